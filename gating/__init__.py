"""Gating: per-prompt weights over experts, the learned network (MoE² eq. 13, Table VI) and the
data it is trained on. The torch-backed parts load on first use, so ``import moe2.gating`` stays
light for agents that only need the ``Gate`` protocol."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from moe2.gating.base import Gate, UniformGate, top_k_experts
from moe2.gating.data import McExample, load_examples
from moe2.gating.dataset import GatingData
from moe2.gating.embed import Embedder, load_embedder

if TYPE_CHECKING:
    from moe2.gating.artifact import GatingArtifact, LearnedGate
    from moe2.gating.model import GatingMLP, TrainConfig, mixture_nll
    from moe2.gating.theorem import theorem1_check
    from moe2.gating.train import train_gating

_LAZY = {
    "GatingArtifact": "artifact",
    "LearnedGate": "artifact",
    "GatingMLP": "model",
    "TrainConfig": "model",
    "mixture_nll": "model",
    "theorem1_check": "theorem",
    "train_gating": "train",
}

__all__ = [
    "Embedder",
    "Gate",
    "GatingArtifact",
    "GatingData",
    "GatingMLP",
    "LearnedGate",
    "McExample",
    "TrainConfig",
    "UniformGate",
    "load_embedder",
    "load_examples",
    "mixture_nll",
    "theorem1_check",
    "top_k_experts",
    "train_gating",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"moe2.gating.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moe2.gating' has no attribute {name!r}")
