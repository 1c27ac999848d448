"""``moe2 replay``: re-publish a trace, or stand in for the experts it recorded.

Replay experts answer a fusion agent from a trace with no model at all: an Open that matches a
recorded Open (same messages, top_k and max_tokens) gets the recorded slice for step 0 under the
new session id, and each Step whose token is the one recorded gets the recorded slice for that
step. Anything the trace did not see is answered with ``trace_diverged``.

Timing (``ReplayTiming``): each answer waits its own delay, all of them at once (an expert with
unlimited parallelism), or, ``per_batch``, the answers wait as a batching expert's would: the
answers that are waiting when a batch starts go out together one delay later, and those that
come in meanwhile wait for the next batch (bench/batching.py's expert at 20 ms a batch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS

from moe2.agents.traces.recorded import (
    OpenKey,
    RecordedAnswer,
    RecordedExpert,
    RecordedSession,
    appended,
    load_recorded_experts,
    open_key,
)
from moe2.runtime import wire
from moe2.runtime.connection import nats_connection, publish_or_log
from moe2.runtime.endpoint import (
    Endpoint,
    Request,
    error_counts,
    session_slice_route,
)
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects, valid_token

log = structlog.get_logger("moe2.replay")

MAX_LIVE_SESSIONS = 4096


# ---------------------------------------------------------------------------------------------
# Replay experts on the bus.


@dataclass(frozen=True, slots=True)
class ReplayTiming:
    """How long a replay expert waits before each answer: a fixed delay (per expert if given),
    plus the recorded ``compute_s`` when ``use_compute_s``. ``per_batch``: the delay is one
    batch's, shared by the answers batched together (the module's docstring)."""

    delay_s: float = 0.0
    delays: Mapping[str, float] = field(default_factory=dict)
    use_compute_s: bool = False
    per_batch: bool = False

    def delay(self, expert: str, answer: RecordedAnswer) -> float:
        fixed = self.delays.get(expert, self.delay_s)
        return fixed + (answer.compute_s if self.use_compute_s else 0.0)


class ReplayExpert:
    """Behaves as ``recorded.expert`` did in the trace, for new sessions; no model compute."""

    def __init__(
        self,
        nc: NATS,
        recorded: RecordedExpert,
        *,
        subjects: Subjects,
        timing: ReplayTiming | None = None,
        heartbeat_s: float | None = None,
    ) -> None:
        self.nc = nc
        self.recorded = recorded
        self.expert = recorded.expert
        self.subjects = subjects
        self.timing = timing or ReplayTiming()
        hb = recorded.heartbeat
        self.heartbeat_s = heartbeat_s or (hb.interval_s if hb else 1.0)
        self.live: dict[str, RecordedSession] = {}
        self._tg: TaskGroup | None = None
        self.endpoints = (
            self._endpoint("open", subjects.expert_open, wire.Open, self._on_open),
            self._endpoint("step", subjects.expert_step, wire.Step, self._on_step),
            self._endpoint("close", subjects.expert_close, wire.Close, self._on_close),
            self._endpoint("score", subjects.expert_score, wire.Score, self._on_score),
        )
        self._cursor: dict[OpenKey, int] = {}
        self._seq = hb.seq if hb else 0
        self._batch: list[tuple[str, bytes, float]] = []  # per_batch: (subject, data, delay)
        self._batch_waiting = anyio.Event()
        self.batches: list[int] = []  # per_batch: the answers of each batch sent

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for endpoint in self.endpoints:
                await tg.start(endpoint.serve)
            await self._heartbeat()
            tg.start_soon(self._heartbeats)
            if self.timing.per_batch:
                tg.start_soon(self._batches)
            task_status.started()

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_s)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        if self.recorded.heartbeat is None:
            return
        self._seq += 1
        beat = msgspec.structs.replace(
            self.recorded.heartbeat,
            seq=self._seq,
            sessions=len(self.live),
            interval_s=self.heartbeat_s,
        )
        await publish_or_log(self.nc, self.subjects.member(self.expert), wire.encode(beat))

    def _endpoint(
        self, verb: str, subject: Callable[[str], str], expects: type[Any], handler: Any
    ) -> Endpoint[Any]:
        return Endpoint(
            self.nc,
            verb,
            subject(self.expert),
            expects,
            handler,
            agent=self.expert,
            route_errors=session_slice_route(self.subjects, self.expert),
        )

    def error_counts(self) -> Counter[str]:
        """Errors answered or logged by this replay expert's endpoints, by code."""
        return error_counts(self.endpoints)

    async def _on_open(self, request: Request[wire.Open]) -> None:
        await self._open(request.message, self._task_group())

    async def _on_step(self, request: Request[wire.Step]) -> None:
        await self._step(request.message, self._task_group())

    async def _on_close(self, request: Request[wire.Close]) -> None:
        self.live.pop(request.message.session, None)

    async def _on_score(self, request: Request[wire.Score]) -> None:
        raise Moe2Error(
            ErrorCode.TRACE_DIVERGED,
            f"replay of {self.expert} answers sessions only: a trace holds no Score to replay",
        )

    def _task_group(self) -> TaskGroup:
        assert self._tg is not None, "the endpoints serve inside run()"
        return self._tg

    async def _open(self, message: wire.Open, tg: TaskGroup) -> None:
        if not valid_token(message.session):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "session must be one subject token")
        if message.session in self.live:  # as a real expert answers it
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"session {message.session} is already open")
        key = open_key(message)
        recordings = self.recorded.sessions.get(key)
        if not recordings:
            raise self._error(0, ErrorCode.TRACE_DIVERGED, "no recorded Open")
        turn = self._cursor.get(key, 0)
        self._cursor[key] = turn + 1
        recording = recordings[turn % len(recordings)]  # in recorded order, then round again
        self._admit(message.session, recording)
        await self._answer(message.session, recording, 0, tg)

    def _admit(self, session: str, recording: RecordedSession) -> None:
        self.live[session] = recording
        while len(self.live) > MAX_LIVE_SESSIONS:  # a fusion agent that never closes
            self.live.pop(next(iter(self.live)))

    async def _step(self, message: wire.Step, tg: TaskGroup) -> None:
        if not valid_token(message.session):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "session must be one subject token")
        recording = self.live.get(message.session)
        if recording is None:
            raise self._error(message.step, ErrorCode.UNKNOWN_SESSION, "")
        elif recording.tokens.get(message.step) != appended(message):
            why = f"recorded {recording.tokens.get(message.step)!r}, got {appended(message)!r}"
            raise self._error(message.step, ErrorCode.TRACE_DIVERGED, why)
        else:
            await self._answer(message.session, recording, message.step, tg)

    async def _answer(
        self, session: str, recording: RecordedSession, step: int, tg: TaskGroup
    ) -> None:
        answer = recording.answers.get(step)
        if answer is None:
            raise self._error(step, ErrorCode.TRACE_DIVERGED, "no recorded answer")
        subject = self.subjects.slice(session, self.expert)
        delay = self.timing.delay(self.expert, answer)
        if self.timing.per_batch:
            self._batch.append((subject, answer.payload.render(session), delay))
            self._batch_waiting.set()
        elif delay > 0:
            tg.start_soon(self._publish_later, delay, subject, answer.payload.render(session))
        else:
            await publish_or_log(self.nc, subject, answer.payload.render(session))

    async def _batches(self) -> None:
        """per_batch: the answers waiting now go out together after the batch's delay (the
        longest of theirs); what comes in meanwhile waits for the next batch."""
        while True:
            while not self._batch:
                self._batch_waiting = anyio.Event()
                await self._batch_waiting.wait()
            batch, self._batch = self._batch, []
            await anyio.sleep(max(delay for _, _, delay in batch))
            for subject, data, _ in batch:
                await publish_or_log(self.nc, subject, data)
            self.batches.append(len(batch))

    async def _publish_later(self, delay: float, subject: str, data: bytes) -> None:
        await anyio.sleep(delay)
        await publish_or_log(self.nc, subject, data)

    def _error(self, step: int, code: ErrorCode, detail: str) -> Moe2Error:
        """What to raise: the endpoint answers it (reply subject, else the slice subject)."""
        return Moe2Error(code, f"replay of {self.expert} at step {step}: {code} {detail}".rstrip())


async def serve_replay_experts(
    url: str,
    trace_path: Path,
    *,
    delay_s: float = 0.0,
    delays: Mapping[str, float] | None = None,
    use_compute_s: bool = False,
    per_batch: bool = False,
    experts: Collection[str] | None = None,
    prefix: str = DEFAULT_PREFIX,
    heartbeat_s: float | None = None,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run one replay expert (own connection) per expert in the trace until cancelled.
    ``task_status`` gets the expert ids once every one is subscribed and has sent a heartbeat."""
    chosen = _choose_experts(load_recorded_experts(Path(trace_path), prefix=prefix), experts)
    timing = ReplayTiming(delay_s, dict(delays or {}), use_compute_s, per_batch)
    async with AsyncExitStack() as stack:
        replayers = [
            ReplayExpert(
                await stack.enter_async_context(
                    nats_connection(url, name=f"moe2-replay-{recorded.expert}")
                ),
                recorded,
                subjects=Subjects(prefix),
                timing=timing,
                heartbeat_s=heartbeat_s,
            )
            for recorded in chosen
        ]  # connected before the task group, so an unreachable server is a plain Moe2Error
        async with anyio.create_task_group() as tg:
            for replayer in replayers:
                await tg.start(replayer.run)
            ids = [r.expert for r in chosen]
            log.info("replay_experts_ready", experts=ids, trace=str(trace_path))
            task_status.started(ids)


def _choose_experts(
    found: dict[str, RecordedExpert], wanted: Collection[str] | None
) -> list[RecordedExpert]:
    missing = sorted(set(wanted or ()) - set(found))
    if missing or not found:
        raise Moe2Error(
            ErrorCode.NO_EXPERTS,
            f"the trace holds no expert {missing or ''}: it has {sorted(found)}",
        )
    return [found[e] for e in sorted(found) if wanted is None or e in wanted]
