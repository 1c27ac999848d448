"""Choosing the next token from a fused distribution: greedy, temperature, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from moe2.runtime.fusion import FusedDistribution


class CandidateValues(Protocol):
    """What the sampler reads: one fused value per candidate, candidates in tie-break order
    (ids ascending on the id path, bytes ascending on the byte path)."""

    @property
    def probs(self) -> npt.NDArray[np.float64]: ...


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError("temperature must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


class TokenSampler:
    """Samples over the union of the slices (the tail outside it is never sampled)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def choose(self, dist: FusedDistribution) -> int:
        return int(dist.ids[self.choose_index(dist)])

    def choose_index(self, dist: CandidateValues) -> int:
        """The position in ``dist`` of the chosen token (or byte candidate)."""
        if self.params.temperature == 0:
            return int(np.argmax(dist.probs))  # ties go to the first: the lowest id or bytes
        p = tempered(dist.probs, self.params.temperature)
        order = np.argsort(-p, kind="stable")
        if self.params.top_p < 1:
            cutoff = int(np.searchsorted(np.cumsum(p[order]), self.params.top_p)) + 1
            order = order[:cutoff]
        kept = p[order] / p[order].sum()
        return int(order[int(self._rng.choice(len(order), p=kept))])


def tempered(probs: npt.NDArray[np.float64], temperature: float) -> npt.NDArray[np.float64]:
    """``q ∝ exp(ln F / T)``, normalised; ``(ln F - max ln F) / T`` is divided last, so any
    ``T > 0`` is safe: a subnormal T sends every id below the best to ``exp(-inf) = 0``."""
    log_f = np.log(np.maximum(probs, 1e-300))
    with np.errstate(over="ignore"):  # a tiny T overflows to -inf, which is what it means
        q: npt.NDArray[np.float64] = np.exp((log_f - log_f.max()) / temperature)
    q /= q.sum()  # the best id is exp(0) = 1, so the sum is >= 1
    return q
