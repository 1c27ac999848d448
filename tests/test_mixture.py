"""The mixture maths' one home: eq. 2 on a subset, eq. 28's top-k, eq. 13's fused log-likelihood
(per token and vectorised over subsets), the rest mass, and the one zero-sum rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.runtime.mixture import (
    GATE_FLOOR,
    floor_gates,
    fused_log_likelihood,
    fused_log_likelihood_on_subsets,
    renormalise_on_subset,
    rest_mass,
    top_k_weights,
)

log = np.log

# --- eq. 2: renormalisation on S ----------------------------------------------------------------


def test_renormalise_on_subset_is_eq_2_and_zero_outside_s() -> None:
    g = np.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.0, 0.25, 0.25]])
    out = renormalise_on_subset(g, [0, 2])
    np.testing.assert_allclose(out, [[1 / 3, 0, 2 / 3, 0], [2 / 3, 0, 1 / 3, 0]])
    np.testing.assert_allclose(renormalise_on_subset([2.0, 6.0]), [0.25, 0.75])
    assert renormalise_on_subset([0.0, 1.0], [0]).tolist() == [1.0, 0.0]  # a lone zero: all of it


@pytest.mark.parametrize(
    "on_s",
    [[0.0, 0.0, 0.0], [0.5, -0.1, 0.6], [0.5, math.nan, 0.1], [0.5, math.inf, 0.1], [1e308] * 3],
    ids=["all zero", "negative", "nan", "inf", "sum overflows"],
)
def test_the_zero_sum_rule_gives_equal_weights_on_s(on_s: list[float]) -> None:
    w = np.array([*on_s, 7.0])
    assert renormalise_on_subset(w, [0, 1, 2]).tolist() == [1 / 3, 1 / 3, 1 / 3, 0.0]


def test_values_outside_s_never_matter_and_rows_are_independent() -> None:
    g = np.array([[1.0, 3.0, math.nan], [0.0, 0.0, -5.0]])
    out = renormalise_on_subset(g, [0, 1])
    assert out.tolist() == [[0.25, 0.75, 0.0], [0.5, 0.5, 0.0]]


def test_an_empty_subset_gives_no_weight() -> None:
    assert renormalise_on_subset([0.3, 0.7], []).tolist() == [0.0, 0.0]
    assert renormalise_on_subset(np.zeros(0)).shape == (0,)


@pytest.mark.parametrize("subset", [[0, 0], [3], [-1]])
def test_bad_subsets_are_refused(subset: list[int]) -> None:
    with pytest.raises(ValueError, match="distinct expert indices"):
        renormalise_on_subset(np.ones(3), subset)


@settings(max_examples=60, deadline=None)
@given(
    # no subnormals: 5e-324 x 0.5 is 0 in float64, and a sum of 0 is the equal-weights rule
    values=st.lists(st.one_of(st.just(0.0), st.floats(1e-300, 1e6)), min_size=1, max_size=8),
    scale=st.floats(1e-3, 1e3),
    data=st.data(),
)
def test_renormalised_weights_are_a_distribution_on_s_and_scale_free(
    values: list[float], scale: float, data: st.DataObject
) -> None:
    n = len(values)
    subset = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    w = renormalise_on_subset(values, subset)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert np.count_nonzero(w[[i for i in range(n) if i not in subset]]) == 0
    np.testing.assert_allclose(renormalise_on_subset(np.array(values) * scale, subset), w)


# --- eq. 28 / Algorithm 3: the top-k of S --------------------------------------------------------


def test_top_k_weights_keep_the_k_largest_of_s() -> None:
    values = np.array([0.1, 0.4, 0.2, 0.3])
    np.testing.assert_allclose(top_k_weights(values, 2, [0, 2, 3]), [0.0, 0.0, 0.4, 0.6])
    np.testing.assert_allclose(top_k_weights(values, None), values)
    np.testing.assert_allclose(top_k_weights(values, 0), values)
    np.testing.assert_allclose(top_k_weights(values, 9), values)
    np.testing.assert_allclose(top_k_weights(values, 3, [1]), [0, 1, 0, 0])


def test_top_k_weights_rows_ties_keep_the_order_of_s() -> None:
    values = np.array([[0.5, 0.3, 0.2], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    np.testing.assert_allclose(
        top_k_weights(values, 2), [[0.625, 0.375, 0], [1 / 3, 2 / 3, 0], [1 / 3, 0, 2 / 3]]
    )
    assert top_k_weights(values[2], 1, [0, 1]).tolist() == [1.0, 0.0, 0.0]
    assert top_k_weights(values[2], 1, [1, 0]).tolist() == [0.0, 1.0, 0.0]


def test_top_k_of_values_that_break_the_zero_sum_rule_are_the_first_k_of_s() -> None:
    for bad in ([0.0, 0.0, 0.0], [0.2, -1.0, 0.9], [math.nan, 0.5, 0.5]):
        assert top_k_weights(bad, 2, [2, 0, 1]).tolist() == [0.5, 0.0, 0.5]


def test_top_k_weights_refuse_a_negative_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        top_k_weights(np.ones(3), -1)


# --- eq. 13's term: the fused log-likelihood -----------------------------------------------------


def test_the_fused_log_likelihood_mixes_in_probability_space() -> None:
    lp = log([[0.2, 0.5], [0.6, 0.1]])  # 2 experts x 2 tokens
    np.testing.assert_allclose(fused_log_likelihood(lp, [0.5, 0.5]), log([0.4, 0.3]))
    np.testing.assert_allclose(fused_log_likelihood(lp, [1.0, 0.0]), log([0.2, 0.5]))
    very_small = np.array([[-1000.0], [-1001.0]])  # no underflow to -inf
    np.testing.assert_allclose(
        fused_log_likelihood(very_small, [0.5, 0.5]), [-1000 + log(0.5 * (1 + math.exp(-1)))]
    )
    assert fused_log_likelihood(lp, [0.0, 0.0]).tolist() == [-math.inf, -math.inf]


def masks(n: int) -> np.ndarray:
    subsets = np.arange(1 << n)
    return (subsets[:, None] >> np.arange(n)[None, :] & 1).astype(bool)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6), tokens=st.integers(1, 8))
def test_the_vectorised_fused_log_likelihood_is_the_per_subset_one(
    seed: int, n: int, tokens: int
) -> None:
    """The loss oracle's two matrix products equal renormalise_on_subset + fused_log_likelihood
    for every S, including S whose gates are all zero (equal weights) and the empty S."""
    rng = np.random.default_rng(seed)
    g = rng.random((tokens, n)) * (rng.random((tokens, n)) > 0.4)  # many zero gates
    lp = log(rng.uniform(1e-6, 1.0, size=(n, tokens)))
    gates = floor_gates(g)
    got = fused_log_likelihood_on_subsets(gates, gates * np.exp(lp.T), masks(n))
    for b, mask in enumerate(masks(n)):
        subset = np.flatnonzero(mask)
        want = [fused_log_likelihood(lp[:, [t]], renormalise_on_subset(g[t], subset))[0]
                for t in range(tokens)]  # fmt: skip
        np.testing.assert_allclose(got[:, b], want, rtol=1e-9, atol=1e-12)


def test_floor_gates_refuses_what_eq_2_cannot_weigh() -> None:
    assert floor_gates([[0.0, 0.5]]).tolist() == [[GATE_FLOOR, 0.5]]
    for bad in ([[-0.1, 1.0]], [[math.nan, 1.0]], [[math.inf, 1.0]]):
        with pytest.raises(ValueError, match="finite and >= 0"):
            floor_gates(bad)


# --- the rest mass of a top-K ------------------------------------------------------------------


def test_the_rest_mass_is_what_the_listed_ids_leave_and_never_negative() -> None:
    assert rest_mass([0.5, 0.2]) == pytest.approx(0.3)
    assert rest_mass(np.exp(np.log(np.full(4, 0.25, dtype=np.float32)))) == pytest.approx(
        0, abs=1e-7
    )
    assert rest_mass([0.7, 0.4]) == 0.0
    assert rest_mass([]) == 1.0
