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
