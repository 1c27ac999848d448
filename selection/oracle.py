"""The loss oracle of problem (19): ``L(θ*, S)`` for many subsets S, from collected outputs.

For held-out example x with gating values g(x) over all N experts (Theorem 1: the full-set
gating, renormalised on S, is the one to use) and gold tokens y_1..y_T teacher-forced,

    L(θ*, S) = -(1/#tokens) Σ_x Σ_t log( Σ_{n∈S} g_n(x) f_{n,y_t} / Σ_{n∈S} g_n(x) )  (eq. 2, 3, 13)

which is two matrix products per batch of subsets: ``A @ m`` and ``G @ m`` with ``A[t, n] =
g_n(x_t) f_{n,y_t}``, ``G[t, n] = g_n(x_t)`` and ``m`` a subset's 0/1 column
(``moe2.runtime.mixture.fused_log_likelihood_on_subsets``; an S with no gate weight gets equal
weights, the zero-sum rule of ``moe2.runtime.mixture``). Results are cached
per subset; ``calls`` counts the subsets actually evaluated (cache misses), ``requests`` every
lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from moe2.runtime.mixture import floor_gates, fused_log_likelihood_on_subsets

F64 = npt.NDArray[np.float64]


def masks_of(subsets: Sequence[int], n: int) -> npt.NDArray[np.bool_]:
    """(B, n) boolean rows of integer subsets (bit i set: expert i is in)."""
    bits = np.asarray(subsets, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)[None, :]
    return (bits & 1).astype(bool)


def subset_of(mask: Sequence[bool] | npt.NDArray[np.bool_]) -> int:
    return sum(1 << i for i, bit in enumerate(mask) if bit)


def members(subset: int, expert_ids: Sequence[str]) -> list[str]:
    return [e for i, e in enumerate(expert_ids) if subset >> i & 1]


class LossOracle:
    """``L(θ*, S)`` over ``expert_ids``; a subset is an int bitmask in that order."""

    def __init__(
        self,
        expert_ids: Sequence[str],
        gate_values: npt.ArrayLike,
        gold_logprobs: Sequence[npt.ArrayLike],
    ) -> None:
        g = np.asarray(gate_values, dtype=np.float64)
        if g.ndim != 2 or g.shape != (len(gold_logprobs), len(expert_ids)):
            raise ValueError(f"gate values {g.shape} != (examples, experts)")
        floored = floor_gates(g)  # finite and >= 0, or ValueError
        lp = [np.asarray(x, dtype=np.float64) for x in gold_logprobs]
        if any(x.ndim != 2 or x.shape[0] != len(expert_ids) for x in lp):
            raise ValueError("each example's gold log-probabilities must be (experts, tokens)")
        rows = np.repeat(np.arange(len(lp)), [x.shape[1] for x in lp])
        if rows.size == 0:
            raise ValueError("the oracle needs at least one gold token")
        gates = floored[rows]
        self._adopt(expert_ids, gates, gates * np.exp(np.concatenate(lp, axis=1).T))

    def _adopt(self, expert_ids: Sequence[str], gates: F64, joint: F64) -> None:
        """Take G (tokens, N) and A (tokens, N), with fresh counts and an empty cache."""
        self.expert_ids = list(expert_ids)
        self.gates, self.joint = gates, joint
        self.tokens = int(gates.shape[0])
        self._bound = _TokenBound(joint, gates)
        self.bounds = 0  # lower-bound evaluations (no loss is computed for those)
        self.calls = 0
        self.requests = 0
        self._cache: dict[int, float] = {}

    @property
    def size(self) -> int:
        return len(self.expert_ids)

    def loss(self, subset: int) -> float:
        return float(self.losses([subset])[0])

    def losses(self, subsets: Sequence[int]) -> F64:
        """NLL per gold token of each subset (inf for the empty one), cached."""
        self.requests += len(subsets)
        todo = sorted({s for s in subsets if s not in self._cache})
        if todo:
            self._cache.update(zip(todo, self.evaluate(masks_of(todo, self.size)), strict=True))
            self.calls += len(todo)
        return np.array([self._cache[s] for s in subsets], dtype=np.float64)

    def evaluate_subsets(self, subsets: Sequence[int]) -> F64:
        """Uncached, for sweeps too large to cache (brute force); counted in ``calls``."""
        self.calls += len(subsets)
        return self.evaluate(masks_of(subsets, self.size))

    def evaluate(self, masks: npt.NDArray[np.bool_]) -> F64:
        """Uncached: the loss of each boolean row of ``masks`` (B, N)."""
        likelihoods = fused_log_likelihood_on_subsets(self.gates, self.joint, masks)
        return np.asarray(-likelihoods.mean(axis=0), dtype=np.float64)

    def restricted(self, expert_ids: Sequence[str]) -> LossOracle:
        """The same loss over the experts ``expert_ids`` only (the gating renormalised on them,
        Theorem 1), with its own cache and counts."""
        index = [self.expert_ids.index(e) for e in expert_ids]
        if index == list(range(self.size)):
            return self
        out = object.__new__(LossOracle)
        out._adopt(expert_ids, self.gates[:, index], self.joint[:, index])
        return out

    def lower_bounds(self, p: int, qs: Sequence[int]) -> F64:
        """For each q: a lower bound on L(S) over every non-empty S with p ⊆ S ⊆ q.

        L(S) = Σ_t [log Σ_S g − log Σ_S g f] is a difference of two functions that grow with S,
        so for each token the best S in the box is exact to find: take p, then add the box's
        other experts in decreasing order of f while that raises the token's mixture
        probability. The sum over tokens of those per-token optima bounds L from below.
        """
        self.bounds += len(qs)
        return self._bound.lower(p, qs)

    def reset_counts(self) -> None:
        self.calls = 0
        self.requests = 0
        self.bounds = 0
        self._cache.clear()


class _TokenBound:
    """The per-token relaxation behind :meth:`LossOracle.lower_bounds`."""

    def __init__(self, joint: F64, gates: F64) -> None:
        self.joint, self.gates = joint, gates
        self.order = np.argsort(-(joint / gates), axis=1, kind="stable")  # by f, best first
        rows = np.arange(joint.shape[0])[:, None]
        self.sorted_joint = joint[rows, self.order]
        self.sorted_gates = gates[rows, self.order]
        self.n = joint.shape[1]

    def lower(self, p: int, qs: Sequence[int]) -> F64:
        p_mask = masks_of([p], self.n)[0]
        base_joint = self.joint[:, p_mask].sum(axis=1)  # (T,)
        base_gates = self.gates[:, p_mask].sum(axis=1)
        free = masks_of([q & ~p for q in qs], self.n)[:, self.order]  # (K, T, N) in f order
        joint = np.cumsum(self.sorted_joint * free, axis=2) + base_joint[None, :, None]
        gates = np.cumsum(self.sorted_gates * free, axis=2) + base_gates[None, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(gates > 0, joint / gates, 0.0).max(axis=2)  # (K, T)
            if p:
                ratio = np.maximum(ratio, (base_joint / base_gates)[None, :])
            return np.asarray(-np.log(ratio).mean(axis=1), dtype=np.float64)


class TableOracle:
    """Losses looked up in a table over every subset (tests and small experiments)."""

    def __init__(self, expert_ids: Sequence[str], values: npt.ArrayLike) -> None:
        self.expert_ids = list(expert_ids)
        self.size = len(self.expert_ids)
        self.values = np.asarray(values, dtype=np.float64)
        if self.values.shape != (1 << self.size,):
            raise ValueError(f"a table over {self.size} experts has {1 << self.size} entries")
        self.calls = 0
        self.requests = 0
        self._seen: set[int] = set()

    def losses(self, subsets: Sequence[int]) -> F64:
        self.requests += len(subsets)
        fresh = set(subsets) - self._seen
        self._seen |= fresh
        self.calls += len(fresh)
        return self._lookup(subsets)

    def evaluate_subsets(self, subsets: Sequence[int]) -> F64:
        self.calls += len(subsets)
        return self._lookup(subsets)

    def _lookup(self, subsets: Sequence[int]) -> F64:
        return np.asarray(self.values[np.asarray(subsets, dtype=np.int64)], dtype=np.float64)

    def reset_counts(self) -> None:
        self.calls = self.requests = 0
        self._seen.clear()


def monotone_envelope(values: F64, n: int) -> tuple[F64, npt.NDArray[np.int64]]:
    """For every subset S (index = bitmask): min over S' ⊆ S of ``values[S']``, and that S'."""
    env = np.asarray(values, dtype=np.float64).copy()
    arg = np.arange(1 << n, dtype=np.int64)
    index = np.arange(1 << n, dtype=np.int64)
    for i in range(n):
        upper = index[(index >> i & 1) == 1]
        lower = upper ^ (1 << i)
        better = env[lower] < env[upper]
        env[upper[better]] = env[lower[better]]
        arg[upper[better]] = arg[lower[better]]
    return env, arg


class EnvelopeOracle(TableOracle):
    """Theorem 2 made exact: ``L̂(S) = min_{S' ⊆ S} L(S')``, the loss of S when the fusion agent
    may also leave some of S out. It is monotone by construction, and since delay and energy
    only grow with S, its best feasible subset has the same loss as ``L``'s; ``witness(S)`` is
    the S' ⊆ S that attains it. Every one of the 2^N subsets is evaluated once, up front, so
    this is for pools of up to about 16 experts.
    """

    def __init__(self, base: LossOracle | TableOracle, max_experts: int = 16) -> None:
        n = base.size
        if n > max_experts:
            raise ValueError(f"the exact envelope needs 2^{n} losses; keep it to {max_experts}")
        values, self.witnesses = monotone_envelope(base.evaluate_subsets(list(range(1 << n))), n)
        super().__init__(base.expert_ids, values)  # calls: distinct subsets asked for
        self.upfront_calls = 1 << n  # ... besides the 2^N evaluated here

    def witness(self, subset: int) -> int:
        return int(self.witnesses[subset])
