"""The draw that a cluster makes from each node's summary of its slice of the logits equals the
draw on the whole row (``kernels.nucleus``), and that draw follows its exact definition."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.kernels import nucleus


def exact_draw(logits: np.ndarray, temperature: float, topp: float, coin: float) -> int:
    """The definition, word for word, in rational arithmetic over every token."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    w = nucleus.weights(logits, temperature, float(z.max()))
    order = sorted(range(len(w)), key=lambda j: (-w[j], j))
    cumulative, running = [], Fraction(0)
    for j in order:
        running += Fraction(float(w[j]))
        cumulative.append(running)
    total = cumulative[-1]
    keep = next((k + 1 for k, c in enumerate(cumulative) if c > Fraction(topp) * total), len(order))
    target = Fraction(coin) * cumulative[keep - 1]
    return order[next(i for i, c in enumerate(cumulative) if c > target)]


# Few distinct values make ties, in the logits and at the nucleus' edge.
logit_values = st.one_of(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0, 2.0]),
                         st.floats(-30, 30, allow_nan=False, width=32))
rows = st.lists(logit_values, min_size=1, max_size=120).map(lambda v: np.array(v, dtype=np.float32))
temperatures = st.one_of(st.just(0.0), st.sampled_from([0.1, 0.7, 1.0, 1.3, 10.0]),
                         st.floats(0.05, 5, allow_nan=False))
topps = st.one_of(st.sampled_from([0.05, 0.5, 0.9, 0.95, 1.0]), st.floats(0.01, 1.0, exclude_min=False))
coins = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.999999]), st.floats(0, 1, exclude_max=True))


@settings(max_examples=400, deadline=None)
@given(rows, temperatures, topps, coins)
def test_draw_full_follows_the_definition(logits, temperature, topp, coin):
    assert nucleus.draw_full(logits, temperature, topp, coin) == exact_draw(logits, temperature, topp, coin)


@st.composite
def sliced(draw):
    logits = draw(rows)
    n = len(logits)
    cuts = sorted(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=min(4, n - 1), unique=True))) if n > 1 else []
    bounds = [0, *cuts, n]
    return logits, [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


@settings(max_examples=600, deadline=None)
@given(sliced(), temperatures, topps, coins, st.integers(1, 12), st.randoms(use_true_random=False))
def test_draw_from_summaries_equals_the_full_draw(row, temperature, topp, coin, k, rnd):
    """Whatever the slicing and the candidates each slice lists, a decided draw is the full
    draw; an undecided one (None) sends the root to the full rows, which decide."""
    logits, slices = row
    n = len(logits)
    parts = [nucleus.summarize(logits[a:b], a, temperature, topp, n, k) for a, b in slices]
    rnd.shuffle(parts)  # the root may merge them in any order
    got = nucleus.draw(parts, temperature, topp, coin)
    want = nucleus.draw_full(logits, temperature, topp, coin)
    if got is not None:
        assert got == want
    if temperature == 0:
        assert got == want  # greedy always decides from one (value, id) per slice
    complete = [nucleus.summarize(logits[a:b], a, temperature, 1.0, n, b - a) for a, b in slices]
    all_w = nucleus.weights(logits, temperature, max(p.z_max for p in complete)) if temperature else None
    assert nucleus.draw(complete, temperature, topp, coin, all_w) == want


def test_small_nuclei_are_decided_from_summaries():
    """Where the nucleus holds fewer tokens than a slice lists, the summaries decide the draw
    (nearly always: only a coin within rounding of a boundary needs the full rows)."""
    rng = np.random.default_rng(0)
    n, small, decided = 49152, 0, 0
    for _ in range(300):
        logits = (rng.standard_normal(n) * rng.uniform(0.5, 3)).astype(np.float32)
        logits[rng.integers(0, n, 30)] += rng.uniform(5, 25, 30).astype(np.float32)
        temperature, topp, coin = float(rng.uniform(0.3, 1.2)), float(rng.uniform(0.5, 0.99)), float(rng.random())
        w = np.sort(nucleus.weights(logits, temperature, float(logits.max()) / temperature))[::-1]
        cumulative = np.cumsum(w)
        if np.searchsorted(cumulative, topp * cumulative[-1], side="right") + 1 > nucleus.CANDIDATES // 2:
            continue
        small += 1
        parts = [nucleus.summarize(logits[a:a + n // 2], a, temperature, topp, n) for a in (0, n // 2)]
        got = nucleus.draw(parts, temperature, topp, coin)
        if got is not None:
            decided += 1
            assert got == nucleus.draw_full(logits, temperature, topp, coin)
    assert small >= 100 and decided == small
