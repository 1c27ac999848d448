"""Gating: per-prompt weights over experts (the learned network arrives with the gating issue)."""

from moe2.gating.base import Gate, UniformGate, top_k_weights

__all__ = ["Gate", "UniformGate", "top_k_weights"]
