"""Logits to what a backend returns, in numpy: top-k slices and teacher-forced scores.

Shared by the backends whose runtime hands back plain arrays (ONNX Runtime, llama.cpp). The
log-probabilities are those of the full-vocabulary softmax, computed in float64 so that the
mass outside the top-k (``1 - sum(exp(logprobs))``) is not lost to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from moe2.agents.expert.backends.base import TargetLogprobs, TopK

Logits = npt.NDArray[np.floating]


def log_softmax(logits: Logits) -> npt.NDArray[np.float64]:
    """Natural-log softmax over the last axis."""
    wide = logits.astype(np.float64)
    shifted = wide - wide.max(axis=-1, keepdims=True)
    result: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def top_ids(logprobs: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.intp]:
    """The indices of the ``k`` largest values of each row, largest first (ties: lower id)."""
    k = min(k, logprobs.shape[-1])
    if k == 0:
        return np.zeros((*logprobs.shape[:-1], 0), dtype=np.intp)
    part = np.argpartition(-logprobs, k - 1, axis=-1)[..., :k]
    values = np.take_along_axis(logprobs, part, axis=-1)
    order = np.lexsort((part, -values), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def top_k_of(logits: Logits, k: int) -> TopK:
    """One position's ``k`` best ids with their full-softmax log-probabilities."""
    logprobs = log_softmax(logits)
    ids = top_ids(logprobs, k)
    return TopK(ids=ids.astype(np.uint32), logprobs=logprobs[ids].astype(np.float32))


def teacher_forced(
    first: Logits, following: Logits, target: Sequence[int], k: int
) -> TargetLogprobs:
    """Scores of ``target`` from the prompt's last logits ``first`` (V,) and the logits
    ``following`` (T-1, V) of the positions that fed ``target[:-1]``."""
    rows = log_softmax(np.concatenate([first[None, :], following[: len(target) - 1]]))
    picked = rows[np.arange(len(target)), np.asarray(target)]
    best = top_ids(rows, k)
    return TargetLogprobs(
        logprobs=picked.astype(np.float32),
        top_ids=best.astype(np.uint32),
        top_logprobs=np.take_along_axis(rows, best, axis=-1).astype(np.float32),
    )
