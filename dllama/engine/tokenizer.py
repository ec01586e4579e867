"""Text to token ids and back, exactly as the model's own tokenizer does it.

Three kinds (``TokenizerData.kind``):

* ``bpe``: byte-level BPE (GPT-2 family). Text is split by the family's pre-tokenizer regex
  (llama.cpp's ``tokenizer.ggml.pre``, see ``pretokenizer``), each piece's UTF-8 bytes are merged
  by rank. Matches HF ``tokenizers`` / llama.cpp. With ``ignore_merges`` (default: the llama3
  family only) a piece that is itself a token is that token.
* ``sentencepiece``: Llama 2 style. Characters (unknown ones as ``<0xXX>`` byte tokens) are merged
  pairwise, highest-scoring result first; or, when the data has merges (a Hugging Face BPE
  ``tokenizer.json`` with byte fallback), lowest merge rank first. ``add_space_prefix`` puts a
  space before the text: at the start and after each special or added token (SentencePiece and
  llama.cpp), or as HF's Metaspace ``prepend_scheme`` says ("always"/"first": never before text
  that already starts with a space; "first": only at the very start of the input).
* ``legacy``: a ``.t`` without sidecar, tokenized as distributed-llama does: shortest byte prefixes
  found in the vocabulary, then score-driven merges over the whole text.

Special (control) tokens come out of ``encode`` only with ``allow_special=True``; typed by a user
they are ordinary text. Added tokens (``added_ids``: HF's non-special added tokens, such as Qwen3's
``<think>``) are cut out of any text, as HF does, the longest first at each position. Tokens in
``lstrip_ids``/``rstrip_ids`` also take the white space before/after them (HF's ``lstrip`` and
``rstrip``). The text between such tokens is put in the data's Unicode normal form
(``normalizer``, e.g. NFC for Qwen) before it is tokenized; Python's ``unicodedata`` does it, so
characters newer than its Unicode version (14.0 in Python 3.11) may normalize differently from HF.
"""
from __future__ import annotations

import codecs
import heapq
import os
import re
import unicodedata
from typing import Callable, Iterable

from dllama.engine.pretokenizer import is_white_space, pre_tokenize, pre_tokenizer_family
from dllama.errors import FormatError
from dllama.formats.tfile import KINDS, NORMALIZERS, PREPEND_SCHEMES, TokenizerData, read_tokenizer

# --- Merging ----------------------------------------------------------------------------------
PairRule = Callable[[int, int], "tuple[float, int] | None"]


def merge_symbols(symbols: list[int], rule: PairRule) -> list[int]:
    """Repeatedly merge the adjacent pair with the lowest ``rule`` priority, leftmost on ties.

    ``rule(left, right)`` gives ``(priority, merged_id)`` or None when the pair cannot merge. A
    heap with stale-entry checks does what rescanning the whole list after each merge would do
    (HF's BPE, llama2.c and distributed-llama all pick the best pair, then the leftmost).
    """
    n = len(symbols)
    if n < 2:
        return symbols
    syms = list(symbols)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        r = rule(syms[i], syms[i + 1])
        if r is not None:
            heap.append((r[0], i, syms[i], syms[i + 1], r[1]))
    heapq.heapify(heap)
    while heap:
        _, i, a, b, merged = heapq.heappop(heap)
        j = nxt[i]
        # Symbols only grow, so an unchanged (left, right) pair of ids means the entry is current.
        if j < 0 or syms[i] != a or syms[j] != b:
            continue
        syms[i] = merged
        syms[j] = -1
        k = nxt[j]
        nxt[i] = k
        if k >= 0:
            prv[k] = i
            r = rule(merged, syms[k])
            if r is not None:
                heapq.heappush(heap, (r[0], i, merged, syms[k], r[1]))
        p = prv[i]
        if p >= 0:
            r = rule(syms[p], merged)
            if r is not None:
                heapq.heappush(heap, (r[0], p, syms[p], merged, r[1]))
    return [s for s in syms if s >= 0]


# --- Tokenizer --------------------------------------------------------------------------------
_SPM_BYTE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
# <|...|>, its full-width form <｜...｜> (DeepSeek), and SentencePiece's three.
_LEGACY_SPECIAL = re.compile(rb"<\|[^\n]*\|>|<\xef\xbd\x9c[^\n]*\xef\xbd\x9c>|<s>|</s>|<unk>")
_WORD_CACHE_LIMIT = 1 << 17
# distributed-llama starts its best score at -1e10: pairs at or below it never merge.
_DLLAMA_MIN_SCORE = -1e10
_OTHER_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def _encodable(text: str) -> str:
    """``text`` with lone surrogates that stand for no byte replaced by U+FFFD.

    Python keeps undecodable input bytes (command-line arguments, for one) as U+DC80..U+DCFF;
    those are encoded back to their bytes ("surrogateescape"); no other surrogate has UTF-8 bytes.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _OTHER_SURROGATE.sub("\ufffd", text)


def _texts(vocab: list[bytes], ids: Iterable[int]) -> dict[str, int]:
    """Text -> id for ``ids`` whose bytes are non-empty UTF-8 (the lowest id of equal texts)."""
    out: dict[str, int] = {}
    for i in sorted(ids):
        try:
            text = vocab[i].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            out.setdefault(text, i)
    return out


def _splitter(by_text: dict[str, int]) -> tuple[re.Pattern[str] | None, dict[str, int]]:
    """A pattern whose ``split`` alternates text and token texts, with the text -> id map."""
    if not by_text:
        return None, by_text
    # Longest first, so that the alternation finds the longest token at each position.
    alternatives = sorted(by_text, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, alternatives)) + ")"), by_text


class Tokenizer:
    """Encode and decode like the model's original tokenizer."""

    def __init__(self, data: TokenizerData):
        if data.kind not in KINDS:
            raise FormatError(f"unknown tokenizer kind {data.kind!r}")
        self.data = data
        self.kind = data.kind
        vocab = data.vocab
        self._scores = [float(s) for s in data.scores]
        if data.kind == "legacy":
            special = {i for i, t in enumerate(vocab) if _LEGACY_SPECIAL.fullmatch(t)}
            special.update(data.eos_ids)
            if data.bos_id >= 0:
                special.add(data.bos_id)
        else:
            special = set(data.special_ids)
        self._special = frozenset(special)
        self._eos = frozenset(data.eos_ids)

        # SentencePiece byte tokens are a fallback, never a merge result.
        byte_tokens: dict[int, int] = {}
        if data.kind != "bpe":
            for i, t in enumerate(vocab):
                m = _SPM_BYTE.fullmatch(t)
                if m and i not in special:
                    byte_tokens.setdefault(int(m.group(1), 16), i)
            if data.kind == "legacy" and len(byte_tokens) < 256:
                byte_tokens = {}  # not a SentencePiece vocabulary: <0x..> texts are ordinary tokens
        self._byte_tokens = byte_tokens
        byte_ids = set(byte_tokens.values())

        # Added tokens are cut out of the text first, so merges never build them.
        not_regular = special | byte_ids | set(data.added_ids)
        regular: dict[bytes, int] = {}
        for i, t in enumerate(vocab):
            if i not in not_regular:
                regular.setdefault(t, i)
        self._regular = regular

        # What each id contributes to decoded text.
        self._pieces = list(vocab)
        for b, i in byte_tokens.items():
            self._pieces[i] = bytes([b])

        added = set(data.added_ids) - special
        self._added = frozenset(added)
        if data.normalizer is not None and data.normalizer not in NORMALIZERS:
            raise FormatError(f"unknown normalizer {data.normalizer!r} (known: {', '.join(NORMALIZERS)})")
        if data.prepend_scheme is not None and data.prepend_scheme not in PREPEND_SCHEMES:
            raise FormatError(f"unknown prepend_scheme {data.prepend_scheme!r}")
        self._normal_form = data.normalizer

        specials_text = _texts(vocab, special)
        added_text = _texts(vocab, added)
        self._special_by_text = specials_text
        # What text becomes a token without (False) and with (True) allow_special.
        self._splitters = {False: _splitter(added_text), True: _splitter({**added_text, **specials_text})}
        # Tokens that take the white space before / after them (HF's AddedToken lstrip / rstrip).
        self._lstrip = frozenset(data.lstrip_ids)
        self._rstrip = frozenset(data.rstrip_ids)

        if data.kind == "bpe":
            self._family = pre_tokenizer_family(data.pre)
            # llama.cpp/HF: a whole-word token wins; the sidecar may say otherwise (HF's ignore_merges).
            self._ignore_merges = (self._family == "llama3" if data.ignore_merges is None
                                   else bool(data.ignore_merges))
            merge_map = self._merge_map()
            self._merge_rule: PairRule = lambda a, b: merge_map.get((a, b))
            self._byte_ids = [regular.get(bytes([b]), -1) for b in range(256)]
            self._word_cache: dict[str, list[int]] = {}
        else:
            self._ignore_merges = bool(data.ignore_merges)
            if data.kind == "sentencepiece" and data.merges:
                merge_map = self._merge_map()
                self._merge_rule = lambda a, b: merge_map.get((a, b))
            else:
                self._merge_rule = self._score_rule
            unk = regular.get(b"<unk>")
            self._unk = unk if unk is not None else next((i for i in special if vocab[i] == b"<unk>"), -1)
            self._max_len = max(map(len, vocab), default=1)

    def _merge_map(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(left, right) -> (rank, merged id); the first of repeated pairs counts."""
        vocab, regular, n = self.data.vocab, self._regular, len(self.data.vocab)
        merge_map: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.data.merges):
            if not (0 <= a < n and 0 <= b < n):
                raise FormatError(f"merge ({a}, {b}) names a token outside the vocabulary of {n}")
            merged = regular.get(vocab[a] + vocab[b])
            if merged is not None and (a, b) not in merge_map:
                merge_map[(a, b)] = (rank, merged)
        return merge_map

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """A tokenizer from a ``.t`` file (and its ``.t.json`` sidecar when there is one)."""
        data = read_tokenizer(path)
        try:
            return cls(data)
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None

    # --- properties ---
    @property
    def vocab_size(self) -> int:
        return len(self.data.vocab)

    @property
    def bos_id(self) -> int:
        return self.data.bos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def add_bos(self) -> bool:
        return self.data.add_bos

    @property
    def chat_template(self) -> str | None:
        return self.data.chat_template

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    @property
    def added_ids(self) -> frozenset[int]:
        """Tokens cut out of any text, even without ``allow_special`` (HF's non-special added tokens)."""
        return self._added

    def is_eos(self, token_id: int) -> bool:
        return token_id in self._eos

    def special_id(self, text: str) -> int | None:
        """The id of the special token spelled ``text`` (e.g. ``'<|im_end|>'``), if any."""
        return self._special_by_text.get(text)

    def piece(self, token_id: int) -> bytes:
        """The bytes ``token_id`` adds to decoded text (a SentencePiece ``<0xXX>`` is its byte)."""
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} is outside the vocabulary of {len(self._pieces)}")
        return self._pieces[token_id]

    # --- encoding ---
    def encode(self, text: str, add_bos: bool | None = None, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. ``allow_special`` lets special-token texts in ``text`` become their ids."""
        out: list[int] = []
        text = _encodable(text)
        if (self.data.add_bos if add_bos is None else add_bos) and self.data.bos_id >= 0:
            out.append(self.data.bos_id)
        parts = self._split(text, bool(allow_special))
        by_text = self._splitters[bool(allow_special)][1]
        after_token = True
        # _split alternates text, token, text, ...
        for k, part in enumerate(parts):
            if k % 2:
                out.append(by_text[part])
                after_token = True
                continue
            if part:
                self._encode_text(part, out, after_token, k == 0)
                after_token = False
        return out

    def _split(self, text: str, allow_special: bool) -> list[str]:
        """``text`` as text, token, text, ... (token texts as in the vocabulary, white space stripped)."""
        pattern, by_text = self._splitters[allow_special]
        if pattern is None:
            return [text]
        if not (self._lstrip or self._rstrip):
            return pattern.split(text)
        parts: list[str] = []
        done = 0  # where the text not yet taken starts
        for m in pattern.finditer(text):
            start, stop = m.span()
            if start < done:
                continue  # inside white space an rstrip token took
            tid = by_text[m.group()]
            if tid in self._lstrip:
                while start > done and is_white_space(text[start - 1]):
                    start -= 1
            if tid in self._rstrip:
                while stop < len(text) and is_white_space(text[stop]):
                    stop += 1
            parts += [text[done:start], m.group()]
            done = stop
        parts.append(text[done:])
        return parts

    def _encode_text(self, text: str, out: list[int], after_token: bool, at_start: bool) -> None:
        if self._normal_form is not None:
            text = unicodedata.normalize(self._normal_form, text)
        if self.kind == "bpe":
            cache = self._word_cache
            if len(cache) > _WORD_CACHE_LIMIT:
                cache.clear()
            for word in pre_tokenize(text, self._family):
                ids = cache.get(word)
                if ids is None:
                    ids = cache[word] = self._bpe_word(word)
                out.extend(ids)
        elif self.kind == "sentencepiece":
            # Our vocabulary holds spaces where SentencePiece has U+2581; SentencePiece and llama.cpp
            # read a U+2581 typed in the text as the space it stands for, so it becomes one here too.
            text = text.replace("\u2581", " ")
            if self.data.add_space_prefix:
                scheme = self.data.prepend_scheme
                if scheme is None:
                    # llama.cpp: a space goes before the text at the start and after every token
                    # cut out of the text (HF: the Prepend normalizer, applied to each part).
                    prefix = after_token
                else:
                    # HF's Metaspace: not before a space; "first": only at the start of the input.
                    prefix = not text.startswith(" ") and (scheme == "always" or at_start)
                if prefix:
                    text = " " + text
            if self._ignore_merges:
                whole = self._regular.get(text.encode("utf-8", "surrogateescape"))
                if whole is not None:
                    out.append(whole)
                    return
            out.extend(merge_symbols(self._spm_symbols(text), self._merge_rule))
        else:
            raw = text.encode("utf-8", "surrogateescape")
            out.extend(merge_symbols(self._legacy_symbols(raw), self._merge_rule))

    def _bpe_word(self, word: str) -> list[int]:
        raw = word.encode("utf-8", "surrogateescape")
        if self._ignore_merges:
            whole = self._regular.get(raw)
            if whole is not None:
                return [whole]
        byte_ids = self._byte_ids
        # A byte with no token of its own cannot be encoded; HF drops it too (no unk token).
        return merge_symbols([i for i in (byte_ids[b] for b in raw) if i >= 0], self._merge_rule)

    def _score_rule(self, a: int, b: int) -> tuple[float, int] | None:
        merged = self._regular.get(self.data.vocab[a] + self.data.vocab[b])
        if merged is None:
            return None
        score = self._scores[merged]
        if self.kind == "legacy" and not score > _DLLAMA_MIN_SCORE:
            return None
        return (-score, merged)

    def _fallback(self, raw: bytes, out: list[int]) -> None:
        """Byte tokens for a character the vocabulary lacks; one unk if some byte has none."""
        ids = [self._byte_tokens.get(b, self._regular.get(bytes([b]), -1)) for b in raw]
        if all(i >= 0 for i in ids):
            out.extend(ids)
        elif self._unk >= 0:
            out.append(self._unk)

    def _spm_symbols(self, text: str) -> list[int]:
        regular = self._regular
        out: list[int] = []
        for ch in text:
            raw = ch.encode("utf-8", "surrogateescape")
            i = regular.get(raw)
            if i is not None:
                out.append(i)
            else:
                self._fallback(raw, out)
        return out

    def _legacy_symbols(self, raw: bytes) -> list[int]:
        # distributed-llama: grow a buffer byte by byte, emit it as soon as it is a token.
        regular, n, limit = self._regular, len(raw), self._max_len
        out: list[int] = []
        i = 0
        while i < n:
            for j in range(i + 1, min(n, i + limit) + 1):
                tid = regular.get(raw[i:j])
                if tid is not None:
                    out.append(tid)
                    i = j
                    break
            else:
                # distributed-llama would fail here; fall back on the bytes of one character.
                j = i + 1
                while j < n and (raw[j] & 0xC0) == 0x80 and j - i < 4:
                    j += 1
                self._fallback(raw[i:j], out)
                i = j
        return out

    # --- decoding ---
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (special tokens as their text); invalid UTF-8 becomes U+FFFD."""
        ids = list(ids)
        raw = b"".join(self.piece(i) for i in ids)
        # SentencePiece decoders drop the space that add_space_prefix put before the first word.
        if (self.kind == "sentencepiece" and self.data.add_space_prefix and ids
                and ids[0] not in self._special and raw.startswith(b" ")):
            raw = raw[1:]
        return raw.decode("utf-8", errors="replace")

    def stream(self) -> "StreamDecoder":
        """A decoder for generated ids, one at a time (no prefix space is dropped: it continues text)."""
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text as they come, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by ``token_id``; a trailing incomplete character waits for the next id."""
        return self._decoder.decode(self._tokenizer.piece(token_id))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD); the decoder starts afresh."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out
