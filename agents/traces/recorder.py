"""``moe2 record``: capture NATS traffic (by default everything, client inboxes too) to a trace."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from moe2.runtime.auth import NatsAuth
from moe2.runtime.connection import close_nats, flush_subscriptions, nats_connection
from moe2.runtime.trace import TraceRecord, TraceWriter, new_header

log = structlog.get_logger("moe2.recorder")


class Recorder:
    """Writes every message on ``subjects`` to ``out`` until stopped; ``count`` is what it wrote."""

    def __init__(
        self,
        url: str,
        out: Path,
        *,
        subjects: Sequence[str] = (">",),
        flush_s: float = 0.2,
        stop: anyio.Event | None = None,
        auth: NatsAuth | None = None,
    ) -> None:
        self.url = url
        self.auth = auth  # its credentials (default: MOE2_NATS_*); reading ">" needs admin
        self.out = Path(out)
        self.subjects = list(subjects)
        self.flush_s = flush_s
        self.count = 0
        self._stop = stop or anyio.Event()

    def stop(self) -> None:
        """Idempotent; ``run`` drains what is in flight, closes the file and returns."""
        self._stop.set()

    async def run(
        self,
        *,
        duration: float | None = None,
        task_status: TaskStatus[Recorder] = anyio.TASK_STATUS_IGNORED,
    ) -> int:
        """Record until ``stop()``, ``duration`` seconds, or cancellation; return the count."""
        started = time.monotonic()
        try:
            async with nats_connection(self.url, name="moe2-recorder", auth=self.auth) as nc:
                header = new_header(server=self.url, subjects=self.subjects)
                with TraceWriter(self.out, header, flush_s=self.flush_s) as writer:
                    try:
                        await self._subscribe(nc, writer, started)
                        log.info("recording", out=str(self.out), subjects=self.subjects)
                        task_status.started(self)
                        await self._until_stopped(writer, duration)
                        with anyio.move_on_after(1):
                            await nc.flush()  # what the server sent before the stop is in hand
                    finally:
                        await close_nats(nc)  # deliver what is in flight while the file is open
        finally:
            seconds = round(time.monotonic() - started, 3)
            log.info("recorded", out=str(self.out), messages=self.count, seconds=seconds)
        return self.count

    async def _subscribe(self, nc: NATS, writer: TraceWriter, started: float) -> None:
        async def on_message(msg: Msg) -> None:
            writer.write(
                TraceRecord(
                    t=time.monotonic() - started,
                    subject=msg.subject,
                    reply=msg.reply or None,
                    headers=dict(msg.headers) if msg.headers else None,
                    data=msg.data,
                )
            )
            self.count = writer.count

        for subject in self.subjects:
            await nc.subscribe(subject, cb=on_message)
        await flush_subscriptions(nc)  # from now on nothing published is missed

    async def _until_stopped(self, writer: TraceWriter, duration: float | None) -> None:
        with anyio.move_on_after(duration):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_flush_every, writer, self.flush_s)
                await self._stop.wait()
                tg.cancel_scope.cancel()


async def _flush_every(writer: TraceWriter, interval: float) -> None:
    """A quiet bus still gets its last messages onto the disk within ``interval``."""
    while True:
        await anyio.sleep(interval)
        writer.flush()


async def record(
    url: str,
    out: Path,
    *,
    subjects: Sequence[str] = (">",),
    duration: float | None = None,
    stop: anyio.Event | None = None,
    task_status: TaskStatus[Recorder] = anyio.TASK_STATUS_IGNORED,
) -> int:
    """Record ``subjects`` from ``url`` into ``out`` until ``stop`` is set or ``duration`` ends."""
    recorder = Recorder(url, out, subjects=subjects, stop=stop)
    return await recorder.run(duration=duration, task_status=task_status)
