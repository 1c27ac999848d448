"""Fusion maths against a full-vocabulary reference; sampling; text assembly; top-k gating."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.gating import top_k_experts
from moe2.runtime.deadline import LateTracker
from moe2.runtime.fusion import ExpertSlice, fuse, fuse_full
from moe2.runtime.sampling import SamplingParams, TokenSampler
from moe2.runtime.text import TextAssembler


def random_distributions(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    logits = rng.normal(size=(n, vocab)) * 3
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def top_k_slice(p: np.ndarray, k: int) -> ExpertSlice:
    ids = np.argsort(-p, kind="stable")[:k]
    return ExpertSlice(
        ids=ids.astype(np.uint32),
        logprobs=np.log(p[ids]).astype(np.float32),
        rest=float(1 - p[ids].sum()),
    )


def test_full_vocabulary_slices_give_exact_fusion() -> None:
    rng = np.random.default_rng(0)
    p = random_distributions(rng, 3, 50)
    w = [0.5, 0.3, 0.2]
    fused = fuse([top_k_slice(row, 50) for row in p], w, 50)
    assert fused.ids.tolist() == list(range(50))
    np.testing.assert_allclose(fused.probs, fuse_full(p, w), rtol=1e-5)
    assert fused.tail == pytest.approx(0, abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 5),
    vocab=st.integers(40, 300),
    k=st.integers(1, 32),
)
def test_top_k_fusion_is_within_the_rest_mass_of_the_reference(
    seed: int, n: int, vocab: int, k: int
) -> None:
    rng = np.random.default_rng(seed)
    p = random_distributions(rng, n, vocab)
    w = rng.random(n) + 0.01
    slices = [top_k_slice(row, k) for row in p]
    fused = fuse(slices, w, vocab)
    exact = fuse_full(p, w)[fused.ids]
    w_norm = w / w.sum()
    bound = float(sum(wn * s.rest for wn, s in zip(w_norm, slices, strict=True)))
    assert np.all(np.abs(fused.probs - exact) <= bound + 1e-6)
    # A token every expert listed is valued exactly.
    listed_by_all = set.intersection(*(set(s.ids.tolist()) for s in slices))
    for token in listed_by_all:
        at = int(np.searchsorted(fused.ids, token))
        assert fused.probs[at] == pytest.approx(exact[at], rel=1e-5)
    # The valuation stays a distribution: union mass plus tail is one.
    assert 0 <= fused.tail <= 1
    assert fused.probs.sum() <= 1 + 1e-6


def test_unlisted_token_gets_the_rest_mass_spread_evenly() -> None:
    a = ExpertSlice(np.array([1, 2], np.uint32), np.log(np.array([0.6, 0.2], np.float32)), 0.2)
    b = ExpertSlice(np.array([3, 1], np.uint32), np.log(np.array([0.5, 0.3], np.float32)), 0.2)
    fused = fuse([a, b], [1, 1], vocab_size=12)
    by_id = dict(zip(fused.ids.tolist(), fused.probs.tolist(), strict=True))
    unlisted = 0.2 / (12 - 2)
    assert by_id[1] == pytest.approx(0.5 * 0.6 + 0.5 * 0.3)
    assert by_id[2] == pytest.approx(0.5 * 0.2 + 0.5 * unlisted)
    assert by_id[3] == pytest.approx(0.5 * unlisted + 0.5 * 0.5)


def test_greedy_picks_the_fused_argmax_not_one_experts() -> None:
    # Expert a prefers 1, expert b prefers 2; the weights decide.
    a = ExpertSlice(np.array([1, 2], np.uint32), np.log(np.array([0.7, 0.3], np.float32)), 0.0)
    b = ExpertSlice(np.array([2, 1], np.uint32), np.log(np.array([0.9, 0.1], np.float32)), 0.0)
    greedy = TokenSampler(SamplingParams())
    assert greedy.choose(fuse([a, b], [0.9, 0.1], 10)) == 1
    assert greedy.choose(fuse([a, b], [0.4, 0.6], 10)) == 2


def test_weights_are_renormalised_over_the_slices_present() -> None:
    a = ExpertSlice(np.array([4], np.uint32), np.zeros(1, np.float32), 0.0)
    fused = fuse([a], [0.25], vocab_size=10)
    assert fused.probs.tolist() == pytest.approx([1.0])


@pytest.mark.parametrize("weights", [[0.0, 0.0], [float("nan"), 1.0], [-1.0, 2.0]])
def test_weights_that_break_the_zero_sum_rule_fuse_as_equal_weights(weights: list[float]) -> None:
    a = ExpertSlice(np.array([1, 2], np.uint32), np.log(np.array([0.6, 0.2], np.float32)), 0.2)
    b = ExpertSlice(np.array([3, 1], np.uint32), np.log(np.array([0.5, 0.3], np.float32)), 0.2)
    fused = fuse([a, b], weights, vocab_size=12)
    np.testing.assert_allclose(fused.probs, fuse([a, b], [1, 1], vocab_size=12).probs)


def test_seeded_sampling_repeats_and_follows_the_distribution() -> None:
    s = ExpertSlice(
        np.array([0, 1, 2], np.uint32), np.log(np.array([0.5, 0.3, 0.2], np.float32)), 0.0
    )
    dist = fuse([s], [1], 3)
    draws = [TokenSampler(SamplingParams(1.0, 1.0, seed=7)).choose(dist) for _ in range(3)]
    assert len(set(draws)) == 1
    sampler = TokenSampler(SamplingParams(1.0, 1.0, seed=1))
    counts = np.bincount([sampler.choose(dist) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_top_p_keeps_only_the_nucleus() -> None:
    s = ExpertSlice(
        np.array([0, 1, 2], np.uint32), np.log(np.array([0.6, 0.3, 0.1], np.float32)), 0.0
    )
    sampler = TokenSampler(SamplingParams(1.0, top_p=0.7, seed=3))
    assert {sampler.choose(fuse([s], [1], 3)) for _ in range(500)} == {0, 1}


def test_low_temperature_approaches_greedy() -> None:
    s = ExpertSlice(np.array([0, 1], np.uint32), np.log(np.array([0.55, 0.45], np.float32)), 0.0)
    sampler = TokenSampler(SamplingParams(0.01, seed=0))
    assert {sampler.choose(fuse([s], [1], 2)) for _ in range(200)} == {0}


def test_bad_sampling_params_are_refused() -> None:
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_text_assembler_holds_back_a_possible_stop_string() -> None:
    text = TextAssembler(stop=["\nUser:"])
    out = [text.push(p) for p in [b"Hi", b" there", b"\n", b"Use", b"r:", b" more"]]
    assert "".join(out) == "Hi there"
    assert out[2] == ""  # "\n" might start the stop string
    assert text.stopped and text.text == "Hi there"


def test_text_assembler_joins_split_utf8() -> None:
    text = TextAssembler(stop=[])
    euro = "€".encode()
    assert text.push(euro[:1]) == ""
    assert text.push(euro[1:]) == "€"
    assert text.finish() == ""


def test_late_tracker_drops_after_consecutive_misses_only() -> None:
    tracker = LateTracker(max_consecutive=2)
    assert tracker.record(["a", "b"], ["a"]) == []
    assert tracker.record(["a", "b"], ["a", "b"]) == []  # the streak resets
    assert tracker.record(["a", "b"], ["a"]) == []
    assert tracker.record(["a", "b"], ["a"]) == ["b"]
    assert tracker.late == {"b": 3}


def test_top_k_experts_keep_the_largest_and_renormalise() -> None:
    experts, weights = top_k_experts(["a", "b", "c", "d"], [0.1, 0.4, 0.2, 0.3], 2)
    assert experts == ["b", "d"]
    assert weights == pytest.approx([4 / 7, 3 / 7])
    assert top_k_experts(["a", "b"], [1, 1], None) == (["a", "b"], [0.5, 0.5])
