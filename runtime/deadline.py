"""Per-step deadlines: who was late, and who has been late too often to stay."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class LateTracker:
    """Counts late slices per expert; ``max_consecutive`` late steps in a row drops an expert."""

    max_consecutive: int = 3
    late: dict[str, int] = field(default_factory=dict)
    _streak: dict[str, int] = field(default_factory=dict)

    def record(self, expected: Iterable[str], arrived: Iterable[str]) -> list[str]:
        """Note one step's arrivals; return the experts to drop now."""
        got = set(arrived)
        drop: list[str] = []
        for expert in expected:
            if expert in got:
                self._streak[expert] = 0
                continue
            self.late[expert] = self.late.get(expert, 0) + 1
            self._streak[expert] = self._streak.get(expert, 0) + 1
            if self._streak[expert] >= self.max_consecutive:
                drop.append(expert)
        return drop
