"""One fused answer on the bus: the I/O around the pure decode loop of ``runtime/decoding.py``.

It subscribes to the session's slices, to its cancel subject and to an inbox of its own, feeds
what arrives to ``Decoding``, publishes the actions it returns, and waits until the next
deadline. Every ``Chunk`` goes out with that inbox as its reply subject: when the client's inbox
has no subscriber any more (it stopped reading, or disconnected), the server answers there with a
503 *no responders* status, and the session ends as if the client had sent a ``Cancel``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from moe2.agents.fusion.config import FusionConfig
from moe2.runtime import wire
from moe2.runtime.connection import flush_subscriptions, publish_or_log
from moe2.runtime.decoding import (
    Accepted,
    Action,
    Arrived,
    Cancelled,
    DecodeSettings,
    Decoding,
    Event,
    Refused,
    SessionPlan,
    Tick,
    ToClient,
    ToExpert,
)
from moe2.runtime.endpoint import Endpoint, EndpointStats, ErrorRoute, Request
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import Subjects

log = structlog.get_logger("moe2.fusion")

QUEUED_EVENTS = 1024  # per session; beyond it new ones are dropped and logged (§6)
Queued = tuple[Event, str]  # an event and the reply subject of the message it came in (or "")

__all__ = ["FusionSession", "SessionPlan", "decode_settings"]


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
    ) -> None:
        self.nc, self.subjects, self.plan, self.reply = nc, subjects, plan, reply
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
        self.machine = Decoding(plan, decode_settings(config, plan.prompt), started)
        self.inbox = nc.new_inbox()  # the reply subject of every Chunk: 503 here = client gone
        self.log = log.bind(session=plan.session)
        self._events: MemoryObjectSendStream[Queued]
        self._cancel: Cancelled | None = None  # kept aside: a full queue must not lose it
        self._expert_subject = {
            wire.Open: subjects.expert_open,
            wire.Step: subjects.expert_step,
            wire.Close: subjects.expert_close,
        }

    @property
    def step_ms(self) -> list[float]:
        return self.machine.step_ms

    async def run(self) -> None:
        self._events, events = anyio.create_memory_object_stream[Queued](QUEUED_EVENTS)
        subs = [
            await self._slices.subscribe(),
            await self._cancels.subscribe(),
            await self.nc.subscribe(self.inbox, cb=self._on_inbox),
        ]
        await flush_subscriptions(self.nc)  # before any Open: slice 0 must find the subscription
        try:
            await self._act(self.machine.start(time.monotonic()))
            while not self.machine.finished:
                event, reply = await self._next(events)
                await self._act(self.machine.apply(event, time.monotonic()), reply)
        except Exception as exc:  # a bug here still ends the session with an error and Closes
            self.log.exception("session_crashed")
            error = Moe2Error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            with anyio.CancelScope(shield=True):
                await self._act(self.machine.abort(error))
        finally:
            with anyio.CancelScope(shield=True):
                if not self.machine.finished:  # the agent is shutting down
                    await self._act(self.machine.apply(Cancelled("shutdown"), time.monotonic()))
                if self.ended is not None:
                    self.ended()
                for sub in subs:  # what is still on its way is answered: the session has ended
                    await _drain(sub)
                await self._refuse_queued(events)
                self._events.close()
                events.close()

    async def _refuse_queued(self, events: MemoryObjectReceiveStream[Queued]) -> None:
        """Events the ended session did not take: answer those that asked for an answer."""
        while True:
            try:
                _, reply = events.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            if reply:
                await self._refuse(reply, self._ended())

    def _ended(self) -> Moe2Error:
        return Moe2Error(ErrorCode.UNKNOWN_SESSION, f"session {self.plan.session} has ended")

    async def _next(self, events: MemoryObjectReceiveStream[Queued]) -> Queued:
        """The next event and its reply subject, or a Tick once the deadline has passed."""
        try:
            queued = events.receive_nowait()  # no timer for what is queued (the machine is strict)
        except anyio.WouldBlock:
            deadline = self.machine.deadline
            assert deadline is not None, "a running session always has a deadline"
            queued = (Tick(), "")
            with anyio.move_on_after(deadline - time.monotonic()):
                queued = await events.receive()
        if self._cancel is None:
            return queued
        if queued[1]:  # a message that asked for an answer, overtaken by the cancel
            await self._refuse(queued[1], self._ended())
        return self._cancel, ""

    async def _act(self, actions: list[Action], reply: str = "") -> None:
        """Publish what the machine decided; ``reply``: where the event came from asks for an
        answer (an Error if the machine did not take it)."""
        data: tuple[object, bytes] | None = None  # one Step or Close goes to many experts
        for action in actions:
            if isinstance(action, ToExpert):
                if data is None or data[0] is not action.message:
                    data = (action.message, wire.encode(action.message))
                subject = self._expert_subject[type(action.message)](action.expert)
                await self._publish(subject, data[1])
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
        await self._publish(self.reply, wire.encode(message), reply=reply)

    # --- subscription callbacks: decode, and queue an event for the loop -------------------------

    async def _on_slice(self, request: Request[wire.Slice | wire.Error]) -> None:
        """Queue what an expert sent for the loop; what does not decode (rule 1 of §6) or comes
        after the end never gets here or is refused: the endpoint answers or logs it."""
        if self.machine.finished:
            raise self._ended()
        sender = self.subjects.expert_of_slice(request.subject)
        if not self._queue((Arrived(sender, request.message), request.reply)):
            raise Moe2Error(ErrorCode.BUSY, f"more than {QUEUED_EVENTS} messages queued")

    async def _on_cancel(self, request: Request[wire.Cancel]) -> None:
        cancel = request.message
        if self.machine.finished:
            raise self._ended()
        if cancel.session != self.plan.session:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"session {cancel.session!r} is not the one {request.subject} names",
            )
        self._cancelled(f"Cancel: {cancel.reason}")

    async def _on_inbox(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status") == "503":
            self._cancelled("the client's inbox has no subscriber")

    def _cancelled(self, reason: str) -> None:
        self._cancel = self._cancel or Cancelled(reason)
        self._queue((Tick(), ""))  # wake the loop (if the queue is full, it is awake anyway)

    def _queue(self, queued: Queued) -> bool:
        """Queue an event for the loop; False if it was dropped (queue full, session over)."""
        try:
            self._events.send_nowait(queued)
        except anyio.WouldBlock:
            if not isinstance(queued[0], Tick):
                self.log.warning("event_dropped", why="queue full", queued=QUEUED_EVENTS)
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False  # the session has ended
        return True


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
