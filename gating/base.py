"""The interface the fusion agent calls to weigh experts, and the uniform default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from moe2.runtime.wire import ChatMessage


class Gate(Protocol):
    """Gating values ``g_n(x)`` for the given experts (non-negative; need not sum to one)."""

    def gate(self, messages: Sequence[ChatMessage], experts: Sequence[str]) -> list[float]: ...


class UniformGate:
    """Equal weights: the majority-voting baseline, and the default until a gating is trained."""

    def gate(self, messages: Sequence[ChatMessage], experts: Sequence[str]) -> list[float]:
        return [1.0] * len(experts)


def top_k_weights(
    experts: Sequence[str], values: Sequence[float], k: int | None
) -> tuple[list[str], list[float]]:
    """Algorithm 3 / eq. 28: keep the k largest gating values of S, renormalised to sum to one.

    Ties keep the order of ``experts`` (sorted ids), so a choice is reproducible.
    """
    if len(experts) != len(values):
        raise ValueError("one gating value per expert")
    if not experts:
        return [], []
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(-v, kind="stable")[: k if k is not None and k > 0 else len(experts)]
    chosen = v[order]
    total = chosen.sum()
    weights = chosen / total if total > 0 else np.full(len(order), 1.0 / len(order))
    return [experts[i] for i in order], [float(w) for w in weights]
