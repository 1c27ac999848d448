"""The gating network (Table VI), its training loss (eq. 13, plus an optional term on the options'
discrimination) and the training hyper-parameters."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def token_nll(log_gates: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token loss ``-log sum_n w_n f_{n,y_t}`` (B, T), zero at padding: the torch twin of
    ``moe2.runtime.mixture.fused_log_likelihood`` (eq. 13's term), held equal to it in the tests.

    ``log_gates`` (B, N) are ``log w_n`` (``-inf`` for experts outside S), ``logprobs`` (B, N, T)
    are ``log f_{n,y_t}``; the sum over experts is a logsumexp, so it never underflows.
    """
    mixed = torch.logsumexp(log_gates.unsqueeze(-1) + logprobs, dim=1)
    return torch.where(mask, -mixed, torch.zeros_like(mixed))


def mixture_nll(gates: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Eq. 13, ``-sum_t log sum_{n in S} w_n f_{n,y_t}``, averaged over the examples.

    ``gates`` (B, N) are weights summing to one over S, zero outside it (eq. 2, as
    ``moe2.runtime.mixture.renormalise_on_subset`` gives). Per-token figures:
    ``per_token_nll``. Training goes through ``mixture_nll_from_logits`` (no log of a softmax).
    """
    return token_nll(torch.log(gates), logprobs, mask).sum(dim=1).mean()


def mixture_nll_from_logits(logits: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-example eq. 13 (B,) with ``w = softmax(logits)``: the training loss."""
    return token_nll(torch.log_softmax(logits, dim=1), logprobs, mask).sum(dim=1)


def per_token_nll(gates: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Eq. 13 summed over all examples and tokens, divided by the number of tokens."""
    return token_nll(torch.log(gates), logprobs, mask).sum() / mask.sum().clamp(min=1)


def option_scores(log_gates: Tensor, logprobs: Tensor, units: Tensor, lengths: Tensor) -> Tensor:
    """Per example and option, the length-normalised fused log-likelihood of the option's text
    (B, O): the torch twin of ``moe2.gating.evaluate.cloze_scores`` (whose argmax is the cloze
    choice), held equal to it in the tests. ``log_gates`` (B, N); ``logprobs`` (B, O, N, T) per
    expert and unit; ``units`` (B, O, T) marks real units; ``lengths`` (B, O) in units."""
    mixed = torch.logsumexp(log_gates[:, None, :, None] + logprobs, dim=2)
    sums = torch.where(units, mixed, torch.zeros_like(mixed)).sum(dim=2)
    return sums / lengths.clamp(min=1.0)


def cloze_cross_entropy(
    log_gates: Tensor,
    logprobs: Tensor,
    units: Tensor,
    lengths: Tensor,
    present: Tensor,
    answers: Tensor,
    scale: float = 1.0,
) -> Tensor:
    """Per example (B,), ``-log softmax_o(scale * option_scores)[answer]`` over the options
    ``present`` (B, O): the discriminative term of training (``TrainConfig.cloze_weight``)."""
    scores = scale * option_scores(log_gates, logprobs, units, lengths)
    scores = scores.masked_fill(~present, -torch.inf)
    return -torch.log_softmax(scores, dim=1).gather(1, answers[:, None]).squeeze(1)


class GatingMLP(nn.Module):
    """Table VI: ``layers`` hidden layers of ``hidden`` units (Linear, PReLU, dropout) and an
    output layer of one logit per expert; gating values are ``softmax(logits)``.

    "Residual connections concatenated before the output layer" is read as dense skip connections:
    the output layer sees the concatenation ``[x, h_1, ..., h_L]`` of the input embedding and every
    hidden layer's output, so it has ``dim + layers * hidden`` inputs.
    """

    def __init__(
        self, dim: int, n_experts: int, *, hidden: int = 128, layers: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        widths = [dim] + [hidden] * layers
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(w_in, hidden), nn.PReLU(), nn.Dropout(dropout))
            for w_in in widths[:-1]
        )
        self.out = nn.Linear(dim + layers * hidden, n_experts)
        self.dim, self.n_experts = dim, n_experts
        self.width, self.layers, self.dropout = hidden, layers, dropout

    def architecture(self) -> dict[str, Any]:
        """What rebuilds this network (with ``dim`` and ``n_experts``)."""
        return {"hidden": self.width, "layers": self.layers, "dropout": self.dropout}

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings (B, dim) -> logits (B, N)."""
        features = [x]
        for layer in self.hidden:
            features.append(layer(features[-1]))
        logits: Tensor = self.out(torch.cat(features, dim=1))
        return logits


def gating_values(model: GatingMLP, x: np.ndarray) -> np.ndarray:
    """``softmax(model(x))`` (E, N) float32 for embeddings (E, dim), dropout off, no autograd."""
    model.eval()
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(np.asarray(x, np.float32))), dim=1).numpy()


@dataclass(frozen=True)
class TrainConfig:
    """Table VI's defaults; everything else chosen here (stated in the comments)."""

    hidden: int = 128
    layers: int = 2
    dropout: float = 0.1
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-2  # AdamW's default
    batch: int = 8
    grad_accum: int = 8  # one optimiser step per grad_accum batches
    clip: float = 1.0  # gradient norm
    plateau_factor: float = 0.8  # ReduceLROnPlateau on the validation loss, stepped once per epoch
    plateau_patience: int = 50  # epochs
    max_epochs: int = 400
    early_stop_patience: int = 80  # epochs without a better validation loss; > plateau_patience
    seed: int = 0  # initialisation, shuffling and the split
    holdout: float = 0.2  # share of the examples held out for evaluation only
    validation: float = 0.2  # share for early stopping and the LR schedule (not evaluation)
    # Discrimination (docs/gating.md §4): loss = eq. 13 + cloze_weight * cross-entropy over the
    # options of cloze_scale * their length-normalised fused scores; 0 is eq. 13 alone.
    cloze_weight: float = 0.0
    cloze_scale: float = 1.0

    def __post_init__(self) -> None:
        positive = ("hidden", "batch", "grad_accum", "max_epochs", "lr", "clip", "plateau_factor")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 < self.holdout < 1.0:
            raise ValueError("dropout must lie in [0, 1) and holdout in (0, 1)")
        if not 0.0 < self.validation < 1.0 or self.holdout + self.validation >= 1.0:
            raise ValueError("validation must lie in (0, 1) and leave examples to train on")
        if min(self.layers, self.plateau_patience, self.early_stop_patience) < 0:
            raise ValueError("layers and patiences must be >= 0")
        if not self.cloze_weight >= 0.0 or not self.cloze_scale > 0.0:
            raise ValueError("cloze_weight must be >= 0 and cloze_scale > 0")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From ``as_dict`` output; unknown keys are ignored (artifacts from a later version),
        missing ones take their defaults (artifacts from before ``cloze_weight``)."""
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def build_model(dim: int, n_experts: int, config: TrainConfig) -> GatingMLP:
    return GatingMLP(
        dim, n_experts, hidden=config.hidden, layers=config.layers, dropout=config.dropout
    )
