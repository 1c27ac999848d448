"""Fusion of top-k slices into one next-token distribution (eq. 29 of the paper).

Each expert n sends its K most likely ids with their probabilities and the mass ``r_n`` outside
them. A token outside expert n's top-K is valued at ``r_n / (V - K)``: the rest mass spread evenly
over the tokens the expert did not list. That keeps every expert's distribution proper and never
ranks an unlisted token above a listed one (a listed token's probability is at least the mean of
the unlisted ones), so the fused argmax over the union of the slices is the argmax over the whole
vocabulary of this valuation. With K = V it is the exact full-vocabulary fusion
``F = sum_n w_n f_n`` (eq. 3 / 29).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from moe2.runtime.mixture import renormalise_on_subset, rest_mass


@dataclass(frozen=True, slots=True)
class ExpertSlice:
    """One expert's top-k at one step, as arrays."""

    ids: npt.NDArray[np.uint32]
    logprobs: npt.NDArray[np.float32]
    rest: float


@dataclass(frozen=True, slots=True)
class FusedDistribution:
    """The fused probabilities of the union of the slices' ids (sorted ascending)."""

    ids: npt.NDArray[np.uint32]
    probs: npt.NDArray[np.float64]
    source: npt.NDArray[np.intp]  # per id: its first position in the slices' ids, concatenated

    @property
    def tail(self) -> float:
        """Fused mass of all tokens outside the union."""
        return rest_mass(self.probs)


def fuse(
    slices: Sequence[ExpertSlice], weights: Sequence[float], vocab_size: int
) -> FusedDistribution:
    """Weighted mixture of the experts' distributions over the union of their top-k ids, the
    weights renormalised over the slices present (eq. 28, ``renormalise_on_subset``).

    One pass: every union id starts at the weighted unlisted values ``sum_n w_n r_n / (V - K_n)``;
    each listed (expert, id) pair then adds ``w_n (p_n(id) - unlisted_n)``. An expert lists an id
    at most once (``wire.check_slice`` refuses duplicates), so this equals the mixture.

    This runs once per fused token, so it is written for a few experts of K = 32 (the fusion
    agent's hot path, bench/bus_overhead.py): the union is found with one stable argsort rather
    than ``np.unique`` (same ids, same first positions, same sums in the same order), and the
    renormalised weights of a weight vector seen before come from a cache.
    """
    if not slices:
        raise ValueError("fuse needs at least one slice")
    w = _renormalised(weights)
    all_ids = np.concatenate([s.ids for s in slices])
    order = all_ids.argsort(kind="stable")
    ordered = all_ids[order]
    first = np.empty(ordered.size, dtype=bool)  # where a new id starts in the sorted ids
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    union, source = ordered[first], order[first]
    sizes = [len(s.ids) for s in slices]
    unlisted = np.array(
        [s.rest / max(vocab_size - n, 1) for s, n in zip(slices, sizes, strict=True)]
    )
    listed = np.exp(np.concatenate([s.logprobs for s in slices]).astype(np.float64))
    gain = np.repeat(w, sizes) * (listed - np.repeat(unlisted, sizes))
    fused: npt.NDArray[np.float64] = float(w @ unlisted) + np.bincount(
        np.cumsum(first) - 1, weights=gain[order], minlength=len(union)
    ).astype(np.float64)
    return FusedDistribution(ids=union.astype(np.uint32), probs=fused, source=source)


def _renormalised(weights: Sequence[float]) -> npt.NDArray[np.float64]:
    """``renormalise_on_subset(weights)``, cached for weights that can be a key (a session
    fuses with the same few weight vectors at every step)."""
    try:
        return _renormalised_cached(tuple(float(x) for x in weights))
    except TypeError:  # not a flat sequence of numbers: let the maths say what is wrong
        return renormalise_on_subset(weights)


@lru_cache(maxsize=1024)
def _renormalised_cached(weights: tuple[float, ...]) -> npt.NDArray[np.float64]:
    w = renormalise_on_subset(weights)
    w.setflags(write=False)  # shared by every call with these weights
    return w


def fuse_full(
    distributions: npt.NDArray[np.float64], weights: Sequence[float]
) -> npt.NDArray[np.float64]:
    """Reference fusion over the whole vocabulary: ``distributions`` is (N, V)."""
    fused: npt.NDArray[np.float64] = renormalise_on_subset(weights) @ distributions
    return fused
