"""A Hugging Face model folder's tokenizer as ``TokenizerData``, tokenizing exactly as the source.

``tokenizer_from_hf(folder)`` reads:

* ``tokenizer.json`` (the ``tokenizers`` library's format) when present, model ``BPE`` only:
  byte-level BPE (kind ``bpe``) or SentencePiece-style BPE with byte fallback (kind
  ``sentencepiece``), with its added tokens (see ``hf_tokenizer_json``).

* ``tokenizer.model`` (a SentencePiece ``ModelProto``, Llama 2) when there is no
  ``tokenizer.json`` or that file is not usable (then a warning on stderr says why: token ids may
  differ from Hugging Face's fast tokenizer); see ``sentencepiece_model``. Its ``add_dummy_prefix``
  is kept, and ``tokenizer_config.json``'s ``added_tokens_decoder`` adds tokens to it.
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
  one to a prompt: ``add_eos_token: true`` in ``tokenizer_config.json``, and such a
  ``tokenizer.json`` post-processor (even when a ``tokenizer.model`` is there to fall back on).

The vocabulary size is the highest id plus one. Ids nothing names (holes), and tokens whose text
is empty (a ``.t`` cannot hold them), become special placeholder tokens ``<|dllama_unused_N|>``
(N the id): never produced from text, harmless to the model.

Every bad or unsupported input is a ``FormatError`` of one line that names the file.
"""
from __future__ import annotations

import sys
from pathlib import Path

from dllama.errors import FormatError
from dllama.formats.hf_tokenizer_core import UNMERGEABLE_SCORE, TokenizerCore, is_id, load_json, one_line
from dllama.formats.hf_tokenizer_json import NoFallback, read_tokenizer_json
from dllama.formats.sentencepiece_model import read_sentencepiece_model
from dllama.formats.tfile import MAX_TOKEN_BYTES, TokenizerData

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"


def placeholder(token_id: int) -> bytes:
    """The special token that fills an id the source leaves empty."""
    return f"<|dllama_unused_{token_id}|>".encode()


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
            core = read_tokenizer_json(tj)
        except FormatError as e:
            if not tm.exists() or isinstance(e, NoFallback):
                raise
            try:
                core = read_sentencepiece_model(tm)
            except FormatError as e2:
                raise FormatError(f"{e}; falling back on {TOKENIZER_MODEL} failed too: {e2}") from None
            print(f"⚠️  not using {one_line(str(e))}; using {tm} instead, whose token ids may differ "
                  f"from Hugging Face's fast tokenizer", file=sys.stderr)
    elif tm.exists():
        core = read_sentencepiece_model(tm)
    else:
        raise FormatError(f"{folder}: no {TOKENIZER_JSON} or {TOKENIZER_MODEL} in the folder")
    if core.from_model:  # a tokenizer.model: the config may add tokens (tokenizer.json lists its own)
        _apply_added_tokens_decoder(core, config, config_path)
        _apply_legacy(core, config, config_path, tm)
    return _finish(core, folder, config, config_path)


def _optional_json_object(path: Path) -> dict:
    if not path.exists():
        return {}
    doc = load_json(path)
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return doc


# --- a tokenizer.model completed by tokenizer_config.json --------------------------------------------
def _apply_added_tokens_decoder(core: TokenizerCore, config: dict, path: Path) -> None:
    """tokenizer_config.json's added_tokens_decoder ({"id": {"content", "special"}}) over a tokenizer.model."""
    decoder = config.get("added_tokens_decoder")
    if decoder is None:
        return
    if not isinstance(decoder, dict):
        raise FormatError(f"{path}: 'added_tokens_decoder' is not an object")
    for key, t in decoder.items():
        if not (isinstance(key, str) and key.isdigit() and is_id(int(key)) and isinstance(t, dict)
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


def _apply_legacy(core: TokenizerCore, config: dict, path: Path, model_path: Path) -> None:
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
def _finish(core: TokenizerCore, folder: Path, config: dict, config_path: Path) -> TokenizerData:
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
