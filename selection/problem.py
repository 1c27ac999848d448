"""Problem (19): minimise the loss ``L(θ*, S)`` over subsets S subject to every application's
delay limit and the energy budget; and what a solver returns.

A subset is an int bitmask over ``expert_ids``. The loss comes from any oracle with
``losses(subsets) -> array`` (:class:`~moe2.selection.oracle.LossOracle`, or a table in tests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.selection.costs import Constraints
from moe2.selection.oracle import masks_of, members


class Oracle(Protocol):
    """Losses of subsets: ``losses`` caches, ``evaluate_subsets`` does not; both count
    evaluated subsets in ``calls``."""

    calls: int

    def losses(self, subsets: Sequence[int]) -> npt.NDArray[np.float64]: ...

    def reset_counts(self) -> None: ...

    def evaluate_subsets(self, subsets: Sequence[int]) -> npt.NDArray[np.float64]: ...


class Infeasible(Moe2Error):
    """No non-empty subset meets the budgets; ``constraint`` names the one that binds."""

    def __init__(self, constraint: str, message: str) -> None:
        super().__init__(ErrorCode.INFEASIBLE, message)
        self.constraint = constraint


@dataclass
class Problem:
    expert_ids: list[str]
    oracle: Oracle
    constraints: Constraints

    def __post_init__(self) -> None:
        if self.constraints.table.expert_ids != self.expert_ids:
            raise ValueError("the cost table and the problem order experts differently")

    @property
    def size(self) -> int:
        return len(self.expert_ids)

    def feasible(self, subset: int) -> bool:
        return bool(self.constraints.feasible(masks_of([subset], self.size))[0])

    def feasible_many(self, subsets: Sequence[int]) -> npt.NDArray[np.bool_]:
        return self.constraints.feasible(masks_of(subsets, self.size))

    def loss(self, subset: int) -> float:
        return float(self.oracle.losses([subset])[0])

    def describe(self, subset: int) -> Candidate:
        """The subset's experts, loss, delay per application and energy."""
        mask = masks_of([subset], self.size)
        table = self.constraints.table
        delays = table.delay_s(mask)[0]
        return Candidate(
            experts=members(subset, self.expert_ids),
            loss=self.loss(subset),
            delay_s={a.name: float(d) for a, d in zip(table.applications, delays, strict=True)},
            energy_j=float(table.energy_j(mask)[0]),
        )

    def check_feasible(self) -> None:
        """Raise :class:`Infeasible` naming the binding constraint if no single expert fits.

        Delay and energy grow with S, so some non-empty S is feasible iff a singleton is.
        """
        singles = [1 << i for i in range(self.size)]
        if not singles:
            raise Infeasible("experts", "there is no expert to choose from")
        if self.feasible_many(singles).any():
            return
        raise Infeasible(*binding_constraint(self, singles))


def binding_constraint(problem: Problem, singles: Sequence[int]) -> tuple[str, str]:
    """The constraint that rules out the most single experts, and a message that says so."""
    broken: dict[str, list[tuple[str, float, float]]] = {}
    for s in singles:
        expert = members(s, problem.expert_ids)[0]
        for name, value, limit in problem.constraints.violations(masks_of([s], problem.size)):
            broken.setdefault(name, []).append((expert, value, limit))
    name, rows = max(broken.items(), key=lambda kv: len(kv[1]))
    best = min(rows, key=lambda r: r[1])
    unit = "J" if name == "energy" else "s"
    return name, (
        f"no expert meets {name} <= {best[2]:.4g} {unit}: the cheapest, {best[0]}, needs "
        f"{best[1]:.4g} {unit} ({len(rows)} of {len(singles)} experts break it)"
    )


@dataclass(frozen=True)
class Candidate:
    experts: list[str]
    loss: float
    delay_s: dict[str, float]
    energy_j: float


@dataclass
class Solution:
    """A solver's answer: the chosen S, its predicted cost and loss, and how it was found."""

    method: str
    chosen: Candidate
    runners_up: list[Candidate] = field(default_factory=list)
    oracle_calls: int = 0
    wall_s: float = 0.0
    boxes: int = 0  # SMO: boxes (polyblock vertices) examined
    bounds: int = 0  # SMO: box bounds computed (with the dm bound: no loss evaluated)
    monotone_violations: int = 0  # SMO: times a smaller subset had a lower loss
    max_violation: float = 0.0  # ... and by how much, nats per token

    @property
    def experts(self) -> list[str]:
        return self.chosen.experts

    @property
    def loss(self) -> float:
        return self.chosen.loss


class TopFeasible:
    """The best few feasible subsets seen, for the runners-up."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.items: dict[int, float] = {}

    def offer(self, subset: int, loss: float) -> None:
        if not math.isfinite(loss):
            return
        self.items[subset] = loss
        if len(self.items) > 4 * self.keep:
            self._trim()

    def _trim(self) -> None:
        best = sorted(self.items.items(), key=lambda kv: (kv[1], kv[0]))[: self.keep]
        self.items = dict(best)

    @property
    def best(self) -> tuple[int, float]:
        if not self.items:
            return 0, math.inf
        return min(self.items.items(), key=lambda kv: (kv[1], kv[0]))

    def ranked(self) -> list[int]:
        self._trim()
        return [s for s, _ in sorted(self.items.items(), key=lambda kv: (kv[1], kv[0]))]


def solution_of(
    problem: Problem,
    method: str,
    top: TopFeasible,
    calls_before: int,
    started: float,
    counters: SearchCounters | None = None,
) -> Solution:
    """Package ``top``'s best subset and runners-up as a :class:`Solution`."""
    ranked = _witnessed(problem.oracle, top.ranked())
    if not ranked:
        problem.check_feasible()
        raise Infeasible("loss", "no feasible subset has a finite loss")
    counters = counters or SearchCounters()
    return Solution(
        method=method,
        chosen=problem.describe(ranked[0]),
        runners_up=[problem.describe(s) for s in ranked[1:]],
        oracle_calls=problem.oracle.calls - calls_before,
        wall_s=time.perf_counter() - started,
        boxes=counters.boxes,
        bounds=counters.bounds,
        monotone_violations=counters.violations,
        max_violation=counters.max_violation,
    )


def _witnessed(oracle: Oracle, ranked: list[int]) -> list[int]:
    """With a monotone envelope, each subset stands for the S' ⊆ S that attains its loss."""
    witness = getattr(oracle, "witness", None)
    if witness is None:
        return ranked
    return list(dict.fromkeys(int(witness(s)) for s in ranked))


@dataclass
class SearchCounters:
    boxes: int = 0
    bounds: int = 0
    violations: int = 0
    max_violation: float = 0.0

    def saw(self, parent: float, child: float) -> None:
        """A child subset's loss below its parent's breaks monotonicity (Theorem 2)."""
        if child < parent - 1e-12:
            self.violations += 1
            self.max_violation = max(self.max_violation, parent - child)
