"""The interface the fusion agent calls to weigh experts, and the uniform default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.mixture import top_k_weights
from moe2.runtime.wire import ChatMessage


class Gate(Protocol):
    """Gating values ``g_n(x)`` for the given experts (non-negative; need not sum to one)."""

    def gate(self, messages: Sequence[ChatMessage], experts: Sequence[str]) -> list[float]: ...


class UniformGate:
    """Equal weights: the majority-voting baseline, and the default until a gating is trained."""

    def gate(self, messages: Sequence[ChatMessage], experts: Sequence[str]) -> list[float]:
        return [1.0] * len(experts)


def top_k_experts(
    experts: Sequence[str], values: Sequence[float], k: int | None
) -> tuple[list[str], list[float]]:
    """Algorithm 3 / eq. 28 on named experts: ``moe2.runtime.mixture.top_k_weights`` of the gating
    values of S (``experts``, in the order that breaks ties), as the experts kept, largest weight
    first, and their weights. An expert whose weight is 0 is left out: it would not change the
    fusion. ``k`` None or 0 keeps all of S; a negative ``k`` is an invalid field.
    """
    if len(experts) != len(values):
        raise ValueError("one gating value per expert")
    if k is not None and k < 0:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"experts must be >= 0, got {k}")
    weights = top_k_weights(np.asarray(values, dtype=np.float64), k)
    order = np.argsort(-weights, kind="stable")[: np.count_nonzero(weights)]
    return [experts[i] for i in order], [float(weights[i]) for i in order]
