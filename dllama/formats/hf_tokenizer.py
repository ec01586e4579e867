"""A Hugging Face model folder's tokenizer as ``TokenizerData``, tokenizing exactly as the source.

``tokenizer_from_hf(folder)`` reads:

* ``tokenizer.json`` (the ``tokenizers`` library's format) when present, model ``BPE`` only:

  - byte-level BPE (a ``ByteLevel`` pre-tokenizer) becomes kind ``bpe``. The pre-tokenizer must
    be one of the known families, recognized by structure: ``ByteLevel(use_regex=true)`` alone
    (gpt2); ``Digits(individual_digits=true)`` + ``ByteLevel(use_regex=true)`` (smollm); or a
    ``Split`` by Llama 3's regex (llama3), by the same with ``\\p{N}`` for ``\\p{N}{1,3}``
    (qwen2) or by GPT-2's regex (gpt2), isolated, then ``ByteLevel(use_regex=false)``. The
    normalizer may be none or one Unicode normal form (NFC for Qwen). The model's
    ``ignore_merges`` is kept (as null, the engine's default, when it is the family's default:
    true for llama3 only; so a plain file still gets a version 1 sidecar).
  - SentencePiece-style BPE (byte fallback; a ``Metaspace`` pre-tokenizer with ``split=false``,
    or no pre-tokenizer and the normalizers ``Prepend("▁")`` + ``Replace(" ", "▁")``: Llama 2,
    Mistral) becomes kind ``sentencepiece`` with the file's merges (by rank, as HF applies them)
    and scores derived from them for distributed-llama (a token's score is minus the rank of the
    first merge that builds it; tokens no merge builds get -1e10, which distributed-llama never
    merges into).
  - added tokens: ``special: true`` ones are special (from text only with ``allow_special``),
    the others are cut out of any text (``added_ids``), as HF does. Their bytes are their literal
    text. Their ids are checked against the ids ``tokenizers`` itself gives them on loading (it
    ignores the ids written in the file). ``lstrip``/``rstrip`` are kept (``lstrip_ids``,
    ``rstrip_ids``: the token takes the white space before/after it); ``single_word`` tokens, and
    ``normalized`` tokens under a normalizer, are refused.

* ``tokenizer.model`` (a SentencePiece ``ModelProto``, Llama 2) when there is no
  ``tokenizer.json`` or that file is not usable (then a warning on stderr says why: token ids may
  differ from Hugging Face's fast tokenizer): BPE models with byte fallback, the identity
  normalization and ``remove_extra_whitespaces=false`` (read here with a small protobuf reader;
  the ``sentencepiece`` package is not needed). Its ``add_dummy_prefix`` is kept.
  ``tokenizer_config.json``'s ``legacy: false`` (transformers' LlamaTokenizer, PR #24565) is
  honoured: the model's dummy prefix is off, a space goes only before the start of the input
  (``add_prefix_space``, default true) and text after a special token gets none; that is the
  fast tokenizer transformers builds from it (Metaspace ``prepend_scheme="first"``), so
  ``prepend_scheme`` "first" (the slow LlamaTokenizer differs from it only for input that starts
  with a space, to which it adds a second one). With ``legacy`` true or absent, an
  ``add_prefix_space`` that disagrees with ``add_dummy_prefix`` is refused (the slow tokenizer
  follows the model, the fast one the config).

* ``tokenizer_config.json``: ``bos_token``, ``eos_token`` (text or ``{"content": ...}``),
  ``add_bos_token`` (when absent: whether the ``tokenizer.json`` post-processor puts the bos token
  first; a ``tokenizer.model`` adds it), ``chat_template`` (text, or a list of named templates of
  which "default" is taken); a ``chat_template.jinja`` file in the folder wins over it, a
  ``chat_template.json`` is used when neither has one. ``generation_config.json``'s
  ``eos_token_id`` (one id or a list) adds end-of-sequence ids after the eos token's.

* Post-processing that appends a token to every encoding is refused, as the engine never appends
  one to a prompt: ``add_eos_token: true`` in ``tokenizer_config.json``, and a ``tokenizer.json``
  post-processor whose single-sequence template puts a special token after ``$A`` (or a
  ``BertProcessing``/``RobertaProcessing``, which append their sep token). Such a post-processor
  is refused even when a ``tokenizer.model`` is there to fall back on.

The vocabulary size is the highest id plus one. Ids nothing names (holes), and tokens whose text
is empty (a ``.t`` cannot hold them), become special placeholder tokens ``<|dllama_unused_N|>``
(N the id): never produced from text, harmless to the model.

Every bad or unsupported input is a ``FormatError`` of one line that names the file.
"""
from __future__ import annotations

import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dllama.errors import FormatError
from dllama.formats.gguf_tokenizer import byte_level_to_bytes, gpt2_unicode_to_byte
from dllama.formats.tfile import (
    MAX_TOKEN_BYTES,
    MAX_VOCAB_SIZE,
    NORMALIZERS,
    TokenizerData,
)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"

# The Split regexes of the known pre-tokenizer families, exactly as HF's files spell them.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_FAMILIES = {LLAMA3_REGEX: "llama3", QWEN2_REGEX: "qwen2", GPT2_REGEX: "gpt2"}

# distributed-llama merges only pairs scoring above -1e10.
UNMERGEABLE_SCORE = -1e10
_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# SentencePiece piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def placeholder(token_id: int) -> bytes:
    """The special token that fills an id the source leaves empty."""
    return f"<|dllama_unused_{token_id}|>".encode()


@dataclass
class _Core:
    """What the tokenizer file gives; the config files complete it."""

    tokens: dict[int, bytes]
    scores: dict[int, float]
    kind: str
    by_text: dict[str, int]  # token text (as the config files spell it) -> id
    special: set[int] = field(default_factory=set)
    added: set[int] = field(default_factory=set)
    lstrip: set[int] = field(default_factory=set)
    rstrip: set[int] = field(default_factory=set)
    pre: str | None = None
    merges: list[tuple[int, int]] = field(default_factory=list)
    normalizer: str | None = None
    ignore_merges: bool | None = None
    add_space_prefix: bool = False
    prepend_scheme: str | None = None
    default_bos: int = -1
    default_eos: int = -1
    default_add_bos: bool = False
    template_first: str | None = None  # the special token the post-processor puts first
    from_model: bool = False  # read from a tokenizer.model


class _NoFallback(FormatError):
    """A tokenizer.json problem that falling back on tokenizer.model would hide."""


def tokenizer_from_hf(folder: str | Path) -> TokenizerData:
    """The tokenizer of a Hugging Face model folder (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder (expected a Hugging Face model folder with "
                          f"{TOKENIZER_JSON} or {TOKENIZER_MODEL})")
    config_path = folder / TOKENIZER_CONFIG
    config = _optional_json_object(config_path)
    tj, tm = folder / TOKENIZER_JSON, folder / TOKENIZER_MODEL
    if tj.exists():
        try:
            core = _from_tokenizer_json(tj)
        except FormatError as e:
            if not tm.exists() or isinstance(e, _NoFallback):
                raise
            try:
                core = _from_sentencepiece_model(tm)
            except FormatError as e2:
                raise FormatError(f"{e}; falling back on {TOKENIZER_MODEL} failed too: {e2}") from None
            print(f"⚠️  not using {_one_line(str(e))}; using {tm} instead, whose token ids may differ "
                  f"from Hugging Face's fast tokenizer", file=sys.stderr)
    elif tm.exists():
        core = _from_sentencepiece_model(tm)
    else:
        raise FormatError(f"{folder}: no {TOKENIZER_JSON} or {TOKENIZER_MODEL} in the folder")
    if core.from_model:  # a tokenizer.model: the config may add tokens (tokenizer.json lists its own)
        _apply_added_tokens_decoder(core, config, config_path)
        _apply_legacy(core, config, config_path, tm)
    return _finish(core, folder, config, config_path)


# --- JSON helpers ---------------------------------------------------------------------------------
def _load_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise FormatError(f"{path}: not valid JSON: {_one_line(str(e))}") from None


def _optional_json_object(path: Path) -> dict:
    if not path.exists():
        return {}
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return doc


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(node) -> str:
    """A compact one-line rendering of a JSON node, for error messages."""
    if isinstance(node, dict) and isinstance(node.get("type"), str):
        args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in node.items() if k != "type")
        return f"{node['type']}({args})"
    return json.dumps(node, ensure_ascii=False)


def _flatten(node, key: str, path: Path, what: str) -> list[dict]:
    """A normalizer/pre-tokenizer/post-processor as a flat list (Sequence unpacked, null = [])."""
    if node is None:
        return []
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise FormatError(f"{path}: the {what} is not a JSON object with a type")
    if node["type"] == "Sequence":
        items = node.get(key)
        if not isinstance(items, list):
            raise FormatError(f"{path}: the {what} Sequence has no {key!r} list")
        return [x for item in items for x in _flatten(item, key, path, what)]
    return [node]


def _is_id(x) -> bool:
    return type(x) is int and 0 <= x < MAX_VOCAB_SIZE


# --- tokenizer.json ----------------------------------------------------------------------------------
def _from_tokenizer_json(path: Path) -> _Core:
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: expected a JSON object")
    _refuse_appended_tokens(doc.get("post_processor"), path)
    model = doc.get("model")
    if not isinstance(model, dict):
        raise FormatError(f"{path}: no 'model' object")
    mtype = model.get("type", "BPE" if "merges" in model else None)
    if mtype != "BPE":
        raise FormatError(f"{path}: tokenizer model type {mtype!r} is not supported (only BPE)")
    if model.get("dropout") not in (None, 0, 0.0):
        raise FormatError(f"{path}: BPE dropout {model.get('dropout')!r} is not supported")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, ""):
            raise FormatError(f"{path}: BPE {key} {model.get(key)!r} is not supported")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise FormatError(f"{path}: the BPE model has no vocab object")
    id_to_str: dict[int, str] = {}
    for tok, i in vocab.items():
        if not _is_id(i):
            raise FormatError(f"{path}: token {tok!r} has a bad id {i!r}")
        if i in id_to_str:
            raise FormatError(f"{path}: tokens {id_to_str[i]!r} and {tok!r} share id {i}")
        id_to_str[i] = tok
    merges = _json_merges(model.get("merges", []), vocab, path)
    added = _json_added_tokens(doc.get("added_tokens"), vocab, path)

    normalizers = _flatten(doc.get("normalizer"), "normalizers", path, "normalizer")
    pres = _flatten(doc.get("pre_tokenizer"), "pretokenizers", path, "pre-tokenizer")
    if any(p["type"] == "ByteLevel" for p in pres):
        core = _byte_level(path, model, id_to_str, normalizers, pres)
    elif any(p["type"] == "Metaspace" for p in pres) or (
            not pres and any(n["type"] in ("Replace", "Prepend") for n in normalizers)):
        core = _metaspace(path, model, vocab, id_to_str, normalizers, pres)
    else:
        raise FormatError(f"{path}: pre-tokenizer {_describe(doc.get('pre_tokenizer'))} is not supported "
                          f"(known: ByteLevel; Digits + ByteLevel; Split by the Llama 3, Qwen2 or GPT-2 "
                          f"regex + ByteLevel; Metaspace)")
    core.merges = merges

    for i, content, special, normalized, lstrip, rstrip in added:
        core.tokens[i] = content.encode("utf-8")
        (core.special if special else core.added).add(i)
        if lstrip:
            core.lstrip.add(i)
        if rstrip:
            core.rstrip.add(i)
        if normalized and core.normalizer is not None:
            raise FormatError(f"{path}: added token {content!r} is matched after normalization "
                              f"(normalized: true), which is not supported with a normalizer")
    core.added -= core.special
    # Text -> id as the config files name tokens: added tokens first, then the model's vocab.
    by_text = {t[1]: t[0] for t in added}
    for tok, i in vocab.items():
        by_text.setdefault(tok, i)
    core.by_text = by_text
    if core.kind == "sentencepiece":
        # distributed-llama merges by score: minus the rank of the first merge building a token.
        scores = {i: UNMERGEABLE_SCORE for i in core.tokens}
        built = set()
        for rank, (a, b) in enumerate(merges):
            merged = vocab[id_to_str[a] + id_to_str[b]]
            if merged not in built:
                built.add(merged)
                scores[merged] = -float(rank)
        core.scores = scores
    core.template_first = _template_first(doc.get("post_processor"), path)
    return core


def _json_merges(raw, vocab: dict[str, int], path: Path) -> list[tuple[int, int]]:
    """Merges as id pairs by rank; of repeated pairs the last counts, as in ``tokenizers``."""
    if not isinstance(raw, list):
        raise FormatError(f"{path}: the BPE merges are not a list")
    pairs: list[tuple[str, str]] = []
    for rank, m in enumerate(raw):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise FormatError(f"{path}: merge {rank} {m!r} is not two tokens separated by one space")
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            parts = m
        else:
            raise FormatError(f"{path}: merge {rank} {m!r} is neither 'a b' nor [a, b]")
        a, b = parts
        for tok in (a, b, a + b):
            if tok not in vocab:
                raise FormatError(f"{path}: merge {rank} ({a!r}, {b!r}) names {tok!r}, which is not in the vocab")
        pairs.append((a, b))
    last = {p: r for r, p in enumerate(pairs)}
    return [(vocab[a], vocab[b]) for r, (a, b) in enumerate(pairs) if last[(a, b)] == r]


def _json_added_tokens(raw, vocab: dict[str, int], path: Path) -> list[tuple[int, str, bool, bool, bool, bool]]:
    """(id, content, special, normalized, lstrip, rstrip) per added token, ids checked as ``tokenizers``
    assigns them."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise FormatError(f"{path}: 'added_tokens' is not a list")
    out = []
    given: dict[str, int] = {}  # content -> id, as tokenizers gives them
    vocab_size = len(vocab)
    for t in raw:
        if not (isinstance(t, dict) and _is_id(t.get("id")) and isinstance(t.get("content"), str)):
            raise FormatError(f"{path}: bad added token {_one_line(json.dumps(t, ensure_ascii=False))[:200]}")
        content = t["content"]
        if t.get("single_word"):
            raise FormatError(f"{path}: added token {content!r} has single_word: true, which is not supported")
        special = bool(t.get("special", False))
        normalized = bool(t.get("normalized", not special))
        if not content:
            continue  # tokenizers ignores empty added tokens; the id stays a placeholder
        if content in given:
            expected = given[content]
        elif content in vocab:
            expected = vocab[content]
        else:
            top = max(given.values(), default=None)
            expected = top + 1 if top is not None and top >= vocab_size else vocab_size
        given.setdefault(content, expected)
        if t["id"] != expected:
            raise FormatError(f"{path}: added token {content!r} has id {t['id']}, but tokenizers gives it "
                              f"id {expected} on loading")
        out.append((expected, content, special, normalized, bool(t.get("lstrip")), bool(t.get("rstrip"))))
    return out


def _normal_form(path: Path, normalizers: list[dict]) -> str | None:
    if not normalizers:
        return None
    if len(normalizers) == 1 and normalizers[0]["type"] in NORMALIZERS:
        return normalizers[0]["type"]
    raise FormatError(f"{path}: normalizer {' + '.join(map(_describe, normalizers))} is not supported "
                      f"(only none or one of {', '.join(NORMALIZERS)})")


def _byte_level(path: Path, model: dict, id_to_str: dict[int, str], normalizers: list[dict],
                pres: list[dict]) -> _Core:
    normalizer = _normal_form(path, normalizers)
    described = " + ".join(map(_describe, pres))
    for p in pres:
        if p["type"] == "ByteLevel" and p.get("add_prefix_space", True):
            raise FormatError(f"{path}: pre-tokenizer {described} is not supported "
                              f"(ByteLevel with add_prefix_space)")

    def byte_level(p: dict, use_regex: bool) -> bool:
        return p["type"] == "ByteLevel" and bool(p.get("use_regex", True)) == use_regex

    family = None
    if len(pres) == 1 and byte_level(pres[0], True):
        family = "gpt2"
    elif len(pres) == 2 and byte_level(pres[1], True) and pres[0]["type"] == "Digits" \
            and pres[0].get("individual_digits") is True:
        family = "smollm"
    elif len(pres) == 2 and byte_level(pres[1], False) and pres[0]["type"] == "Split":
        split = pres[0]
        pattern = split.get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if (isinstance(regex, str) and str(split.get("behavior", "")).lower() == "isolated"
                and not split.get("invert", False)):
            family = SPLIT_FAMILIES.get(regex)
    if family is None:
        raise FormatError(f"{path}: pre-tokenizer {described} is not supported (known: ByteLevel; "
                          f"Digits(individual_digits) + ByteLevel; Split by the Llama 3, Qwen2 or GPT-2 "
                          f"regex, isolated, + ByteLevel(use_regex=false))")

    table = gpt2_unicode_to_byte()
    tokens: dict[int, bytes] = {}
    for i, tok in id_to_str.items():
        odd = next((c for c in tok if c not in table), None)
        if odd is not None:
            raise FormatError(f"{path}: token {tok!r} (id {i}) is not byte-level text ({odd!r} stands for "
                              f"no byte)")
        tokens[i] = byte_level_to_bytes(tok)
    missing = [c for c in table if c not in model["vocab"]]
    if missing and (model.get("unk_token") is not None or model.get("byte_fallback")):
        raise FormatError(f"{path}: {len(missing)} bytes have no token and the model has an unk token or "
                          f"byte fallback (not supported)")
    # The family's default (llama3 only) is left to the engine, keeping the sidecar version 1.
    ignore_merges = bool(model.get("ignore_merges", False))
    return _Core(tokens=tokens, scores={}, kind="bpe", by_text={}, pre=family, normalizer=normalizer,
                 ignore_merges=None if ignore_merges == (family == "llama3") else ignore_merges)


def _metaspace(path: Path, model: dict, vocab: dict[str, int], id_to_str: dict[int, str],
               normalizers: list[dict], pres: list[dict]) -> _Core:
    """SentencePiece-style BPE (Llama 2, Mistral): kind sentencepiece with the file's merges."""
    add_space_prefix, scheme, normalizer = False, None, None
    if pres:
        ms = pres[0]
        if len(pres) != 1 or ms.get("replacement") != "\u2581" or ms.get("split", True):
            raise FormatError(f"{path}: pre-tokenizer {' + '.join(map(_describe, pres))} is not supported "
                              f"(only Metaspace with replacement '\u2581' and split false)")
        prepend = ms.get("prepend_scheme")
        if prepend is None:  # older files
            prepend = "always" if ms.get("add_prefix_space", True) else "never"
        if prepend not in ("always", "first", "never"):
            raise FormatError(f"{path}: Metaspace prepend_scheme {prepend!r} is not supported")
        add_space_prefix = prepend != "never"
        scheme = prepend if add_space_prefix else None
        normalizer = _normal_form(path, normalizers)
    else:
        kinds = sorted(n["type"] for n in normalizers)
        prepend_ok = all(n.get("prepend") == "\u2581" for n in normalizers if n["type"] == "Prepend")
        replace_ok = all(n.get("pattern") == {"String": " "} and n.get("content") == "\u2581"
                         for n in normalizers if n["type"] == "Replace")
        if kinds not in (["Prepend", "Replace"], ["Replace"]) or not (prepend_ok and replace_ok):
            raise FormatError(f"{path}: normalizer {' + '.join(map(_describe, normalizers))} is not supported "
                              f"(for SentencePiece-style BPE: Prepend('\u2581') + Replace(' ', '\u2581'))")
        add_space_prefix = "Prepend" in kinds
    if not model.get("byte_fallback"):
        raise FormatError(f"{path}: SentencePiece-style BPE without byte_fallback is not supported")
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise FormatError(f"{path}: byte fallback token <0x{missing[0]:02X}> is not in the vocab")
    tokens: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for i, tok in id_to_str.items():
        raw = tok.encode("utf-8") if _SPM_BYTE.fullmatch(tok) else tok.replace("\u2581", " ").encode("utf-8")
        if raw in seen:
            raise FormatError(f"{path}: tokens {id_to_str[seen[raw]]!r} and {tok!r} are the same text")
        seen[raw] = i
        tokens[i] = raw
    return _Core(tokens=tokens, scores={}, kind="sentencepiece", by_text={}, normalizer=normalizer,
                 ignore_merges=bool(model.get("ignore_merges", False)) or None, add_space_prefix=add_space_prefix,
                 prepend_scheme=scheme)


def _refuse_appended_tokens(post, path: Path) -> None:
    """A post-processor that appends a token (an EOS) to every encoding is refused."""
    for p in _flatten(post, "processors", path, "post-processor"):
        appended = None
        if p["type"] == "TemplateProcessing":
            single = p.get("single")
            items = single if isinstance(single, list) else []
            seen_a = False
            for item in items:
                if not isinstance(item, dict):
                    continue
                if "Sequence" in item:
                    seen_a = True
                elif seen_a and isinstance(item.get("SpecialToken"), dict):
                    appended = item["SpecialToken"].get("id")
                    break
        elif p["type"] in ("BertProcessing", "RobertaProcessing"):
            sep = p.get("sep")
            appended = sep[0] if isinstance(sep, list) and sep else sep
        if appended is not None:
            raise _NoFallback(f"{path}: post-processor {p['type']} appends {appended!r} to every encoding, which is "
                              f"not supported (the engine never appends it to a prompt)")


def _template_first(post, path: Path) -> str | None:
    """The special token a TemplateProcessing post-processor puts first in a single sequence."""
    for p in _flatten(post, "processors", path, "post-processor"):
        if p["type"] != "TemplateProcessing":
            continue
        single = p.get("single")
        if isinstance(single, list) and single and isinstance(single[0], dict):
            first = single[0].get("SpecialToken")
            if isinstance(first, dict) and isinstance(first.get("id"), str):
                return first["id"]
        return None
    return None


# --- tokenizer.model (SentencePiece protobuf) --------------------------------------------------------
def _varint(buf: bytes, pos: int, path: Path) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if pos >= len(buf):
            raise FormatError(f"{path}: truncated SentencePiece model (protobuf varint)")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise FormatError(f"{path}: not a SentencePiece model (bad protobuf varint)")


def _proto_fields(buf: bytes, path: Path) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a protobuf message."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos, path)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise FormatError(f"{path}: not a SentencePiece model (protobuf field number 0)")
        if wire == 0:
            value, pos = _varint(buf, pos, path)
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise FormatError(f"{path}: truncated SentencePiece model")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos, path)
            if pos + size > end:
                raise FormatError(f"{path}: truncated SentencePiece model")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise FormatError(f"{path}: not a SentencePiece model (protobuf wire type {wire})")
        out.append((number, wire, value))
    return out


def _message(fields: list, number: int, path: Path, what: str) -> list:
    """The fields of the (last) sub-message ``number``; [] when absent."""
    found = [(w, v) for n, w, v in fields if n == number]
    if not found:
        return []
    wire, value = found[-1]
    if wire != 2:
        raise FormatError(f"{path}: not a SentencePiece model (bad {what})")
    return _proto_fields(value, path)


def _scalar(fields: list, number: int, default: int) -> int:
    """A varint field (last wins), as a signed 64-bit number."""
    value = default
    for n, w, v in fields:
        if n == number and w == 0:
            value = v - (1 << 64) if v >= 1 << 63 else v
    return value


def _text(fields: list, number: int, path: Path, what: str) -> str:
    value = b""
    for n, w, v in fields:
        if n == number and w == 2:
            value = v
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not a SentencePiece model ({what} is not UTF-8)") from None


def _from_sentencepiece_model(path: Path) -> _Core:
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    fields = _proto_fields(buf, path)
    trainer = _message(fields, 2, path, "trainer spec")
    norm = _message(fields, 3, path, "normalizer spec")
    if any(n == 1 and w != 2 for n, w, _ in fields):
        raise FormatError(f"{path}: not a SentencePiece model (bad piece)")
    pieces = [(i, _proto_fields(v, path)) for i, v in enumerate(v for n, w, v in fields if n == 1)]
    if not pieces:
        raise FormatError(f"{path}: not a SentencePiece model (no pieces)")
    if len(pieces) > MAX_VOCAB_SIZE:
        raise FormatError(f"{path}: absurd number of pieces {len(pieces)}")

    model_type = _scalar(trainer, 3, 1)
    if model_type != 2:
        name = {1: "unigram", 3: "word", 4: "char"}.get(model_type, str(model_type))
        raise FormatError(f"{path}: SentencePiece model type {name} is not supported (only BPE)")
    if _scalar(trainer, 24, 0):
        raise FormatError(f"{path}: treat_whitespace_as_suffix is not supported")
    rule = _text(norm, 1, path, "the normalization rule name")
    charsmap = [v for n, w, v in norm if n == 2 and w == 2 and v]
    if charsmap:
        raise FormatError(f"{path}: normalization rule {rule or 'custom'!r} is not supported (only identity)")
    if _scalar(norm, 4, 1):
        raise FormatError(f"{path}: remove_extra_whitespaces is not supported")
    if not _scalar(norm, 5, 1):
        raise FormatError(f"{path}: escape_whitespaces false is not supported")

    tokens: dict[int, bytes] = {}
    scores: dict[int, float] = {}
    special: set[int] = set()
    by_text: dict[str, int] = {}
    seen: dict[bytes, int] = {}
    byte_pieces = set()
    for i, pf in pieces:
        text = _text(pf, 1, path, f"piece {i}")
        kind = _scalar(pf, 3, _NORMAL)
        score = 0.0
        for n, w, v in pf:
            if n == 2 and w == 5:
                (score,) = struct.unpack("<f", v)
        if not text:
            raise FormatError(f"{path}: piece {i} is empty")
        if kind in (_UNKNOWN, _CONTROL):
            raw = text.encode("utf-8")
            special.add(i)
        elif kind == _BYTE:
            m = _SPM_BYTE.fullmatch(text)
            if not m:
                raise FormatError(f"{path}: byte piece {i} {text!r} is not <0xXX>")
            byte_pieces.add(int(m.group(1), 16))
            raw = text.encode("utf-8")
        elif kind == _NORMAL:
            raw = text.replace("\u2581", " ").encode("utf-8")
        else:
            name = {_USER_DEFINED: "user-defined", _UNUSED: "unused"}.get(kind, f"type {kind}")
            raise FormatError(f"{path}: piece {i} {text!r} is {name}, which is not supported")
        if raw in seen and i not in special:
            raise FormatError(f"{path}: pieces {seen[raw]} and {i} are both {text!r}")
        seen.setdefault(raw, i)
        tokens[i] = raw
        scores[i] = score
        by_text.setdefault(text, i)
    if len(byte_pieces) != 256:
        raise FormatError(f"{path}: the model lacks byte fallback pieces (<0x00>..<0xFF>), not supported")
    n = len(pieces)

    def ident(number: int, default: int) -> int:
        v = _scalar(trainer, number, default)
        return v if 0 <= v < n else -1

    return _Core(tokens=tokens, scores=scores, kind="sentencepiece", by_text=by_text, special=special,
                 add_space_prefix=bool(_scalar(norm, 3, 1)), default_bos=ident(41, 1), default_eos=ident(42, 2),
                 default_add_bos=True, from_model=True)


def _apply_added_tokens_decoder(core: _Core, config: dict, path: Path) -> None:
    """tokenizer_config.json's added_tokens_decoder ({"id": {"content", "special"}}) over a tokenizer.model."""
    decoder = config.get("added_tokens_decoder")
    if decoder is None:
        return
    if not isinstance(decoder, dict):
        raise FormatError(f"{path}: 'added_tokens_decoder' is not an object")
    for key, t in decoder.items():
        if not (isinstance(key, str) and key.isdigit() and _is_id(int(key)) and isinstance(t, dict)
                and isinstance(t.get("content"), str)):
            raise FormatError(f"{path}: bad added_tokens_decoder entry {key!r}")
        i, content = int(key), t["content"]
        if t.get("single_word"):
            raise FormatError(f"{path}: added token {content!r} has single_word: true, which is not supported")
        if i in core.tokens:
            if core.by_text.get(content) != i:
                raise FormatError(f"{path}: added token {content!r} has id {i}, which the tokenizer gives to "
                                  f"another piece")
        elif not content:
            continue
        if t.get("lstrip"):
            core.lstrip.add(i)
        if t.get("rstrip"):
            core.rstrip.add(i)
        if i in core.tokens:
            continue
        if content in core.by_text:
            raise FormatError(f"{path}: added token {content!r} (id {i}) is already piece {core.by_text[content]}")
        core.tokens[i] = content.encode("utf-8")
        core.scores[i] = 0.0
        core.by_text[content] = i
        (core.special if t.get("special", False) else core.added).add(i)


def _apply_legacy(core: _Core, config: dict, path: Path, model_path: Path) -> None:
    """tokenizer_config.json's legacy / add_prefix_space over a tokenizer.model (transformers' LlamaTokenizer)."""
    values = {}
    for key in ("legacy", "add_prefix_space"):
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise FormatError(f"{path}: {key} is not true/false")
        values[key] = value
    prefix = values["add_prefix_space"]
    if values["legacy"] is False:
        # Dummy prefix off; "▁" before the input only, none after special tokens: Metaspace "first".
        core.add_space_prefix = True if prefix is None else prefix
        core.prepend_scheme = "first" if core.add_space_prefix else None
    elif prefix is not None and prefix != core.add_space_prefix:
        raise FormatError(f"{path}: add_prefix_space {str(prefix).lower()} disagrees with {model_path}'s "
                          f"add_dummy_prefix {str(core.add_space_prefix).lower()} under legacy behaviour "
                          f"(transformers' slow and fast tokenizers then differ), which is not supported")


# --- the config files --------------------------------------------------------------------------------
def _finish(core: _Core, folder: Path, config: dict, config_path: Path) -> TokenizerData:
    n = max(core.tokens) + 1
    vocab: list[bytes] = []
    special = set(core.special)
    for i in range(n):
        tok = core.tokens.get(i, b"")
        if not tok:
            tok = placeholder(i)
            special.add(i)
        if len(tok) > MAX_TOKEN_BYTES:
            raise FormatError(f"{folder}: token {i} is {len(tok)} bytes long (at most {MAX_TOKEN_BYTES})")
        vocab.append(tok)
    if core.kind == "bpe":  # merges go by rank; distributed-llama's scores follow the ids, as from a GGUF
        scores = [-float(i) for i in range(n)]
    else:
        scores = [core.scores.get(i, UNMERGEABLE_SCORE) for i in range(n)]

    def token_id(key: str) -> int | None:
        value = config.get(key)
        if value is None:
            return None
        if isinstance(value, dict):
            value = value.get("content")
        if not isinstance(value, str):
            raise FormatError(f"{config_path}: {key} is neither text nor {{\"content\": text}}")
        i = core.by_text.get(value)
        if i is None:
            raise FormatError(f"{config_path}: {key} {value!r} is not a token of the tokenizer")
        return i

    bos = token_id("bos_token")
    if bos is None:
        bos = core.by_text.get(core.template_first, -1) if core.template_first else core.default_bos
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        if core.template_first is not None:
            add_bos = bos >= 0 and core.by_text.get(core.template_first) == bos
        else:
            add_bos = core.default_add_bos
    elif not isinstance(add_bos, bool):
        raise FormatError(f"{config_path}: add_bos_token is not true/false")
    add_eos = config.get("add_eos_token")
    if add_eos is not None and not isinstance(add_eos, bool):
        raise FormatError(f"{config_path}: add_eos_token is not true/false")
    if add_eos:
        raise FormatError(f"{config_path}: add_eos_token true (an eos token appended to every encoding) is not "
                          f"supported (the engine never appends it to a prompt)")

    eos_ids: list[int] = []
    eos = token_id("eos_token")
    if eos is None:
        eos = core.default_eos
    if eos is not None and eos >= 0:
        eos_ids.append(eos)
    gen_path = folder / GENERATION_CONFIG
    gen = _optional_json_object(gen_path)
    extra = gen.get("eos_token_id")
    if extra is not None:
        extra = extra if isinstance(extra, list) else [extra]
        for e in extra:
            if type(e) is not int or not 0 <= e < n:
                raise FormatError(f"{gen_path}: eos_token_id {e!r} is not a token id below {n}")
            if e not in eos_ids:
                eos_ids.append(e)

    return TokenizerData(
        vocab=vocab, scores=scores, bos_id=bos, eos_ids=eos_ids, chat_template=_chat_template(folder, config,
                                                                                                 config_path),
        add_bos=bool(add_bos), kind=core.kind, pre=core.pre, merges=list(core.merges),
        special_ids=sorted(special), add_space_prefix=core.add_space_prefix,
        added_ids=sorted(core.added - special), normalizer=core.normalizer, ignore_merges=core.ignore_merges,
        prepend_scheme=core.prepend_scheme, lstrip_ids=sorted(core.lstrip), rstrip_ids=sorted(core.rstrip))


def _chat_template(folder: Path, config: dict, config_path: Path) -> str | None:
    jinja = folder / CHAT_TEMPLATE_JINJA
    if jinja.exists():
        try:
            return jinja.read_bytes().decode("utf-8")
        except OSError as e:
            raise FormatError(f"{jinja}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise FormatError(f"{jinja}: not UTF-8 text") from None
    source, where = config.get("chat_template"), config_path
    if source is None:
        where = folder / CHAT_TEMPLATE_JSON
        source = _optional_json_object(where).get("chat_template")
    if source is None or isinstance(source, str):
        return source or None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise FormatError(f"{where}: the chat templates {sorted(map(str, named))} have no \"default\" one")
    raise FormatError(f"{where}: chat_template is neither text nor a list of named templates")
