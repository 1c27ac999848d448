"""An expert's kept conversations: the KV cache of a conversation's last turn, kept for the next.

When a session that carries a conversation id is closed, its KV cache (the prompt, then the
answer as far as it was fed) is not freed but renamed to ``conversation:<id>`` in the backend
(``Backend.rename``; no session id can take that name, a session id being a subject token). The
next ``Open`` of that conversation takes it back under its own session id and ``rewrite``s it to
the new prompt: the head the kept ids share with the new prompt stays, the rest is cut, and only
the tail is computed. Without a kept cache (a first turn, a restart, an eviction, another
expert) the prompt is prefilled whole, as any prompt: the answer is the same either way.

The store is bounded: at most ``max_conversations`` kept, at most ``max_tokens`` tokens held by
them together, each forgotten ``idle_s`` after its last turn; the least recently used goes first.
A backend that runs out of room for a new session (llama.cpp's sequences: ``busy``) gets the
least recently used conversation's cache back and the call is tried again.

Every call comes from the expert's model worker (one at a time), never from the event loop.
docs/conversations.md is the user's side of this.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import anyio
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from moe2.agents.expert.backends import Backend, PrefixCache, TopK
from moe2.agents.expert.backends.base import common_prefix
from moe2.agents.expert.warmup import prefilled_tokens
from moe2.runtime.errors import ErrorCode, Moe2Error

log = structlog.get_logger("moe2.expert")

KEY_PREFIX: Final = "conversation:"
TURN_WAIT_S: Final = 2.0  # how long a turn's Open waits for the turn before to be closed
Eviction = Literal["count", "tokens", "idle", "room"]


def kept_key(conversation: str) -> str:
    """The backend's name for a kept conversation's cache."""
    return KEY_PREFIX + conversation


@dataclass(frozen=True, slots=True)
class Started:
    """An opened session's first top-k, and how its prompt was computed."""

    top: TopK
    prefilled: int  # prompt tokens actually computed
    reused: int  # prompt tokens taken from the conversation's kept cache (0: none was kept)


@dataclass(frozen=True, slots=True)
class _Kept:
    tokens: int
    used_at: float


class _ConversationMetrics:
    def __init__(self, registry: CollectorRegistry, store: ConversationStore) -> None:
        turns = Counter(
            "moe2_expert_conversation_turns",
            "Opens that carried a conversation id: resumed from the kept cache, or cold (none "
            "kept: a first turn, an eviction, a restart).",
            ["start"],
            registry=registry,
        )
        tokens = Counter(
            "moe2_expert_conversation_prompt_tokens",
            "Prompt tokens of conversation turns: reused from the kept cache, or prefilled.",
            ["kind"],
            registry=registry,
        )
        evicted = Counter(
            "moe2_expert_conversations_evicted",
            "Kept conversation caches freed, by reason: count, tokens (over the bounds), idle, "
            "room (the backend needed the space for a session).",
            ["reason"],
            registry=registry,
        )
        self.turns = {s: turns.labels(s) for s in ("resumed", "cold")}
        self.tokens = {k: tokens.labels(k) for k in ("reused", "prefilled")}
        self.evicted = {r: evicted.labels(r) for r in ("count", "tokens", "idle", "room")}
        Gauge(
            "moe2_expert_conversations_kept", "Conversation caches kept now.", registry=registry
        ).set_function(lambda: len(store))
        Gauge(
            "moe2_expert_conversation_tokens_kept",
            "Tokens held by the kept conversation caches together.",
            registry=registry,
        ).set_function(lambda: store.tokens)


class ConversationStore:
    """The kept caches of one expert's conversations; see the module's docstring."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_conversations: int,
        max_tokens: int,
        idle_s: float,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self.max_conversations, self.max_tokens, self.idle_s = max_conversations, max_tokens, idle_s
        self._clock = clock
        self._kept: OrderedDict[str, _Kept] = OrderedDict()  # least recently used first
        self.tokens = 0  # held by the kept caches together (read by /metrics from its thread)
        self._metrics = _ConversationMetrics(registry or CollectorRegistry(), self)

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, conversation: str) -> bool:
        return conversation in self._kept

    def start(
        self,
        session: str,
        conversation: str | None,
        ids: Sequence[int],
        top_k: int,
        prefix: PrefixCache | None,
    ) -> Started:
        """Open ``session`` on ``ids``: from the conversation's kept cache if there is one,
        else by a prefill (from ``prefix``'s head)."""
        self.expire()
        held = self._take(conversation, session) if conversation is not None else None
        started = self._resume(session, held, ids, top_k) if held is not None else None
        if started is None:
            top = self._with_room(lambda: self._backend.prefill(session, ids, top_k, prefix))
            started = Started(top, prefilled_tokens(ids, prefix), 0)
        if conversation is not None:
            self._count(session, conversation, len(ids), started, resumed=started.reused > 0)
        return started

    def _resume(
        self, session: str, held: list[int], ids: Sequence[int], top_k: int
    ) -> Started | None:
        """``rewrite`` the kept cache, now ``session``'s, to ``ids``; None (the session freed)
        if the backend has no room for the new tokens: its cache may be half-written."""
        reused = min(common_prefix(held, ids), len(ids) - 1)
        try:
            top = self._backend.rewrite(session, ids, top_k)
        except Moe2Error as exc:
            if exc.code != ErrorCode.BUSY:
                raise
            self._backend.release(session)
            return None
        return Started(top, len(ids) - reused, reused)

    def keep(self, session: str, conversation: str) -> None:
        """``session`` has been closed: keep its cache as the conversation's (replacing an
        older one), then evict over the bounds. A session with no cache is ignored."""
        self.expire()
        self._drop(conversation)
        if self.max_conversations < 1 or self.max_tokens < 1:
            return
        try:
            held = self._backend.rename(session, kept_key(conversation))
        except Moe2Error:  # its prefill never finished: nothing to keep
            return
        self._kept[conversation] = _Kept(len(held), self._clock())
        self.tokens += len(held)
        self._evict_over_bounds()

    def expire(self) -> None:
        """Free the conversations idle for ``idle_s`` or more."""
        oldest = self._clock() - self.idle_s
        while self._kept and next(iter(self._kept.values())).used_at <= oldest:
            self._evict("idle")

    def clear(self) -> None:
        while self._kept:
            self._drop(next(iter(self._kept)))

    def _take(self, conversation: str, session: str) -> list[int] | None:
        """The kept cache, renamed to ``session``, and the ids it holds; None if none is kept."""
        if self._forget(conversation) is None:
            return None
        return self._backend.rename(kept_key(conversation), session)

    def _with_room(self, call: Callable[[], TopK]) -> TopK:
        """``call``; while the backend is full (``busy``) and conversations are kept, free the
        least recently used one and try again."""
        while True:
            try:
                return call()
            except Moe2Error as exc:
                if exc.code != ErrorCode.BUSY or not self._kept:
                    raise
                self._evict("room")

    def _evict_over_bounds(self) -> None:
        while len(self._kept) > self.max_conversations:
            self._evict("count")
        while self._kept and self.tokens > self.max_tokens:
            self._evict("tokens")

    def _evict(self, reason: Eviction) -> None:
        conversation, kept = next(iter(self._kept.items()))
        self._drop(conversation)
        self._metrics.evicted[reason].inc()
        log.info(
            "conversation_evicted", conversation=conversation, reason=reason, tokens=kept.tokens
        )

    def _drop(self, conversation: str) -> None:
        self._forget(conversation)
        self._backend.release(kept_key(conversation))

    def _forget(self, conversation: str) -> _Kept | None:
        kept = self._kept.pop(conversation, None)
        self.tokens -= kept.tokens if kept is not None else 0
        return kept

    def _count(
        self, session: str, conversation: str, prompt: int, started: Started, *, resumed: bool
    ) -> None:
        m = self._metrics
        m.turns["resumed" if resumed else "cold"].inc()
        m.tokens["reused"].inc(started.reused)
        m.tokens["prefilled"].inc(started.prefilled)
        log.info(
            "conversation_turn",
            conversation=conversation,
            session=session,
            start="resumed" if resumed else "cold",
            prompt_tokens=prompt,
            reused_tokens=started.reused,
            prefilled_tokens=started.prefilled,
        )


class TurnOrder:
    """The open session of each conversation on this expert, so that a turn's Open waits (at
    most ``wait_s``) for the session of the turn before to be closed, and its cache kept: the
    fusion agent sends that Close just after the client's Final, so the client's next turn can
    overtake it. A turn that waits longer starts cold, which is only slower."""

    def __init__(self, wait_s: float = TURN_WAIT_S) -> None:
        self.wait_s = wait_s
        self._open: dict[str, tuple[str, anyio.Event]] = {}

    async def begin(self, conversation: str, session: str) -> None:
        before = self._open.get(conversation)
        if before is not None:
            with anyio.move_on_after(self.wait_s):
                await before[1].wait()
        self._open[conversation] = (session, anyio.Event())

    def end(self, conversation: str, session: str) -> None:
        entry = self._open.get(conversation)
        if entry is not None and entry[0] == session:
            del self._open[conversation]
            entry[1].set()
