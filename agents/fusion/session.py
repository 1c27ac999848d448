"""One fused answer on the bus: the I/O around the pure decode loop of ``runtime/decoding.py``.

It subscribes to the session's slices, to its cancel subject and to an inbox of its own, feeds
what arrives to ``Decoding`` in the subscription's own callback (no queue and no second task per
message: that hop was a large part of the fused step's cost, bench/bus_overhead.py), publishes
the actions it returns, and a watcher ticks the machine when its deadline passes. Every ``Chunk``
goes out with that inbox as its reply subject: when the client's inbox has no subscriber any
more (it stopped reading, or disconnected), the server answers there with a 503 *no responders*
status, and the session ends as if the client had sent a ``Cancel``.

Faults (docs/faults.md): every ``Open`` and ``Step`` goes out with a reply subject of the session's
own, one per expert, so that an expert whose subscriptions are gone (killed, disconnected) is
answered *no responders* by the server at once and dropped (``Gone``); an expert that misses a
deadline is probed, and one that does not answer the probe is dropped too. While no Chunk went to
the client for ``KEEPALIVE_S``, a client that asked for them gets an empty ``Moe2-Alive`` message:
it tells a working fusion agent from a dead one within seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from moe2.agents.fusion.config import FusionConfig
from moe2.agents.fusion.membership import probe_expert
from moe2.runtime import wire
from moe2.runtime.client import ALIVE_HEADER, ALIVE_SUFFIX
from moe2.runtime.connection import flush_subscriptions, publish_or_log
from moe2.runtime.decoding import (
    Accepted,
    Action,
    Arrived,
    Cancelled,
    DecodeSettings,
    Event,
    Gone,
    Probe,
    Refused,
    SessionPlan,
    Tick,
    ToClient,
    ToExpert,
)
from moe2.runtime.endpoint import Endpoint, EndpointStats, ErrorRoute, Request
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.speculative import decoding_for
from moe2.runtime.subjects import Subjects

log = structlog.get_logger("moe2.fusion")

Queued = tuple[Event, str]  # an event and the reply subject of the message it came in (or "")

__all__ = ["ALIVE_HEADER", "ALIVE_SUFFIX", "FusionSession", "SessionPlan", "decode_settings"]

KEEPALIVE_S = 1.0  # a client that asked for them gets one when no message went out for this long
# a late expert that does not answer its probe in min(PROBE_LIMIT_S, max(PROBE_FLOOR_S, step
# deadline / 2)) is dropped: never less than a round trip on a busy box, whatever the deadline
PROBE_LIMIT_S = 1.0
PROBE_FLOOR_S = 0.5


@dataclass(frozen=True, slots=True)
class SessionCounters:
    """The endpoint counters every session of one agent adds to: its slice and cancel
    subjects are new per session, their statistics are the agent's."""

    slices: EndpointStats
    cancels: EndpointStats

    @classmethod
    def of(cls, subjects: Subjects) -> SessionCounters:
        return cls(
            EndpointStats("slice", subjects.session_slices("*")),
            EndpointStats("cancel", subjects.cancel("*")),
        )


def decode_settings(config: FusionConfig, prompt: wire.Prompt | None = None) -> DecodeSettings:
    """The agent's settings, with the per-step deadline the prompt asks for, if any."""
    asked = prompt.step_deadline_s if prompt is not None else None
    return DecodeSettings(
        slice_k=config.slice_k,
        step_deadline_s=config.step_deadline_s if asked is None else asked,
        prefill_deadline_s=config.prefill_deadline_s,
        prefill_grace=config.prefill_grace,
        max_consecutive_late=config.max_consecutive_late,
        no_slice_extensions=0 if config.speculate else config.max_consecutive_late - 1,
    )


class FusionSession:
    """Runs one session to its end: a Final, an Error, or a cancellation."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        config: FusionConfig,
        plan: SessionPlan,
        reply: str,
        started: float,
        observe: Callable[[wire.Slice], None] | None = None,
        ended: Callable[[], None] | None = None,
        counters: SessionCounters | None = None,
        gone: Callable[[str], None] | None = None,
        keepalive: bool = False,
    ) -> None:
        self.nc, self.subjects, self.plan, self.reply = nc, subjects, plan, reply
        self.gone = gone  # told the id of an expert found not there any more (membership)
        self.keepalive = keepalive  # the client asked for keepalives (ALIVE_HEADER)
        self.observe = observe  # sees every accepted slice (live selection's costs)
        self.ended = ended  # called once the client has its last message, before the clean-up
        counters = counters or SessionCounters.of(subjects)
        sid = plan.session
        self._slices = Endpoint(
            nc,
            "slice",
            subjects.session_slices(sid),
            (wire.Slice, wire.Error),
            self._on_slice,
            route_errors=self._about_session,
            stats=counters.slices,
        )
        self._cancels = Endpoint(
            nc, "cancel", subjects.cancel(sid), wire.Cancel, self._on_cancel, stats=counters.cancels
        )
        settings = decode_settings(config, plan.prompt)
        self.machine = decoding_for(plan, settings, started, config.speculate)
        self.inbox = nc.new_inbox()  # the reply subject of every Chunk: 503 here = client gone
        # <experts>.<expert>: the reply subject of its Opens and Steps: 503 here = expert gone
        self.experts_inbox = nc.new_inbox()
        self._probing: set[str] = set()
        self._tg: TaskGroup | None = None  # the probes' and keepalives' tasks, while running
        self._sent_at = started  # when the client last got a message
        self._probe_s = min(PROBE_LIMIT_S, max(PROBE_FLOOR_S, settings.step_deadline_s / 2))
        self.log = log.bind(session=plan.session)
        # events that came while another was being applied (its publishing awaited): applied
        # next, in arrival order, by the call already applying
        self._backlog: deque[Queued] = deque()
        self._applying = True  # until the Opens are out: what comes before waits for them
        self._wake = anyio.Event()  # the watcher sleeps until the deadline or this
        self._sleeping_until = float("inf")
        self._expert_subject = {
            wire.Open: subjects.expert_open,
            wire.Step: subjects.expert_step,
            wire.Close: subjects.expert_close,
        }

    @property
    def step_ms(self) -> list[float]:
        return self.machine.step_ms

    async def run(self) -> None:
        subs = [
            await self._slices.subscribe(),
            await self._cancels.subscribe(),
            await self.nc.subscribe(self.inbox, cb=self._on_inbox),
            await self.nc.subscribe(f"{self.experts_inbox}.*", cb=self._on_expert_reply),
        ]
        await flush_subscriptions(self.nc)  # before any Open: slice 0 must find the subscription
        try:
            async with anyio.create_task_group() as self._tg:
                if self.keepalive:
                    self._tg.start_soon(self._keep_alive)
                await self._step(None)  # the Opens
                self._applying = False
                await self._apply_backlog()
                await self._watch_deadline()
                self._tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if not self.machine.finished:  # the agent is shutting down
                    await self._apply(Cancelled("shutdown"))
                if self.ended is not None:
                    self.ended()
                for sub in subs:  # what is still on its way is answered: the session has ended
                    await _drain(sub)

    async def _watch_deadline(self) -> None:
        """Sleep until the machine's deadline, or until an event ended the session or moved the
        deadline earlier; give it a Tick once the deadline has passed."""
        while not self.machine.finished:
            deadline = self.machine.deadline
            assert deadline is not None, "a running session always has a deadline"
            now = time.monotonic()
            if now >= deadline:
                await self._apply(Tick())
                continue
            self._wake, self._sleeping_until = anyio.Event(), deadline
            with anyio.move_on_after(deadline - now):
                await self._wake.wait()
            self._sleeping_until = float("inf")

    def _ended(self) -> Moe2Error:
        return Moe2Error(ErrorCode.UNKNOWN_SESSION, f"session {self.plan.session} has ended")

    async def _apply(self, event: Event, reply: str = "") -> None:
        """Feed ``event`` to the machine and publish its actions; ``reply``: the event's message
        asked for an answer. An event arriving while an earlier one's actions are being
        published is applied after it, in order, by the call applying that one."""
        self._backlog.append((event, reply))
        if not self._applying:
            await self._apply_backlog()

    async def _apply_backlog(self) -> None:
        """Apply the waiting events in order; once the session has ended, those that asked for
        an answer are told so. Wakes the watcher when the session ended or its deadline moved
        earlier."""
        self._applying = True
        try:
            while self._backlog:
                event, reply = self._backlog.popleft()
                if not self.machine.finished:
                    await self._step(event, reply)
                elif reply:
                    await self._refuse(reply, self._ended())
        finally:
            self._applying = False
        deadline = self.machine.deadline
        if deadline is None or deadline < self._sleeping_until:
            self._wake.set()

    async def _step(self, event: Event | None, reply: str = "") -> None:
        """One event (None: the start) through the machine; a bug here still ends the session
        with an error and Closes."""
        now = time.monotonic()
        try:
            actions = self.machine.start(now) if event is None else self.machine.apply(event, now)
            await self._act(actions, reply)
        except Exception as exc:
            self.log.exception("session_crashed")
            error = Moe2Error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            with anyio.CancelScope(shield=True):
                await self._act(self.machine.abort(error))

    async def _act(self, actions: list[Action], reply: str = "") -> None:
        """Publish what the machine decided; ``reply``: where the event came from asks for an
        answer (an Error if the machine did not take it)."""
        data: tuple[object, bytes] | None = None  # one Step or Close goes to many experts
        for action in actions:
            if isinstance(action, ToExpert):
                if data is None or data[0] is not action.message:
                    data = (action.message, wire.encode(action.message))
                subject = self._expert_subject[type(action.message)](action.expert)
                asks = not isinstance(action.message, wire.Close)  # 503 if nobody listens
                reply = f"{self.experts_inbox}.{action.expert}" if asks else ""
                await self._publish(subject, data[1], reply)
            elif isinstance(action, ToClient):
                if isinstance(action.message, wire.Final):
                    await self._final(action.message)
                else:
                    await self._reply(action.message)
            elif isinstance(action, Accepted) and self.observe is not None:
                try:
                    self.observe(action.slice)
                except Exception:  # the costs' bookkeeping must not end the answer
                    self.log.exception("observe_failed")
            elif isinstance(action, Refused) and reply:
                await self._refuse(reply, Moe2Error(action.code, action.reason))
            elif isinstance(action, Probe) and self._tg and action.expert not in self._probing:
                self._probing.add(action.expert)
                self._tg.start_soon(self._probe, action.expert)

    async def _probe(self, expert: str) -> None:
        """Is a late expert still there? One that is not is Gone now, not after more deadlines."""
        try:
            failure = await probe_expert(self.nc, self.subjects, expert, self._probe_s)
        finally:
            self._probing.discard(expert)
        if failure and not self.machine.finished:
            await self._expert_gone(expert, f"probe: {failure}")

    async def _expert_gone(self, expert: str, why: str) -> None:
        if self.gone is not None:
            self.gone(expert)
        await self._apply(Gone(expert, why))

    async def _keep_alive(self) -> None:
        """An empty ``Moe2-Alive`` message to the client whenever nothing went out for
        ``KEEPALIVE_S`` (docs/protocol.md): the client tells a dead fusion agent by its silence."""
        while not self.machine.finished:
            wait = self._sent_at + KEEPALIVE_S - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
                continue
            self._sent_at = time.monotonic()
            try:
                headers = {ALIVE_HEADER: "1"}  # 503 on the inbox: the client is gone
                await self.nc.publish(self.reply, b"", reply=self.inbox, headers=headers)
            except Exception as exc:  # the bus failed, not the session
                self.log.warning("keepalive_failed", error=repr(exc))

    def _about_session(self, _: object) -> ErrorRoute:
        """Errors answered on the session's subjects name the session and its current step."""
        return ErrorRoute("", self.plan.session, self.machine.step)

    async def _refuse(self, reply: str, error: Moe2Error) -> None:
        """Answer a message the machine did not take (counted with the slice subject's)."""
        await self._slices.reply_error(reply, error, self._about_session(None))

    async def _publish(self, subject: str, data: bytes, reply: str = "") -> None:
        """Publish, logging instead of raising (disconnected, closing, over max_payload): the
        machine has already moved on, and the rest of its actions must still go out."""
        await publish_or_log(self.nc, subject, data, reply=reply, logger=self.log)

    async def _final(self, final: wire.Final) -> None:
        await self._reply(final)

    async def _reply(self, message: wire.Chunk | wire.Final | wire.Error) -> None:
        if not self.reply:
            return
        reply = self.inbox if isinstance(message, wire.Chunk) else ""
        self._sent_at = time.monotonic()
        await self._publish(self.reply, wire.encode(message), reply=reply)

    # --- subscription callbacks: the endpoint decoded the message; apply it --------------------

    async def _on_slice(self, request: Request[wire.Slice | wire.Error]) -> None:
        """Apply what an expert sent; what does not decode (rule 1 of §6) or comes after the end
        never gets here or is refused: the endpoint answers or logs it."""
        if self.machine.finished:
            raise self._ended()
        sender = self.subjects.expert_of_slice(request.subject)
        await self._apply(Arrived(sender, request.message), request.reply)

    async def _on_cancel(self, request: Request[wire.Cancel]) -> None:
        cancel = request.message
        if self.machine.finished:
            raise self._ended()
        if cancel.session != self.plan.session:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"session {cancel.session!r} is not the one {request.subject} names",
            )
        await self._apply(Cancelled(f"Cancel: {cancel.reason}"))

    async def _on_expert_reply(self, msg: Msg) -> None:
        """What an expert answers to an Open or Step sent with a reply subject: the server's
        *no responders* (nobody subscribes to its subjects any more), or an Error."""
        expert = msg.subject.rsplit(".", 1)[-1]
        if msg.headers and msg.headers.get("Status") == "503":
            await self._expert_gone(expert, "no responders on its subjects")
            return
        try:
            message = wire.decode(msg.data)
        except Moe2Error:
            self.log.warning("expert_reply_undecodable", expert=expert)
            return
        if isinstance(message, wire.Error):
            await self._apply(Arrived(expert, message))

    async def _on_inbox(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status") == "503":
            await self._apply(Cancelled("the client's inbox has no subscriber"))


async def _drain(sub: Subscription, limit_s: float = 5.0) -> None:
    """Stop the subscription once the messages already delivered to it are handled (bounded)."""
    with anyio.move_on_after(limit_s):
        try:
            await sub.drain()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
            return
        except Exception:  # the connection is closing or gone: nothing more will arrive
            log.debug("drain_failed", exc_info=True)
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    # nats-py 2.x marks a drain cut short as closed without removing the subscription or
    # stopping its task (unsubscribe then refuses): finish that, or the session stays alive.
    with contextlib.suppress(Exception):
        sub._stop_processing()
        sub._conn._remove_sub(sub._id)
