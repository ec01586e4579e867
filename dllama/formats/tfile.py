"""distributed-llama tokenizer files (``.t``) and the dllama sidecar that completes them.

``.t`` layout (little-endian, as distributed-llama reads it):

* int32 magic ``0x567124``; int32 header size H in bytes, counting the magic and itself;
* (H - 8) / 8 pairs of int32 ``(key, value)``: 0 version (must be 1), 1 vocab size, 2 max token
  length, 3 bos id, 4 eos id (old files; appended to the eos list), 5 pad id (ignored), 6 chat eos
  id (old files; appended to the eos list), 7 chat template length in bytes, 8 chat stop length
  (that many bytes after the header are skipped), 9 number of eos ids, 10 add bos (0/1);
* the chat template (UTF-8), then the eos ids (int32 each);
* per token: float32 score, uint32 length, the token's raw bytes.

The old magic ``0x567123`` is followed by a fixed header (uint32 vocab size, uint32 max token
length, int32 bos id, int32 eos id, int32 pad id) and the tokens; it is read, never written.

Token bytes are raw bytes: GPT-2 byte-level characters are mapped back to the bytes they stand
for, SentencePiece's ``▁`` is a plain space and its byte tokens stay as the text ``<0xXX>``.

distributed-llama refuses unknown header keys, so what a ``.t`` cannot hold lives in a sidecar
JSON file next to it, ``<name>.t.json`` (UTF-8)::

    {
      "format": "dllama-tokenizer-sidecar",   # fixed
      "version": 1 | 2,                       # readers refuse versions they do not know (below)
      "vocab_size": 49152,                    # must equal the .t's vocab size
      "kind": "bpe" | "sentencepiece",        # byte-level BPE by merge rank, or SentencePiece
      "pre": "smollm" | null,                 # llama.cpp's tokenizer.ggml.pre (BPE pre-tokenizer)
      "merges": [[left_id, right_id], ...],   # merges, lowest rank first; for sentencepiece (version
                                              # 2 only), when present, they replace the scores (HF's
                                              # BPE with byte fallback); [] = merge by score
      "special_ids": [0, 1, ...],             # control tokens (and GGUF user-defined ones): from
                                              # text only with allow_special
      "add_space_prefix": false,              # SentencePiece: prepend a space to the text
      # version 2 only; optional, absent = the default shown:
      "added_ids": [151665, ...],             # [] - tokens always cut out of text, even plain text
                                              #      (HF's non-special added tokens)
      "normalizer": "NFC",                    # null - Unicode normal form applied to text parts
                                              #      ("NFC", "NFD", "NFKC", "NFKD")
      "ignore_merges": true,                  # null - a word that is a token is that token; null:
                                              #      true for the llama3 family only
      "prepend_scheme": "first",              # null - where add_space_prefix puts its space: null
                                              #      at the start and after each special or added
                                              #      token (SentencePiece/llama.cpp); "always" or
                                              #      "first" as HF's Metaspace (no space before
                                              #      text that starts with one; "first": only at
                                              #      the very start of the input)
      "lstrip_ids": [32007, ...],             # [] - special/added tokens that take the white space
      "rstrip_ids": [32007, ...]              # [] - before (lstrip) / after (rstrip) them, as HF's
                                              #      AddedToken lstrip/rstrip (Phi-3)
    }

Versions: every field of version 2 changes how text is tokenized, and a reader that knows only
version 1 would skip the fields it does not know and tokenize differently without a word. So a
sidecar is written as version 2 when it needs any of them (one of the version 2 fields differs from
its default, or kind ``sentencepiece`` has merges), and as version 1 otherwise, byte for byte as
before (plain byte-level BPE and SentencePiece by score, e.g. Llama 3 and Llama 2, stay version 1).
The optional fields are written only when they differ from their default. Both versions are read;
a version 1 document that holds a version 2 field, or merges for kind ``sentencepiece``, is refused
(version 1 means version 1's tokenization), as is any other version.

A ``.t`` without a sidecar (written by distributed-llama's own converter) still loads, as kind
``legacy``: it is tokenized the way distributed-llama does it, by merge scores.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dllama.errors import FormatError
from dllama.formats.atomic import write_bytes_atomic

MAGIC = 0x567124
OLD_MAGIC = 0x567123
SIDECAR_FORMAT = "dllama-tokenizer-sidecar"
SIDECAR_VERSIONS = (1, 2)
SIDECAR_VERSION = SIDECAR_VERSIONS[-1]  # the newest
# Fields version 1 does not have: each changes how text is tokenized.
V2_FIELDS = ("added_ids", "normalizer", "ignore_merges", "prepend_scheme", "lstrip_ids", "rstrip_ids")
KINDS = ("bpe", "sentencepiece", "legacy")
NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")
PREPEND_SCHEMES = ("always", "first")

KEY_VERSION = 0
KEY_VOCAB_SIZE = 1
KEY_MAX_TOKEN_LENGTH = 2
KEY_BOS_ID = 3
KEY_EOS_ID = 4
KEY_PAD_ID = 5
KEY_CHAT_EOS_ID = 6
KEY_CHAT_TEMPLATE = 7
KEY_CHAT_STOP = 8
KEY_N_EOS_TOKENS = 9
KEY_ADD_BOS = 10
_KNOWN_KEYS = range(11)

# distributed-llama allocates vocab and string buffers from these; far larger values mean a
# corrupt file, and refusing them keeps a bad header from asking for gigabytes.
MAX_VOCAB_SIZE = 1 << 24
MAX_TOKEN_BYTES = 1 << 16


@dataclass
class TokenizerData:
    """Everything a tokenizer needs, as read from ``.t`` (+ sidecar) or GGUF."""

    vocab: list[bytes]
    scores: list[float] | np.ndarray
    bos_id: int = -1
    eos_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    add_bos: bool = False
    kind: str = "legacy"
    pre: str | None = None
    merges: list[tuple[int, int]] = field(default_factory=list)
    special_ids: list[int] = field(default_factory=list)
    add_space_prefix: bool = False
    added_ids: list[int] = field(default_factory=list)
    normalizer: str | None = None
    ignore_merges: bool | None = None
    prepend_scheme: str | None = None
    lstrip_ids: list[int] = field(default_factory=list)
    rstrip_ids: list[int] = field(default_factory=list)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path) + ".json")


class _Cursor:
    """Reads little-endian values from a buffer; running off its end is a FormatError."""

    def __init__(self, buf: bytes, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(f"{self.path}: truncated tokenizer file (while reading {what})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def ints(self, n: int, what: str) -> tuple[int, ...]:
        return struct.unpack(f"<{n}i", self.take(4 * n, what))


def read_tokenizer(path: str | os.PathLike) -> TokenizerData:
    """Read a ``.t`` file and, when present, its ``.t.json`` sidecar."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read tokenizer file: {e.strerror or e}") from None
    data = _read_t(buf, path)
    side = sidecar_path(path)
    if side.exists():
        _apply_sidecar(data, side)
    return data


def _read_t(buf: bytes, path: Path) -> TokenizerData:
    cur = _Cursor(buf, path)
    (magic,) = cur.ints(1, "magic")
    eos_ids: list[int] = []
    chat_template: str | None = None
    add_bos = True  # distributed-llama adds BOS unless the header says otherwise
    if magic == OLD_MAGIC:
        vocab_size, max_len = struct.unpack("<2I", cur.take(8, "header"))
        bos_id, eos_id, _pad = cur.ints(3, "header")
        if eos_id != -1:
            eos_ids.append(eos_id)
    elif magic == MAGIC:
        (header_size,) = cur.ints(1, "header size")
        if header_size < 8 or (header_size - 8) % 8 != 0:
            raise FormatError(f"{path}: bad tokenizer header size {header_size}")
        kv = cur.ints((header_size - 8) // 4, "header")
        version = vocab_size = max_len = None
        bos_id = -1
        template_len = n_eos = skip = 0
        for key, value in zip(kv[::2], kv[1::2]):
            if key not in _KNOWN_KEYS:
                raise FormatError(f"{path}: unknown tokenizer header key {key}")
            if key == KEY_VERSION:
                version = value
            elif key == KEY_VOCAB_SIZE:
                vocab_size = value
            elif key == KEY_MAX_TOKEN_LENGTH:
                max_len = value
            elif key == KEY_BOS_ID:
                bos_id = value
            elif key in (KEY_EOS_ID, KEY_CHAT_EOS_ID):
                if value != -1:
                    eos_ids.append(value)
            elif key == KEY_CHAT_TEMPLATE:
                template_len = value
            elif key == KEY_CHAT_STOP:
                skip += value  # distributed-llama seeks past it before reading the template
            elif key == KEY_N_EOS_TOKENS:
                n_eos = value
            elif key == KEY_ADD_BOS:
                if value not in (0, 1):
                    raise FormatError(f"{path}: add-bos header value {value} is not 0 or 1")
                add_bos = value == 1
        if version is None:
            raise FormatError(f"{path}: tokenizer header has no version key")
        if version != 1:
            raise FormatError(f"{path}: tokenizer version {version} is not supported (expected 1)")
        if vocab_size is None or max_len is None:
            raise FormatError(f"{path}: tokenizer header lacks the vocab size or max token length")
        for name, value in (("chat template length", template_len), ("chat stop length", skip),
                            ("eos count", n_eos)):
            if value < 0:
                raise FormatError(f"{path}: negative {name} {value}")
        cur.take(skip, "chat stop")
        if template_len > 0:
            raw = cur.take(template_len, "chat template")
            try:
                chat_template = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{path}: the chat template is not valid UTF-8") from None
        if n_eos > MAX_VOCAB_SIZE:
            raise FormatError(f"{path}: absurd eos count {n_eos}")
        eos_ids.extend(cur.ints(n_eos, "eos ids"))
    else:
        raise FormatError(f"{path}: not a distributed-llama tokenizer file (magic 0x{magic & 0xFFFFFFFF:x})")

    if not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise FormatError(f"{path}: bad vocab size {vocab_size}")
    if not 1 <= max_len <= MAX_TOKEN_BYTES:
        raise FormatError(f"{path}: bad max token length {max_len}")
    if not -1 <= bos_id < vocab_size:
        raise FormatError(f"{path}: bos id {bos_id} is outside the vocabulary of {vocab_size}")
    for e in eos_ids:
        if not 0 <= e < vocab_size:
            raise FormatError(f"{path}: eos id {e} is outside the vocabulary of {vocab_size}")

    vocab, scores = _read_tokens(cur, vocab_size, max_len)
    if cur.pos != len(buf):
        raise FormatError(f"{path}: {len(buf) - cur.pos} unexpected bytes after the last token")
    return TokenizerData(vocab=vocab, scores=scores, bos_id=bos_id, eos_ids=list(dict.fromkeys(eos_ids)),
                         chat_template=chat_template, add_bos=add_bos, kind="legacy")


def _read_tokens(cur: _Cursor, vocab_size: int, max_len: int) -> tuple[list[bytes], np.ndarray]:
    buf, pos, end = cur.buf, cur.pos, len(cur.buf)
    vocab: list[bytes] = []
    scores = np.empty(vocab_size, dtype=np.float32)
    unpack = struct.Struct("<fI").unpack_from
    for i in range(vocab_size):
        if pos + 8 > end:
            raise FormatError(f"{cur.path}: truncated tokenizer file (at token {i} of {vocab_size})")
        score, length = unpack(buf, pos)
        pos += 8
        if length > max_len:
            raise FormatError(f"{cur.path}: token {i} is {length} bytes, over the max token length {max_len}")
        if pos + length > end:
            raise FormatError(f"{cur.path}: truncated tokenizer file (in token {i} of {vocab_size})")
        vocab.append(buf[pos:pos + length])
        scores[i] = score
        pos += length
    cur.pos = pos
    return vocab, scores


def _apply_sidecar(data: TokenizerData, side: Path) -> None:
    try:
        doc = json.loads(side.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise FormatError(f"{side}: unreadable tokenizer sidecar: {e}") from None

    def bad(problem: str) -> FormatError:
        return FormatError(f"{side}: {problem}")

    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT:
        raise bad(f"not a tokenizer sidecar (format is not {SIDECAR_FORMAT!r})")
    version = doc.get("version")
    if type(version) is not int or version not in SIDECAR_VERSIONS:
        raise bad(f"sidecar version {version!r} is not supported (expected "
                  f"{' or '.join(map(str, SIDECAR_VERSIONS))})")
    n = len(data.vocab)
    if type(doc.get("vocab_size")) is not int or doc.get("vocab_size") != n:
        raise bad(f"sidecar is for {doc.get('vocab_size')!r} tokens, the .t file has {n}")
    kind = doc.get("kind")
    if kind not in ("bpe", "sentencepiece"):
        raise bad(f"unknown tokenizer kind {kind!r}")
    pre = doc.get("pre")
    if pre is not None and not isinstance(pre, str):
        raise bad("'pre' is not a string")
    add_space_prefix = doc.get("add_space_prefix", False)
    if not isinstance(add_space_prefix, bool):
        raise bad("'add_space_prefix' is not true/false")
    merges = doc.get("merges", [])
    special = doc.get("special_ids", [])
    if not isinstance(merges, list) or not isinstance(special, list):
        raise bad("'merges' and 'special_ids' must be lists")

    def is_id(x: object) -> bool:
        return type(x) is int and 0 <= x < n

    pairs: list[tuple[int, int]] = []
    for m in merges:
        if not (isinstance(m, list) and len(m) == 2 and is_id(m[0]) and is_id(m[1])):
            raise bad(f"bad merge {m!r} (expected [left_id, right_id] below {n})")
        pairs.append((m[0], m[1]))
    if not all(is_id(s) for s in special):
        raise bad(f"a special id is not a token id below {n}")
    if kind == "bpe" and "merges" not in doc:
        raise bad("a bpe tokenizer needs its merges")
    if version == 1:
        newer = [key for key in V2_FIELDS if key in doc]
        if newer:
            raise bad(f"{newer[0]!r} is a version 2 field, but the sidecar says version 1")
        if kind == "sentencepiece" and pairs:
            raise bad("merges for kind sentencepiece need sidecar version 2 (version 1 merges it by score)")
    added = doc.get("added_ids", [])
    if not isinstance(added, list) or not all(is_id(a) for a in added):
        raise bad(f"'added_ids' must be a list of token ids below {n}")
    if set(added) & set(special):
        raise bad("a token id is in both 'special_ids' and 'added_ids'")
    normalizer = doc.get("normalizer")
    if normalizer is not None and normalizer not in NORMALIZERS:
        raise bad(f"unknown normalizer {normalizer!r} (known: {', '.join(NORMALIZERS)})")
    ignore_merges = doc.get("ignore_merges")
    if ignore_merges is not None and not isinstance(ignore_merges, bool):
        raise bad("'ignore_merges' is not true/false/null")
    prepend_scheme = doc.get("prepend_scheme")
    if prepend_scheme is not None and prepend_scheme not in PREPEND_SCHEMES:
        raise bad(f"unknown prepend_scheme {prepend_scheme!r} (known: {', '.join(PREPEND_SCHEMES)})")
    strips = {}
    for key in ("lstrip_ids", "rstrip_ids"):
        ids = doc.get(key, [])
        if not isinstance(ids, list) or not all(is_id(i) for i in ids):
            raise bad(f"{key!r} must be a list of token ids below {n}")
        strips[key] = sorted(set(ids))
    data.kind = kind
    data.pre = pre
    data.merges = pairs
    data.special_ids = sorted(set(special))
    data.add_space_prefix = add_space_prefix
    data.added_ids = sorted(set(added))
    data.normalizer = normalizer
    data.ignore_merges = ignore_merges
    data.prepend_scheme = prepend_scheme
    data.lstrip_ids = strips["lstrip_ids"]
    data.rstrip_ids = strips["rstrip_ids"]


def _t_bytes(data: TokenizerData) -> bytes:
    n = len(data.vocab)
    if n == 0:
        raise ValueError("a tokenizer needs at least one token")
    scores = np.asarray(data.scores, dtype=np.float32)
    if scores.shape != (n,):
        raise ValueError(f"{scores.size} scores for {n} tokens")
    if np.isnan(scores).any():
        raise ValueError("a token score is NaN")
    eos_ids = list(dict.fromkeys(int(e) for e in data.eos_ids))
    for i, tok in enumerate(data.vocab):
        # distributed-llama cannot read a zero-length token (its fread of 0 bytes fails).
        if not tok:
            raise ValueError(f"token {i} is empty; distributed-llama cannot read empty tokens")
    template = (data.chat_template or "").encode("utf-8")
    kv = [(KEY_VERSION, 1), (KEY_VOCAB_SIZE, n), (KEY_MAX_TOKEN_LENGTH, max(map(len, data.vocab))),
          (KEY_BOS_ID, data.bos_id)]
    if template:
        kv.append((KEY_CHAT_TEMPLATE, len(template)))
    kv += [(KEY_N_EOS_TOKENS, len(eos_ids)), (KEY_ADD_BOS, int(bool(data.add_bos)))]
    parts = [struct.pack("<2i", MAGIC, 8 + 8 * len(kv))]
    parts += [struct.pack("<2i", k, v) for k, v in kv]
    parts.append(template)
    parts.append(struct.pack(f"<{len(eos_ids)}i", *eos_ids))
    pack = struct.Struct("<fI").pack
    for tok, score in zip(data.vocab, scores.tolist()):
        parts.append(pack(score, len(tok)))
        parts.append(tok)
    return b"".join(parts)


def _sidecar_bytes(data: TokenizerData) -> bytes:
    doc = {
        "format": SIDECAR_FORMAT,
        "version": 1,  # 2 below when the document needs it
        "vocab_size": len(data.vocab),
        "kind": data.kind,
        "pre": data.pre,
        "merges": [[int(a), int(b)] for a, b in data.merges],
        "special_ids": sorted({int(s) for s in data.special_ids}),
        "add_space_prefix": bool(data.add_space_prefix),
    }
    if data.added_ids:
        doc["added_ids"] = sorted({int(a) for a in data.added_ids})
    if data.normalizer is not None:
        doc["normalizer"] = data.normalizer
    if data.ignore_merges is not None:
        doc["ignore_merges"] = bool(data.ignore_merges)
    if data.prepend_scheme is not None:
        doc["prepend_scheme"] = data.prepend_scheme
    for key in ("lstrip_ids", "rstrip_ids"):
        ids = getattr(data, key)
        if ids:
            doc[key] = sorted({int(i) for i in ids})
    if any(key in doc for key in V2_FIELDS) or (data.kind == "sentencepiece" and doc["merges"]):
        doc["version"] = 2
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def write_tokenizer(path: str | os.PathLike, data: TokenizerData) -> None:
    """Write ``path`` (the ``.t``) and ``path + '.json'`` (the sidecar; removed for kind ``legacy``)."""
    if data.kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {data.kind!r}")
    if data.normalizer is not None and data.normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {data.normalizer!r}")
    if data.prepend_scheme is not None and data.prepend_scheme not in PREPEND_SCHEMES:
        raise ValueError(f"unknown prepend_scheme {data.prepend_scheme!r}")
    n = len(data.vocab)
    for key in ("added_ids", "lstrip_ids", "rstrip_ids"):
        if not all(0 <= int(a) < n for a in getattr(data, key)):
            raise ValueError(f"{key}: an id is outside the vocabulary of {n}")
    if set(map(int, data.added_ids)) & set(map(int, data.special_ids)):
        raise ValueError("a token id is both special and added")
    path = Path(path)
    t_payload = _t_bytes(data)
    side = sidecar_path(path)
    if data.kind == "legacy":
        write_bytes_atomic(path, t_payload)
        # A stale sidecar would re-label this file as something it is not.
        side.unlink(missing_ok=True)
        return
    write_bytes_atomic(side, _sidecar_bytes(data))
    write_bytes_atomic(path, t_payload)
