"""Who is on the bus: experts seen by heartbeat, admitted once they answered a probe, forgotten
when their heartbeats stop.

Two checks hold even where the server's permissions are misconfigured (docs/security.md): an
expert's own heartbeat interval counts for at most ``MAX_HEARTBEAT_INTERVAL_S`` (a heartbeat that
announces 1e9 s still expires within ``missed`` minutes), and a heartbeat alone never makes an
expert selectable: the fusion agent probes the expert's step subject once when it joins
(:func:`probe_expert`), and only an expert that answered is live. A forged heartbeat for an expert
that is not there (nobody subscribed: NATS answers "no responders" at once) never joins.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client as NATS

from moe2.runtime.byte_fusion import Vocabulary
from moe2.runtime.endpoint import PROBE_HEADER
from moe2.runtime.subjects import Subjects
from moe2.runtime.wire import MAX_HEARTBEAT_INTERVAL_S, Heartbeat

PROBE_TIMEOUT_S = 2.0  # an expert that does not answer its probe in this time is not admitted
PROBE_RETRY_S = 5.0  # a refused expert is probed again on a heartbeat this long after


@dataclass(slots=True)
class Membership:
    """Pure bookkeeping of heartbeats: an expert silent for ``missed`` of its own heartbeat
    intervals (each at most ``MAX_HEARTBEAT_INTERVAL_S``) is gone; an expert is live only once
    admitted (:meth:`admit`, after its probe)."""

    missed: int = 2
    _last: dict[str, tuple[float, Heartbeat]] = field(default_factory=dict)
    _admitted: set[str] = field(default_factory=set)
    _probing: set[str] = field(default_factory=set)
    _refused: dict[str, float] = field(default_factory=dict)  # expert -> when its probe failed

    def seen(self, heartbeat: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True if the expert should be probed now (new, back after
        silence, or refused more than ``PROBE_RETRY_S`` ago), and it is marked as probing."""
        expert = heartbeat.expert
        if expert in self._last and not self._fresh(expert, now):
            self._admitted.discard(expert)  # silent too long: it proves itself again
        self._last[expert] = (now, heartbeat)
        if expert in self._admitted or expert in self._probing:
            return False
        if now - self._refused.get(expert, -PROBE_RETRY_S) < PROBE_RETRY_S:
            return False
        self._probing.add(expert)
        return True

    def admit(self, expert: str) -> bool:
        """The expert answered its probe: live from now on. True if it was not live before."""
        self._probing.discard(expert)
        self._refused.pop(expert, None)
        if expert not in self._last or expert in self._admitted:
            return False
        self._admitted.add(expert)
        return True

    def refuse(self, expert: str, now: float) -> None:
        """Its probe failed: not live; probed again on a heartbeat after ``PROBE_RETRY_S``."""
        self._probing.discard(expert)
        self._refused[expert] = now

    def gone(self, expert: str, now: float) -> bool:
        """A session found the expert not there (no responders, or no answer to a probe): not
        live until a heartbeat after ``PROBE_RETRY_S`` and its probe say otherwise. True if it
        was live."""
        was = expert in self._admitted
        self._admitted.discard(expert)
        self._probing.discard(expert)
        self._refused[expert] = now
        return was

    def _fresh(self, expert: str, now: float) -> bool:
        """Heard from within ``missed`` of the expert's own heartbeat intervals (capped)."""
        seen, hb = self._last[expert]
        return now - seen <= self.missed * min(hb.interval_s, MAX_HEARTBEAT_INTERVAL_S)

    def live(self, now: float) -> dict[str, Heartbeat]:
        return {
            e: hb
            for e, (_, hb) in self._last.items()
            if e in self._admitted and self._fresh(e, now)
        }

    def expire(self, now: float) -> list[str]:
        """Forget the experts whose heartbeats stopped; return their ids."""
        gone = [e for e in self._last if not self._fresh(e, now)]
        for e in gone:
            del self._last[e]
            self._admitted.discard(e)
        for e, at in list(self._refused.items()):
            if now - at > PROBE_RETRY_S and e not in self._last:
                del self._refused[e]
        return gone


async def probe_expert(
    nc: NATS, subjects: Subjects, expert: str, timeout_s: float = PROBE_TIMEOUT_S
) -> str:
    """Ask the expert's step subject for a probe answer (runtime/endpoint.py answers it); ``""``
    if it answered, else why not."""
    try:
        await nc.request(
            subjects.expert_step(expert), b"", timeout=timeout_s, headers={PROBE_HEADER: "1"}
        )
    except nats.errors.NoRespondersError:
        return "nobody subscribes to its subjects"
    except nats.errors.TimeoutError:
        return f"no answer in {timeout_s:g} s"
    except Exception as exc:  # disconnected, closing: not admitted now, asked again later
        return f"probe failed: {type(exc).__name__}"
    return ""


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
