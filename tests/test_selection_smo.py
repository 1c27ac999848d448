"""SMO (Algorithm 2) against brute force on random specialist pools; why the default bound is
the difference-of-monotone one; ε, infeasible budgets, baselines, runners-up, oracle calls."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe2.runtime.errors import ErrorCode
from moe2.selection.costs import Budgets, Constraints
from moe2.selection.oracle import EnvelopeOracle, LossOracle, TableOracle
from moe2.selection.problem import Infeasible, Problem, Solution
from moe2.selection.smo import brute_force, greedy, random_subset, smo
from moe2.selection.synthetic import synthetic_problem
from tests.selection_helpers import (
    all_masks,
    candidate_subsets,
    raw_losses,
    solvable_problems,
)

SIZES = range(2, 13)


def assert_same_optimum(found: Solution, best: Solution, context: object) -> None:
    assert found.experts == best.experts, context
    assert found.loss == pytest.approx(best.loss, abs=1e-9), context


def test_smo_with_the_dm_bound_finds_the_brute_force_optimum_of_raw_losses() -> None:
    compared = 0
    for problem in solvable_problems(SIZES, range(25)):
        best = brute_force(problem)
        found = smo(problem, eps=0)
        assert found.method == "smo/dm"
        assert_same_optimum(found, best, (problem.size, problem.expert_ids))
        compared += 1
    assert compared >= 200


def with_oracle(problem: Problem, oracle: EnvelopeOracle | TableOracle) -> Problem:
    return Problem(problem.expert_ids, oracle, problem.constraints)


def test_smo_with_the_monotone_bound_is_exact_on_the_monotone_envelope() -> None:
    compared = 0
    for problem in solvable_problems(range(2, 11), range(8)):
        best = brute_force(problem)
        assert isinstance(problem.oracle, LossOracle)
        found = smo(with_oracle(problem, EnvelopeOracle(problem.oracle)), eps=0)
        assert found.method == "smo/monotone"  # "auto": the envelope has no lower_bounds
        assert found.monotone_violations == 0
        assert_same_optimum(found, best, problem.size)
        compared += 1
    assert compared >= 60


def first_violation(losses: np.ndarray, n: int) -> tuple[int, int] | None:
    """A subset S and an expert i not in it with L(S ∪ {i}) > L(S): adding i hurts."""
    for s in range(1, 1 << n):
        for i in range(n):
            if not s >> i & 1 and losses[s | 1 << i] > losses[s] + 1e-9:
                return s, i
    return None


def test_raw_losses_are_not_monotone_so_the_monotone_bound_misses_optima() -> None:
    # Theorem 2 assumes that a larger S never raises the loss. On held-out data a weak expert
    # with some gate weight does raise it, so L(q) is no bound on the box [p, q]: the monotone
    # bound prunes boxes that hold the optimum, which is why "dm" is the default.
    problem = synthetic_problem(8, 0)
    violation = first_violation(raw_losses(problem), 8)
    assert violation is not None
    misses = 0
    for seed in range(12):
        raw = synthetic_problem(10, seed)
        try:
            best = brute_force(raw)
        except Infeasible:
            continue
        monotone = smo(raw, eps=0, bound="monotone")
        assert monotone.method == "smo/monotone"
        if monotone.monotone_violations:
            assert monotone.max_violation > 0
        misses += monotone.loss > best.loss + 1e-9
        assert_same_optimum(smo(synthetic_problem(10, seed), eps=0), best, seed)
    assert misses >= 3


def test_smo_with_the_monotone_bound_reports_the_violations_it_meets() -> None:
    reports = [smo(p, eps=0, bound="monotone") for p in solvable_problems([10], range(6))]
    assert any(r.monotone_violations > 0 and r.max_violation > 0 for r in reports)


@pytest.mark.parametrize("eps", [0.005, 0.05, 0.3])
def test_a_positive_eps_stays_within_eps_of_the_optimum(eps: float) -> None:
    for problem in solvable_problems([8, 12], range(8)):
        best = brute_force(problem)
        found = smo(problem, eps=eps)
        assert best.loss - 1e-12 <= found.loss <= best.loss + eps
        assert problem.feasible(candidate_subsets(problem, [found.chosen])[0])


def starved(problem: Problem, **limits: float) -> Problem:
    """The same pool under budgets set to half the cheapest single expert's figure."""
    table = problem.constraints.table
    singles = np.eye(problem.size, dtype=bool)
    tau = {}
    if "delay" in limits:
        chat = [a.name for a in table.applications].index("chat")
        tau["chat"] = float(table.delay_s(singles)[:, chat].min()) * limits["delay"]
    energy = float(table.energy_j(singles).min()) * limits["energy"] if "energy" in limits else None
    return Problem(problem.expert_ids, problem.oracle, Constraints(table, Budgets(tau, energy)))


@pytest.mark.parametrize(
    ("limits", "binding"),
    [({"energy": 0.5}, "energy"), ({"delay": 0.5}, "tau[chat]")],
)
@pytest.mark.parametrize("solve", [smo, brute_force, greedy, random_subset])
def test_infeasible_budgets_raise_naming_the_binding_constraint(
    limits: dict[str, float], binding: str, solve: object
) -> None:
    problem = starved(synthetic_problem(6, 1), **limits)
    with pytest.raises(Infeasible) as caught:
        solve(problem)  # type: ignore[operator]
    assert caught.value.code is ErrorCode.INFEASIBLE
    assert str(caught.value).startswith("[infeasible]")
    assert caught.value.constraint == binding
    assert f"no expert meets {binding} <=" in caught.value.message
    assert "(6 of 6 experts break it)" in caught.value.message


def test_the_baselines_are_feasible_and_never_beat_the_optimum() -> None:
    for problem in solvable_problems([6, 9, 12], range(10)):
        best = brute_force(problem)
        for method, baseline in [("greedy", greedy(problem)), ("random", random_subset(problem))]:
            assert baseline.method == method
            (subset,) = candidate_subsets(problem, [baseline.chosen])
            assert problem.feasible(subset)
            assert baseline.loss >= best.loss - 1e-12
            assert baseline.loss == pytest.approx(problem.loss(subset))


def test_runners_up_are_feasible_distinct_and_ranked() -> None:
    for problem in solvable_problems([10], range(6)):
        feasible = problem.constraints.feasible(all_masks(problem.size))
        losses = raw_losses(problem)
        ranked = sorted(np.flatnonzero(feasible & np.isfinite(losses)), key=lambda s: losses[s])
        for found in (smo(problem, eps=0, keep=5), brute_force(problem, keep=5)):
            chosen = [found.chosen, *found.runners_up]
            subsets = candidate_subsets(problem, chosen)
            assert len(set(subsets)) == len(subsets)
            assert all(problem.feasible(s) for s in subsets)
            assert [c.loss for c in chosen] == sorted(c.loss for c in chosen)
            assert subsets[0] == ranked[0]
            if found.method == "brute_force":  # it sees every subset: the true top five
                assert subsets == [int(s) for s in ranked[:5]]


def test_a_candidate_reports_its_delay_and_energy() -> None:
    problem = next(solvable_problems([8], range(10)))
    found = smo(problem)
    (subset,) = candidate_subsets(problem, [found.chosen])
    mask = all_masks(problem.size)[subset]
    table = problem.constraints.table
    assert found.chosen.energy_j == pytest.approx(float(table.energy_j(mask)[0]))
    assert list(found.chosen.delay_s.values()) == pytest.approx(table.delay_s(mask)[0].tolist())
    assert set(found.chosen.delay_s) == {"chat", "code"}


def test_smo_evaluates_a_small_fraction_of_the_subsets_at_n_16() -> None:
    compared = 0
    for problem in solvable_problems([16], range(6)):
        found = smo(problem, eps=0)
        assert found.oracle_calls == problem.oracle.calls  # a fresh oracle: every call is SMO's
        assert found.oracle_calls < 0.05 * 2**16
        assert found.bounds > 0 and found.boxes > 0
        assert_same_optimum(found, brute_force(problem), problem.size)
        compared += 1
    assert compared >= 3


def test_bound_choices_are_checked() -> None:
    problem = next(solvable_problems([4], range(10)))
    table = with_oracle(problem, TableOracle(problem.expert_ids, np.arange(16.0)[::-1]))
    with pytest.raises(ValueError, match="no lower_bounds"):
        smo(table, bound="dm")
    with pytest.raises(ValueError, match="bound must be auto, dm or monotone"):
        smo(problem, bound="convex")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        smo(problem, eps=-1)
    # a table that falls as S grows: the whole feasible boundary is the answer
    assert math.isfinite(smo(table).loss)
    assert smo(table).loss == brute_force(table).loss
