"""``tokenizer.model`` (a SentencePiece ``ModelProto``, Llama 2) as a ``TokenizerCore``.

Read with a small protobuf reader: the ``sentencepiece`` package is not needed. Only BPE models with
byte fallback (the 256 pieces ``<0x00>``..``<0xFF>``), the identity normalization,
``remove_extra_whitespaces=false`` and white space escaped as a ``▁`` prefix are taken;
``add_dummy_prefix`` and the trainer's bos/eos ids are kept. Control and unknown pieces are special;
user-defined and unused pieces are refused.
"""
from __future__ import annotations

import struct
from pathlib import Path

from dllama.errors import FormatError
from dllama.formats.hf_tokenizer_core import SPM_BYTE, TokenizerCore
from dllama.formats.tfile import MAX_VOCAB_SIZE

# SentencePiece piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


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


def read_sentencepiece_model(path: Path) -> TokenizerCore:
    """The pieces, scores and settings of the SentencePiece model in ``path`` (FormatError when unusable)."""
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
            m = SPM_BYTE.fullmatch(text)
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

    return TokenizerCore(tokens=tokens, scores=scores, kind="sentencepiece", by_text=by_text, special=special,
                 add_space_prefix=bool(_scalar(norm, 3, 1)), default_bos=ident(41, 1), default_eos=ident(42, 2),
                 default_add_bos=True, from_model=True)
