"""Each agent as a NATS micro service: ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` answer
for it, so ``nats micro ls`` and ``nats micro info moe2-expert`` show the pool (docs/discovery.md).

The service subscribes only to the ``$SRV`` control subjects: moe2's own subjects keep their
:class:`~moe2.runtime.endpoint.Endpoint` and their wire behaviour. ``$SRV.INFO`` lists those
endpoints and ``$SRV.STATS`` reports their counters (requests, errors, processing time, the last
error; ``data`` holds the errors by code), read when each request comes. Metadata is read then
too, so it follows what the heartbeats announce. Registration that fails is logged and the agent
serves without it; a control request never raises out of its handler.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.service import (
    EndpointInfo,
    EndpointStats,
    Service,
    ServiceConfig,
    ServiceInfo,
    ServiceStats,
)

import moe2
from moe2.runtime import endpoint

log = structlog.get_logger("moe2.discovery")

EXPERT_SERVICE = "moe2-expert"
FUSION_SERVICE = "moe2-fusion"
NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Served:
    """One moe2 endpoint as ``$SRV`` shows it: its counters and its queue group (``""``: none)."""

    stats: endpoint.EndpointStats
    queue: str = ""


Describe = Callable[[], Mapping[str, object]]
ListServed = Callable[[], Sequence[Served]]


def as_metadata(values: Mapping[str, object]) -> dict[str, str]:
    """Micro metadata is strings only: ``None`` becomes ``""``, maps and lists JSON."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            out[key] = ""
        elif isinstance(value, str):
            out[key] = value
        elif isinstance(value, Mapping | list | tuple):
            out[key] = json.dumps(value, sort_keys=True)
        else:
            out[key] = str(value)
    return out


def micro_stats(served: Served) -> EndpointStats:
    """moe2's counters in nats.micro's schema (times in nanoseconds)."""
    stats = served.stats
    return EndpointStats(
        name=stats.name,
        subject=stats.subject,
        queue_group=served.queue,
        num_requests=stats.requests,
        num_errors=stats.num_errors,
        processing_time=int(stats.processing_s * NS_PER_S),
        average_processing_time=int(stats.average_processing_s * NS_PER_S),
        last_error=stats.last_error,
        data={"errors": dict(stats.errors)},
    )


class MicroService(Service):
    """A micro service whose endpoints are moe2's, counted by moe2 (no subscriptions of its own
    besides ``$SRV``), with metadata read from ``describe`` on every control request."""

    def __init__(
        self, nc: NATS, name: str, description: str, describe: Describe, served: ListServed
    ) -> None:
        self._describe = describe
        self._served = served
        config = ServiceConfig(name=name, version=moe2.__version__, description=description)
        super().__init__(nc, config)
        self._metadata = as_metadata(describe())

    def stats(self) -> ServiceStats:
        self._metadata = as_metadata(self._describe())
        return ServiceStats(
            id=self._id,
            name=self._name,
            version=self._version,
            metadata=self._metadata,
            endpoints=[micro_stats(s) for s in self._served()],
            started=self._started,
        )

    def info(self) -> ServiceInfo:
        self._metadata = as_metadata(self._describe())
        return ServiceInfo(
            id=self._id,
            name=self._name,
            version=self._version,
            metadata=self._metadata,
            description=self._description,
            endpoints=[
                EndpointInfo(name=s.stats.name, subject=s.stats.subject, queue_group=s.queue)
                for s in self._served()
            ],
        )

    async def _handle_ping_request(self, msg: Msg) -> None:
        await self._answer(super()._handle_ping_request, msg)

    async def _handle_info_request(self, msg: Msg) -> None:
        await self._answer(super()._handle_info_request, msg)

    async def _handle_stats_request(self, msg: Msg) -> None:
        await self._answer(super()._handle_stats_request, msg)

    async def _answer(self, handle: Callable[[Msg], Any], msg: Msg) -> None:
        """Whatever the request carries, a failure to answer is logged, never raised."""
        try:
            if msg.reply:
                await handle(msg)
        except Exception:
            log.exception("micro_request_failed", service=self._name, subject=msg.subject)


class Registration(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


R = TypeVar("R", bound=Registration)


@asynccontextmanager
async def registered(create: Callable[[], R], what: str) -> AsyncIterator[R | None]:
    """``create()`` then ``start()``d while inside, stopped (bounded, shielded) on the way out;
    ``None`` and a logged ``registration_failed`` when either raised: the agent serves on."""
    service: R | None = None
    try:
        service = create()
        await service.start()
        log.info("registered", what=what)
    except Exception:
        log.exception("registration_failed", what=what)
        service = None
    try:
        yield service
    finally:
        if service is not None:
            with anyio.move_on_after(1, shield=True):
                try:
                    await service.stop()
                except Exception:  # the connection is already closed: nothing to undo
                    log.debug("unregister_failed", what=what, exc_info=True)


def micro_service(
    nc: NATS, name: str, description: str, describe: Describe, served: ListServed
) -> AbstractAsyncContextManager[MicroService | None]:
    """Registered on ``$SRV`` while inside; ``None`` (and a log line) when that failed."""
    create = partial(MicroService, nc, name, description, describe, served)
    return registered(create, f"micro service {name}")
