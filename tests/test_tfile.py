"""distributed-llama tokenizer files (.t) and the dllama sidecar: round trips and malformed input."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllama.errors import FormatError
from dllama.formats.tfile import (MAGIC, OLD_MAGIC, TokenizerData, read_tokenizer, sidecar_path,
                                  write_tokenizer)

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def dllama_t(tokens: list[bytes], bos: int, eos: list[int], template: bytes | None = b"",
             extra_kv: list[tuple[int, int]] = (), scores=None) -> bytes:
    """A .t as distributed-llama's converter (tokenizer-writer.py) writes it: keys 0,1,2,3,7,9."""
    kv = [(0, 1), (1, len(tokens)), (2, max(map(len, tokens))), (3, bos)]
    if template:
        kv.append((7, len(template)))
    kv.append((9, len(eos)))
    kv += list(extra_kv)
    out = struct.pack("<2i", MAGIC, 8 + 8 * len(kv)) + b"".join(struct.pack("<2i", k, v) for k, v in kv)
    out += template or b""
    out += b"".join(struct.pack("<i", e) for e in eos)
    for i, t in enumerate(tokens):
        out += struct.pack("<fI", -float(i) if scores is None else scores[i], len(t)) + t
    return out


SMALL_TOKENS = [b"<unk>", b"<|begin|>", b"<|end|>", b"a", b"b", b"ab", b" ", b"\xe2\x96\x81x"]
SMALL = dllama_t(SMALL_TOKENS, bos=1, eos=[2], template=b"{{x}}")


def test_reads_distributed_llama_file_without_sidecar(tmp_path):
    p = tmp_path / "tok.t"
    p.write_bytes(SMALL)
    d = read_tokenizer(p)
    assert d.vocab == SMALL_TOKENS
    assert list(d.scores) == [-float(i) for i in range(len(SMALL_TOKENS))]
    assert (d.bos_id, d.eos_ids, d.chat_template) == (1, [2], "{{x}}")
    assert d.kind == "legacy" and d.merges == [] and d.pre is None
    assert d.add_bos is True  # distributed-llama's default when the header has no key 10


def test_old_eos_keys_chat_stop_and_add_bos(tmp_path):
    tokens = [b"x", b"yy", b"z"]
    kv = [(0, 1), (1, 3), (2, 2), (3, 0), (4, 1), (6, 2), (8, 3), (5, -1), (10, 0), (7, 2)]
    raw = struct.pack("<2i", MAGIC, 8 + 8 * len(kv)) + b"".join(struct.pack("<2i", k, v) for k, v in kv)
    raw += b"STP" + b"hi"  # chat stop bytes are skipped, then the template
    for t in tokens:
        raw += struct.pack("<fI", 0.5, len(t)) + t
    p = tmp_path / "old-keys.t"
    p.write_bytes(raw)
    d = read_tokenizer(p)
    assert d.eos_ids == [1, 2] and d.chat_template == "hi" and d.add_bos is False and d.bos_id == 0


def test_old_magic(tmp_path):
    tokens = [b"<unk>", b"<s>", b"</s>", b"hello"]
    raw = struct.pack("<i2I3i", OLD_MAGIC, len(tokens), 5, 1, 2, -1)
    for i, t in enumerate(tokens):
        raw += struct.pack("<fI", float(i) / 2, len(t)) + t
    p = tmp_path / "old.t"
    p.write_bytes(raw)
    d = read_tokenizer(p)
    assert d.vocab == tokens and list(d.scores) == [0.0, 0.5, 1.0, 1.5]
    assert (d.bos_id, d.eos_ids, d.chat_template, d.kind) == (1, [2], None, "legacy")


def _assert_format_error(path, match=None):
    with pytest.raises(FormatError) as e:
        read_tokenizer(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    if match:
        assert match in msg, msg


def test_truncated_at_every_offset(tmp_path):
    p = tmp_path / "cut.t"
    for n in range(len(SMALL)):
        p.write_bytes(SMALL[:n])
        _assert_format_error(p)


@pytest.mark.parametrize("raw, problem", [
    (struct.pack("<i", 0x12345678) + SMALL[4:], "magic"),
    (SMALL + b"\0", "unexpected bytes"),
    (dllama_t([b"a"], bos=0, eos=[0], extra_kv=[(11, 0)]), "unknown tokenizer header key 11"),
    (dllama_t([b"a"], bos=0, eos=[0], extra_kv=[(-3, 0)]), "unknown tokenizer header key -3"),
    (dllama_t([b"a"], bos=0, eos=[0], extra_kv=[(0, 0)]), "version 0"),
    (dllama_t([b"a"], bos=0, eos=[0], extra_kv=[(0, 2)]), "version 2"),
    (struct.pack("<2i", MAGIC, 12) + struct.pack("<i", 0), "header size"),
    (dllama_t([b"a", b"b"], bos=2, eos=[0]), "bos id 2"),
    (dllama_t([b"a", b"b"], bos=-2, eos=[0]), "bos id -2"),
    (dllama_t([b"a", b"b"], bos=0, eos=[5]), "eos id 5"),
    (dllama_t([b"a"], bos=0, eos=[0], extra_kv=[(2, 0)]), "max token length"),
    (dllama_t([b"a"], bos=0, eos=[0], extra_kv=[(1, 0)]), "vocab size"),
    (dllama_t([b"a"], bos=0, eos=[0], extra_kv=[(1, 1 << 30)]), "vocab size"),
    (dllama_t([b"a"], bos=0, eos=[0], extra_kv=[(7, -5)]), "negative"),
    (dllama_t([b"a"], bos=0, eos=[0], extra_kv=[(10, 7)]), "add-bos"),
    (dllama_t([b"a"], bos=0, eos=[0], template=b"\xff\xfe"), "UTF-8"),
    (dllama_t([b"abc", b"d"], bos=0, eos=[0], extra_kv=[(2, 2)]), "over the max token length"),
    (struct.pack("<2i", MAGIC, 8 + 16) + struct.pack("<4i", 0, 1, 1, 1) + struct.pack("<fI", 0, 1) + b"a",
     "lacks"),
    (struct.pack("<2i", MAGIC, 8 + 16) + struct.pack("<4i", 1, 1, 2, 1) + struct.pack("<fI", 0, 1) + b"a",
     "no version"),
])
def test_malformed_files(tmp_path, raw, problem):
    p = tmp_path / "bad.t"
    p.write_bytes(raw)
    _assert_format_error(p, problem)


def test_missing_file_is_a_format_error(tmp_path):
    _assert_format_error(tmp_path / "nope.t", "cannot read")


@given(pos=st.integers(0, len(SMALL) - 1), value=st.integers(0, 255), cut=st.integers(0, 8))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_corrupted_bytes_give_format_error_or_load(tmp_path, pos, value, cut):
    raw = bytearray(SMALL)
    raw[pos] = value
    p = tmp_path / "fuzz.t"
    p.write_bytes(bytes(raw[:len(raw) - cut]))
    try:
        read_tokenizer(p)
    except FormatError as e:
        assert str(p) in str(e)


def _data(**kw) -> TokenizerData:
    args = dict(vocab=[b"a", b"b", b"ab", b"<|s|>"], scores=[0.0, -1.0, -2.0, -3.0], bos_id=3, eos_ids=[3],
                chat_template=TEMPLATE, add_bos=True, kind="bpe", pre="gpt2", merges=[(0, 1)],
                special_ids=[3], add_space_prefix=False)
    args.update(kw)
    return TokenizerData(**args)


def test_written_t_has_only_keys_distributed_llama_knows(tmp_path):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data())
    raw = p.read_bytes()
    magic, size = struct.unpack_from("<2i", raw)
    keys = [struct.unpack_from("<i", raw, 8 + 8 * i)[0] for i in range((size - 8) // 8)]
    assert magic == MAGIC and keys == [0, 1, 2, 3, 7, 9, 10]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["w.t", "w.t.json"]  # no temp files left


def test_sidecar_document(tmp_path):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data())
    doc = json.loads(sidecar_path(p).read_text("utf-8"))
    assert doc == {"format": "dllama-tokenizer-sidecar", "version": 1, "vocab_size": 4, "kind": "bpe",
                   "pre": "gpt2", "merges": [[0, 1]], "special_ids": [3], "add_space_prefix": False}


V2_DATA = {"added_ids": [2], "normalizer": "NFC", "ignore_merges": True, "prepend_scheme": "first",
           "lstrip_ids": [2], "rstrip_ids": [2, 3]}


def test_version_2_sidecar_round_trip(tmp_path):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data(**V2_DATA))
    doc = json.loads(sidecar_path(p).read_text("utf-8"))
    assert doc["version"] == 2 and {k: doc[k] for k in V2_DATA} == V2_DATA
    back = read_tokenizer(p)
    assert {k: getattr(back, k) for k in V2_DATA} == V2_DATA
    assert (back.kind, back.pre, back.merges, back.special_ids) == ("bpe", "gpt2", [(0, 1)], [3])


@pytest.mark.parametrize("field, value", list(V2_DATA.items()) + [("ignore_merges", False)])
def test_one_version_2_field_makes_version_2(tmp_path, field, value):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data(**{field: value}))
    doc = json.loads(sidecar_path(p).read_text("utf-8"))
    assert doc["version"] == 2 and doc[field] == value
    assert getattr(read_tokenizer(p), field) == value


def test_sentencepiece_merges_make_version_2(tmp_path):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data(kind="sentencepiece", pre=None, add_space_prefix=True))
    assert json.loads(sidecar_path(p).read_text("utf-8"))["version"] == 2
    assert read_tokenizer(p).merges == [(0, 1)]
    write_tokenizer(p, _data(kind="sentencepiece", pre=None, merges=[], add_space_prefix=True))
    assert json.loads(sidecar_path(p).read_text("utf-8"))["version"] == 1  # merged by score, as ever


def test_plain_tokenizers_stay_version_1(tmp_path):
    # What version 1 readers understand is still written as version 1, byte for byte as before.
    p = tmp_path / "w.t"
    write_tokenizer(p, _data(added_ids=[], normalizer=None, ignore_merges=None, prepend_scheme=None))
    assert sidecar_path(p).read_bytes() == (b'{"format":"dllama-tokenizer-sidecar","version":1,"vocab_size":4,'
                                            b'"kind":"bpe","pre":"gpt2","merges":[[0,1]],"special_ids":[3],'
                                            b'"add_space_prefix":false}')


@pytest.mark.parametrize("field, value", list(V2_DATA.items()) + [("added_ids", []), ("normalizer", None)])
def test_version_1_sidecar_with_a_version_2_field_is_refused(tmp_path, field, value):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data())
    side = sidecar_path(p)
    doc = json.loads(side.read_text("utf-8"))
    assert doc["version"] == 1
    side.write_text(json.dumps({**doc, field: value}))
    with pytest.raises(FormatError, match=f"'{field}' is a version 2 field, but the sidecar says version 1"):
        read_tokenizer(p)
    side.write_text(json.dumps({**doc, field: value, "version": 2}))  # the same field under version 2 loads
    back = read_tokenizer(p)
    # That field reads back as written (also the explicit defaults [] and null), the others keep
    # their defaults, and what version 1 holds is untouched.
    assert {f: getattr(back, f) for f in V2_DATA} == {f: getattr(_data(), f) for f in V2_DATA} | {field: value}
    assert (back.vocab, back.kind, back.pre, back.merges, back.special_ids) == \
        (_data().vocab, "bpe", "gpt2", [(0, 1)], [3])


def test_version_1_sentencepiece_sidecar_with_merges_is_refused(tmp_path):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data(kind="sentencepiece", pre=None, add_space_prefix=True))
    side = sidecar_path(p)
    doc = json.loads(side.read_text("utf-8"))
    side.write_text(json.dumps({**doc, "version": 1}))
    with pytest.raises(FormatError, match="merges for kind sentencepiece need sidecar version 2"):
        read_tokenizer(p)
    side.write_text(json.dumps({**doc, "version": 1, "merges": []}))
    assert read_tokenizer(p).merges == []


def test_legacy_data_writes_no_sidecar_and_removes_a_stale_one(tmp_path):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data())
    write_tokenizer(p, _data(kind="legacy", merges=[], special_ids=[]))
    assert not sidecar_path(p).exists()
    assert read_tokenizer(p).kind == "legacy"


def test_empty_token_cannot_be_written(tmp_path):
    with pytest.raises(ValueError, match="token 1 is empty"):
        write_tokenizer(tmp_path / "w.t", _data(vocab=[b"a", b"", b"ab", b"<|s|>"]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sidecar, problem", [
    (b"{not json", "unreadable"),
    (b"\xff\xfe", "unreadable"),
    (b"[]", "not a tokenizer sidecar"),
    ({"format": "something-else"}, "not a tokenizer sidecar"),
    ({"version": 3}, "sidecar version 3 is not supported (expected 1 or 2)"),
    ({"version": 0}, "sidecar version 0"),
    ({"version": "2"}, "sidecar version '2'"),
    ({"vocab_size": 5}, "5 tokens"),
    ({"kind": "wordpiece"}, "kind"),
    ({"pre": 3}, "'pre'"),
    ({"add_space_prefix": "yes"}, "add_space_prefix"),
    ({"merges": [[0, 9]]}, "bad merge"),
    ({"merges": [[0, 1, 2]]}, "bad merge"),
    ({"merges": [[0, True]]}, "bad merge"),
    ({"merges": {"a": 1}}, "must be lists"),
    ({"special_ids": [-1]}, "special id"),
    (b"[" * 100000 + b"]" * 100000, "unreadable"),
    ({"version": True}, "version"),
    ({"vocab_size": 5.0}, "tokens"),
])
def test_bad_sidecar(tmp_path, sidecar, problem):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data())
    side = sidecar_path(p)
    if isinstance(sidecar, dict):
        doc = json.loads(side.read_text("utf-8"))
        doc.update(sidecar)
        sidecar = json.dumps(doc).encode()
    side.write_bytes(sidecar)
    with pytest.raises(FormatError) as e:
        read_tokenizer(p)
    assert str(side) in str(e.value) and problem in str(e.value), str(e.value)


@st.composite
def tokenizer_data(draw) -> TokenizerData:
    vocab = draw(st.lists(st.binary(min_size=1, max_size=12), min_size=1, max_size=40))
    n = len(vocab)
    ids = st.integers(0, n - 1)
    kind = draw(st.sampled_from(["bpe", "sentencepiece", "legacy"]))
    special = sorted(draw(st.sets(ids, max_size=5))) if kind != "legacy" else []
    newer = {}  # version 2 fields, sometimes
    if kind != "legacy" and draw(st.booleans()):
        newer = {
            "added_ids": sorted(draw(st.sets(ids, max_size=3)) - set(special)),
            "normalizer": draw(st.sampled_from([None, "NFC", "NFKD"])),
            "ignore_merges": draw(st.sampled_from([None, False, True])),
            "prepend_scheme": draw(st.sampled_from([None, "always", "first"])),
            "lstrip_ids": sorted(draw(st.sets(ids, max_size=3))),
            "rstrip_ids": sorted(draw(st.sets(ids, max_size=3))),
        }
    return TokenizerData(
        vocab=vocab,
        scores=draw(st.lists(st.floats(width=32, allow_nan=False), min_size=n, max_size=n)),
        bos_id=draw(st.integers(-1, n - 1)),
        eos_ids=draw(st.lists(ids, unique=True, max_size=4)),
        chat_template=draw(st.one_of(st.none(), st.text(min_size=1))),
        add_bos=draw(st.booleans()),
        kind=kind,
        pre=draw(st.sampled_from([None, "smollm", "llama3"])) if kind == "bpe" else None,
        merges=draw(st.lists(st.tuples(ids, ids), max_size=20)) if kind != "legacy" else [],
        special_ids=special,
        add_space_prefix=draw(st.booleans()) if kind == "sentencepiece" else False,
        **newer,
    )


@given(data=tokenizer_data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_round_trip(tmp_path, data):
    p = tmp_path / "rt.t"
    write_tokenizer(p, data)
    back = read_tokenizer(p)
    assert back.vocab == data.vocab
    assert np.array_equal(np.asarray(back.scores, dtype=np.float32), np.asarray(data.scores, dtype=np.float32))
    assert back.bos_id == data.bos_id and back.eos_ids == data.eos_ids
    assert back.chat_template == data.chat_template and back.add_bos == data.add_bos
    assert (back.kind, back.pre, back.merges) == (data.kind, data.pre, data.merges)
    assert (back.special_ids, back.add_space_prefix) == (data.special_ids, data.add_space_prefix)
    fields = ("added_ids", "normalizer", "ignore_merges", "prepend_scheme", "lstrip_ids", "rstrip_ids")
    assert [getattr(back, f) for f in fields] == [getattr(data, f) for f in fields]
    if data.kind != "legacy":
        needs_2 = any(getattr(data, f) not in (None, []) for f in fields) or (data.kind == "sentencepiece"
                                                                            and data.merges)
        assert json.loads(sidecar_path(p).read_text("utf-8"))["version"] == (2 if needs_2 else 1)


def test_bpe_sidecar_without_merges(tmp_path):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data())
    side = sidecar_path(p)
    doc = json.loads(side.read_text("utf-8"))
    if doc["kind"] != "bpe":
        doc["kind"] = "bpe"
    del doc["merges"]
    side.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="needs its merges"):
        read_tokenizer(p)


def test_written_files_have_the_usual_permissions(tmp_path):
    import os

    p = tmp_path / "w.t"
    write_tokenizer(p, _data())
    umask = os.umask(0)
    os.umask(umask)
    for f in (p, sidecar_path(p)):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask
