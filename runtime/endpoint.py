"""One way to serve a subject: bytes → the expected wire type → identity → handler → reply.

Every subscription an agent serves goes through :class:`Endpoint` (in the spirit of nats.micro's
``Endpoint._handle_request``): the expert's open, step, close and score subjects, the replay
expert's, the fusion agent's prompt subject and every heartbeat watcher. It

1. decodes the body to the one wire type the subject carries (``wire.decode``; any other type is
   ``unknown_type``),
2. checks the identity the subject names (the publisher's id at the end of ``…members.<expert>``
   must be the message's ``expert``),
3. calls the handler, and publishes what it returns on the request's reply subject, if any,
4. turns every exception into a ``wire.Error`` with a stable code: on the request's reply subject
   when it has one, else where the endpoint routes errors of that message (an expert: the
   session's slice subject), else a structured log line,
5. counts requests, errors by code and handling time (:class:`EndpointStats`, what metrics and
   ``$SRV.STATS`` export).

No handler can raise out of it: one message never stops an agent. docs/protocol.md §11–12.

A request with the header ``Moe2-Probe`` is answered at once with an empty body and goes no
further (not decoded, not counted): before a fusion agent selects an expert whose heartbeat it
heard, it probes the expert's step subject so (docs/security.md).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.abc
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from moe2.runtime import wire
from moe2.runtime.connection import flush_subscriptions, publish_or_log
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import Subjects, valid_token

log = structlog.get_logger("moe2.endpoint")
PROBE_HEADER = "Moe2-Probe"

M = TypeVar("M", bound=wire.Message)


@dataclass(frozen=True, slots=True)
class Request(Generic[M]):
    """One decoded message, where it came from and where its answer goes (``""``: nowhere)."""

    subject: str
    reply: str
    message: M


@dataclass(frozen=True, slots=True)
class ErrorRoute:
    """Where an error about a message without a reply subject goes, and what it names."""

    subject: str
    session: str = ""
    step: int = -1


Handler = Callable[[Request[M]], Awaitable[wire.Message | None]]
IdentityCheck = Callable[[str, M], None]
RouteErrors = Callable[[M], ErrorRoute | None]


@dataclass(slots=True)
class EndpointStats:
    """Counters of one endpoint, as nats.micro's ``EndpointStats`` (plus errors by code)."""

    name: str
    subject: str
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    processing_s: float = 0.0
    last_error: str = ""

    @property
    def num_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def average_processing_s(self) -> float:
        return self.processing_s / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject": self.subject,
            "num_requests": self.requests,
            "num_errors": self.num_errors,
            "errors": dict(self.errors),
            "last_error": self.last_error,
            "processing_time_s": self.processing_s,
            "average_processing_time_s": self.average_processing_s,
        }


def publisher_named_by(field_name: str) -> IdentityCheck[Any]:
    """The last subject token is the publisher's id and must equal the message's ``field_name``
    (a slice or heartbeat in another expert's name is a forgery)."""

    def check(subject: str, message: Any) -> None:
        claimed = getattr(message, field_name)
        named = subject.rsplit(".", 1)[-1]
        if claimed != named:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"{field_name} {claimed!r} is not the publisher {named!r} named by {subject}",
            )

    return check


def session_slice_route(subjects: Subjects, expert: str) -> RouteErrors[Any]:
    """Where an expert sends an error about an ``Open`` or ``Step`` that came without a reply
    subject: that session's slice subject, naming the step (0 for ``Open``), docs/protocol.md §5.
    Other messages, and sessions that are not one subject token, have nowhere to go."""

    def route(message: Any) -> ErrorRoute | None:
        if not isinstance(message, wire.Open | wire.Step) or not valid_token(message.session):
            return None
        step = message.step if isinstance(message, wire.Step) else 0
        return ErrorRoute(subjects.slice(message.session, expert), message.session, step)

    return route


def error_counts(endpoints: Iterable[Endpoint[Any]]) -> Counter[str]:
    """Errors answered or logged by these endpoints, by code."""
    return sum((ep.stats.errors for ep in endpoints), Counter[str]())


class Endpoint(Generic[M]):
    """Serves one subject on ``nc``; ``await tg.start(endpoint.serve)`` returns once subscribed.

    ``agent`` is the id put in the ``expert`` field of the errors it sends (an expert's own id;
    ``""`` for other agents). ``concurrency`` N runs up to N handlers at once, each in its own
    task, and refuses more with ``busy`` (for handlers whose work outlives the message); None
    (the default) handles messages one after another in arrival order.
    """

    def __init__(
        self,
        nc: NATS,
        name: str,
        subject: str,
        expects: type[M] | tuple[type[wire.Message], ...],
        handler: Handler[M],
        *,
        queue: str = "",
        agent: str = "",
        identity: IdentityCheck[M] | None = None,
        route_errors: RouteErrors[M] | None = None,
        concurrency: int | None = None,
        stats: EndpointStats | None = None,
    ) -> None:
        self.name, self.subject, self.expects = name, subject, expects
        self._handler = handler
        self.queue = queue
        self.agent = agent
        self._identity = identity
        self._route_errors = route_errors
        self.concurrency = concurrency
        self.in_flight = 0
        self.stats = stats or EndpointStats(name, subject)  # shared: one record, many subjects
        self._nc = nc
        self._log = log.bind(endpoint=name, agent=agent or None)

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe and handle every message until cancelled or the connection closes."""
        sub = await self._nc.subscribe(self.subject, queue=self.queue)
        try:
            await flush_subscriptions(self._nc)  # a request sent once we are started finds us
            async with anyio.create_task_group() as tg:
                task_status.started()
                async for msg in sub.messages:
                    await self._take(tg, msg)
                self._log.warning("endpoint_closed")  # the connection was closed under us
        finally:
            with anyio.move_on_after(1, shield=True):
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection is already closed: nothing to undo
                    self._log.debug("unsubscribe_failed", exc_info=True)

    async def subscribe(self) -> Subscription:
        """Subscribe with :meth:`handle` as the callback, for a caller that owns the lifetime
        (a watcher that unsubscribes when it has heard enough); live on the server on return."""
        sub = await self._nc.subscribe(self.subject, queue=self.queue, cb=self.handle)
        await flush_subscriptions(self._nc)
        return sub

    async def _answered_probe(self, msg: Msg) -> bool:
        """A probe: answer it (empty) and handle nothing more."""
        if not (msg.headers and PROBE_HEADER in msg.headers):
            return False
        if msg.reply:
            await publish_or_log(self._nc, msg.reply, b"", logger=self._log)
        return True

    async def _take(self, tg: anyio.abc.TaskGroup, msg: Msg) -> None:
        if await self._answered_probe(msg):
            return
        if self.concurrency is None:
            await self.handle(msg)
        elif self.in_flight >= self.concurrency:
            self.stats.requests += 1
            limit = f"at most {self.concurrency} {self.name} requests at once"
            busy = Moe2Error(ErrorCode.BUSY, f"this agent handles {limit}")
            await self._fail(msg, None, busy)
        else:
            self.in_flight += 1
            tg.start_soon(self._handle_counted, msg)

    async def _handle_counted(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        finally:
            self.in_flight -= 1

    async def handle(self, msg: Msg) -> None:
        """Handle one message; never raises (except cancellation). Usable as a ``cb=``."""
        if await self._answered_probe(msg):
            return
        started = time.perf_counter()
        self.stats.requests += 1
        message: M | None = None
        try:
            message = self._read(msg)
            answer = await self._handler(Request(msg.subject, msg.reply or "", message))
            if answer is not None and msg.reply:
                await self.publish(msg.reply, answer)
        except Moe2Error as exc:
            await self._fail(msg, message, exc)
        except Exception as exc:
            self._log.exception("handler_failed", subject=msg.subject)
            failed = Moe2Error(ErrorCode.INTERNAL, f"{self.name} failed: {type(exc).__name__}")
            await self._fail(msg, message, failed)
        finally:
            self.stats.processing_s += time.perf_counter() - started

    def _read(self, msg: Msg) -> M:
        message = wire.decode(msg.data)
        if not isinstance(message, self.expects):
            expects = self.expects if isinstance(self.expects, tuple) else (self.expects,)
            carried = " or ".join(str(t.__struct_config__.tag) for t in expects)
            tag = message.__struct_config__.tag
            raise Moe2Error(ErrorCode.UNKNOWN_TYPE, f"{msg.subject} carries {carried}, not {tag}")
        typed = cast(M, message)  # one of the expected types, checked just above
        if self._identity is not None:
            self._identity(msg.subject, typed)
        return typed

    async def _fail(self, msg: Msg, message: M | None, exc: Moe2Error) -> None:
        """Count the error and send it where it belongs (or log it where nobody is asking)."""
        route = self._route_errors(message) if message is not None and self._route_errors else None
        target = msg.reply or (route.subject if route else "")
        self._log.info(
            "request_refused" if target else "message_dropped",
            subject=msg.subject,
            code=str(exc.code),
            error=exc.message,
        )
        await self.reply_error(msg.reply or "", exc, route)

    def record_error(self, exc: Moe2Error) -> None:
        """Count an error found after the handler returned (work it started in a task)."""
        self.stats.errors[str(exc.code)] += 1
        self.stats.last_error = f"[{exc.code}] {exc.message}"

    async def reply_error(
        self, reply: str, exc: Moe2Error, route: ErrorRoute | None = None
    ) -> None:
        """Answer ``reply`` (or the route) with an error, counted like the handler's own."""
        self.record_error(exc)
        target = reply or (route.subject if route else "")
        if target:
            session, step = (route.session, route.step) if route else ("", -1)
            error = wire.error_from(exc, session=session, expert=self.agent, step=step)
            await self.publish(target, error)

    async def publish(self, subject: str, message: wire.Message) -> None:
        """Publish, logging instead of raising when the bus is gone (the bus failed, not us)."""
        await publish_or_log(self._nc, subject, wire.encode(message), logger=self._log)
