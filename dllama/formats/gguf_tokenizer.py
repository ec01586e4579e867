"""The tokenizer stored in a GGUF (llama.cpp's ``tokenizer.ggml.*`` fields) as ``TokenizerData``."""
from __future__ import annotations

from functools import lru_cache

import gguf

from dllama.errors import FormatError
from dllama.formats.tfile import TokenizerData

# llama.cpp's token types (tokenizer.ggml.token_type).
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6


@lru_cache(maxsize=1)
def gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def byte_level_to_bytes(token: str) -> bytes:
    """A byte-level BPE token's raw bytes; characters outside the table stay as their UTF-8."""
    table = gpt2_unicode_to_byte()
    out = bytearray()
    for ch in token:
        b = table.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def _name(reader: gguf.GGUFReader) -> str:
    return str(getattr(getattr(reader, "data", None), "filename", None) or "GGUF file")


def gguf_field(reader: gguf.GGUFReader, key: str, default=None):
    """A GGUF metadata value as Python data, ``default`` when absent; FormatError when unreadable."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, UnicodeDecodeError, IndexError) as e:
        raise FormatError(f"{_name(reader)}: unreadable GGUF field {key}: {e}") from None


def _ids(reader: gguf.GGUFReader, n: int, *keys: str) -> list[int]:
    out = []
    for key in keys:
        v = gguf_field(reader, key)
        if v is None:
            continue
        v = int(v)
        if not 0 <= v < n:
            raise FormatError(f"{_name(reader)}: {key} {v} is outside the vocabulary of {n}")
        if v not in out:
            out.append(v)
    return out


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> TokenizerData:
    """Read ``tokenizer.ggml.*``: byte-level BPE (``gpt2``) or SentencePiece (``llama``)."""
    name = _name(reader)
    model = gguf_field(reader, "tokenizer.ggml.model")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise FormatError(f"{name}: the GGUF has no tokenizer.ggml.tokens")
    n = len(tokens)
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [TYPE_NORMAL] * n
    if len(types) != n:
        raise FormatError(f"{name}: {len(types)} token types for {n} tokens")
    bos = _ids(reader, n, "tokenizer.ggml.bos_token_id")
    eos_ids = _ids(reader, n, "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                   "tokenizer.ggml.eom_token_id")
    template = gguf_field(reader, "tokenizer.chat_template")
    common = dict(bos_id=bos[0] if bos else -1, eos_ids=eos_ids,
                  chat_template=str(template) if template else None)

    if model == "gpt2":
        special = [i for i, t in enumerate(types) if t in (TYPE_CONTROL, TYPE_USER_DEFINED)]
        special_set = set(special)
        # Control and user-defined tokens are literal text, not byte-level encoded.
        vocab = [t.encode("utf-8") if i in special_set else byte_level_to_bytes(t)
                 for i, t in enumerate(tokens)]
        merges = _merges(reader, tokens, special_set)
        return TokenizerData(
            vocab=vocab, scores=[-float(i) for i in range(n)], kind="bpe",
            pre=str(gguf_field(reader, "tokenizer.ggml.pre", "gpt2")), merges=merges, special_ids=special,
            add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)), add_space_prefix=False,
            **common)
    if model == "llama":
        scores = gguf_field(reader, "tokenizer.ggml.scores") or [0.0] * n
        if len(scores) != n:
            raise FormatError(f"{name}: {len(scores)} token scores for {n} tokens")
        # <unk> (type 2) joins the specials: SentencePiece never produces it from text either.
        special = [i for i, t in enumerate(types) if t in (TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED)]
        vocab = [t.replace("▁", " ").encode("utf-8") for t in tokens]
        return TokenizerData(
            vocab=vocab, scores=[float(s) for s in scores], kind="sentencepiece", pre=None, merges=[],
            special_ids=special, add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True)), **common)
    raise FormatError(f"{name}: tokenizer model {model!r} is not supported (only 'gpt2' and 'llama')")


def _merges(reader: gguf.GGUFReader, tokens: list[str], special: set[int]) -> list[tuple[int, int]]:
    """Merges as id pairs, rank order; a merge naming an unknown token is dropped (it can never fire)."""
    raw = gguf_field(reader, "tokenizer.ggml.merges")
    if not raw:
        raise FormatError(f"{_name(reader)}: a 'gpt2' tokenizer needs tokenizer.ggml.merges")
    index: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if i not in special:
            index.setdefault(t, i)
    out = []
    for m in raw:
        # llama.cpp splits at the first space after the first character.
        cut = m.find(" ", 1)
        if cut < 0:
            raise FormatError(f"{_name(reader)}: bad merge {m!r}")
        left, right = index.get(m[:cut]), index.get(m[cut + 1:])
        if left is not None and right is not None:
            out.append((left, right))
    return out
