"""Tensor cuts (``formats.cuts``) against a brute-force model of sets of indices, and the slice
cache assembling a new plan's slices from what earlier plans left: the bytes it keeps are the
model's, the pieces it asks for are exactly the bytes it lacks, and filling them in (as the
root's chunks do) gives the new plan's slices byte for byte."""
from __future__ import annotations

import hashlib
import itertools
import json
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.formats.cuts import TensorCut, missing, overlap
from dllama.formats.mfile import ModelFile
from dllama.kernels.quants import FloatType
from dllama.model.slicing import node_cuts, node_tensors, plan_slices, whole_bytes
from dllama.transport.slice_cache import SliceCache
from tests.helpers import tiny_header, write_random_model


# -- cuts -----------------------------------------------------------------------------------------
@st.composite
def tensors(draw) -> tuple[str, int, int, int]:
    """(name, rows, row_bytes, axis) of a tensor seen along one axis."""
    return (draw(st.sampled_from(["a", "b"])), draw(st.integers(1, 6)), draw(st.integers(1, 24)),
            draw(st.integers(0, 1)))


def extent(t) -> int:
    return t[1] if t[3] == 0 else t[2]


@st.composite
def cuts_of(draw, t) -> TensorCut:
    n = extent(t)
    lo = draw(st.integers(0, n - 1))
    return TensorCut(*t, lo, draw(st.integers(lo + 1, n)))


@st.composite
def want_and_have(draw):
    """A cut ``want``, and cuts ``have`` of the same tensor mixed with cuts of others (another
    name, shape or axis), which hold none of ``want``'s bytes as far as ``missing`` knows."""
    t = draw(tensors())
    others = st.one_of(tensors(), st.just((*t[:3], 1 - t[3]))).filter(lambda o: o != t)
    have = draw(st.lists(st.one_of(cuts_of(t), others.flatmap(cuts_of)), max_size=6))
    return draw(cuts_of(t)), have


def indices(lo: int, hi: int) -> set[int]:
    return set(range(lo, hi))


@settings(max_examples=400, deadline=None)
@given(want_and_have())
def test_missing_is_what_no_cut_of_the_same_tensor_covers(case):
    want, have = case
    gaps = missing(want, have)
    covered = set().union(*[indices(h.lo, h.hi) for h in have if h[:4] == want[:4]])
    assert set().union(*[indices(lo, hi) for lo, hi in gaps]) == indices(want.lo, want.hi) - covered
    # Sorted, disjoint, none empty, none touching the next (a covered range lies between).
    assert all(lo < hi for lo, hi in gaps)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(gaps))
    if len([h for h in have if h[:4] == want[:4]]) <= 1:
        assert len(gaps) <= 2


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_overlap_is_the_intersection_of_the_same_tensor(data):
    t = data.draw(tensors())
    want = data.draw(cuts_of(t))
    have = data.draw(st.one_of(cuts_of(t), tensors().flatmap(cuts_of)))
    got = overlap(want, have)
    common = indices(want.lo, want.hi) & indices(have.lo, have.hi) if have[:4] == want[:4] else set()
    if not common:
        assert got is None
    else:
        assert got is not None and indices(*got) == common
        assert overlap(have, want) == got


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_region_and_place_address_the_same_bytes(data):
    """``region`` (of the whole tensor) and ``place`` (in a cut's own buffer) agree: what
    ``assemble`` copies from a stored cut into a new one is the same bytes of the tensor."""
    t = data.draw(tensors())
    a, b = data.draw(cuts_of(t)), data.draw(cuts_of(t))
    whole = np.arange(t[1] * t[2], dtype=np.int64).reshape(t[1], t[2])
    assert a.region(whole).shape == a.shape and a.region(whole).size == a.nbytes
    buf_a, buf_b = a.region(whole).copy(), np.full(b.shape, -1)
    span = overlap(b, a)
    if span is not None:
        assert np.array_equal(a.place(buf_a, *span), a.region(whole, *span))
        b.place(buf_b, *span)[...] = a.place(buf_a, *span)
        assert np.array_equal(b.place(buf_b, *span), b.region(whole, *span))
    for lo, hi in missing(b, [a]):  # the rest of b, untouched
        assert (b.place(buf_b, lo, hi) == -1).all()


@given(st.data())
def test_cut_json_round_trip_and_bad_values(data):
    cut = data.draw(tensors().flatmap(cuts_of))
    assert TensorCut.from_json(json.loads(json.dumps(cut.to_json()))) == cut
    for bad in ([*cut[:4], cut.hi, cut.lo], [*cut[:3], 2, cut.lo, cut.hi], [*cut[:5], extent(cut) + 1],
                [*cut[:4], True, cut.hi], [1, *cut[1:]], list(cut[:5]), "cut"):
        with pytest.raises(ValueError):
            TensorCut.from_json(bad)


# -- the slice cache over plans -------------------------------------------------------------------
MODELS = {
    # F32: byte columns of o and w2 are 4 per value; 4 heads on 2 KV heads, 3 feed-forward blocks.
    "f32": {"weight_type": FloatType.F32},
    # Q40: 18-byte blocks of 32 values; 6 heads on 2 KV heads (replicated beyond 2 nodes), 7
    # feed-forward blocks and 101 vocabulary rows (no even split).
    "q40": {"weight_type": FloatType.Q40, "dim": 128, "hidden_dim": 224, "n_layers": 1, "n_heads": 6,
            "n_kv_heads": 2, "head_dim": 32, "vocab_size": 101},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, ModelFile]:
    out = {}
    for name, kw in MODELS.items():
        path = tmp_path_factory.mktemp("cuts") / f"{name}.m"
        write_random_model(path, tiny_header(**kw), seed=3)
        out[name] = ModelFile(path)
    return out


def slice_bytes(model: ModelFile, node) -> dict[str, np.ndarray]:
    """The node's tensors as flat bytes, cut by ``node_tensors`` (typed slicing, not cuts)."""
    return {name: np.ascontiguousarray(t).reshape(-1).view(np.uint8)
            for name, t in node_tensors(model.tensors, model.header, node).items()}


def key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


@st.composite
def plans(draw, model: ModelFile):
    h = model.header
    most = min(h.n_heads, (h.hidden_dim // 32), 5)
    n = draw(st.integers(1, most))
    return plan_slices(h, draw(st.lists(st.floats(0.3, 3.0), min_size=n, max_size=n)))


@settings(max_examples=40, deadline=None)
@given(which=st.sampled_from(sorted(MODELS)), data=st.data())
def test_assemble_keeps_what_earlier_plans_cached_and_asks_for_exactly_the_rest(models, which, data):
    model = models[which]
    h = model.header
    digest = key("model", which)
    old = data.draw(plans(model), "old plan")
    stored = data.draw(st.lists(st.sampled_from(old), min_size=1, max_size=2, unique_by=lambda n: n.index),
                       "cached nodes")
    new = data.draw(plans(model), "new plan")
    target = data.draw(st.sampled_from(new), "node")
    with tempfile.TemporaryDirectory() as tmp:
        cache = SliceCache(tmp)
        for node in stored:
            cache.store(key("slice", node), node_cuts(h, node), slice_bytes(model, node), digest)
        # An entry of another model with the same cuts: its bytes must not be used.
        cache.store(key("other", target), node_cuts(h, target),
                    {c.name: np.full(c.nbytes, 0xA5, np.uint8) for c in node_cuts(h, target)}, key("other model"))
        cuts = node_cuts(h, target)
        buffers, need = cache.assemble(digest, cuts)
    want = slice_bytes(model, target)
    assert [c.name for c in cuts] == list(want) == list(buffers)
    held = {}  # tensor -> the indices the cached entries hold, along the target cut's axis
    for node in stored:
        for c in node_cuts(h, node):
            held.setdefault(c[:4], set()).update(indices(c.lo, c.hi))
    by_name = {c.name: c for c in cuts}
    for piece in need:
        cut = by_name[piece.name]
        assert piece[:4] == cut[:4] and cut.lo <= piece.lo < piece.hi <= cut.hi
    for cut in cuts:
        whole = whole_bytes(model.tensors, cut.name)
        assert np.array_equal(cut.region(whole).reshape(-1), want[cut.name])  # cuts and node_tensors agree
        asked = [indices(p.lo, p.hi) for p in need if p.name == cut.name]
        assert sum(map(len, asked)) == len(set().union(*asked))  # no byte asked for twice
        assert set().union(*asked) == indices(cut.lo, cut.hi) - held.get(cut[:4], set())
        got = buffers[cut.name].reshape(cut.shape)
        expected = want[cut.name].reshape(cut.shape)
        for lo, hi in missing(cut, need):  # what it kept: the model's bytes
            assert np.array_equal(cut.place(got, lo, hi), cut.place(expected, lo, hi))
    # The root sends each needed piece's bytes of the whole tensor; the worker puts them in place.
    for piece in need:
        cut = by_name[piece.name]
        cut.place(buffers[piece.name].reshape(cut.shape), piece.lo, piece.hi)[...] = \
            piece.region(whole_bytes(model.tensors, piece.name))
    for name, expected in want.items():
        assert np.array_equal(buffers[name], expected), name
    sent = sum(p.nbytes for p in need)
    assert sent <= sum(c.nbytes for c in cuts)
    if any(node == target for node in stored):
        assert sent == 0


def test_load_returns_the_stored_entry_and_refuses_other_layouts(models, tmp_path):
    model = models["q40"]
    h = model.header
    a, b = plan_slices(h, [1, 1])
    cache = SliceCache(tmp_path)
    cache.store(key("a"), node_cuts(h, b), slice_bytes(model, b), "d")
    loaded = cache.load(key("a"), node_cuts(h, b))
    assert loaded is not None and all(np.array_equal(loaded[n], t) for n, t in slice_bytes(model, b).items())
    assert cache.load(key("a"), node_cuts(h, a)) is None  # another layout: not ours, left alone
    assert cache.load(key("a"), node_cuts(h, b)) is not None
    assert cache.load(key("absent"), node_cuts(h, b)) is None
    assert cache.load("not a key", node_cuts(h, b)) is None
    # A corrupt entry is dropped by load, and assemble never uses it.
    data = tmp_path / key("a") / "slice.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    _, need = cache.assemble("d", node_cuts(h, b))
    assert need == node_cuts(h, b)
    assert cache.load(key("a"), node_cuts(h, b)) is None
    assert not (tmp_path / key("a")).exists()
