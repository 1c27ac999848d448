"""Where the loss oracle's arrays come from: a ``moe2 gating collect`` store and a trained gating
artifact (the held-out examples it records, gated by it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe2.gating.embed import Embedder
from moe2.selection.oracle import LossOracle


def oracle_from_outputs(
    outputs: Path, gate: Path, split: str = "heldout", embedder: Embedder | None = None
) -> LossOracle:
    """``L(θ*, S)`` on the artifact's held-out examples (``split="all"``: every example);
    ``embedder``: the artifact's, if already loaded (the fusion agent's gate has it)."""
    from moe2.gating.evaluate import gated_scores

    _, arrays, values = gated_scores(outputs, gate, split, embedder)
    gold = [np.asarray(e.gold, dtype=np.float64) for e in arrays.examples]
    return LossOracle(arrays.expert_ids, values, gold)
