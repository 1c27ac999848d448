"""Where the loss oracle's arrays come from: a ``moe2 gating collect`` store and a trained gating
artifact (the held-out examples it records, gated by it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.selection.oracle import LossOracle


def oracle_from_outputs(outputs: Path, gate: Path, split: str = "heldout") -> LossOracle:
    """``L(θ*, S)`` on the artifact's held-out examples (``split="all"``: every example)."""
    from moe2.gating.artifact import GatingArtifact
    from moe2.gating.data import embed_text
    from moe2.gating.embed import load_embedder
    from moe2.gating.evaluate import heldout_ids
    from moe2.gating.store import OutputStore

    store = OutputStore(outputs)
    artifact = GatingArtifact.load(gate, expert_ids=store.expert_ids)
    ids = heldout_ids(store, artifact.heldout_ids, gate) if split == "heldout" else None
    arrays = store.score_arrays(ids)
    if not arrays.examples:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"{outputs} holds no complete example")
    texts = [embed_text(store.example(i)) for i in arrays.example_ids]
    values = artifact.values(load_embedder(artifact.embedder).embed(texts))
    gold = [np.asarray(e.gold, dtype=np.float64) for e in arrays.examples]
    return LossOracle(arrays.expert_ids, values, gold)
