"""The loss oracle L(θ*, S) (eq. 2, 3, 13) against a per-subset loop; its cache and counters;
the per-token lower bound over a box; the monotone envelope of Theorem 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.runtime.mixture import fused_log_likelihood, renormalise_on_subset
from moe2.selection.oracle import (
    EnvelopeOracle,
    LossOracle,
    TableOracle,
    masks_of,
    members,
    monotone_envelope,
    subset_of,
)
from moe2.selection.synthetic import all_losses, specialist_oracle
from tests.selection_helpers import box_members, supersets_within


def random_data(
    rng: np.random.Generator, n: int, examples: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Gate values (some exactly 0) and gold-token log-probabilities, (N, tokens) per example."""
    gates = rng.random((examples, n)) * (rng.random((examples, n)) > 0.2)
    gold = [
        np.log(rng.uniform(1e-4, 1.0, size=(n, int(rng.integers(1, 6))))) for _ in range(examples)
    ]
    return gates, gold


def naive_loss(gates: np.ndarray, gold: list[np.ndarray], subset: int) -> float:
    """Eq. 2–3, 13 one token at a time: -log of the gold token under the mixture renormalised
    on S, averaged over every gold token of every example."""
    chosen = [i for i in range(gates.shape[1]) if subset >> i & 1]
    nll = []
    for g, lp in zip(gates, gold, strict=True):
        total = sum(g[i] for i in chosen)
        for t in range(lp.shape[1]):
            if total == 0:  # no gate weight on S: every member counts alike
                p = sum(math.exp(lp[i, t]) for i in chosen) / len(chosen)
            else:
                p = sum(g[i] / total * math.exp(lp[i, t]) for i in chosen)
            nll.append(-math.log(p))
    return sum(nll) / len(nll)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6), examples=st.integers(1, 6))
def test_losses_are_the_renormalised_mixture_nll_per_gold_token(
    seed: int, n: int, examples: int
) -> None:
    gates, gold = random_data(np.random.default_rng(seed), n, examples)
    oracle = LossOracle([f"e{i}" for i in range(n)], gates, gold)
    subsets = list(range(1, 1 << n))
    want = [naive_loss(gates, gold, s) for s in subsets]
    np.testing.assert_allclose(oracle.losses(subsets), want, rtol=1e-9)
    assert oracle.tokens == sum(lp.shape[1] for lp in gold)


def test_losses_come_from_the_mixture_home_with_its_zero_sum_rule() -> None:
    """Per subset, the oracle's loss is -mean_t fused_log_likelihood with the gating renormalised
    on S (eq. 2): the same functions as evaluation, even where S has no gate weight at all."""
    rng = np.random.default_rng(3)
    gates, gold = random_data(rng, 4, 5)
    gates[0, :2] = 0.0  # example 0: S = {e0, e1} has no gate weight, so equal weights
    oracle = LossOracle([f"e{i}" for i in range(4)], gates, gold)
    for s in range(1, 16):
        subset = [i for i in range(4) if s >> i & 1]
        per_token = np.concatenate(
            [
                fused_log_likelihood(lp, renormalise_on_subset(g, subset))
                for g, lp in zip(gates, gold, strict=True)
            ]
        )
        assert oracle.loss(s) == pytest.approx(-per_token.mean(), rel=1e-12)


def test_the_cache_counts_distinct_subsets_as_calls_and_every_lookup_as_a_request() -> None:
    oracle = specialist_oracle(5, np.random.default_rng(1))
    first = oracle.losses([3, 3, 5])
    assert (oracle.calls, oracle.requests) == (2, 3)
    second = oracle.losses([5, 6])
    assert (oracle.calls, oracle.requests) == (3, 5)
    assert second[0] == first[2]
    assert oracle.loss(6) == second[1]
    assert (oracle.calls, oracle.requests) == (3, 6)
    oracle.evaluate_subsets([3, 3])  # uncached: every subset counted
    assert oracle.calls == 5
    oracle.reset_counts()
    assert (oracle.calls, oracle.requests, oracle.bounds) == (0, 0, 0)
    oracle.losses([3])
    assert oracle.calls == 1  # the cache went with the counts


def test_the_empty_subset_has_infinite_loss() -> None:
    oracle = specialist_oracle(3, np.random.default_rng(2))
    assert oracle.losses([0, 1]).tolist()[0] == math.inf
    assert math.isfinite(oracle.loss(1))


def test_malformed_inputs_are_rejected() -> None:
    gold = [np.zeros((2, 3))]
    with pytest.raises(ValueError, match="gate values"):
        LossOracle(["a", "b"], np.ones((1, 3)), gold)
    with pytest.raises(ValueError, match="finite and >= 0"):
        LossOracle(["a", "b"], np.array([[1.0, -0.1]]), gold)
    with pytest.raises(ValueError, match="at least one gold token"):
        LossOracle(["a", "b"], np.ones((1, 2)), [np.zeros((2, 0))])


def test_subset_bitmasks_and_members_round_trip() -> None:
    masks = masks_of([0, 5, 6], 3)
    assert masks.tolist() == [[False] * 3, [True, False, True], [False, True, True]]
    assert [subset_of(m) for m in masks] == [0, 5, 6]
    assert members(5, ["a", "b", "c"]) == ["a", "c"]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), data=st.data())
def test_lower_bounds_are_below_every_subset_of_the_box(
    seed: int, n: int, data: st.DataObject
) -> None:
    oracle = specialist_oracle(n, np.random.default_rng(seed), examples=6)
    losses = all_losses(oracle)
    p = data.draw(st.integers(0, (1 << n) - 1), label="p")
    qs = supersets_within(p, n)
    bounds = oracle.lower_bounds(p, qs.tolist())
    assert oracle.bounds == len(qs)
    for q, bound in zip(qs.tolist(), bounds, strict=True):
        inside = box_members(p, q, n)
        best = float(losses[inside].min()) if inside.any() else math.inf
        assert bound <= best + 1e-12, (p, q)
        if q == p:  # a box of one subset: the bound is its loss
            assert bound == pytest.approx(best, rel=1e-12)


def test_lower_bounds_count_no_loss_evaluations() -> None:
    oracle = specialist_oracle(6, np.random.default_rng(3))
    oracle.lower_bounds(1, [63, 31, 7])
    assert (oracle.calls, oracle.bounds) == (0, 3)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 7), values=st.data())
def test_monotone_envelope_is_monotone_below_the_values_with_attaining_witnesses(
    n: int, values: st.DataObject
) -> None:
    size = 1 << n
    raw = np.array(values.draw(st.lists(st.floats(0, 10), min_size=size, max_size=size)))
    raw[0] = math.inf
    env, witness = monotone_envelope(raw, n)
    everything = np.arange(size)
    for s in range(size):
        below = (everything & ~s) == 0
        assert env[s] == raw[below].min()  # the least value over every S' ⊆ S
        assert witness[s] & ~s == 0 and raw[witness[s]] == env[s]
        for i in range(n):
            assert env[s | 1 << i] <= env[s]


def test_envelope_oracle_serves_the_envelope_of_the_base_losses() -> None:
    base = specialist_oracle(6, np.random.default_rng(4))
    envelope = EnvelopeOracle(base)
    assert (base.calls, envelope.upfront_calls) == (64, 64)
    want, witnesses = monotone_envelope(all_losses(base), 6)
    subsets = [63, 12, 1]
    np.testing.assert_array_equal(envelope.losses(subsets), want[subsets])
    assert envelope.requests == 3
    assert [envelope.witness(s) for s in subsets] == witnesses[subsets].tolist()
    assert envelope.losses([63])[0] == min(base.losses(list(range(1, 64))))


def test_envelope_oracle_refuses_pools_too_large_to_enumerate() -> None:
    base = TableOracle([f"e{i}" for i in range(5)], np.zeros(32))
    with pytest.raises(ValueError, match="2\\^5 losses; keep it to 4"):
        EnvelopeOracle(base, max_experts=4)


def test_table_oracle_counts_fresh_lookups_and_checks_its_size() -> None:
    table = TableOracle(["a", "b"], [math.inf, 1.0, 2.0, 0.5])
    assert table.losses([1, 3, 1]).tolist() == [1.0, 0.5, 1.0]
    assert (table.calls, table.requests) == (2, 3)
    with pytest.raises(ValueError, match="a table over 2 experts has 4 entries"):
        TableOracle(["a", "b"], [1.0, 2.0])
