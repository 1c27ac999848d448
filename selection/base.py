"""The interface the fusion agent calls to pick the allowed subset S, and its default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class SubsetSelector(Protocol):
    """Chooses S from the live experts; called again whenever membership changes."""

    def select(self, live: Sequence[str]) -> list[str]: ...


class AllLive:
    """Every live expert may take part (the default when no gating outputs are configured)."""

    def select(self, live: Sequence[str]) -> list[str]:
        return sorted(live)
