"""Algorithm 2: discrete monotonic optimisation of problem (19), and the baselines.

Delay and energy rise with S (eq. 7, 10), so the feasible subsets form a normal set: every
subset of a feasible S is feasible. After Tuy, Minoux and Hoai-Phuong (discrete monotonic
optimisation, SIAM J. Optim. 2006) the solver keeps boxes [p, q] of the 0/1 lattice (p: the
experts that must be in, q: those that may be in), each with a lower bound on the loss of every
subset in it, and:

1. takes the box with the lowest bound; stops when it cannot beat the best feasible subset found
   (the current best value, CBV) by more than ε;
2. reduces it: drops from q every expert i with p ∪ {i} infeasible, and moves into p every expert
   i whose box without it, [p, q \\ {i}], cannot beat CBV − ε; an infeasible p empties the box;
3. projects onto the upper boundary of the feasible set: from p, adds q's experts, most valuable
   first, while the subset stays feasible, and offers that subset (and q, if feasible) as CBV;
4. branches on the most valuable free expert i: [p, q \\ {i}] and [p ∪ {i}, q].

The bound is where monotonicity comes in. The paper's Theorem 2 makes the loss fall as S grows,
so L(q) bounds the box (``bound="monotone"``). Held-out losses break that in practice (a weak
expert with some gating weight can raise the loss; tests/test_selection_smo.py shows it), so the
default bound uses only what is always true: L(S) = Σ_t [log Σ_S g − log Σ_S g f] is a
difference of two increasing functions, and the oracle's ``lower_bounds`` solves each token's
share of it exactly over the box (see :meth:`LossOracle.lower_bounds`). That makes the search
ε-optimal with no monotonicity assumption.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from moe2.selection.problem import Problem, SearchCounters, Solution, TopFeasible, solution_of

BoundFn = Callable[[int, Sequence[int]], npt.NDArray[np.float64]]


def smo(problem: Problem, *, eps: float = 1e-4, keep: int = 4, bound: str = "auto") -> Solution:
    """Algorithm 2: an ε-optimal feasible subset (exact for ε = 0).

    ``bound``: "dm" (the difference-of-monotone bound; needs an oracle with ``lower_bounds``),
    "monotone" (L(q), exact only where Theorem 2 holds), "auto" (dm when the oracle can).
    """
    if eps < 0:
        raise ValueError("eps must be >= 0")
    started, calls = time.perf_counter(), problem.oracle.calls
    problem.check_feasible()
    search = _Search(problem, eps, TopFeasible(keep), _bound_fn(problem, bound))
    search.run()
    if keep > 1:
        _neighbours(problem, search.top)
    return solution_of(problem, f"smo/{search.mode}", search.top, calls, started, search.counters)


def _neighbours(problem: Problem, top: TopFeasible) -> None:
    """Runners-up worth showing: S with one expert removed, added or swapped (N² at most)."""
    best, _ = top.best
    n = problem.size
    inside = [i for i in range(n) if best >> i & 1]
    outside = [i for i in range(n) if not best >> i & 1]
    near = [best & ~(1 << i) for i in inside] + [best | 1 << j for j in outside]
    near += [best & ~(1 << i) | 1 << j for i in inside for j in outside]
    near = [s for s in near if s]
    if not near:
        return
    feasible = problem.feasible_many(near)
    candidates = [s for s, ok in zip(near, feasible, strict=True) if ok]
    if candidates:
        for s, loss in zip(candidates, problem.oracle.losses(candidates), strict=True):
            top.offer(s, float(loss))


def _bound_fn(problem: Problem, bound: str) -> tuple[str, BoundFn]:
    lower = getattr(problem.oracle, "lower_bounds", None)
    if bound == "auto":
        bound = "dm" if lower is not None else "monotone"
    if bound == "dm":
        if lower is None:
            raise ValueError("this oracle has no lower_bounds; use bound='monotone'")
        return "dm", lower
    if bound == "monotone":
        return "monotone", lambda p, qs: problem.oracle.losses(list(qs))
    raise ValueError(f"bound must be auto, dm or monotone, not {bound!r}")


class _Search:
    def __init__(
        self, problem: Problem, eps: float, top: TopFeasible, bound: tuple[str, BoundFn]
    ) -> None:
        self.problem = problem
        self.eps = eps
        self.top = top
        self.mode, self._bound = bound
        self.counters = SearchCounters()
        self._order = itertools.count()
        self.heap: list[tuple[float, int, int, int]] = []

    def bound(self, p: int, qs: Sequence[int]) -> npt.NDArray[np.float64]:
        self.counters.bounds += len(qs)
        return self._bound(p, qs)

    def hopeless(self, bound: float) -> bool:
        """Nothing under this bound beats the best value found so far by more than ε."""
        return bound >= self.top.best[1] - self.eps

    def run(self) -> None:
        n = self.problem.size
        alone = self.problem.feasible_many([1 << i for i in range(n)])
        root = sum(1 << i for i in range(n) if alone[i])
        self.push(0, root, float(self.bound(0, [root])[0]))
        while self.heap:
            bound, _, p, q = heapq.heappop(self.heap)
            self.counters.boxes += 1
            if self.hopeless(bound):
                break
            self.visit(p, q, bound)

    def push(self, p: int, q: int, bound: float) -> None:
        if not self.hopeless(bound):
            heapq.heappush(self.heap, (bound, next(self._order), p, q))

    def visit(self, p: int, q: int, bound: float) -> None:
        reduced = self.reduce(p, q, bound)
        if reduced is None:
            return
        p, q, values = reduced
        self.project(p, values)
        pivot = max(values, key=lambda i: (values[i], -i))
        self.push(p, q & ~(1 << pivot), values[pivot])
        self.push(p | 1 << pivot, q, float(self.bound(p | 1 << pivot, [q])[0]))

    def reduce(self, p: int, q: int, bound: float) -> tuple[int, int, dict[int, float]] | None:
        """Step 2, and the q-corner's own offer; None when the box holds nothing better."""
        while True:
            tightened = self.tighten_q(p, q)
            if tightened != q:
                q, bound = tightened, float(self.bound(p, [tightened])[0])
                if self.hopeless(bound):
                    return None
            if self.problem.feasible(q):
                self.offer(q)
                if self.mode == "monotone" or q == p:
                    return None
            free = list(_bits(q & ~p))
            if not free:
                return None
            values = self.removal_bounds(p, q, free)
            forced = sum(1 << i for i in free if self.hopeless(values[i]))
            if not forced:
                return p, q, values
            p |= forced
            if not self.problem.feasible(p):
                return None
            bound = float(self.bound(p, [q])[0])
            if self.hopeless(bound):
                return None

    def tighten_q(self, p: int, q: int) -> int:
        free = list(_bits(q & ~p))
        if not free:
            return q
        ok = self.problem.feasible_many([p | 1 << i for i in free])
        return q & ~sum(1 << i for i, fits in zip(free, ok, strict=True) if not fits)

    def removal_bounds(self, p: int, q: int, free: list[int]) -> dict[int, float]:
        """The bound of each box [p, q \\ {i}]: how much the box needs expert i."""
        values = self.bound(p, [q & ~(1 << i) for i in free])
        if self.mode == "monotone":
            parent = self.problem.loss(q)
            for value in values:
                self.counters.saw(parent=parent, child=float(value))
        return {i: float(v) for i, v in zip(free, values, strict=True)}

    def project(self, p: int, values: dict[int, float]) -> None:
        """Step 3: climb from p to the feasible boundary, most valuable experts first."""
        subset = p
        for i in sorted(values, key=lambda i: (-values[i], i)):
            if self.problem.feasible(subset | 1 << i):
                subset |= 1 << i
        self.offer(subset)

    def offer(self, subset: int) -> None:
        if subset:
            self.top.offer(subset, self.problem.loss(subset))


def _bits(x: int) -> Iterator[int]:
    i = 0
    while x:
        if x & 1:
            yield i
        x >>= 1
        i += 1


def brute_force(problem: Problem, *, keep: int = 4, chunk: int = 1 << 14) -> Solution:
    """Every subset: the exact optimum, for checking SMO (feasible subsets are evaluated)."""
    started, calls = time.perf_counter(), problem.oracle.calls
    problem.check_feasible()
    top = TopFeasible(keep)
    for start in range(1, 1 << problem.size, chunk):
        subsets = np.arange(start, min(start + chunk, 1 << problem.size), dtype=np.int64)
        subsets = subsets[problem.feasible_many(subsets.tolist())]
        if subsets.size == 0:
            continue
        losses = problem.oracle.evaluate_subsets(subsets.tolist())
        for j in np.argsort(losses, kind="stable")[:keep]:
            top.offer(int(subsets[j]), float(losses[j]))
    return solution_of(problem, "brute_force", top, calls, started)


def greedy(problem: Problem, *, keep: int = 4) -> Solution:
    """Add the expert that lowers the loss most while the subset stays feasible."""
    started, calls = time.perf_counter(), problem.oracle.calls
    problem.check_feasible()
    top = TopFeasible(keep)
    subset, loss = 0, math.inf
    while True:
        options = [subset | 1 << i for i in range(problem.size) if not subset >> i & 1]
        options = [s for s, ok in zip(options, problem.feasible_many(options), strict=True) if ok]
        if not options:
            break
        losses = problem.oracle.losses(options)
        for s, value in zip(options, losses, strict=True):
            top.offer(s, float(value))
        j = int(np.argmin(losses))
        if losses[j] >= loss:
            break
        subset, loss = options[j], float(losses[j])
    return solution_of(problem, "greedy", top, calls, started)


def random_subset(problem: Problem, *, seed: int = 0) -> Solution:
    """A random maximal feasible subset (experts taken in a random order while they fit)."""
    started, calls = time.perf_counter(), problem.oracle.calls
    problem.check_feasible()
    order = list(range(problem.size))
    random.Random(seed).shuffle(order)
    subset = 0
    for i in order:
        if problem.feasible(subset | 1 << i):
            subset |= 1 << i
    top = TopFeasible(1)
    top.offer(subset, problem.loss(subset))
    return solution_of(problem, "random", top, calls, started)
