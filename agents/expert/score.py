"""The pure half of an expert's ``Score`` service: checking a request and packing the reply.

The I/O half (subscribe, queue on the model's worker thread, reply) is in ``expert.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe2.agents.expert.backends import Backend, PrefixCache, TargetLogprobs
from moe2.agents.expert.energy import EnergyMeter
from moe2.runtime import wire
from moe2.runtime.errors import ErrorCode, Moe2Error


def score_refusal(score: wire.Score) -> Moe2Error | None:
    """Why a Score cannot be served, judged from the request alone; None if it can be tried."""
    if not wire.has_content(score.messages):
        return Moe2Error(ErrorCode.EMPTY_PROMPT, "the prompt has no message with content")
    if not score.targets:
        return Moe2Error(ErrorCode.INVALID_FIELD, "a Score needs at least one target")
    empty = [i for i, t in enumerate(score.targets) if not t]
    if empty:
        return Moe2Error(ErrorCode.INVALID_FIELD, f"target {empty[0]} is empty")
    if score.top_k < 0:
        return Moe2Error(ErrorCode.INVALID_FIELD, f"top_k must be >= 0, got {score.top_k}")
    return None


def check_fits(prompt_tokens: int, targets_ids: Sequence[Sequence[int]], max_context: int) -> None:
    """A target is scored only if a session could have generated it: prompt + target <= context."""
    for i, ids in enumerate(targets_ids):
        if not ids:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"target {i} encodes to no tokens")
        if prompt_tokens + len(ids) > max_context:
            raise Moe2Error(
                ErrorCode.PROMPT_TOO_LONG,
                f"the prompt ({prompt_tokens} tokens) and target {i} ({len(ids)} tokens) "
                f"exceed this expert's {max_context}-token context",
            )


def target_score(ids: Sequence[int], scored: TargetLogprobs) -> wire.TargetScore:
    """Pack one target's arrays little-endian, as the wire wants them."""
    return wire.TargetScore(
        ids=np.asarray(ids, dtype="<u4").tobytes(),
        logprobs=np.ascontiguousarray(scored.logprobs, dtype="<f4").tobytes(),
        top_ids=np.ascontiguousarray(scored.top_ids, dtype="<u4").tobytes(),
        top_logprobs=np.ascontiguousarray(scored.top_logprobs, dtype="<f4").tobytes(),
    )


def run_score(
    backend: Backend,
    prompt_ids: Sequence[int],
    score: wire.Score,
    *,
    expert: str,
    top_k: int,
    max_context: int,
    meter: EnergyMeter,
    prefix: PrefixCache | None = None,
) -> wire.Scored:
    """Encode the targets, check they fit, score them: the worker thread's part of a Score."""
    targets_ids = [backend.encode_answer(t) for t in score.targets]
    check_fits(len(prompt_ids), targets_ids, max_context)
    with meter.measure() as reading:
        scored = backend.score(prompt_ids, targets_ids, top_k, prefix)
    return wire.Scored(
        expert=expert,
        prompt_tokens=len(prompt_ids),
        targets=[target_score(ids, s) for ids, s in zip(targets_ids, scored, strict=True)],
        compute_s=reading.compute_s,
        energy_j=reading.energy_j,
    )
