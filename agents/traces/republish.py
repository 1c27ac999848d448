"""Re-publishing a trace as it was recorded, with its timing (``moe2 replay``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio
import nats.errors
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from moe2.runtime.connection import nats_connection
from moe2.runtime.trace import TraceRecord, read_trace

log = structlog.get_logger("moe2.replay")


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a final ``>`` is one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)


async def republish(
    url: str,
    trace_path: Path,
    *,
    speed: float = 1.0,
    subjects: Sequence[str] | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> int:
    """Publish every record (or those on ``subjects``) with its reply and headers, keeping the
    recorded gaps divided by ``speed`` (0: as fast as possible). Returns the count published."""
    if speed < 0:
        raise ValueError("speed must be >= 0")
    _, records = read_trace(Path(trace_path))
    wanted = (
        r for r in records if not subjects or any(subject_matches(p, r.subject) for p in subjects)
    )
    async with nats_connection(url, name="moe2-replay") as nc:
        task_status.started()
        count = await _publish_paced(nc, wanted, speed)
        await nc.flush()
    log.info("republished", trace=str(trace_path), messages=count, speed=speed)
    return count


async def _publish_paced(nc: NATS, records: Iterable[TraceRecord], speed: float) -> int:
    count, start, first = 0, anyio.current_time(), None
    for record in records:
        if speed > 0:
            first = record.t if first is None else first
            await anyio.sleep_until(start + (record.t - first) / speed)
        try:
            await nc.publish(record.subject, record.data, record.reply or "", record.headers)
        except nats.errors.MaxPayloadError:
            log.warning("republish_too_large", subject=record.subject, size=len(record.data))
            continue
        count += 1
    return count
