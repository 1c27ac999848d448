"""Who is on the bus: experts seen by heartbeat, forgotten when their heartbeats stop."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from moe2.runtime.byte_fusion import Vocabulary
from moe2.runtime.wire import Heartbeat


@dataclass(slots=True)
class Membership:
    """Pure bookkeeping of heartbeats: an expert silent for ``missed`` of its own heartbeat
    intervals is gone."""

    missed: int = 2
    _last: dict[str, tuple[float, Heartbeat]] = field(default_factory=dict)

    def seen(self, heartbeat: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True if the expert is new (or back)."""
        known = heartbeat.expert in self._last and self._fresh(heartbeat.expert, now)
        self._last[heartbeat.expert] = (now, heartbeat)
        return not known

    def _fresh(self, expert: str, now: float) -> bool:
        """Heard from within ``missed`` of the expert's own heartbeat intervals."""
        seen, hb = self._last[expert]
        return now - seen <= self.missed * hb.interval_s

    def live(self, now: float) -> dict[str, Heartbeat]:
        return {e: hb for e, (_, hb) in self._last.items() if self._fresh(e, now)}

    def expire(self, now: float) -> list[str]:
        """Forget the experts whose heartbeats stopped; return their ids."""
        gone = [e for e in self._last if not self._fresh(e, now)]
        for e in gone:
            del self._last[e]
        return gone


def vocabulary_of(heartbeat: Heartbeat) -> Vocabulary:
    """What a session needs of an expert's tokenizer: its identity, V and eos ids."""
    return Vocabulary(heartbeat.tokenizer, heartbeat.vocab_size, frozenset(heartbeat.eos_ids))


def same_tokenizer(live: dict[str, Heartbeat], candidates: list[str]) -> list[str]:
    """Keep the candidates that share the most common tokenizer (``fusion_path = "ids"``: a
    session that fuses by token id only; the other paths keep every candidate)."""
    if not candidates:
        return []
    counts = Counter(live[e].tokenizer for e in candidates)
    top = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return [e for e in candidates if live[e].tokenizer == top]
