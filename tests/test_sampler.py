import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from dllama.engine.sampler import Sampler

logit_arrays = hnp.arrays(np.float32, st.integers(2, 60), elements=st.floats(-20, 20, width=32))


@given(logit_arrays)
def test_temperature_zero_is_argmax(logits):
    assert Sampler(temperature=0).sample(logits) == int(np.argmax(logits))


@settings(max_examples=50, deadline=None)
@given(logit_arrays, st.integers(0, 2**32 - 1), st.floats(0.05, 1.0), st.floats(0.1, 2.0))
def test_same_seed_same_tokens(logits, seed, topp, temperature):
    a = Sampler(temperature, topp, seed)
    b = Sampler(temperature, topp, seed)
    assert [a.sample(logits) for _ in range(10)] == [b.sample(logits) for _ in range(10)]


@settings(max_examples=50, deadline=None)
@given(logit_arrays, st.integers(0, 1000), st.floats(0.05, 0.99))
def test_topp_only_picks_from_the_nucleus(logits, seed, topp):
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    # The nucleus, by its definition: most probable first, until the mass passes topp.
    nucleus, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        nucleus.add(i)
        mass += p[i]
        if mass > topp:
            break
    # Ties at the boundary may be broken either way: admit every token as likely as the last one.
    nucleus |= {i for i in range(len(p)) if p[i] >= min(p[j] for j in nucleus)}
    s = Sampler(1.0, topp, seed)
    for _ in range(20):
        assert s.sample(logits) in nucleus


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    s = Sampler(1.0, 1.0, seed=7)
    counts = np.bincount([s.sample(logits) for _ in range(6000)], minlength=3) / 6000
    # binomial standard deviation at n=6000 is under 0.0065: 0.03 is more than 4 sigma
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_bad_parameters():
    with pytest.raises(ValueError):
        Sampler(-1.0)
    with pytest.raises(ValueError):
        Sampler(1.0, 0.0)
