"""Theorem 1, measured: a gating trained on the full expert set N, renormalised on a subset S
(eq. 2), against a gating trained on S alone, both on the same split and judged on the same
held-out examples by eq. 13. The paper proves the gap is zero for a wide enough network; this
reports what a finite network and finite data give.

Both gatings are early-stopped on the held-out part, as ``train_gating`` is, so neither is favoured.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe2.gating.dataset import GatingData, split_three
from moe2.gating.embed import Embedder
from moe2.gating.model import GatingMLP, TrainConfig, gating_values
from moe2.gating.train import Batch, embed_all, fit, loss_report
from moe2.runtime.mixture import renormalise_on_subset

QUICK = TrainConfig(max_epochs=150, early_stop_patience=30, plateau_patience=20)
COLUMNS = ("subset", "size", "full_renormalised", "retrained", "gap", "gap_per_token")


class Theorem1Table(list[dict[str, Any]]):
    """One row per subset S (a plain list of dicts), printable as markdown."""

    def markdown(self) -> str:
        rows = [[_cell(row[c]) for c in COLUMNS] for row in self]
        lines = [list(COLUMNS), ["---"] * len(COLUMNS), *rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return ", ".join(value) if isinstance(value, list) else str(value)


def random_subsets(experts: Sequence[str], count: int, seed: int) -> list[list[str]]:
    """Up to ``count`` distinct proper subsets (1 <= |S| < N) of ``experts``, drawn with ``seed``
    (a size uniformly, then its members); all of them when there are no more than ``count``."""
    n = len(experts)
    proper = [list(c) for r in range(1, n) for c in itertools.combinations(experts, r)]
    if len(proper) <= count:
        return proper
    rng = np.random.default_rng(seed)
    chosen: list[list[str]] = []
    while len(chosen) < count:
        pick = rng.choice(n, size=int(rng.integers(1, n)), replace=False)
        subset = [experts[i] for i in sorted(pick.tolist())]
        if subset not in chosen:
            chosen.append(subset)
    return chosen


@dataclass(frozen=True)
class _Split:
    """Three disjoint sets, as ``gating train`` uses: train, validation (early stopping), and
    held out (the losses compared; neither trains nor stops a gate)."""

    data: GatingData
    x: np.ndarray  # every example's embedding
    train_idx: np.ndarray
    val_idx: np.ndarray
    held_idx: np.ndarray

    def batch(self, experts: Sequence[str], idx: np.ndarray) -> Batch:
        lps = self.data.with_experts(experts).gold_logprobs
        return Batch.of(self.x[idx], [lps[i] for i in idx], len(experts))

    def batches(self, experts: Sequence[str]) -> tuple[Batch, Batch]:
        """(train, held out) on S."""
        return self.batch(experts, self.train_idx), self.batch(experts, self.held_idx)

    def fit(self, experts: Sequence[str], config: TrainConfig, progress: bool) -> GatingMLP:
        train, val = self.batch(experts, self.train_idx), self.batch(experts, self.val_idx)
        return fit(train, val, config, progress=progress).model


def theorem1_check(
    data: GatingData,
    embedder: Embedder,
    config: TrainConfig | None = None,
    *,
    subsets: int | Sequence[Sequence[str]] = 8,
    seed: int = 0,
    embeddings: np.ndarray | None = None,
    progress: bool = False,
) -> Theorem1Table:
    """For each subset S (``subsets`` random ones drawn with ``seed``, or the ones given): held-out
    eq. 13 loss of the full-set gating renormalised on S, of a gating retrained on S alone, and the
    gap (renormalised minus retrained: the theorem says 0; positive favours retraining).
    ``config`` defaults to ``QUICK`` (Table VI's network, shorter patience); ``embeddings`` of
    ``data.texts`` may be passed to skip embedding."""
    config = config or QUICK
    x = embed_all(embedder, data.texts, progress=progress) if embeddings is None else embeddings
    split = _Split(data, x, *split_three(len(data), config.seed, config.holdout, config.validation))
    full = gating_values(split.fit(data.expert_ids, config, progress), x[split.held_idx])
    chosen = random_subsets(data.expert_ids, subsets, seed) if isinstance(subsets, int) else subsets
    return Theorem1Table(_compare(split, full, list(s), config) for s in chosen)


def _retrained_values(split: _Split, subset: list[str], config: TrainConfig) -> np.ndarray:
    held_x = split.x[split.held_idx]
    if len(subset) == 1:  # one expert: its weight is 1 whatever the network
        return np.ones((len(held_x), 1), dtype=np.float32)
    return gating_values(split.fit(subset, config, False), held_x)


def _compare(
    split: _Split, full: np.ndarray, subset: list[str], config: TrainConfig
) -> dict[str, Any]:
    _, held = split.batches(subset)
    allowed = [split.data.expert_ids.index(e) for e in subset]
    renorm = loss_report(renormalise_on_subset(full, allowed)[:, allowed], held)
    own = _retrained_values(split, subset, config)
    retrained = loss_report(own, held)
    return {
        "subset": subset,
        "size": len(subset),
        "full_renormalised": renorm["loss"],
        "retrained": retrained["loss"],
        "gap": renorm["loss"] - retrained["loss"],
        "full_renormalised_per_token": renorm["nll_per_token"],
        "retrained_per_token": retrained["nll_per_token"],
        "gap_per_token": renorm["nll_per_token"] - retrained["nll_per_token"],
    }
