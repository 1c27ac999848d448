"""Batched decoding for the transformers backend: several sessions' caches as one left-padded batch.

Each session's KV cache holds its own number of positions. A batch stacks them along the batch
axis, each padded on the left to the longest (``Stacked``): the attention mask hides the padding,
and each row's position id is its own length, so a row computes what its session alone would
(up to float rounding: the same sums in other shapes). After the pass each row's cache is a view
of the batched one, its padding cut off.

The batched cache is kept while the same sessions keep stepping together (the common case of an
expert serving steady sessions: nothing is re-stacked); when one joins or leaves, the rows are
split back into caches of their own (copied, so no session holds the others' memory) and the
next batch is stacked anew.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # torch's own convention
from transformers import DynamicCache


@dataclass(slots=True)
class Stacked:
    """The caches of ``sessions``, left-padded to ``width`` positions and stacked."""

    sessions: tuple[str, ...]
    cache: DynamicCache
    lengths: list[int]  # per row: the positions its session holds
    width: int  # positions per row, padding included

    @classmethod
    def of(cls, sessions: Sequence[str], caches: Sequence[Any]) -> Stacked:
        lengths = [int(c.get_seq_length()) for c in caches]
        width = max(lengths)
        per_cache = [list(c) for c in caches]  # per session: (keys, values, ...) per layer
        layers = []
        for at in range(len(per_cache[0])):
            rows = [held[at] for held in per_cache]
            keys = torch.cat([_left_pad(r[0], width) for r in rows])
            values = torch.cat([_left_pad(r[1], width) for r in rows])
            layers.append((keys, values))
        return cls(tuple(sessions), DynamicCache(layers), lengths, width)

    def mask(self) -> torch.Tensor:
        """The attention mask of the next step: 0 on each row's padding, 1 elsewhere."""
        mask = torch.ones(len(self.lengths), self.width + 1, dtype=torch.long)
        for row, length in enumerate(self.lengths):
            mask[row, : self.width - length] = 0
        return mask

    def positions(self) -> torch.Tensor:
        """Each row's next position id: the number of positions its session holds."""
        return torch.tensor(self.lengths, dtype=torch.long)[:, None]

    def advanced(self, cache: DynamicCache) -> Stacked:
        """The batch after one step: ``cache`` from the forward pass, one more position each."""
        return Stacked(self.sessions, cache, [n + 1 for n in self.lengths], self.width + 1)

    def row(self, index: int) -> DynamicCache:
        """Row ``index``'s cache alone, its padding cut, in memory of its own."""
        pad = self.width - self.lengths[index]
        return DynamicCache(
            [
                (k[index : index + 1, :, pad:].clone(), v[index : index + 1, :, pad:].clone())
                for k, v, *_ in self.cache
            ]
        )


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(1, heads, n, dim) to (1, heads, width, dim), zeros on the left."""
    return F.pad(tensor, (0, 0, width - tensor.shape[2], 0))


# --- batched prefill ---------------------------------------------------------------------------

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), (1, heads, n, dim)


def prefill_rows(
    model: Any, heads: Sequence[Layers | None], tails: Sequence[list[int]]
) -> tuple[list[torch.Tensor], list[DynamicCache]]:
    """Several prompts in one forward pass: each row is a head already computed (a copy of a
    ``PrefixCache``'s shared head, or none) and a tail of ids to compute. Returns each row's
    last-position logits and its own cache (head and tail, no padding).

    The batch is ``[left padding][head][tail][right padding]`` per row: heads are left-padded to
    the longest head (zeros, hidden by the attention mask), tails right-padded to the longest
    tail, so every real position sees exactly its own row's head and tail, and no real query is
    fully masked; each tail position's id is its row's head length plus its index. Only the
    positions that end a row get logits (``logits_to_keep`` as indices).
    """
    head_lengths = [0 if h is None else int(h[0][0].shape[2]) for h in heads]
    width, span = max(head_lengths), max(len(t) for t in tails)
    rows = len(tails)
    device = model.device
    past = None
    if width:
        template = next(h for h in heads if h is not None)
        layers = []
        for at, (key0, value0) in enumerate(template):
            keys = [key0[:, :, :0] if h is None else h[at][0] for h in heads]
            values = [value0[:, :, :0] if h is None else h[at][1] for h in heads]
            layers.append(
                (
                    torch.cat([_left_pad(k, width) for k in keys]),
                    torch.cat([_left_pad(v, width) for v in values]),
                )
            )
        past = DynamicCache(layers)
    mask = torch.zeros(rows, width + span, dtype=torch.long)
    ids = torch.zeros(rows, span, dtype=torch.long)
    for row, (head, tail) in enumerate(zip(head_lengths, tails, strict=True)):
        mask[row, width - head : width + len(tail)] = 1
        ids[row, : len(tail)] = torch.tensor(tail, dtype=torch.long)
        ids[row, len(tail) :] = tail[-1]  # any real id: these positions are never read
    positions = torch.tensor(head_lengths, dtype=torch.long)[:, None] + torch.arange(span)
    ends = sorted({len(t) - 1 for t in tails})
    with torch.inference_mode():
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=past,
            use_cache=True,
            logits_to_keep=torch.tensor(ends, device=device),
        )
    logits = [out.logits[row, ends.index(len(t) - 1)] for row, t in enumerate(tails)]
    caches = [
        DynamicCache(
            [
                (
                    _row(k, row, width - head, width + len(tail)),
                    _row(v, row, width - head, width + len(tail)),
                )
                for k, v, *_ in out.past_key_values
            ]
        )
        for row, (head, tail) in enumerate(zip(head_lengths, tails, strict=True))
    ]
    return logits, caches


def _row(tensor: torch.Tensor, row: int, start: int, end: int) -> torch.Tensor:
    """Positions ``start:end`` of batch row ``row``, (1, heads, n, dim), in memory of its own."""
    return tensor[row : row + 1, :, start:end].clone()
