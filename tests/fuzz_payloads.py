"""Hostile payloads, and the agent processes they are fired at (issue 8: "The crash").

Shared by ``tests/test_crash_repro.py`` (the payloads that stopped agents) and
``tests/test_fuzz.py`` (generated ones on every subject of docs/protocol.md §2). Agents run as
real OS processes (``python -m moe2 …``) on a real nats-server, as a user starts them.

The contract they are held to: any message with a reply subject, on a subject an agent serves,
that is not a valid request gets a well-formed wire ``Error`` on that reply subject (one per
subscriber; where nobody subscribes the server answers 503 *no responders*); no payload may stop
a process; and afterwards a normal question gets the right answer.
"""

from __future__ import annotations

import json
import math
import random
import string
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import moe2
from moe2.runtime import wire
from moe2.runtime.errors import ErrorCode, Moe2Error

ROOT = "moe2.v1"
QUESTION = "What does the trace say?"

# --- a msgpack writer that can also write what msgspec refuses to -------------------------------


@dataclass(frozen=True)
class Raw:
    """Bytes put into the output as they are (e.g. deep nesting inside a field)."""

    data: bytes


@dataclass(frozen=True)
class RawStr:
    """A msgpack str holding any bytes, e.g. invalid UTF-8."""

    data: bytes


def u32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def pack(obj: Any) -> bytes:
    """msgpack of ``obj``: None, bool, int (int64/uint64 range), float (float64), str, bytes,
    list, dict, :class:`Raw` and :class:`RawStr`."""
    if isinstance(obj, Raw):
        return obj.data
    if obj is None or isinstance(obj, bool):
        return {None: b"\xc0", False: b"\xc2", True: b"\xc3"}[obj]
    if isinstance(obj, int):
        return _pack_int(obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str | RawStr):
        data = obj.encode() if isinstance(obj, str) else obj.data
        return _header(len(data), 0xA0, 31, b"\xd9", b"\xda", b"\xdb") + data
    if isinstance(obj, bytes):
        return _header(len(obj), None, 0, b"\xc4", b"\xc5", b"\xc6") + obj
    if isinstance(obj, list | tuple):
        return _header(len(obj), 0x90, 15, None, b"\xdc", b"\xdd") + b"".join(map(pack, obj))
    if isinstance(obj, dict):
        items = b"".join(pack(k) + pack(v) for k, v in obj.items())
        return _header(len(obj), 0x80, 15, None, b"\xde", b"\xdf") + items
    raise TypeError(f"cannot pack {type(obj).__name__}")


def _pack_int(n: int) -> bytes:
    if -32 <= n <= 127:
        return struct.pack(">b", n)
    for code, fmt in ((b"\xcc", ">B"), (b"\xcd", ">H"), (b"\xce", ">I"), (b"\xcf", ">Q")):
        if 0 <= n < 256 ** struct.calcsize(fmt):
            return code + struct.pack(fmt, n)
    return b"\xd3" + struct.pack(">q", n)


def _header(
    n: int, fix: int | None, fix_max: int, b8: bytes | None, b16: bytes, b32: bytes
) -> bytes:
    if fix is not None and n <= fix_max:
        return bytes([fix | n])
    if b8 is not None and n < 1 << 8:
        return b8 + struct.pack(">B", n)
    return b16 + struct.pack(">H", n) if n < 1 << 16 else b32 + struct.pack(">I", n)


# --- the payloads that stopped agents -------------------------------------------------------------

PROMPT_BODY = {
    "type": "moe2.v1.prompt",
    "messages": [{"role": "user", "content": "Why is the sky blue?"}],
    "max_tokens": 4,
}

CRASHERS: dict[str, bytes] = {
    "hello": b"hello",
    "json": b'{"type": "moe2.v1.prompt", "messages": [{"role": "user", "content": "hi"}]}',
    "text": b"Why is the sky blue?",
    "bytes_01_02": b"\x01\x02",
    "array32_header_alone": bytes.fromhex("dd00000005"),
    "nested_arrays_200k": b"\x91" * 200_000 + b"\xc0",
    "type_str_invalid_utf8": pack({"type": RawStr(b"moe2.v1.\xff\xfe\xfd")}),
    "truncated_map": pack(PROMPT_BODY)[:-7],
}


# --- where a payload goes, and what must come back ----------------------------------------------


class Expect(Enum):
    ERROR = "an Error"  # not a valid request: with a reply subject, a wire Error answers it
    LENIENT = "nothing, or an Error"  # a valid message that is no request (Close, Cancel, ...)
    SCORED = "a Scored or an Error"  # a valid Score
    JSON = "JSON replies, or none"  # $SRV and the agent protocol: their payloads are not wire


class Live:
    """Placeholder: the session the fuzzer's own question is running now (a fresh id if none)."""

    def __repr__(self) -> str:
        return "LIVE"


LIVE = Live()


@dataclass(frozen=True)
class Target:
    """A subject of docs/protocol.md §2. ``kind``: prompt, open, step, close, score, verb (an
    unknown last token on an expert's subject), slice, cancel, members or selection; or srv
    (``$SRV.<verb>``, the agents' micro services) or agent (``agents.<verb>.moe2.moe2.moe2``,
    the fusion agent in the Agent Protocol)."""

    kind: str
    expert: str = ""  # the subject's expert token
    session: str | Live = ""  # the subject's session token
    verb: str = ""  # for kind "verb"

    def subject(self, session: str) -> str:
        match self.kind:
            case "prompt" | "selection":
                return f"{ROOT}.{self.kind}"
            case "open" | "step" | "close" | "score":
                return f"{ROOT}.expert.{self.expert}.{self.kind}"
            case "verb":
                return f"{ROOT}.expert.{self.expert}.{self.verb}"
            case "slice":
                return f"{ROOT}.session.{session}.slice.{self.expert}"
            case "cancel":
                return f"{ROOT}.session.{session}.cancel"
            case "members":
                return f"{ROOT}.members.{self.expert}"
            case "srv":
                return f"$SRV.{self.verb}"
            case "agent":
                return f"agents.{self.verb}.moe2.moe2.moe2"
        raise ValueError(self.kind)


class Slot(Enum):
    """Placeholders in a body, filled when it is sent."""

    SESSION = "the subject's session"
    EXPERT = "the subject's expert"
    FORGED = "another expert than the subject's"


@dataclass(frozen=True, repr=False)
class Shot:
    """One payload for one subject: ``raw`` bytes, or ``body`` packed (then cut or extended)."""

    target: Target
    expect: Expect
    what: str
    raw: bytes = b""
    body: Any = None
    cut: int | None = None  # keep only this many bytes (mod the length): a truncated body
    tail: bytes = b""  # trailing garbage

    def render(self, live: str | None, experts: Sequence[str]) -> tuple[str, bytes]:
        session = self.target.session
        if isinstance(session, Live):
            session = live or uuid.uuid4().hex
        data = self.raw
        if self.body is not None:
            data = pack(_fill(self.body, session, self.target.expert, experts))
        if self.cut is not None:
            data = data[: self.cut % len(data)]
        return self.target.subject(session), data + self.tail

    def describe(self) -> str:
        t = self.target
        where = f"{t.kind}[{t.expert or ''}{'' if not t.session else f' sid={t.session}'}]"
        return f"{where} {self.what}"

    def __repr__(self) -> str:  # what hypothesis prints of a failing batch
        _, data = self.render("LIVE", ["e1", "e2"])
        return f"<{self.describe()}: {len(data)} bytes {data[:24].hex()}{'…' * (len(data) > 24)}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' pretty-printer
        printer.text(repr(self))


def _fill(body: Any, session: str, expert: str, experts: Sequence[str]) -> Any:
    if isinstance(body, Slot):
        others = [e for e in experts if e != expert] or [f"{expert}-x"]
        return {Slot.SESSION: session, Slot.EXPERT: expert, Slot.FORGED: others[0]}[body]
    if isinstance(body, dict):
        return {_fill(k, session, expert, experts): _fill(v, session, expert, experts)
                for k, v in body.items()}  # fmt: skip
    if isinstance(body, list):
        return [_fill(v, session, expert, experts) for v in body]
    return body


def nobody_may_listen(target: Target, experts: Sequence[str]) -> bool:
    """Subjects where a 503 *no responders* is a fair answer: sessions that may have ended,
    unknown verbs and experts."""
    if target.kind in ("slice", "cancel", "verb", "srv", "agent"):
        return True
    return target.kind in ("open", "step", "close", "score") and target.expert not in experts


def is_no_responders(msg: Msg) -> bool:
    return bool(msg.headers) and msg.headers.get("Status") == "503"  # type: ignore[union-attr]


def wire_error(data: bytes) -> str | None:
    """None for a well-formed wire Error with a known code, else what is wrong with ``data``."""
    try:
        message = wire.decode(data)
    except Moe2Error as exc:
        return f"undecodable reply ({exc}): {data[:60]!r}"
    if not isinstance(message, wire.Error):
        return f"a {type(message).__name__} where an Error was due"
    if message.code not in set(ErrorCode):
        return f"Error with unknown code {message.code!r}"
    return None


def reply_problem(shot: Shot, replies: Sequence[Msg], experts: Sequence[str]) -> str | None:
    """What is wrong with the replies to ``shot`` (sent with a reply subject), or None."""
    if not replies:
        return None if shot.expect is Expect.LENIENT else "no reply"
    if any(is_no_responders(m) for m in replies):
        if nobody_may_listen(shot.target, experts) or shot.expect is Expect.LENIENT:
            return None
        return "503 no responders: nobody serves this subject (did its agent stop?)"
    if shot.expect is Expect.JSON:  # every service answers $SRV; the agent protocol streams
        return next(filter(None, map(json_problem, replies)), None)
    single = shot.target.kind not in ("members", "selection")  # there, each watcher answers
    if single and len(replies) > 1:
        return f"{len(replies)} replies, expected one"
    for msg in replies:
        if shot.expect is Expect.SCORED and _is_scored(msg.data):
            continue
        if problem := wire_error(msg.data):
            return problem
    return None


def json_problem(msg: Msg) -> str | None:
    """None for a reply of a micro service or the agent protocol (JSON; or empty: the agent
    protocol's end of a stream, or a header-only status), else what is wrong with it."""
    if not msg.data:
        return None
    try:
        json.loads(msg.data)
    except ValueError:
        return f"a reply that is not JSON: {msg.data[:60]!r}"
    return None


def _is_scored(data: bytes) -> bool:
    try:
        return isinstance(wire.decode(data), wire.Scored)
    except Moe2Error:
        return False


async def fire(
    nc: NATS, sends: Sequence[tuple[str, bytes]], awaited: Sequence[bool], *, wait_s: float = 5.0
) -> list[list[Msg]]:
    """Publish each (subject, data) without, then with a reply subject; return the replies to
    each. Waits (bounded) until every ``awaited`` one has a reply, then 0.25 s for stragglers."""
    inbox = nc.new_inbox()
    replies: list[list[Msg]] = [[] for _ in sends]
    pending = {i for i, a in enumerate(awaited) if a}
    answered = anyio.Event()

    async def got(msg: Msg) -> None:
        i = int(msg.subject.rsplit(".", 1)[1])
        replies[i].append(msg)
        pending.discard(i)
        if not pending:
            answered.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=got)
    try:
        for i, (subject, data) in enumerate(sends):
            await nc.publish(subject, data)
            await nc.publish(subject, data, reply=f"{inbox}.{i}")
        await nc.flush()
        with anyio.move_on_after(wait_s):
            if pending:
                await answered.wait()
        await anyio.sleep(0.25)  # a bounded wait for a second, unwanted reply
    finally:
        await sub.unsubscribe()
    return replies


# --- agents as OS processes ----------------------------------------------------------------------


@dataclass
class Agent:
    name: str
    args: list[str]
    log: Path
    ready: Callable[[Agent], bool]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            command = [sys.executable, "-m", "moe2", *self.args]
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


def logged(event: str, times: int = 1) -> Callable[[Agent], bool]:
    """Ready once the agent has logged ``event`` ``times`` times since its latest start."""
    return lambda agent: agent.text().rsplit("=== start", 1)[-1].count(f"] {event} ") >= times


def fusion_ready(experts: int) -> Callable[[Agent], bool]:
    """A fusion agent that listens and has seen ``experts`` experts join."""
    listens, knows = logged("fusion_ready"), logged("expert_joined", experts)
    return lambda agent: listens(agent) and knows(agent)


@dataclass
class Agents:
    """Agent processes on one bus, each logging to its own file."""

    url: str
    logs: Path
    agents: dict[str, Agent] = field(default_factory=dict)
    restarts: int = 0

    def add(self, name: str, *args: str, ready: Callable[[Agent], bool]) -> None:
        agent = Agent(name, [*args, "--nats", self.url], self.logs / f"{name}.log", ready)
        self.agents[name] = agent
        self._start(agent)

    def _start(self, agent: Agent) -> None:
        with agent.log.open("a") as out:
            out.write(f"=== start {time.strftime('%H:%M:%S')}\n")
        agent.start()

    def wait_ready(self, limit_s: float = 90) -> None:
        deadline = time.monotonic() + limit_s
        for agent in self.agents.values():
            while not agent.ready(agent):
                assert agent.proc is not None and agent.proc.poll() is None, self.describe([agent])
                assert time.monotonic() < deadline, f"{agent.name} not ready:\n{agent.tail()}"
                time.sleep(0.05)

    def dead(self) -> list[Agent]:
        return [a for a in self.agents.values() if a.proc is None or a.proc.poll() is not None]

    def describe(self, agents: Sequence[Agent]) -> str:
        parts = []
        for a in agents:
            status = a.proc.poll() if a.proc else None
            parts.append(f"--- {a.name} ({' '.join(a.args[:2])}) exit status {status}:\n{a.tail()}")
        return "\n".join(parts)

    def assert_alive(self, context: str = "") -> None:
        gone = self.dead()
        assert not gone, f"{context}agents stopped:\n{self.describe(gone)}"

    def revive(self) -> list[str]:
        """Start again every agent that stopped (so one crash does not fail later tests)."""
        gone = self.dead()
        for agent in gone:
            self._start(agent)
        self.restarts += len(gone)
        if gone:
            self.wait_ready()
        return [a.name for a in gone]

    def stop(self) -> dict[str, int | None]:
        for a in self.agents.values():
            if a.proc is not None and a.proc.poll() is None:
                a.proc.terminate()
        return {a.name: a.proc.wait(20) if a.proc else None for a in self.agents.values()}


def selection_watcher_ready(url: str) -> Callable[[Agent], bool]:
    """``moe2 selection`` logs nothing when subscribed: publish a valid announcement of S and
    look for its line in the watcher's output."""
    versions = iter(range(1, 1 << 30))

    def ready(agent: Agent) -> bool:
        version = next(versions)
        body = {
            "type": "moe2.v1.selection",
            "agent": "fusion-0ready00",
            "version": version,
            "reason": "start",
            "live": [],
            "experts": [],
        }
        anyio.run(_publish, url, f"{ROOT}.selection", pack(body))
        time.sleep(0.1)
        return "fusion-0ready00 v" in agent.text().rsplit("=== start", 1)[-1]

    return ready


async def _publish(url: str, subject: str, data: bytes) -> None:
    async with moe2.connect(url, name="fuzz-ready") as client:
        await client.nc.publish(subject, data)
        await client.nc.flush()


async def ask(url: str, question: str, max_tokens: int, *, patient: bool = False) -> str:
    """A normal question's answer. ``patient``: while agents are still starting, a question may
    be refused with ``no_experts`` or ``no_fusion_agent``; ask again (bounded)."""
    with anyio.fail_after(60):
        async with moe2.connect(url, name="fuzz-ask") as client:
            while True:
                try:
                    answer = client.ask(question, max_tokens=max_tokens, timeout=10)
                    return (await answer.collect()).text
                except Moe2Error as exc:
                    starting = exc.code in (ErrorCode.NO_EXPERTS, ErrorCode.NO_FUSION_AGENT)
                    if not (patient and starting):
                        raise
                    await anyio.sleep(0.1)


# --- generated payloads --------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]
S, E = Slot.SESSION, Slot.EXPERT
VALID: dict[str, dict[str, Any]] = {
    "prompt": {**PROMPT_BODY, "step_deadline_s": 1.0, "conversation": "fuzz-1"},
    "open": {"type": "moe2.v1.open", "session": S, "messages": CHAT, "top_k": 8, "max_tokens": 4},
    "step": {"type": "moe2.v1.step", "session": S, "step": 1, "token": 5, "draft": [6, 7],
             "propose": 2},
    "close": {"type": "moe2.v1.close", "session": S, "reason": "done"},
    "cancel": {"type": "moe2.v1.cancel", "session": S, "reason": "client"},
    "score": {"type": "moe2.v1.score", "messages": CHAT, "targets": ["Rayleigh."], "top_k": 0},
    "slice": {
        "type": "moe2.v1.slice", "session": S, "expert": E, "step": 0, "ids": u32(5, 6),
        "logprobs": f32(-0.5, -1.5), "rest": 0.17, "pieces": [b"a", b"b"], "compute_s": 0.001,
        "energy_j": 0.0, "prompt_tokens": 3, "more": 0,
    },
    "error": {
        "type": "moe2.v1.error", "code": "internal", "message": "fuzz", "session": S,
        "expert": E, "step": 0,
    },
    "heartbeat": {  # always in another expert's name than its subject's: never a valid one
        "type": "moe2.v1.heartbeat", "expert": Slot.FORGED, "model": "fuzz",
        "tokenizer": "fuzz:0123456789abcdef", "backend": "fuzz", "vocab_size": 64,
        "eos_ids": [0], "device": None, "energy_source": "declared", "sessions": 0,
        "interval_s": 1.0, "seq": 1,
    },
    "chunk": {"type": "moe2.v1.chunk", "session": S, "index": 0, "text": "hi", "tokens": [1],
              "dominant": [E]},
    "final": {
        "type": "moe2.v1.final", "session": S, "text": "", "finish_reason": "eos",
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        "timings": {"ttft_s": 0.0, "total_s": 0.0, "tokens_per_s": 0.0, "step_p50_ms": 0.0,
                    "step_p99_ms": 0.0},
        "experts": [], "weights": [], "late": {}, "dropped": [],
    },
    "scored": {
        "type": "moe2.v1.scored", "expert": "e1", "prompt_tokens": 1,
        "targets": [{"ids": u32(1), "logprobs": f32(-0.1)}], "compute_s": 0.0, "energy_j": 0.0,
    },
    "selection": {
        "type": "moe2.v1.selection", "agent": "fusion-f0220000", "version": 1,
        "reason": "start", "live": [], "experts": [],
    },
}  # fmt: skip

# The msgpack kinds each field accepts (docs/protocol.md §3–4); "msgs" is an array of ChatMessage.
NUM, STR, INT, ARR, MAP = {"float", "int"}, {"str"}, {"int"}, {"array"}, {"map"}
FIELDS: dict[str, dict[str, set[str]]] = {
    "prompt": {"messages": ARR, "max_tokens": INT, "temperature": NUM, "top_p": NUM,
               "seed": INT | {"nil"}, "stop": ARR, "experts": INT | {"nil"},
               "step_deadline_s": NUM | {"nil"}, "conversation": STR | {"nil"}},
    "open": {"session": STR, "messages": ARR, "top_k": INT, "max_tokens": INT,
             "conversation": STR | {"nil"}},
    "step": {"session": STR, "step": INT, "token": INT, "text": {"bin", "nil"}, "draft": ARR,
             "propose": INT, "draft_text": ARR},
    "close": {"session": STR, "reason": STR},
    "cancel": {"session": STR, "reason": STR},
    "score": {"messages": ARR, "targets": ARR, "top_k": INT},
    "slice": {"session": STR, "expert": STR, "step": INT, "ids": {"bin"}, "logprobs": {"bin"},
              "rest": NUM, "pieces": ARR, "compute_s": NUM, "energy_j": NUM,
              "prompt_tokens": INT, "more": INT},
    "error": {"code": STR, "message": STR, "session": STR, "expert": STR, "step": INT},
    "heartbeat": {"expert": STR, "model": STR, "tokenizer": STR, "backend": STR,
                  "vocab_size": INT, "eos_ids": ARR, "device": MAP | {"nil"},
                  "energy_source": STR, "sessions": INT, "interval_s": NUM, "seq": INT},
    "selection": {"agent": STR, "version": INT, "reason": STR, "live": ARR, "experts": ARR},
}  # fmt: skip
REQUIRED = {
    "prompt": ["messages"], "open": ["session", "messages"],
    "step": ["session", "step", "token"], "close": ["session"], "cancel": ["session"],
    "score": ["messages", "targets"],
    "slice": ["session", "expert", "step", "ids", "logprobs", "rest", "pieces"],
    "error": ["code", "message"],
    "heartbeat": ["expert", "model", "tokenizer", "backend", "vocab_size", "eos_ids"],
    "selection": ["agent", "version", "reason", "live", "experts"],
}  # fmt: skip
NAN, INF = math.nan, math.inf
EMPTY_CHATS: list[Any] = [[], [{"role": "user", "content": " \n\t"}], [None], ["hi"],
                          [{"role": "user"}], [{"role": "user", "content": 7}]]  # fmt: skip
NOT_TOKENS = ["", "a.b", "a b", "*", ">"]
OTHER_SESSION = "0123456789abcdef" * 2  # a session other than the subject's
BAD_CONVERSATIONS = ["", "a.b", "a b", "*", ">", "x" * 65, "é"]
# Values of the right kind that the protocol refuses (§4, §5, §6, §13).
BAD_VALUES: dict[str, dict[str, list[Any]]] = {
    "prompt": {
        "messages": [*EMPTY_CHATS, [{"role": "user", "content": "x" * 100_001}]],
        "max_tokens": [0, -1, 4097, 2**63 - 1, 2**64 - 1, -(2**63)],
        "temperature": [NAN, INF, -INF, -1.0, -1e-300],
        "top_p": [0.0, -0.5, 1.0000001, 2.0, NAN, INF],
        "seed": [-1, -(2**63)],
        "experts": [0, -1, -(2**63)],
        "step_deadline_s": [0.0, -1.0, NAN, INF, -INF, 1e300],
        "conversation": BAD_CONVERSATIONS,
    },
    "open": {"messages": EMPTY_CHATS, "top_k": [-1, -(2**63)], "session": NOT_TOKENS,
             "conversation": BAD_CONVERSATIONS},
    "step": {"step": [0, -1, -(2**63), 2**64 - 1], "token": [-1, 2**32, 2**64 - 1],
             "session": NOT_TOKENS},
    "score": {"messages": EMPTY_CHATS, "targets": [[], [""], ["a", ""], [None], [7]],
              "top_k": [-1, -(2**63)]},
    "slice": {
        "ids": [b"", b"\x01\x02\x03", u32(1, 2, 3), u32(7, 7), u32(0xFFFFFFFF, 1)],
        "logprobs": [f32(NAN, -1.0), f32(INF, -1.0), f32(1.0, -1.0), f32(-1.0)],
        "rest": [NAN, INF, -0.5, 1.5], "pieces": [[b"a"], [], ["a", "b"]],
        "step": [2**63 - 1], "expert": [Slot.FORGED], "session": [OTHER_SESSION],
    },
    "cancel": {"session": [OTHER_SESSION]},
}  # fmt: skip
HOSTILE: dict[str, list[Any]] = {
    "nil": [None], "bool": [True, False],
    "int": [0, -1, 127, -33, 2**63, 2**64 - 1, -(2**63)],
    "float": [0.0, -0.0, NAN, INF, -INF, 1e308, 5.0],
    "str": ["", "x", "é", "\x00", "y" * 1000],
    "bin": [b"", b"\x00\x01\x02", bytes(1000)],
    "array": [[], [None], [1, "a"], [[[]]]],
    "map": [{}, {"a": 1}, {1: 2}, {"type": "moe2.v1.prompt"}],
}  # fmt: skip
RETAGS: list[Any] = [
    "moe2.v2.{}", "moe2.v0.{}", "moe2.v10.{}", "moe2.v99999999999999999999999.{}", "moe2.v1.nope",
    "moe2.v1.", "moe2.v1.{}x", "MOE2.V1.{}", "foo", "", RawStr(b"moe2.v1.\xc3\x28"), 1, None,
    b"moe2.v1.prompt", ["moe2.v1.prompt"], {"type": "moe2.v1.prompt"},
]  # fmt: skip
TYPE_OF = {"prompt": "prompt", "open": "open", "step": "step", "close": "close", "score": "score",
           "cancel": "cancel", "members": "heartbeat", "selection": "selection"}  # fmt: skip
ACCEPTED = {**{k: {v} for k, v in TYPE_OF.items()}, "slice": {"slice", "error"}, "verb": set()}
ACCEPTED |= {"srv": set(), "agent": set()}  # their payloads are not wire messages


# msgpack headers that promise more than follows (or are reserved, c1)
LYING_HEADERS = ["ddffffffff", "dcffff", "dfffffffff", "dbffffffff", "c6ffffffff", "c9ffffffff01"]
LYING_HEADERS += ["d4", "c1", "dd00000005"]


def deep(n: int, opener: bytes = b"\x91") -> Raw:
    return Raw(opener * n + b"\xc0")


DEEP = [1000, 10_000, 100_000, 200_000]
FIELD_DEEP = [1000, 10_000, 100_000]  # twice in one body still fits
TOKEN_CHARS = string.ascii_letters + string.digits + "_-+=!#$%&()[]{}|;:',<?/~@^`\""
_T = TypeVar("_T")


class Draw(Protocol):
    """Where a generator's choices come from: hypothesis (``HypothesisDraw``, shrinkable, for
    the default suite) or a seeded ``random.Random`` (``RandomDraw``, some thousand times
    faster: the slow suite's 10,000+ payloads per subject)."""

    def pick(self, options: Sequence[_T]) -> _T: ...
    def integer(self, lo: int, hi: int) -> int: ...
    def blob(self, lo: int, hi: int) -> bytes: ...
    def token(self) -> str: ...


@dataclass(frozen=True)
class HypothesisDraw:
    draw: st.DrawFn

    def pick(self, options: Sequence[_T]) -> _T:
        return self.draw(st.sampled_from(options))

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def blob(self, lo: int, hi: int) -> bytes:
        return self.draw(st.binary(min_size=lo, max_size=hi))

    def token(self) -> str:
        return self.draw(st.text(TOKEN_CHARS, min_size=1, max_size=70))


@dataclass(frozen=True)
class RandomDraw:
    rng: random.Random

    def pick(self, options: Sequence[_T]) -> _T:
        return options[self.rng.randrange(len(options))]

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def blob(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))

    def token(self) -> str:
        return "".join(self.rng.choices(TOKEN_CHARS, k=self.rng.randint(1, 70)))


def depth(d: Draw, choices: Sequence[int]) -> int:
    return d.integer(1, 64) if d.integer(0, 1) else d.pick(choices)


# Every subject an agent listens on (docs/protocol.md §2, docs/discovery.md).
KINDS = sorted(ACCEPTED)


def target(d: Draw, experts: Sequence[str], kinds: Sequence[str] = KINDS) -> Target:
    kind = d.pick(kinds)
    expert = d.pick([*experts, *experts, "nobody"])
    if kind == "members":
        expert = d.pick(experts) if d.integer(0, 1) else d.token()
    elif kind == "slice":
        expert = d.pick([*experts, "zz"])
    session: str | Live = LIVE if d.integer(0, 2) else uuid.UUID(int=d.integer(0, 2**128 - 1)).hex
    verb = d.pick(SRV_VERBS if kind == "srv" else AGENT_VERBS if kind == "agent" else VERBS)
    return Target(kind, expert, session, verb)


VERBS = ["frob", "Open", "scores", "_", "opened"]
# $SRV.<verb>, with no name, every agent's service name, an unknown one (and an id)
SRV_VERBS = [
    f"{verb}{name}"
    for verb in ("PING", "INFO", "STATS", "NOPE")
    for name in ("", ".moe2-fusion", ".moe2-expert", ".agents", ".nobody", ".moe2-fusion.x")
]
AGENT_VERBS = ["prompt", "status"]  # agents.<verb>.moe2.<owner>.<session>


def garbage(d: Draw, target: Target) -> Shot:
    choice = d.integer(0, 5)
    if choice == 0:
        raw = d.blob(0, 64)
        return Shot(target, Expect.ERROR, f"random bytes {raw[:16].hex()}", raw=raw)
    if choice == 1:
        name = d.pick(sorted(CRASHERS))
        return Shot(target, Expect.ERROR, f"crasher {name}", raw=CRASHERS[name])
    if choice == 2:
        opener = d.pick([b"\x91", b"\x81\xa1a", b"\xdd\x00\x00\x00\x01"])
        n = min(depth(d, DEEP), 200_000 // len(opener))  # within the suite's 256 KiB max_payload
        return Shot(target, Expect.ERROR, f"{n} nested {opener.hex()}", raw=deep(n, opener).data)
    if choice == 3:
        head = d.pick(LYING_HEADERS)
        return Shot(target, Expect.ERROR, f"lying header {head}", raw=bytes.fromhex(head))
    name = d.pick(sorted(VALID))
    if choice == 4:
        cut = d.integer(0, 1 << 16)
        return Shot(target, Expect.ERROR, f"truncated {name}", body=VALID[name], cut=cut)
    tail = d.blob(1, 16)
    return Shot(target, Expect.ERROR, f"{name} + garbage {tail.hex()}", body=VALID[name], tail=tail)


def non_map(d: Draw, target: Target) -> Shot:
    kind = d.pick(sorted(HOSTILE))
    value = d.pick([v for v in HOSTILE[kind] if not isinstance(v, dict)] or [7])
    return Shot(target, Expect.ERROR, f"msgpack {kind} {value!r:.30}", body=value)


def mutated(d: Draw, target: Target) -> Shot:
    """The subject's own message type, made invalid by one or two mutations."""
    name = TYPE_OF.get(target.kind) or d.pick(["slice", "error"])
    if target.kind in ("verb", "srv", "agent"):
        name = d.pick(sorted(FIELDS))
    body, notes = dict(VALID[name]), []
    for _ in range(d.integer(1, 2)):
        notes.append(mutation(d, body, name))
    return Shot(target, Expect.ERROR, f"{name} with {'; '.join(notes)}", body=body)


def mutation(d: Draw, body: dict[Any, Any], name: str) -> str:
    """Change ``body`` in place so that no receiver may accept it; say how."""
    ways = ["wrong kind", "missing", "bad utf-8", "bad key", "deep", "retag"]
    ways += ["bad value"] * 3 if name in BAD_VALUES else []
    way = d.pick(ways)
    fields = FIELDS[name]
    if way == "wrong kind":
        key = d.pick(sorted(fields))
        kind = d.pick(sorted(set(HOSTILE) - fields[key]))
        body[key] = d.pick(HOSTILE[kind])
        return f"{key}={body[key]!r:.40}"
    if way == "missing":
        key = d.pick(REQUIRED[name])
        body.pop(key, None)
        return f"no {key}"
    if way == "bad utf-8":
        bad = RawStr(b"ab\xff\xfe" + d.blob(0, 4))
        keys = sorted(k for k, kinds in fields.items() if kinds == STR)
        if not keys:  # a prompt or a score: in a message's content
            body["messages"] = [{"role": "user", "content": bad}]
            return "content invalid UTF-8"
        key = d.pick(keys)
        body[key] = bad
        return f"{key} invalid UTF-8"
    if way == "bad key":
        odd: Any = d.pick([1, -1, None, True, b"type", 1.5])  # keys must be str
        body[odd] = 1
        return f"key {odd!r}"
    if way == "deep":
        key, n = d.pick(sorted(fields)), depth(d, FIELD_DEEP)
        body[key] = deep(n)
        return f"{key} nested {n} deep"
    if way == "retag":
        tag = d.pick([*RETAGS, "missing"])
        if tag == "missing":
            body.pop("type", None)
        else:
            body["type"] = tag.format(name) if isinstance(tag, str) else tag
        return f"type {tag!r}"
    key = d.pick(sorted(BAD_VALUES[name]))
    body[key] = d.pick(BAD_VALUES[name][key])
    return f"{key}={body[key]!r:.40}"


def misrouted(d: Draw, target: Target) -> Shot:
    """A valid message of a type this subject does not carry."""
    name = d.pick(sorted(set(VALID) - ACCEPTED.get(target.kind, set())))
    return Shot(target, Expect.ERROR, f"a valid {name}", body=VALID[name])


def valid(target: Target, experts: Sequence[str]) -> Shot | None:
    """A valid message for this subject, where sending one cannot change the answer checked at
    the end: Close, Cancel, Score, a Step or an expert's Slice in the running question, an
    announcement of S (and a Step for an unknown session: an error). Never a Prompt, an Open or
    a Heartbeat."""
    kind, own = target.kind, target.expert in experts
    if kind == "score":
        return Shot(target, Expect.SCORED, "a valid score", body=VALID["score"])
    if kind in ("close", "cancel", "selection") or (kind == "step" and target.session is LIVE):
        return Shot(target, Expect.LENIENT, f"a valid {kind}", body=VALID[kind])
    if kind == "step":
        return Shot(target, Expect.ERROR, "a step for an unknown session", body=VALID["step"])
    if kind == "slice" and own:
        return Shot(target, Expect.LENIENT, "a valid slice", body=VALID["slice"])
    return None


def shot(d: Draw, experts: Sequence[str], kinds: Sequence[str] = KINDS) -> Shot:
    """One payload for one subject of ``kinds``, of any style. On ``$SRV`` and the agent
    protocol's subjects the payload is whatever it is, and a reply is JSON (``Expect.JSON``)."""
    where = target(d, experts, kinds)
    style = d.pick(STYLES)
    if style == "valid" and (one := valid(where, experts)) is not None:
        return one
    made = {"garbage": garbage, "non-map": non_map, "misrouted": misrouted}.get(style, mutated)
    one = made(d, where)
    if where.kind in ("srv", "agent"):
        one = replace(one, expect=Expect.JSON)
    return one


def shots(experts: Sequence[str], kinds: Sequence[str] = KINDS) -> st.SearchStrategy[Shot]:
    """Hypothesis' strategy of :func:`shot`."""

    @st.composite
    def one(draw: st.DrawFn) -> Shot:
        return shot(HypothesisDraw(draw), experts, kinds)

    return one()


def random_shots(
    experts: Sequence[str], kinds: Sequence[str], count: int, seed: int = 0
) -> Iterator[Shot]:
    """``count`` payloads for subjects of ``kinds``, from a seeded ``random.Random``."""
    d = RandomDraw(random.Random(f"{'/'.join(kinds)}/{seed}"))
    for _ in range(count):
        yield shot(d, experts, kinds)


STYLES = ["garbage", "garbage", "non-map", "mutated", "mutated", "mutated", "misrouted", "valid"]
