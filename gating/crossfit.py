"""Cross-fitted evaluation: every example judged by a gate that never saw it.

One held-out split leaves few examples to judge a gate by (a fifth of a collection), and the
confidence intervals are as wide as that. K-fold cross-fitting trains K gates: gate k is trained
on the other folds (a seeded share of them set aside for early stopping), and gives the gating
values of fold k's examples only. Every example then has held-out gating values, from a gate that
neither trained on it nor stopped its training on it, and the report is over all of them. The
shipped gate (``moe2 gating train``) is a separate, single training; this estimates how a gate
trained this way does on examples it has not seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from tqdm.auto import tqdm

from moe2.gating.dataset import GatingData
from moe2.gating.evaluate import Evaluation, evaluate, markdown_report
from moe2.gating.model import TrainConfig, gating_values
from moe2.gating.train import Batch, embed_all, fit
from moe2.runtime.errors import ErrorCode, Moe2Error


def fold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint, sorted index sets covering range(n), sizes differing by one at most."""
    if not 2 <= folds <= n:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"--folds must lie in [2, {n}], got {folds}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(chunk) for chunk in np.array_split(perm, folds)]


def crossfit_values(
    data: GatingData,
    x: np.ndarray,
    config: TrainConfig,
    folds: int,
    *,
    progress: bool = True,
) -> np.ndarray:
    """(E, N) gating values, row i from the gate trained without example i's fold; each gate
    early-stops on ``config.validation / (1 - 1 / folds)`` of its training folds."""
    n_examples, n = len(data), len(data.expert_ids)
    chunks = fold_indices(n_examples, folds, config.seed)
    values = np.zeros((n_examples, n), dtype=np.float64)
    share = min(0.5, config.validation / (1.0 - 1.0 / folds))
    everything = np.arange(n_examples)
    for k, test in enumerate(tqdm(chunks, desc="folds", disable=not progress)):
        rest = np.setdiff1d(everything, test)
        perm = np.random.default_rng(config.seed + 1 + k).permutation(rest)
        n_val = max(1, round(len(rest) * share))
        val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        result = fit(Batch.pick(data, x, train), Batch.pick(data, x, val), config, progress=False)
        values[test] = gating_values(result.model, x[test])
    return values


def run_crossfit(
    outputs: Path,
    embedder: Any,
    config: TrainConfig,
    folds: int,
    stem: Path,
    *,
    experts: list[str] | None = None,
    progress: bool = True,
) -> tuple[str, Evaluation]:
    """Cross-fit on the store at ``outputs`` (over ``experts``, default all of them); write
    ``stem``.md and .json; return the markdown and the evaluation."""
    from moe2.gating.store import OutputStore

    store = OutputStore(outputs)
    data = store.to_gating_data(options=config.cloze_weight > 0)
    if experts is not None:
        data = data.with_experts(experts)
    arrays = store.score_arrays(data.example_ids, experts=data.expert_ids)
    x = embed_all(embedder, data.texts, progress=progress)
    values = crossfit_values(data, x, config, folds, progress=progress)
    result = evaluate(arrays, values)
    meta = store.meta
    models = {e.id: e.model for e in meta.experts}
    context: dict[str, object] = {
        "outputs": str(store.directory),
        "pool": ", ".join(f"{e} ({models[e]})" for e in data.expert_ids),
        "data": f"{meta.dataset.path} (limit {meta.dataset.limit}, seed {meta.dataset.seed})",
        "data hash": data.data_hash(),
        "embedder": getattr(embedder, "name", str(embedder)),
        "split": f"{folds}-fold cross-fitting (seed {config.seed}): every example's gating "
        "values come from a gate trained without its fold, early-stopped on part of the others",
        "examples": len(arrays.examples),
        f"gold {arrays.unit}s": int(sum(e.length(e.answer) for e in arrays.examples)),
    }
    text = markdown_report(result.rows, context, result.differences, arrays.unit)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    body = {
        **context,
        "config": config.as_dict(),
        "unit": arrays.unit,
        "rows": [r.as_dict() for r in result.rows],
        "differences": [d.as_dict() for d in result.differences],
    }
    stem.with_suffix(".json").write_bytes(msgspec.json.format(msgspec.json.encode(body), indent=2))
    return text, result
