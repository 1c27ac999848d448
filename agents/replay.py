"""``moe2 replay``: re-publish a trace, or stand in for the experts it recorded.

Replay experts answer a fusion agent from a trace with no model at all: an Open that matches a
recorded Open (same messages, top_k and max_tokens) gets the recorded slice for step 0 under the
new session id, and each Step whose token is the one recorded gets the recorded slice for that
step. Anything the trace did not see is answered with ``trace_diverged``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import nats.errors
import numpy as np
import numpy.typing as npt
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from moe2.runtime import wire
from moe2.runtime.connection import nats_connection
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects
from moe2.runtime.trace import TraceRecord, TraceWriter, new_header, read_trace

log = structlog.get_logger("moe2.replay")

OpenKey = tuple[bytes, int, int]  # (msgpack of the messages, top_k, max_tokens)
_HOLE = "\x00moe2-replay-session\x00"
MAX_LIVE_SESSIONS = 4096


# ---------------------------------------------------------------------------------------------
# Re-publishing a trace as it was recorded.


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


# ---------------------------------------------------------------------------------------------
# What the trace says each expert did (pure).


@dataclass(frozen=True, slots=True)
class SessionTemplate:
    """An encoded message with a hole where the session id goes: no re-encoding per answer."""

    head: bytes
    tail: bytes

    @classmethod
    def of(cls, message: wire.Slice | wire.Error) -> SessionTemplate:
        data = wire.encode(msgspec.structs.replace(message, session=_HOLE))
        hole = msgspec.msgpack.encode(_HOLE)
        if data.count(hole) != 1:
            raise Moe2Error(ErrorCode.INTERNAL, "cannot place the session id in a recorded answer")
        head, _, tail = data.partition(hole)
        return cls(head, tail)

    def render(self, session: str) -> bytes:
        return self.head + msgspec.msgpack.encode(session) + self.tail


@dataclass(frozen=True, slots=True)
class RecordedAnswer:
    """What the expert published for one step: a slice or an error, and its compute time."""

    payload: SessionTemplate
    compute_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RecordedSession:
    expert: str
    session: str  # the recorded session id
    answers: Mapping[int, RecordedAnswer]  # step -> answer
    tokens: Mapping[int, int]  # step -> the token the fusion agent sent with Step(step)


@dataclass(slots=True)
class RecordedExpert:
    expert: str
    heartbeat: wire.Heartbeat | None = None
    sessions: dict[OpenKey, list[RecordedSession]] = field(default_factory=dict)

    @property
    def session_count(self) -> int:
        return sum(len(v) for v in self.sessions.values())


def open_key(message: wire.Open) -> OpenKey:
    return (msgspec.msgpack.encode(message.messages), message.top_k, message.max_tokens)


@dataclass(slots=True)
class _Draft:
    key: OpenKey
    answers: dict[int, wire.Slice | wire.Error] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    last_step: int = 0


class _TraceIndex:
    """Folds records, in order, into per-expert heartbeats and sessions."""

    def __init__(self, prefix: str) -> None:
        self.root = Subjects(prefix).root + "."
        self.heartbeats: dict[str, wire.Heartbeat] = {}
        self.drafts: dict[tuple[str, str], _Draft] = {}  # (expert, session), in Open order

    def add(self, record: TraceRecord) -> None:
        if not record.subject.startswith(self.root):
            return
        parts = record.subject[len(self.root) :].split(".")
        try:
            message = wire.decode(record.data)
        except Moe2Error:
            return
        if parts[0] == "members" and len(parts) == 2 and isinstance(message, wire.Heartbeat):
            self.heartbeats[parts[1]] = message
        elif parts[0] == "expert" and len(parts) == 3:
            self._to_expert(parts[1], message)
        elif parts[0] == "session" and len(parts) == 4 and parts[2] == "slice":
            self._from_expert(parts[3], parts[1], message)

    def _to_expert(self, expert: str, message: wire.Message) -> None:
        if isinstance(message, wire.Open):
            self.drafts.pop((expert, message.session), None)
            self.drafts[(expert, message.session)] = _Draft(open_key(message))
        elif isinstance(message, wire.Step) and (
            draft := self.drafts.get((expert, message.session))
        ):
            draft.tokens[message.step] = message.token
            draft.last_step = message.step

    def _from_expert(self, expert: str, session: str, message: wire.Message) -> None:
        draft = self.drafts.get((expert, session))
        if draft is None or not isinstance(message, wire.Slice | wire.Error):
            return
        step = message.step if message.step >= 0 else draft.last_step
        draft.answers.setdefault(step, message)  # a duplicate answer is not the answer

    def experts(self) -> dict[str, RecordedExpert]:
        found = {e: RecordedExpert(e, hb) for e, hb in self.heartbeats.items()}
        for (expert, session), draft in self.drafts.items():
            recorded = found.setdefault(expert, RecordedExpert(expert))
            recorded.sessions.setdefault(draft.key, []).append(_finish(expert, session, draft))
        return found


def _finish(expert: str, session: str, draft: _Draft) -> RecordedSession:
    answers = {
        step: RecordedAnswer(
            SessionTemplate.of(m), m.compute_s if isinstance(m, wire.Slice) else 0.0
        )
        for step, m in draft.answers.items()
    }
    return RecordedSession(expert, session, answers, dict(draft.tokens))


def recorded_experts(
    records: Iterable[TraceRecord], *, prefix: str = DEFAULT_PREFIX
) -> dict[str, RecordedExpert]:
    """Every expert id the trace saw, with its latest heartbeat and its recorded sessions."""
    index = _TraceIndex(prefix)
    for record in records:
        index.add(record)
    return index.experts()


# ---------------------------------------------------------------------------------------------
# Replay experts on the bus.


@dataclass(frozen=True, slots=True)
class ReplayTiming:
    """How long a replay expert waits before each answer: a fixed delay (per expert if given),
    plus the recorded ``compute_s`` when ``use_compute_s``."""

    delay_s: float = 0.0
    delays: Mapping[str, float] = field(default_factory=dict)
    use_compute_s: bool = False

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
        self.errors: dict[str, int] = {}
        self._cursor: dict[OpenKey, int] = {}
        self._seq = hb.seq if hb else 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        sub = await self.nc.subscribe(self.subjects.expert_inbox(self.expert))
        try:
            async with anyio.create_task_group() as tg:
                await self._heartbeat()
                tg.start_soon(self._heartbeats)
                await self.nc.flush()
                task_status.started()
                async for msg in sub.messages:
                    await self._handle(msg, tg)
        finally:
            with anyio.move_on_after(1, shield=True):
                await sub.unsubscribe()

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
        await self.nc.publish(self.subjects.member(self.expert), wire.encode(beat))

    async def _handle(self, msg: Msg, tg: TaskGroup) -> None:
        try:
            message = wire.decode(msg.data)
        except Moe2Error as exc:
            self._count(exc.code)
            return
        try:
            await self._dispatch(message, tg)
        except Exception as exc:  # a handler's failure is an error reply, never a dead expert
            log.warning("replay_handler_failed", expert=self.expert, exc_info=True)
            session = getattr(message, "session", "")
            if session:
                await self._error(session, -1, ErrorCode.INTERNAL, repr(exc))

    async def _dispatch(self, message: wire.Message, tg: TaskGroup) -> None:
        if isinstance(message, wire.Open):
            await self._open(message, tg)
        elif isinstance(message, wire.Step):
            await self._step(message, tg)
        elif isinstance(message, wire.Close):
            self.live.pop(message.session, None)

    async def _open(self, message: wire.Open, tg: TaskGroup) -> None:
        key = open_key(message)
        recordings = self.recorded.sessions.get(key)
        if not recordings:
            await self._error(message.session, 0, ErrorCode.TRACE_DIVERGED, "no recorded Open")
            return
        turn = self._cursor.get(key, 0)
        self._cursor[key] = turn + 1
        recording = recordings[turn % len(recordings)]  # in recorded order, then round again
        self._admit(message.session, recording)
        await self._answer(message.session, recording, 0, tg)

    def _admit(self, session: str, recording: RecordedSession) -> None:
        self.live.pop(session, None)
        self.live[session] = recording
        while len(self.live) > MAX_LIVE_SESSIONS:  # a fusion agent that never closes
            self.live.pop(next(iter(self.live)))

    async def _step(self, message: wire.Step, tg: TaskGroup) -> None:
        recording = self.live.get(message.session)
        if recording is None:
            await self._error(message.session, message.step, ErrorCode.UNKNOWN_SESSION, "")
        elif recording.tokens.get(message.step) != message.token:
            why = f"recorded token {recording.tokens.get(message.step)}, got {message.token}"
            await self._error(message.session, message.step, ErrorCode.TRACE_DIVERGED, why)
        else:
            await self._answer(message.session, recording, message.step, tg)

    async def _answer(
        self, session: str, recording: RecordedSession, step: int, tg: TaskGroup
    ) -> None:
        answer = recording.answers.get(step)
        if answer is None:
            await self._error(session, step, ErrorCode.TRACE_DIVERGED, "no recorded answer")
            return
        subject = self.subjects.slice(session, self.expert)
        delay = self.timing.delay(self.expert, answer)
        if delay > 0:
            tg.start_soon(self._publish_later, delay, subject, answer.payload.render(session))
        else:
            await self.nc.publish(subject, answer.payload.render(session))

    async def _publish_later(self, delay: float, subject: str, data: bytes) -> None:
        await anyio.sleep(delay)
        await self.nc.publish(subject, data)

    async def _error(self, session: str, step: int, code: ErrorCode, detail: str) -> None:
        self._count(code)
        log.debug("replay_error", expert=self.expert, session=session, step=step, code=code)
        error = wire.Error(
            code=str(code),
            message=f"replay of {self.expert} at step {step}: {code} {detail}".rstrip(),
            session=session,
            expert=self.expert,
            step=step,
        )
        await self.nc.publish(self.subjects.slice(session, self.expert), wire.encode(error))

    def _count(self, code: ErrorCode) -> None:
        self.errors[str(code)] = self.errors.get(str(code), 0) + 1


async def serve_replay_experts(
    url: str,
    trace_path: Path,
    *,
    delay_s: float = 0.0,
    delays: Mapping[str, float] | None = None,
    use_compute_s: bool = False,
    experts: Collection[str] | None = None,
    prefix: str = DEFAULT_PREFIX,
    heartbeat_s: float | None = None,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run one replay expert (own connection) per expert in the trace until cancelled.
    ``task_status`` gets the expert ids once every one is subscribed and has sent a heartbeat."""
    chosen = _choose_experts(load_recorded_experts(Path(trace_path), prefix=prefix), experts)
    timing = ReplayTiming(delay_s, dict(delays or {}), use_compute_s)
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


def load_recorded_experts(path: Path, *, prefix: str = DEFAULT_PREFIX) -> dict[str, RecordedExpert]:
    _, records = read_trace(path)
    return recorded_experts(records, prefix=prefix)


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


# ---------------------------------------------------------------------------------------------
# Synthetic traces: drive a fusion agent with no model at all.


def synthetic_trace(
    path: Path,
    *,
    experts: Sequence[str],
    prompt_messages: Sequence[wire.ChatMessage],
    steps: int,
    top_k: int = 32,
    vocab_size: int = 49152,
    seed: int = 0,
    tokens: Sequence[int] | None = None,
    max_tokens: int | None = None,
    eos_ids: Sequence[int] = (0,),
    session: str = "synthetic-0",
    prefix: str = DEFAULT_PREFIX,
) -> list[int]:
    """Write a trace of one session: heartbeats, Open (``max_tokens`` defaults to ``steps``),
    slices for steps 0..steps and the Steps between them. In every slice of step t the token
    ``tokens[t]`` has the highest probability, so a greedy fusion picks it whatever the weights.
    ``tokens`` (steps + 1 ids, none in ``eos_ids``) defaults to random ones; returns them."""
    rng = np.random.default_rng(seed)
    plan = _SyntheticPlan(
        experts=list(experts),
        opened=wire.Open(
            session=session,
            messages=list(prompt_messages),
            top_k=top_k,
            max_tokens=steps if max_tokens is None else max_tokens,
        ),
        chosen=_chosen_tokens(rng, steps + 1, vocab_size, eos_ids, tokens),
        vocab_size=vocab_size,
        eos_ids=list(eos_ids),
    )
    with TraceWriter(Path(path), new_header(server="", subjects=[">"])) as writer:
        for i, (subject, message) in enumerate(plan.messages(rng, Subjects(prefix))):
            writer.write(TraceRecord(i * 0.001, subject, data=wire.encode(message)))
    return plan.chosen


@dataclass(frozen=True, slots=True)
class _SyntheticPlan:
    experts: list[str]
    opened: wire.Open
    chosen: list[int]  # the token chosen at each step
    vocab_size: int
    eos_ids: list[int]

    def messages(
        self, rng: np.random.Generator, sub: Subjects
    ) -> Iterator[tuple[str, wire.Message]]:
        for e in self.experts:
            yield sub.member(e), _synthetic_heartbeat(e, self.vocab_size, self.eos_ids)
        for step in range(len(self.chosen)):
            for e in self.experts:
                yield self._request(sub, e, step)
            for e in self.experts:
                yield sub.slice(self.opened.session, e), self._slice(rng, e, step)
        for e in self.experts:
            yield sub.expert_close(e), wire.Close(session=self.opened.session)

    def _request(self, sub: Subjects, expert: str, step: int) -> tuple[str, wire.Message]:
        if step == 0:
            return sub.expert_open(expert), self.opened
        token = self.chosen[step - 1]
        return sub.expert_step(expert), wire.Step(
            session=self.opened.session, step=step, token=token
        )

    def _slice(self, rng: np.random.Generator, expert: str, step: int) -> wire.Slice:
        prompt_tokens = (
            sum(len(m.content.split()) for m in self.opened.messages) if step == 0 else 0
        )
        ids, logprobs = _synthetic_top_k(rng, self.chosen[step], self.opened.top_k, self.vocab_size)
        return wire.make_slice(
            session=self.opened.session,
            expert=expert,
            step=step,
            ids=ids,
            logprobs=logprobs,
            pieces=[f" t{int(i)}".encode() for i in ids],
            compute_s=float(rng.uniform(0.005, 0.02)),
            prompt_tokens=prompt_tokens,
        )


def _chosen_tokens(
    rng: np.random.Generator,
    n: int,
    vocab_size: int,
    eos_ids: Sequence[int],
    tokens: Sequence[int] | None,
) -> list[int]:
    if tokens is not None:
        if len(tokens) != n or any(t in eos_ids or not 0 <= t < vocab_size for t in tokens):
            raise ValueError(f"tokens must be {n} ids in [0, {vocab_size}), none of {eos_ids}")
        return [int(t) for t in tokens]
    chosen: list[int] = []
    while len(chosen) < n:
        token = int(rng.integers(vocab_size))
        if token not in eos_ids:
            chosen.append(token)
    return chosen


def _synthetic_heartbeat(expert: str, vocab_size: int, eos_ids: list[int]) -> wire.Heartbeat:
    return wire.Heartbeat(
        expert=expert,
        model=f"synthetic/{expert}",
        tokenizer=f"synthetic-{vocab_size}",
        backend="replay",
        vocab_size=vocab_size,
        eos_ids=eos_ids,
    )


def _synthetic_top_k(
    rng: np.random.Generator, chosen: int, top_k: int, vocab_size: int
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float64]]:
    """Random top-k ids and descending logprobs, ``chosen`` first; 5-30 % of the mass is outside."""
    others = rng.choice(vocab_size, size=top_k, replace=False)
    ids = np.concatenate([[chosen], others[others != chosen][: top_k - 1]]).astype(np.uint32)
    logits = rng.normal(0.0, 1.0, size=len(ids))
    logits[0] = logits[1:].max(initial=0.0) + 0.5 + rng.random()
    probs = np.exp(logits - logits.max())
    probs *= (1.0 - rng.uniform(0.05, 0.3)) / probs.sum()
    order = np.argsort(-probs, kind="stable")
    return ids[order], np.log(probs[order])
