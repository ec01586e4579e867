"""``tokenizer.json`` (the ``tokenizers`` library's format) as a ``TokenizerCore``, model ``BPE`` only.

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

A post-processor that appends a token to every encoding (its single-sequence template puts a special
token after ``$A``, or a ``BertProcessing``/``RobertaProcessing``) is refused with ``NoFallback``:
the engine never appends one to a prompt, and a ``tokenizer.model`` next to it must not hide that.
"""
from __future__ import annotations

import json
from pathlib import Path

from dllama.errors import FormatError
from dllama.formats.gguf_tokenizer import byte_level_to_bytes, gpt2_unicode_to_byte
from dllama.formats.hf_tokenizer_core import SPM_BYTE, UNMERGEABLE_SCORE, TokenizerCore, is_id, load_json, one_line
from dllama.formats.tfile import NORMALIZERS

# The Split regexes of the known pre-tokenizer families, exactly as HF's files spell them.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_FAMILIES = {LLAMA3_REGEX: "llama3", QWEN2_REGEX: "qwen2", GPT2_REGEX: "gpt2"}


class NoFallback(FormatError):
    """A tokenizer.json problem that falling back on tokenizer.model would hide."""


def read_tokenizer_json(path: Path) -> TokenizerCore:
    """The tokenizer in ``path`` (see the module docstring); FormatError, or NoFallback, when unusable."""
    doc = load_json(path)
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
        if not is_id(i):
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
        if not (isinstance(t, dict) and is_id(t.get("id")) and isinstance(t.get("content"), str)):
            raise FormatError(f"{path}: bad added token {one_line(json.dumps(t, ensure_ascii=False))[:200]}")
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
                pres: list[dict]) -> TokenizerCore:
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
    return TokenizerCore(tokens=tokens, scores={}, kind="bpe", by_text={}, pre=family, normalizer=normalizer,
                 ignore_merges=None if ignore_merges == (family == "llama3") else ignore_merges)


def _metaspace(path: Path, model: dict, vocab: dict[str, int], id_to_str: dict[int, str],
               normalizers: list[dict], pres: list[dict]) -> TokenizerCore:
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
        raw = tok.encode("utf-8") if SPM_BYTE.fullmatch(tok) else tok.replace("\u2581", " ").encode("utf-8")
        if raw in seen:
            raise FormatError(f"{path}: tokens {id_to_str[seen[raw]]!r} and {tok!r} are the same text")
        seen[raw] = i
        tokens[i] = raw
    return TokenizerCore(tokens=tokens, scores={}, kind="sentencepiece", by_text={}, normalizer=normalizer,
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
            raise NoFallback(f"{path}: post-processor {p['type']} appends {appended!r} to every encoding, which is "
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
