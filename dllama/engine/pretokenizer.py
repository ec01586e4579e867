"""Pre-tokenizers: the pieces a text is cut into before BPE merges each one on its own.

The families are llama.cpp's ``tokenizer.ggml.pre`` (gpt2, llama3, qwen2, smollm, ...): regexes
over Unicode letters, numbers, punctuation and white space. They live apart from the tokenizer
because spelling those classes out (Python's ``re`` has no ``\\p{L}``) is a job of its own, with
its own data: the code points newer Unicode versions added.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Iterable

from dllama.errors import FormatError

# --- Unicode classes -------------------------------------------------------------------------
# Python's ``re`` has no \p{L}/\p{N}, and its \s (str.isspace) wrongly includes U+001C..U+001F,
# so the classes are spelled out from ``unicodedata``. The reference tokenizers know newer
# Unicode than Python 3.11 (14.0): HF's regex engine (Oniguruma) has Unicode 16 letters, numbers
# and punctuation, its Digits pre-tokenizer (Rust's char::is_numeric) Unicode 17 numbers. Those
# later additions are unassigned for Python, so they are listed here to give the same splits.
_NEWER_LETTERS = (
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240), (0x11380, 0x11389), (0x1138B, 0x1138B),
    (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3),
    (0x11BC0, 0x11BE0), (0x11F02, 0x11F02), (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F),
    (0x13441, 0x13446), (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D), (0x1E4D0, 0x1E4EB),
    (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739), (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF),
)
_NEWER_NUMBERS = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59), (0x16130, 0x16139),
    (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)
_NEWER_PUNCTUATION = (
    (0x1B4E, 0x1B4F), (0x1B7F, 0x1B7F), (0x10D6E, 0x10D6E), (0x113D4, 0x113D5), (0x113D7, 0x113D8),
    (0x11B00, 0x11B09), (0x11BE1, 0x11BE1), (0x11F43, 0x11F4F), (0x16D6D, 0x16D6F), (0x1E5FF, 0x1E5FF),
)
_NEWER_DIGITS = _NEWER_NUMBERS + ((0x11DE0, 0x11DE9), (0x16FF4, 0x16FF6))  # Unicode 17
# Unicode White_Space (what Oniguruma and llama.cpp call \s).
_WHITE_SPACE = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))
# Planes 4 and up hold no letters, numbers or punctuation: scanning planes 0-3 is enough.
_SCAN_END = 0x40000


@lru_cache(maxsize=1)
def _category_ranges() -> dict[str, tuple[tuple[int, int], ...]]:
    """Code point ranges per major general category (L, N, P, ...) in planes 0-3."""
    majors = [c[0] for c in map(unicodedata.category, map(chr, range(_SCAN_END)))]
    out: dict[str, list[tuple[int, int]]] = {}
    start = 0
    for cp in range(1, _SCAN_END + 1):
        if cp == _SCAN_END or majors[cp] != majors[start]:
            out.setdefault(majors[start], []).append((start, cp - 1))
            start = cp
    return {k: tuple(v) for k, v in out.items()}


def _spell(ranges: Iterable[tuple[int, int]]) -> str:
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


@lru_cache(maxsize=None)
def _char_classes() -> dict[str, str]:
    """Bodies (no brackets) of the character classes the patterns use."""
    cats = _category_ranges()
    return {
        "L": _spell(cats["L"] + _NEWER_LETTERS),
        "N": _spell(cats["N"] + _NEWER_NUMBERS),
        "D": _spell(cats["N"] + _NEWER_DIGITS),
        "P": _spell(cats["P"] + _NEWER_PUNCTUATION),
        "S": _spell(_WHITE_SPACE),
    }


# --- Pre-tokenizers (llama.cpp's tokenizer.ggml.pre) ------------------------------------------
# {L} letters, {N} numbers, {S} white space, {D} numbers for the digit splitter, {P} punctuation.
# Each family is a list of regexes applied in turn; text between matches stays a piece too.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
# HF's files spell the contractions (?i:'s|'t|...): case folding also makes "'ſ" (long s) one.
_LLAMA3 = (r"(?:'[sSſ]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}"
           r"| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")
_QWEN2 = _LLAMA3.replace("[{N}]{{1,3}}", "[{N}]")
_FAMILIES: dict[str, tuple[str, ...]] = {
    "gpt2": (_GPT2,),
    # llama.cpp's fallback when a GGUF names no known pre-tokenizer.
    "default": (r"[{P}\$\+<=>\^~\|]+", _GPT2, r"[{N}]+", r"[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    # Every digit on its own, then GPT-2 (HF: Digits(individual_digits=True) + ByteLevel).
    "smollm": (r"[{D}]", _GPT2),
}
_ALIASES = {
    "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "llama-bpe": "llama3", "llama-v3": "llama3",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm",
    "exaone": "smollm", "minerva-7b": "smollm",
    "deepseek-r1-qwen": "qwen2",
}
KNOWN_PRE = tuple(sorted(set(_FAMILIES) | set(_ALIASES)))


def pre_tokenizer_family(pre: str | None) -> str:
    """The family ``pre`` names (aliases resolved; None: gpt2); FormatError for an unknown one."""
    name = pre or "gpt2"
    name = _ALIASES.get(name, name)
    if name not in _FAMILIES:
        raise FormatError(f"pre-tokenizer {pre!r} is not supported; known: {', '.join(KNOWN_PRE)}")
    return name


@lru_cache(maxsize=None)
def _compiled(family: str) -> tuple[re.Pattern[str], ...]:
    classes = _char_classes()
    return tuple(re.compile(p.format(**classes)) for p in _FAMILIES[family])


def pre_tokenize(text: str, pre: str | None) -> list[str]:
    """The pieces the family's pre-tokenizer cuts ``text`` into (each is BPE-merged on its own)."""
    pieces = [text] if text else []
    for pattern in _compiled(pre_tokenizer_family(pre)):
        out: list[str] = []
        for piece in pieces:
            pos = 0
            for m in pattern.finditer(piece):
                start, end = m.span()
                if start > pos:
                    out.append(piece[pos:start])
                if end > start:
                    out.append(piece[start:end])
                    pos = end
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


_WHITE_SPACE_CHARS = frozenset(chr(c) for a, b in _WHITE_SPACE for c in range(a, b + 1))


def is_white_space(ch: str) -> bool:
    """Unicode White_Space, as Rust's char::is_whitespace (HF's lstrip/rstrip)."""
    return ch in _WHITE_SPACE_CHARS
