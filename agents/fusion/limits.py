"""Prompts per client: a token bucket per client identity (docs/security.md).

A client is known by its reply inbox's prefix: ``_INBOX.<user or nkey>`` when it connected with
the per-role credentials of runtime/auth.py, else (the default ``_INBOX.<nuid>``) by the first 12
characters of the nuid, which nats-py draws once per connection. Past its burst a client gets
``busy`` until its bucket refills; other clients are not slowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe2.runtime.errors import ErrorCode, Moe2Error

NUID_PREFIX = 12  # nats-py's nuid: 12 random characters per connection, then a sequence
MAX_CLIENTS = 4096  # buckets kept; the fullest are dropped first beyond this


def client_of(reply: str) -> str:
    """The client identity in a reply inbox (``_INBOX.<who>.<nuid>`` or ``_INBOX.<nuid>``)."""
    head, _, last = reply.rpartition(".")
    if head in ("", "_INBOX"):
        return f"{head}.{last[:NUID_PREFIX]}"
    return head


@dataclass(slots=True)
class PromptRate:
    """``burst`` prompts at once per client, refilled at ``per_s``; 0 ``per_s``: no limit."""

    per_s: float = 16.0
    burst: int = 32
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, when

    def take(self, client: str, now: float) -> None:
        """One prompt of ``client``, or Moe2Error(BUSY) saying when it may ask again."""
        if self.per_s <= 0:
            return
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            wait = (1.0 - tokens) / self.per_s
            raise Moe2Error(
                ErrorCode.BUSY,
                f"rate limited: at most {self.burst} prompts at once and {self.per_s:g}/s per "
                f"client; ask again in {wait:.2f} s",
            )
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled (they hold nothing a new one would not)."""
        for client, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.per_s >= self.burst:
                del self._buckets[client]
