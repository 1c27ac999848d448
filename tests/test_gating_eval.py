"""Offline evaluation maths on small cases worked out by hand (no bus, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from moe2.gating.evaluate import (
    ExampleScores,
    PerExample,
    ScoreArrays,
    aggregate,
    cloze_choice,
    equal_weights,
    evaluate_all,
    fused_top1,
    letter_choice,
    markdown_table,
    oracle,
    paired_differences,
    per_example,
)

log = np.log


def test_the_letter_choice_is_the_argmax_of_the_fused_letter_probabilities() -> None:
    letter = log([[0.9, 0.1], [0.3, 0.7]])  # expert 0 says A, expert 1 says B
    assert letter_choice(letter, [0.5, 0.5]) == 0  # 0.6 vs 0.4
    assert letter_choice(letter, [0.2, 0.8]) == 1  # 0.42 vs 0.58


def test_the_cloze_choice_is_length_normalised() -> None:
    # option 0: one token at 0.5 (total log 0.5); option 1: three tokens at 0.6 (total log 0.216)
    cloze = [log([[0.5]]), log([[0.6, 0.6, 0.6]])]
    assert cloze_choice(cloze, [1.0]) == 1  # mean -0.51 beats -0.69
    # fused per token: expert 0 alone prefers option 1, expert 1 strongly prefers option 0
    two = [log([[0.5], [0.9]]), log([[0.6, 0.6, 0.6], [0.1, 0.1, 0.1]])]
    assert cloze_choice(two, [1.0, 0.0]) == 1
    assert cloze_choice(two, [0.5, 0.5]) == 0  # log 0.7 = -0.36 vs log 0.35 = -1.05


def _case() -> ScoreArrays:
    """Two experts, two examples: expert a right on the first, expert b on the second."""
    first = ExampleScores(
        answer=0,
        letter=log([[0.8, 0.2], [0.4, 0.6]]),
        cloze=[log([[0.5, 0.5], [0.1, 0.2]]), log([[0.1], [0.3]])],
        cloze_ids=[np.array([1, 2]), np.array([3])],
    )
    second = ExampleScores(
        answer=1,
        letter=log([[0.7, 0.3], [0.1, 0.9]]),
        cloze=[log([[0.5], [0.1]]), log([[0.2], [0.8]])],
        cloze_ids=[np.array([4]), np.array([5])],
    )
    return ScoreArrays(["a", "b"], ["x1", "x2"], [first, second])


def test_single_experts_equal_weights_and_the_oracle_by_hand() -> None:
    arrays = _case()
    rows = {r.method: r for r in evaluate_all(arrays, None)}
    a, b = rows["single: a"], rows["single: b"]
    # gold tokens: x1 -> (0.5, 0.5) for a, (0.1, 0.2) for b; x2 -> 0.2 for a, 0.8 for b
    assert a.nll_per_token == pytest.approx(-(log(0.5) * 2 + log(0.2)) / 3)
    assert b.nll_per_token == pytest.approx(-(log(0.1) + log(0.2) + log(0.8)) / 3)
    assert (a.letter_accuracy, b.letter_accuracy) == (0.5, 0.5)
    assert (a.cloze_accuracy, b.cloze_accuracy) == (0.5, 0.5)
    equal = rows["equal weights"]
    assert equal.nll_per_token == pytest.approx(-(log(0.3) + log(0.35) + log(0.5)) / 3)
    assert equal.letter_accuracy == 1.0  # x1: 0.6 vs 0.4 -> A; x2: 0.4 vs 0.6 -> B
    best = rows["best single"]
    assert best.nll_per_token == a.nll_per_token and best.detail["nll_per_token"] == "a"
    orc = rows["oracle (per example)"]
    assert orc.nll_per_token == pytest.approx(-(log(0.5) * 2 + log(0.8)) / 3)
    assert (orc.letter_accuracy, orc.cloze_accuracy) == (1.0, 1.0)
    assert orc.nll_per_token <= best.nll_per_token
    assert orc.letter_accuracy >= best.letter_accuracy
    assert orc.cloze_accuracy >= best.cloze_accuracy
    assert orc.token_accuracy is None  # no top-k collected


def test_gating_rows_top_n_is_the_full_gating_and_top_1_the_argmax() -> None:
    arrays = _case()
    gates = np.array([[0.9, 0.1], [0.2, 0.8]])  # a perfect router
    rows = {r.method: r for r in evaluate_all(arrays, gates)}
    full, top2, top1 = rows["MoE² gating (all)"], rows["MoE² top-2"], rows["MoE² top-1"]
    for got, want in zip(full.as_dict().values(), top2.as_dict().values(), strict=True):
        if isinstance(want, float):
            assert got == pytest.approx(want)
    assert top1.nll_per_token == pytest.approx(rows["oracle (per example)"].nll_per_token)
    assert full.nll_per_token == pytest.approx(-(log(0.46) + log(0.47) + log(0.68)) / 3)
    assert (full.letter_accuracy, full.cloze_accuracy) == (1.0, 1.0)
    names = [r.method for r in evaluate_all(arrays, gates)]
    assert names == [
        "single: a",
        "single: b",
        "best single",
        "equal weights",
        "MoE² gating (all)",
        "MoE² top-1",
        "MoE² top-2",
        "oracle (per example)",
    ]


def test_equal_weights_are_the_majority_vote() -> None:
    np.testing.assert_allclose(equal_weights(2, 4), np.full((2, 4), 0.25))


def test_fused_top1_follows_the_weighted_top_k() -> None:
    # 2 experts, 1 position, k = 2, V = 10: a lists {1: 0.6, 2: 0.3}, b lists {2: 0.5, 3: 0.4}
    ids = np.array([[[1, 2]], [[2, 3]]])
    lps = log(np.array([[[0.6, 0.3]], [[0.5, 0.4]]]))
    assert fused_top1(ids, lps, [1.0, 0.0], 10).tolist() == [1]
    assert fused_top1(ids, lps, [0.5, 0.5], 10).tolist() == [2]  # 0.4 beats 0.3 + unlisted
    assert fused_top1(ids, lps, [0.0, 1.0], 10).tolist() == [2]


def test_token_accuracy_counts_gold_tokens_that_are_the_fused_top_1() -> None:
    ex = ExampleScores(
        answer=0,
        letter=log([[0.5, 0.5], [0.5, 0.5]]),
        cloze=[log([[0.6, 0.3], [0.5, 0.4]]), log([[0.1], [0.1]])],
        cloze_ids=[np.array([1, 3]), np.array([9])],
        top_ids=np.array([[[1, 2], [2, 3]], [[2, 3], [3, 1]]]),
        top_logprobs=log(np.array([[[0.6, 0.3], [0.6, 0.3]], [[0.5, 0.4], [0.4, 0.3]]])),
    )
    arrays = ScoreArrays(["a", "b"], ["x"], [ex], vocab_size=10)
    assert arrays.has_top_k
    a = per_example(arrays, [[1.0, 0.0]])
    b = per_example(arrays, [[0.0, 1.0]])
    assert (a.token_hits.tolist(), b.token_hits.tolist()) == ([1], [1])  # a: t0, b: t1
    assert oracle([a, b]).token_hits.tolist() == [1]
    result = aggregate("x", per_example(arrays, [[0.5, 0.5]]), top_k=True)
    # t0: 1 -> 0.3+, 2 -> 0.4: the fused top-1 is 2, not gold 1; t1: 3 -> 0.35, gold 3 wins
    assert result.token_accuracy == pytest.approx(0.5)


def test_the_table_names_the_best_single_expert_of_each_metric() -> None:
    rows = evaluate_all(_case(), None)
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| method | NLL / token | letter acc %")
    best = next(line for line in table.splitlines() if line.startswith("| best single"))
    assert "(a)" in best
    assert "| - |" in best  # no top-k: no token accuracy


def _outcome(nll: list[float], cloze: list[bool]) -> PerExample:
    e = len(nll)
    return PerExample(
        nll=np.array(nll),
        tokens=np.full(e, 2, dtype=np.int64),
        letter_ok=np.zeros(e, dtype=bool),
        cloze_ok=np.array(cloze),
        token_hits=np.zeros(e, dtype=np.int64),
    )


def test_paired_differences_see_a_consistent_gain_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(2.0, 6.0, 200)
    right = rng.random(200) < 0.3
    better = _outcome(list(base - 0.2), list(right | (rng.random(200) < 0.3)))
    same = _outcome(list(base + rng.normal(0, 0.5, 200)), list(rng.random(200) < 0.3))
    ref = _outcome(list(base), list(right))
    gain = {d.metric: d for d in paired_differences("g", better, "b", ref)}
    assert gain["nll"].value == pytest.approx(-0.1)  # 0.2 nats per 2 tokens
    assert gain["nll"].high < 0 and gain["nll"].better
    assert gain["cloze"].low > 0 and gain["cloze"].better
    assert gain["letter"].value == 0 and not gain["letter"].better
    noise = {d.metric: d for d in paired_differences("g", same, "b", ref)}
    assert noise["nll"].low < 0 < noise["nll"].high and not noise["nll"].better
    again = paired_differences("g", same, "b", ref)
    assert again == paired_differences("g", same, "b", ref)  # seeded: reproducible


def test_a_mixed_pool_normalises_cloze_and_nll_by_bytes() -> None:
    # option 0: 2 bytes at total log 0.5; option 1: 6 bytes at total log 0.2; per byte 1 wins
    ex = ExampleScores(
        answer=1,
        letter=log([[0.5, 0.5]]),
        cloze=[log([[0.5]]), log([[0.2]])],
        cloze_ids=[np.zeros(0, dtype=np.int64)] * 2,
        lengths=[2, 6],
    )
    assert cloze_choice(ex.cloze, [1.0], ex.lengths) == 1
    assert cloze_choice(ex.cloze, [1.0]) == 0  # per unit (one each) option 0 would win
    arrays = ScoreArrays(["a"], ["x"], [ex], unit="byte")
    row = {r.method: r for r in evaluate_all(arrays, None)}["single: a"]
    assert row.nll_per_token == pytest.approx(-np.log(0.2) / 6)
    assert row.cloze_accuracy == 1.0
