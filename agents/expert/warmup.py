"""An expert's warm-up: one small prefill and a few decode steps before it joins the bus.

It wakes the model's lazy start-up costs outside any session, and gives the first heartbeat a
measured ``decode_s`` and ``prefill_s_per_token`` (the fusion agent and the selection read them)
instead of zeros. Synchronous: the expert runs it on its model worker thread.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from moe2.agents.expert.backends import Backend, PrefixCache
from moe2.agents.expert.backends.base import common_prefix
from moe2.agents.expert.energy import EnergyMeter
from moe2.runtime.wire import ChatMessage

WARMUP_SESSION: Final = "moe2-warmup"  # a backend session id; no bus session exists yet
WARMUP_PROMPT: Final = (ChatMessage("user", "Count from one to ten, in words."),)
WARMUP_DECODE_STEPS: Final = 4


@dataclass(frozen=True, slots=True)
class Warmup:
    """What the warm-up measured: seconds per prefilled token and per decode step (median)."""

    prefill_s_per_token: float
    decode_s: float


def prefilled_tokens(prompt_ids: Sequence[int], prefix: PrefixCache | None) -> int:
    """How many of ``prompt_ids`` a prefill computes: those after the head ``prefix`` shares."""
    shared = common_prefix(prompt_ids, prefix.ids) if prefix is not None else 0
    return max(1, len(prompt_ids) - shared)


def warm_up(
    backend: Backend,
    prompt_ids: Sequence[int],
    meter: EnergyMeter,
    *,
    prefix: PrefixCache | None = None,
    decode_steps: int = WARMUP_DECODE_STEPS,
) -> Warmup:
    """Prefill ``prompt_ids``, decode ``decode_steps`` greedy tokens, free the cache, report."""
    try:
        with meter.measure() as prefill:
            top = backend.prefill(WARMUP_SESSION, prompt_ids, 1, prefix)
        steps: list[float] = []
        for _ in range(decode_steps):
            with meter.measure() as step:
                top = backend.decode(WARMUP_SESSION, int(top.ids[0]), 1)
            steps.append(step.compute_s)
    finally:
        backend.release(WARMUP_SESSION)
    per_token = prefill.compute_s / prefilled_tokens(prompt_ids, prefix)
    return Warmup(per_token, statistics.median(steps) if steps else 0.0)
