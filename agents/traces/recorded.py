"""What a trace says each expert did: its heartbeat, and per session the Open, the slices
and the tokens the fusion agent chose (pure: records in, an index out)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from moe2.runtime import wire
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects
from moe2.runtime.trace import TraceRecord, read_trace

OpenKey = tuple[bytes, int, int]  # (msgpack of the messages, top_k, max_tokens)
_HOLE = "\x00moe2-replay-session\x00"

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
    tokens: Mapping[int, int | bytes]  # step -> what Step(step) appended: its token or text


@dataclass(slots=True)
class RecordedExpert:
    expert: str
    heartbeat: wire.Heartbeat | None = None
    sessions: dict[OpenKey, list[RecordedSession]] = field(default_factory=dict)

    @property
    def session_count(self) -> int:
        return sum(len(v) for v in self.sessions.values())


def appended(step: wire.Step) -> int | bytes:
    """What a Step appends: its text on the byte path, else its token."""
    return step.token if step.text is None else step.text


def open_key(message: wire.Open) -> OpenKey:
    return (msgspec.msgpack.encode(message.messages), message.top_k, message.max_tokens)


@dataclass(slots=True)
class _Draft:
    key: OpenKey
    answers: dict[int, wire.Slice | wire.Error] = field(default_factory=dict)
    tokens: dict[int, int | bytes] = field(default_factory=dict)
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
            draft.tokens[message.step] = appended(message)
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


def load_recorded_experts(path: Path, *, prefix: str = DEFAULT_PREFIX) -> dict[str, RecordedExpert]:
    _, records = read_trace(path)
    return recorded_experts(records, prefix=prefix)
