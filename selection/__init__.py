"""Coarse-grained selection of the subset S (SMO arrives with the selection issue)."""

from moe2.selection.base import AllLive, SubsetSelector

__all__ = ["AllLive", "SubsetSelector"]
