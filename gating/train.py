"""Algorithm 1: train the gating network on eq. 13 over the full expert set.

The embeddings are computed once. The split is seeded (``TrainConfig.seed`` / ``holdout``), the
held-out part is the validation set for early stopping (the best epoch's weights are kept) and for
ReduceLROnPlateau. Gradient accumulation over ``grad_accum`` batches of ``batch`` is done as one
forward pass over the group, each example weighted as its batch's mean over the group's batches:
the same gradient as accumulating batch by batch, in fewer calls.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import Tensor
from tqdm import tqdm

from moe2.gating.artifact import ExpertModel, GatingArtifact, expert_records
from moe2.gating.dataset import GatingData, OptionScores, pad_logprobs, pad_options, split_three
from moe2.gating.embed import Embedder
from moe2.gating.model import (
    GatingMLP,
    TrainConfig,
    build_model,
    cloze_cross_entropy,
    mixture_nll,
    mixture_nll_from_logits,
    per_token_nll,
)
from moe2.runtime.errors import ErrorCode, Moe2Error

__all__ = ["Batch", "FitResult", "OptionBatch", "TrainConfig", "embed_all", "fit", "train_gating"]

log = structlog.get_logger("moe2.gating.train")

EMBED_BATCH = 64
NLL_ONLY = TrainConfig()
CURVES = "curves.png"


@dataclass(frozen=True)
class OptionBatch:
    """Every option's scores as tensors (``pad_options``): log-probabilities (E, O, N, T), the
    mask of units (E, O, T), lengths in units (E, O), the mask of options (E, O), answers (E,)."""

    logprobs: Tensor
    units: Tensor
    lengths: Tensor
    present: Tensor
    answers: Tensor

    @classmethod
    def of(cls, options: list[OptionScores], n: int) -> OptionBatch:
        return cls(*(torch.from_numpy(a) for a in pad_options(options, n)))

    def take(self, idx: Tensor) -> OptionBatch:
        return OptionBatch(
            self.logprobs[idx],
            self.units[idx],
            self.lengths[idx],
            self.present[idx],
            self.answers[idx],
        )

    def cross_entropy(self, log_gates: Tensor, scale: float) -> Tensor:
        """Per example, the cross-entropy of the gold option (``cloze_cross_entropy``)."""
        parts = (self.logprobs, self.units, self.lengths, self.present, self.answers)
        return cloze_cross_entropy(log_gates, *parts, scale=scale)


@dataclass(frozen=True)
class Batch:
    """Embeddings (E, dim), gold log-probabilities (E, N, T) and their mask (E, T), as tensors;
    every option's scores too when training on discrimination."""

    x: Tensor
    logprobs: Tensor
    mask: Tensor
    options: OptionBatch | None = None

    @classmethod
    def of(
        cls,
        embeddings: np.ndarray,
        gold_logprobs: list[np.ndarray],
        n: int,
        options: list[OptionScores] | None = None,
    ) -> Batch:
        lp, mask = pad_logprobs(gold_logprobs, n)
        opts = None if options is None else OptionBatch.of(options, n)
        return cls(torch.from_numpy(embeddings), torch.from_numpy(lp), torch.from_numpy(mask), opts)

    @classmethod
    def pick(cls, data: GatingData, x: np.ndarray, idx: np.ndarray) -> Batch:
        """Examples ``idx`` of ``data`` (their embeddings ``x[idx]``), with their options when
        ``data`` has them."""
        options = None if data.options is None else [data.options[i] for i in idx]
        gold = [data.gold_logprobs[i] for i in idx]
        return cls.of(x[idx], gold, len(data.expert_ids), options)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx: Tensor) -> Batch:
        opts = None if self.options is None else self.options.take(idx)
        return Batch(self.x[idx], self.logprobs[idx], self.mask[idx], opts)


def training_losses(logits: Tensor, batch: Batch, config: TrainConfig) -> Tensor:
    """Per example (B,): eq. 13, plus ``cloze_weight`` times the options' cross-entropy when
    that weight is positive (at 0 exactly eq. 13, computed as before the term existed)."""
    losses = mixture_nll_from_logits(logits, batch.logprobs, batch.mask)
    if config.cloze_weight == 0.0:
        return losses
    if batch.options is None:
        raise ValueError(
            "cloze_weight > 0 needs every option's scores (to_gating_data(options=True))"
        )
    ce = batch.options.cross_entropy(torch.log_softmax(logits, dim=1), config.cloze_scale)
    return losses + config.cloze_weight * ce


@dataclass
class FitResult:
    """The network at its best validation epoch, in eval mode, and what training went through."""

    model: GatingMLP
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def embed_all(embedder: Embedder, texts: list[str], *, progress: bool = True) -> np.ndarray:
    """Every text's embedding (E, dim) float32, with a progress bar. Texts go in batches of
    similar length (less padding), and come back in their own order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    starts = range(0, len(texts), EMBED_BATCH)
    for start in tqdm(starts, desc="embed", unit="batch", disable=not progress):
        picked = order[start : start + EMBED_BATCH]
        out[picked] = embedder.embed([texts[i] for i in picked])
    return out


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for a while: the gating network is too small for threads to
    pay, and on a busy 2-core box their spinning made training ten times slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(train: Batch, val: Batch, config: TrainConfig, *, progress: bool = True) -> FitResult:
    """Train a fresh ``GatingMLP`` on ``train``, early-stopped on ``val``'s loss (eq. 13, plus
    the options' cross-entropy when ``config.cloze_weight`` > 0)."""
    with one_thread():
        return _fit(train, val, config, progress)


def _fit(train: Batch, val: Batch, config: TrainConfig, progress: bool) -> FitResult:
    torch.manual_seed(config.seed)
    model = build_model(int(train.x.shape[1]), int(train.logprobs.shape[1]), config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=config.plateau_factor, patience=config.plateau_patience
    )
    shuffle = torch.Generator().manual_seed(config.seed)
    best, history, started = _Best(), [], time.perf_counter()
    bar = tqdm(range(config.max_epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        train_loss = _train_epoch(model, opt, train, config, shuffle)
        val_loss = validation_loss(model, val, config)
        plateau.step(val_loss)
        lr = float(opt.param_groups[0]["lr"])
        history.append({"epoch": epoch, "train": train_loss, "val": val_loss, "lr": lr})
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", lr=f"{lr:.2e}")
        if (
            not best.update(model, val_loss, epoch)
            and epoch - best.epoch >= config.early_stop_patience
        ):
            break
    model.load_state_dict(best.state)
    model.eval()
    return FitResult(model, best.epoch, history, time.perf_counter() - started)


@dataclass
class _Best:
    """The best validation loss so far, its epoch and a copy of the weights then."""

    loss: float = math.inf
    epoch: int = 0
    state: dict[str, Tensor] = field(default_factory=dict)

    def update(self, model: GatingMLP, loss: float, epoch: int) -> bool:
        if loss >= self.loss:
            return False
        self.loss, self.epoch, self.state = loss, epoch, copy.deepcopy(model.state_dict())
        return True


def _train_epoch(
    model: GatingMLP,
    opt: torch.optim.Optimizer,
    data: Batch,
    config: TrainConfig,
    gen: torch.Generator,
) -> float:
    """One pass over ``data``; the mean per-example loss seen (dropout on)."""
    model.train()
    order, group = torch.randperm(len(data), generator=gen), config.batch * config.grad_accum
    total = 0.0
    for start in range(0, len(data), group):
        part = data.take(order[start : start + group])
        losses = training_losses(model(part.x), part, config)
        opt.zero_grad(set_to_none=True)
        loss = (losses * accumulation_weights(len(part), config.batch)).sum()
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward untyped
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        total += float(losses.detach().sum())
    return total / max(len(data), 1)


def accumulation_weights(size: int, batch: int) -> Tensor:
    """Per-example weights (size,) that make one backward pass over ``size`` examples give the
    gradient of accumulating the mean loss of each ``batch``-sized slice, averaged over slices."""
    sizes = torch.full((size,), float(batch))
    tail = size % batch
    if tail:
        sizes[-tail:] = float(tail)
    return 1.0 / (sizes * math.ceil(size / batch))


def validation_loss(model: GatingMLP, val: Batch, config: TrainConfig | None = None) -> float:
    """The training loss per example (eq. 13 alone without ``config``), averaged over ``val``,
    dropout off."""
    model.eval()
    with torch.inference_mode():
        return float(training_losses(model(val.x), val, config or NLL_ONLY).mean())


def loss_report(gates: np.ndarray, val: Batch) -> dict[str, float]:
    """Eq. 13 per example and per token for fixed gating values (E, N) on ``val``."""
    g = torch.from_numpy(np.asarray(gates, dtype=np.float32))
    with torch.inference_mode():
        return {
            "loss": float(mixture_nll(g, val.logprobs, val.mask)),
            "nll_per_token": float(per_token_nll(g, val.logprobs, val.mask)),
        }


def train_gating(
    data: GatingData,
    embedder: Embedder,
    config: TrainConfig,
    out: Path,
    *,
    progress: bool = True,
    identities: Mapping[str, ExpertModel] | None = None,
) -> GatingArtifact:
    """Algorithm 1 end to end: embed, split three ways (train; validation for early stopping;
    held out for evaluation only), fit, then write ``out/model.safetensors``,
    ``out/gating.json`` and ``out/curves.png``; returns the artifact. ``identities``: what
    served each expert id in ``data`` (from the store's meta), recorded in ``gating.json`` for
    those of ``data.expert_ids`` so that evaluation elsewhere can check it; extra ids are
    ignored, a missing one is refused."""
    if identities is not None:
        expert_records(data.expert_ids, identities)  # refuse a missing one before training
    if config.cloze_weight > 0 and data.options is None:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            "cloze_weight > 0 trains on every option's scores: build the data with "
            "OutputStore.to_gating_data(options=True)",
        )
    train_idx, val_idx, held_idx = split_three(
        len(data), config.seed, config.holdout, config.validation
    )
    x = embed_all(embedder, data.texts, progress=progress)
    n = len(data.expert_ids)
    train, val, held = (Batch.pick(data, x, idx) for idx in (train_idx, val_idx, held_idx))
    log.info(
        "gating_train_start",
        examples=len(data),
        train=len(train),
        validation=len(val),
        heldout=len(held),
        experts=n,
    )
    result = fit(train, val, config, progress=progress)
    artifact = GatingArtifact(result.model, data.expert_ids, embedder.name, experts=identities)
    artifact.metadata.update(
        data_hash=data.data_hash(),
        config=config.as_dict(),
        metrics=_metrics(artifact, result, train, val, held, config),
        split={
            "seed": config.seed,
            "holdout": config.holdout,
            "validation_share": config.validation,
            "n_train": len(train),
            "validation": [data.example_ids[i] for i in val_idx],
            "heldout": [data.example_ids[i] for i in held_idx],
        },
        history=result.history,
    )
    artifact.save(out)
    loss = "eq. 13 + λ·CE" if config.cloze_weight > 0 else "eq. 13"
    plot_curves(result.history, out / CURVES, best_epoch=result.best_epoch, loss=loss)
    log.info("gating_trained", out=str(out), **artifact.metadata["metrics"])
    return artifact


def _metrics(
    artifact: GatingArtifact,
    result: FitResult,
    train: Batch,
    val: Batch,
    held: Batch,
    config: TrainConfig,
) -> dict[str, Any]:
    """Held-out figures on examples that neither trained the gate nor stopped its training."""
    n = artifact.model.n_experts
    gated = loss_report(artifact.values(held.x.numpy()), held)
    uniform = loss_report(np.full((len(held), n), 1.0 / n), held)
    return {
        "validation_loss": validation_loss(artifact.model, val, config),
        "heldout_loss": gated["loss"],
        "heldout_nll_per_token": gated["nll_per_token"],
        "heldout_uniform_loss": uniform["loss"],
        "heldout_uniform_nll_per_token": uniform["nll_per_token"],
        "train_loss": validation_loss(artifact.model, train, config),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "seconds": round(result.seconds, 3),
    }


def plot_curves(
    history: list[dict[str, float]], path: Path, *, best_epoch: int, loss: str = "eq. 13"
) -> None:
    """Training and validation loss per epoch (and the best epoch) as a PNG; no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train"] for h in history], label="train (dropout on)")
    ax.plot(epochs, [h["val"] for h in history], label="validation")
    ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    ax.set(xlabel="epoch", ylabel=f"{loss} loss per example", title="gating network training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
