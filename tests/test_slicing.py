"""The slice plan and the per-node forward, in one process: any node count, uneven splits,
KV heads replicated beyond their count, every architecture, both kernel backends."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.errors import DllamaError
from dllama.formats.mfile import ArchType, ModelFile
from dllama.kernels.quants import FloatType
from dllama.model.forward import Transformer
from dllama.model.slicing import node_specs, plan_slices, proportional
from tests.helpers import tiny_header, write_random_model
from tests.threaded_cluster import ThreadedCluster


@given(st.integers(1, 500), st.lists(st.floats(0.1, 10), min_size=1, max_size=8))
def test_proportional_split(total, weights):
    if total < len(weights):
        with pytest.raises(ValueError):
            proportional(total, weights)
        return
    counts = proportional(total, weights)
    assert sum(counts) == total and min(counts) >= 1
    ideal = [total * w / sum(weights) for w in weights]
    # Within one unit of the ideal share, but the units that nodes under one unit are lifted
    # to must come from someone.
    forced = sum(max(0.0, 1 - i) for i in ideal)
    assert all(abs(c - i) < 1 + forced + 1e-9 for c, i in zip(counts, ideal))


@settings(max_examples=200, deadline=None)
@given(kv=st.sampled_from([1, 2, 3, 4, 8]), group=st.integers(1, 4), nodes=st.integers(1, 12),
       blocks=st.integers(1, 20), vocab=st.integers(12, 300), data=st.data())
def test_plan_covers_everything_once(kv, group, nodes, blocks, vocab, data):
    h = tiny_header(FloatType.Q40, n_heads=kv * group, n_kv_heads=kv, head_dim=32, dim=64,
                    hidden_dim=32 * blocks, vocab_size=vocab)
    split = data.draw(st.lists(st.floats(0.2, 5), min_size=nodes, max_size=nodes))
    if nodes > h.n_heads or nodes > blocks:
        with pytest.raises(DllamaError):
            plan_slices(h, split)
        return
    plan = plan_slices(h, split)
    for field, total in (("q_heads", h.n_heads), ("hidden", h.hidden_dim), ("vocab", h.vocab_size)):
        ranges = [getattr(s, field) for s in plan]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:] + [(total, total + 1)]))
    for s in plan:
        assert s.hidden[0] % 32 == 0  # whole Q40 blocks of w2's columns
        # every query head's KV head is held, and no other
        needed = {q // group for q in range(*s.q_heads)}
        assert set(range(*s.kv_heads)) == needed
        if nodes <= kv:
            assert s.n_heads == s.n_kv_heads * group  # whole groups: nothing replicated
    assert sum(spec.nbytes for spec in node_specs(h, plan[0])) > 0


def test_too_many_nodes_is_one_clear_error():
    h = tiny_header(n_heads=4, n_kv_heads=2)
    with pytest.raises(DllamaError, match="5 nodes are more than the model's 4 attention heads"):
        plan_slices(h, [1] * 5)


CASES = {
    "llama": dict(n_heads=6, n_kv_heads=2, head_dim=32, hidden_dim=224),
    "qwen3": dict(arch=ArchType.QWEN3, n_heads=6, n_kv_heads=3, head_dim=32, hidden_dim=160),
    "qwen3-moe": dict(arch=ArchType.QWEN3_MOE, n_heads=6, n_kv_heads=2, head_dim=32, moe_hidden_dim=160),
}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("weights", [FloatType.F32, FloatType.Q40])
@pytest.mark.parametrize("case", list(CASES))
def test_threaded_cluster_equals_one_node(tmp_path, case, weights, backend):
    kw = dict(CASES[case])
    h = tiny_header(weights, kw.pop("arch", ArchType.LLAMA), **kw)
    write_random_model(tmp_path / "m.m", h, seed=3)
    m = ModelFile(tmp_path / "m.m")
    tokens = [3, 17, 42, 5, 5, 79, 0, 23]
    want = Transformer(m, backend=backend).forward(tokens, 0, all_logits=True)
    for split in ([1, 1], [1, 1, 1], [1, 1, 1, 1], [2, 1], [1, 2, 3, 1, 1]):
        cluster = ThreadedCluster(m, split, backend=backend)
        try:
            got = cluster.forward(tokens[:5], 0, all_logits=True)
            got = np.concatenate([got, cluster.forward(tokens[5:], 5, all_logits=True)])
        finally:
            cluster.close()
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0, err_msg=str(split))
