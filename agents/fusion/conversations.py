"""Routing consistency: a conversation's later turns go to the experts of its first turn.

Each fusion agent remembers, per conversation id, the experts and weights its first turn was
planned with (a bounded LRU map with a TTL, refreshed by every turn). A later turn reuses them
while every one is live, so each expert finds the KV cache it kept of the earlier turns
(docs/conversations.md); when one of them has gone, the turn is planned afresh, and the route is
replaced. Pure state, no I/O: the agent asks ``route`` and tells ``remember``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Final, Literal

import structlog
from prometheus_client import CollectorRegistry, Counter

from moe2.runtime import wire

log = structlog.get_logger("moe2.fusion")

DEFAULT_ROUTES: Final = 4096
DEFAULT_ROUTE_TTL_S: Final = 3600.0

RouteOutcome = Literal["kept", "new", "rerouted"]


@dataclass(frozen=True, slots=True)
class Route:
    """The experts (highest weight first) and weights a conversation's first turn used."""

    experts: tuple[str, ...]
    weights: tuple[float, ...]
    used_at: float


class ConversationRoutes:
    """conversation id -> ``Route``; at most ``capacity``, each forgotten ``ttl_s`` after its
    last turn; the least recently used goes first when full."""

    def __init__(
        self,
        capacity: int = DEFAULT_ROUTES,
        ttl_s: float = DEFAULT_ROUTE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity, self.ttl_s, self._clock = capacity, ttl_s, clock
        self._routes: OrderedDict[str, Route] = OrderedDict()

    def __len__(self) -> int:
        return len(self._routes)

    def route(self, conversation: str, live: Collection[str]) -> tuple[Route | None, bool]:
        """The conversation's route if all its experts are ``live`` (else None), and whether
        a route was known (a known route with an expert gone means: choose again)."""
        self._expire()
        known = self._routes.get(conversation)
        if known is None:
            return None, False
        if not all(e in live for e in known.experts):
            del self._routes[conversation]
            return None, True
        self.remember(conversation, list(known.experts), list(known.weights))  # LRU, TTL anew
        return known, True

    def remember(self, conversation: str, experts: list[str], weights: list[float]) -> None:
        now = self._clock()
        self._routes[conversation] = Route(tuple(experts), tuple(weights), now)
        self._routes.move_to_end(conversation)
        while len(self._routes) > self.capacity:
            self._routes.popitem(last=False)

    def _expire(self) -> None:
        oldest = self._clock() - self.ttl_s
        while self._routes:
            conversation, route = next(iter(self._routes.items()))
            if route.used_at > oldest:
                return
            del self._routes[conversation]


Chosen = tuple[dict[str, wire.Heartbeat], list[str], list[float]]  # live, experts, weights


class ConversationRouter:
    """The fusion agent's choice of experts for a prompt, kept across a conversation's turns.

    Counts ``moe2_fusion_conversation_turns_total{outcome}``: turns that kept their experts,
    started a route, or were rerouted because an expert of the route had gone (also logged as
    ``conversation_rerouted``).
    """

    def __init__(self, registry: CollectorRegistry, routes: ConversationRoutes | None = None):
        self.routes = routes or ConversationRoutes()
        counter = Counter(
            "moe2_fusion_conversation_turns",
            "Turns of conversations (prompts with a conversation id), by routing outcome: kept "
            "(the first turn's experts), new (a first turn, or a forgotten route), rerouted "
            "(an expert of the route had gone).",
            ["outcome"],
            registry=registry,
        )
        self._by = {o: counter.labels(o) for o in ("kept", "new", "rerouted")}

    async def choose(
        self,
        prompt: wire.Prompt,
        live_experts: Callable[[], Awaitable[dict[str, wire.Heartbeat]]],
        choose: Callable[[list[wire.ChatMessage], int | None], Awaitable[Chosen]],
    ) -> Chosen:
        """``choose(messages, k)`` for a prompt outside a conversation or a conversation's
        first turn; a later turn gets the route's experts and weights while all are live."""
        conversation = prompt.conversation
        if conversation is None:
            return await choose(prompt.messages, prompt.experts)
        live = await live_experts()
        route, known = self.routes.route(conversation, live)
        if route is not None:
            self._count("kept")
            return live, list(route.experts), list(route.weights)
        live, experts, weights = await choose(prompt.messages, prompt.experts)
        self.routes.remember(conversation, experts, weights)
        if known:
            log.info("conversation_rerouted", conversation=conversation, experts=experts)
        self._count("rerouted" if known else "new")
        return live, experts, weights

    def _count(self, outcome: RouteOutcome) -> None:
        self._by[outcome].inc()
