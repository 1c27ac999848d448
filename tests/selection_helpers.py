"""What the selection tests share: solvable synthetic instances and subsets as bitmasks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from moe2.selection.oracle import LossOracle, masks_of, subset_of
from moe2.selection.problem import Candidate, Infeasible, Problem
from moe2.selection.synthetic import all_losses, synthetic_problem


def solvable_problems(sizes: Iterable[int], seeds: Sequence[int]) -> Iterator[Problem]:
    """``synthetic_problem(n, seed)`` for each size and seed whose budgets leave a feasible S."""
    for n in sizes:
        for seed in seeds:
            problem = synthetic_problem(n, seed)
            try:
                problem.check_feasible()
            except Infeasible:
                continue
            yield problem


def subset_of_experts(problem: Problem, experts: Sequence[str]) -> int:
    """The bitmask of a candidate's expert list (in the problem's order)."""
    unknown = set(experts) - set(problem.expert_ids)
    assert not unknown, f"not in the pool: {unknown}"
    return subset_of([e in experts for e in problem.expert_ids])


def candidate_subsets(problem: Problem, candidates: Sequence[Candidate]) -> list[int]:
    return [subset_of_experts(problem, c.experts) for c in candidates]


def supersets_within(p: int, n: int) -> npt.NDArray[np.int64]:
    """Every q ⊆ {0..n-1} with p ⊆ q."""
    everything = np.arange(1 << n, dtype=np.int64)
    return np.asarray(everything[(everything & p) == p], dtype=np.int64)


def box_members(p: int, q: int, n: int) -> npt.NDArray[np.bool_]:
    """(2^n,) mask of the non-empty S with p ⊆ S ⊆ q."""
    everything = np.arange(1 << n, dtype=np.int64)
    inside = ((everything & p) == p) & ((everything & ~q) == 0)
    return np.asarray(inside & (everything != 0))


def all_masks(n: int) -> npt.NDArray[np.bool_]:
    return masks_of(list(range(1 << n)), n)


def raw_losses(problem: Problem) -> npt.NDArray[np.float64]:
    """Every subset's loss under the problem's LossOracle (index = bitmask), uncounted."""
    assert isinstance(problem.oracle, LossOracle)
    return np.asarray(all_losses(problem.oracle), dtype=np.float64)
