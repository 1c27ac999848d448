"""Teacher forcing and KV-cache reuse for the transformers backend.

Scoring a ``Score``'s targets: the prompt is prefilled once; then the targets, right-padded to one
width, run as one batch from copies of the prompt's cache. Each target feeds all its tokens but
the last (that one is only predicted), and causal attention keeps padding from reaching any real
position, so every score is the one a lone forward pass over ``prompt + target`` gives (up to float
rounding: the same sums, in other shapes). Long targets go through in chunks of positions, so
the logits held at once stay below ``ROW_BUDGET`` rows whatever the targets' lengths.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from moe2.agents.expert.backends.base import TargetLogprobs

MAX_BATCH: Final = 8  # targets per batched pass
ROW_BUDGET: Final = 256  # positions x batch rows of logits computed at once (≈ 50 MB at V = 49152)


def reusable(cache: Any) -> bool:
    """Only plain dynamic caches can be copied and cut (sliding-window layers cannot)."""
    if not isinstance(cache, DynamicCache):
        return False
    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def copied_cache(cache: Any, length: int, batch: int = 1) -> DynamicCache:
    """A new cache with the first ``length`` positions of ``cache``, repeated ``batch`` times.

    The source is never changed: a forward pass extends a cache by concatenation into new
    tensors, and building this one copies.
    """
    data = [
        (k[:, :, :length].expand(batch, -1, -1, -1), v[:, :, :length].expand(batch, -1, -1, -1))
        for k, v, *_ in cache
    ]
    return DynamicCache(data)


def repeated_cache(cache: Any, batch: int) -> Any:
    """A copy of the whole of ``cache``, repeated ``batch`` times; sliding-window layers (Gemma-3)
    stay sliding-window layers, holding their window and their count of positions seen."""
    if reusable(cache):
        return copied_cache(cache, cache.get_seq_length(), batch)
    repeated = copy.deepcopy(cache)
    for layer in repeated.layers:
        layer.keys = layer.keys.expand(batch, -1, -1, -1)
        layer.values = layer.values.expand(batch, -1, -1, -1)
    return repeated


def cut_cache(cache: Any, remove: int) -> bool:
    """Drop the last ``remove`` positions of ``cache`` in place; False if it cannot be cut (a
    sliding-window layer past its window keeps no older positions): recompute it then."""
    if remove <= 0:
        return True
    try:
        cache.crop(-remove)
    except (AttributeError, RuntimeError, ValueError):
        return False
    return True


def score_targets(
    model: Any, last: torch.Tensor, past: Any, targets: Sequence[list[int]], top_k: int
) -> list[TargetLogprobs]:
    """Scores of non-empty ``targets`` after a prompt (its last logits ``last``, cache ``past``)."""
    first = torch.log_softmax(last.float(), dim=-1)
    scored: list[TargetLogprobs] = []
    for start in range(0, len(targets), MAX_BATCH):
        scored += _score_batch(model, first, past, targets[start : start + MAX_BATCH], top_k)
    return scored


def _score_batch(
    model: Any, first: torch.Tensor, past: Any, targets: Sequence[list[int]], top_k: int
) -> list[TargetLogprobs]:
    batch = len(targets)
    first_top = torch.topk(first, top_k)
    heads = torch.tensor([t[0] for t in targets])
    values = [first[heads][:, None]]  # (B, 1): position 0 comes from the prompt's last logits
    top_values = [first_top.values.expand(batch, 1, -1)]
    top_ids = [first_top.indices.expand(batch, 1, -1)]
    width = max(len(t) for t in targets) - 1
    if width:
        fed, labels = _padded(targets, width)
        cache = repeated_cache(past, batch)
        step = max(1, ROW_BUDGET // batch)
        for at in range(0, width, step):
            out = model(input_ids=fed[:, at : at + step], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logprobs = torch.log_softmax(out.logits.float(), dim=-1)
            values.append(logprobs.gather(-1, labels[:, at : at + step, None])[..., 0])
            top = torch.topk(logprobs, top_k)
            top_values.append(top.values)
            top_ids.append(top.indices)
    return [
        TargetLogprobs(
            logprobs=_numpy(values, i, len(t)).astype(np.float32),
            top_ids=_numpy(top_ids, i, len(t)).astype(np.uint32),
            top_logprobs=_numpy(top_values, i, len(t)).astype(np.float32),
        )
        for i, t in enumerate(targets)
    ]


def _padded(targets: Sequence[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) ids fed (each target but its last token) and the ids they predict; 0-padded."""
    fed = torch.zeros(len(targets), width, dtype=torch.long)
    labels = torch.zeros(len(targets), width, dtype=torch.long)
    for i, t in enumerate(targets):
        fed[i, : len(t) - 1] = torch.tensor(t[:-1])
        labels[i, : len(t) - 1] = torch.tensor(t[1:])
    return fed, labels


def _numpy(chunks: list[torch.Tensor], row: int, length: int) -> Any:
    """Row ``row`` of chunks concatenated along positions, cut to ``length`` positions."""
    return torch.cat([c[row] for c in chunks], dim=0)[:length].cpu().numpy()
