"""Fuzzing on a real server (issue 8): generated payloads on every subject of docs/protocol.md §2.

Agents run as OS processes: a fusion agent, experts (replay experts from a recorded trace; the
real SmolLM2 expert in the ``model`` variant) and a selection watcher. While a normal question
keeps running (so that session subjects have a live session to hit), hypothesis draws batches of
payloads — random bytes, truncated and trailing-garbage msgpack, valid maps with wrong types,
huge and negative numbers, NaN/inf, wrong version and unknown type tags, unknown sessions, forged
identities, deep nesting, invalid UTF-8 — and each is published once without and once with a
reply subject. Then: every agent still runs; every payload sent with a reply subject that is not
a valid request got a well-formed wire ``Error`` (503 *no responders* where nobody subscribes);
and a normal question still gets the right answer.

The subjects include the agents' ``$SRV`` micro services and the fusion agent's Agent Protocol
subjects (``agents.prompt|status.moe2.moe2.moe2``), whose replies must be JSON; the payloads use
the wire's newer fields too (Prompt.conversation and step_deadline_s, Step.draft, propose and
draft_text, Slice.more, Chunk.dominant). The replay bus runs on the tests' server with its
per-role users (the fuzzer, the agents and the victim connect as its superuser).

The event loop and NATS connection live in a blocking portal (a thread), so the default test is
a plain synchronous ``@given`` that draws one batch per example with ``st.data()``. The slow
suite (issue 12 §3, ``pytest -m slow``) sends 10,000 payloads on each kind of subject from the
same generators driven by a seeded ``random.Random`` (hypothesis draws about 150 payloads a
second, far too few): about 8 s a kind, 12 kinds, 3.7 min with the SmolLM2 variant.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import anyio
import msgspec
import nats.errors
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from moe2.agents.traces.synthetic import synthetic_trace
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.errors import Moe2Error
from moe2.runtime.server import NatsServer
from tests.fuzz_payloads import (
    KINDS,
    QUESTION,
    ROOT,
    Agents,
    Expect,
    Shot,
    ask,
    fire,
    fusion_ready,
    is_no_responders,
    logged,
    pack,
    random_shots,
    reply_problem,
    selection_watcher_ready,
    shots,
)

STEPS = 24


@dataclass
class Bus:
    """Agent processes on one server, the experts they serve and the answer a question gets."""

    url: str
    agents: Agents
    experts: list[str]
    max_tokens: int
    expected: str = ""

    def answer(self, *, patient: bool = False) -> str:
        return anyio.run(partial(ask, self.url, QUESTION, self.max_tokens, patient=patient))


@pytest.fixture(scope="module")
def replay_bus(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """`moe2 fusion`, `moe2 replay --experts` (e1, e2; 50 ms a step, so that a question lasts
    about a second) and `moe2 selection`; the answer is the recorded one."""
    tmp = tmp_path_factory.mktemp("fuzz")
    trace, experts = tmp / "trace.moe2", ["e1", "e2"]
    question = [wire.ChatMessage("user", QUESTION)]
    chosen = synthetic_trace(trace, experts=experts, prompt_messages=question, steps=STEPS)
    agents = Agents(nats_server.url, tmp)
    try:
        agents.add("fusion", "fusion", ready=fusion_ready(len(experts)))
        replay = ["replay", str(trace), "--experts", "--delay", "0.05"]
        agents.add("replay", *replay, ready=logged("replay_experts_ready"))
        agents.add("watcher", "selection", ready=selection_watcher_ready(nats_server.url))
        agents.wait_ready()
        bus = Bus(nats_server.url, agents, experts, STEPS)
        bus.expected = "".join(f" t{t}" for t in chosen[:STEPS])
        assert bus.answer(patient=True) == bus.expected
        yield bus
    finally:
        agents.stop()


@pytest.fixture(scope="module")
def model_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """`moe2 fusion`, a real `moe2 expert` (SmolLM2) and `moe2 selection` on their own server;
    the right answer is the greedy one it gave before the fuzzing."""
    tmp = tmp_path_factory.mktemp("fuzz-model")
    with NatsServer(max_payload=256 * 1024) as server:
        agents = Agents(server.url, tmp)
        try:
            expert = ["expert", "--id", "r1", "--threads", "1", "--no-warmup"]
            agents.add("r1", *expert, ready=logged("expert_ready"))
            agents.add("fusion", "fusion", ready=logged("fusion_ready"))
            agents.add("watcher", "selection", ready=selection_watcher_ready(server.url))
            agents.wait_ready(limit_s=180)
            bus = Bus(server.url, agents, ["r1"], 8)
            bus.expected = bus.answer(patient=True)
            yield bus
        finally:
            agents.stop()


@dataclass
class Victim:
    """Keeps a normal question running, so that session subjects have a live session to hit.
    Whatever the fuzzing does to it, what it gets must be Chunks, then a Final or an Error."""

    nc: NATS
    max_tokens: int
    session: str | None = None
    oddities: list[str] = field(default_factory=list)
    asked: int = 0
    _stop: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        while not self._stop.is_set():
            await self._one()

    def stop(self) -> None:
        self._stop.set()

    async def _one(self) -> None:
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        prompt = wire.Prompt(
            messages=[wire.ChatMessage("user", QUESTION)], max_tokens=self.max_tokens
        )
        self.asked += 1
        try:
            await self.nc.publish(f"{ROOT}.prompt", wire.encode(prompt), reply=inbox)
            while await self._read(await sub.next_msg(timeout=2)):
                pass
        except nats.errors.TimeoutError:
            pass  # cancelled by a fuzzed Cancel, or its experts were knocked out: ask again
        finally:
            self.session = None
            await sub.unsubscribe()

    async def _read(self, msg: Msg) -> bool:
        """Take one message of the answer; False once the answer is over."""
        if is_no_responders(msg):
            self.oddities.append("503: the fusion agent is gone")
            await anyio.sleep(0.1)
            return False
        try:
            item = wire.decode(msg.data)
        except Moe2Error as exc:
            self.oddities.append(f"an answer message that does not decode: {exc}")
            return False
        if isinstance(item, wire.Chunk):
            self.session = item.session
            return True
        if not isinstance(item, wire.Final | wire.Error):
            self.oddities.append(f"a {type(item).__name__} in an answer")
        return False


class Fuzzer:
    """Fires batches of shots from the portal's event loop, with the victim running beside."""

    def __init__(self, portal: BlockingPortal, bus: Bus) -> None:
        self.portal, self.bus = portal, bus
        self.nc: NATS = portal.call(partial(connect_nats, bus.url, name="fuzzer"))
        self.victim = portal.call(Victim, self.nc, bus.max_tokens)  # its Event needs the loop
        self._victim_done = portal.start_task_soon(self.victim.run)
        self.sent = 0
        self.answered = 0  # payloads an agent answered (not the server's 503 no responders)

    def close(self) -> None:
        self.portal.call(self.victim.stop)
        self._victim_done.result(timeout=15)
        self.portal.call(close_nats, self.nc)

    def fire(self, batch: list[Shot]) -> list[str]:
        """Send the batch; what went wrong, one line per payload."""
        replies = self.portal.call(self._fire, batch)
        self.sent += len(batch)
        self.answered += sum(1 for got in replies if got and not any(map(is_no_responders, got)))
        problems = []
        for i, (shot, got) in enumerate(zip(batch, replies, strict=True)):
            if problem := reply_problem(shot, got, self.bus.experts):
                problems.append(f"#{i} {shot.describe()}: {problem}")
        return problems

    async def _fire(self, batch: list[Shot]) -> list[list[Msg]]:
        sends = [shot.render(self.victim.session, self.bus.experts) for shot in batch]
        awaited = [shot.expect is not Expect.LENIENT for shot in batch]
        # Up to 30 s for a batch's last reply: 1,000 messages queue behind one another, and on a
        # box loaded by other work the last of a batch once took over 10 s to be answered.
        return await fire(self.nc, sends, awaited, wait_s=30)


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal("asyncio") as p:
        yield p


def fuzz(bus: Bus, portal: BlockingPortal, *, batches: int, size: int) -> None:
    """``batches`` hypothesis examples of ``size`` payloads each, then the final checks."""
    fuzzer = Fuzzer(portal, bus)
    started, restarts = time.monotonic(), bus.agents.restarts

    @settings(
        max_examples=batches,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: see the batch
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def one_batch(data: st.DataObject) -> None:
        restarted = bus.agents.revive()  # a crash in one batch must not fail the next
        batch = data.draw(st.lists(shots(bus.experts), min_size=size, max_size=size), "batch")
        problems = fuzzer.fire(batch)
        dead = bus.agents.dead()
        report = "\n".join(problems[:40])
        restarts = f" (restarted before this batch: {restarted})" if restarted else ""
        assert not dead, f"{bus.agents.describe(dead)}\nreplies:\n{report}{restarts}"
        assert not problems, f"{len(problems)} of {size} payloads:\n{report}{restarts}"

    try:
        one_batch()
    finally:
        fuzzer.close()
    after_fuzzing(bus, fuzzer, started, restarts)


def after_fuzzing(bus: Bus, fuzzer: Fuzzer, started: float, restarts: int) -> None:
    """Every agent runs (none restarted), the question beside got well-formed answers, and a
    normal question still gets the right answer."""
    elapsed = time.monotonic() - started
    print(
        f"{fuzzer.sent} payloads ({fuzzer.answered} answered by an agent, "
        f"{fuzzer.victim.asked} questions beside) in {elapsed:.1f} s"
    )
    bus.agents.assert_alive("after the fuzzing: ")
    assert bus.agents.restarts == restarts
    assert fuzzer.victim.oddities == []
    assert bus.answer(patient=True) == bus.expected


def fuzz_fast(bus: Bus, portal: BlockingPortal, kinds: list[str], count: int, size: int) -> None:
    """``count`` payloads on subjects of ``kinds`` from a seeded ``random.Random`` (the same
    generators as hypothesis', no shrinking: each failing payload is printed), in batches."""
    fuzzer = Fuzzer(portal, bus)
    started, restarts = time.monotonic(), bus.agents.restarts
    pending = random_shots(bus.experts, kinds, count)
    try:
        while batch := [shot for _, shot in zip(range(size), pending, strict=False)]:
            problems = fuzzer.fire(batch)
            report = "\n".join(problems[:40])
            dead = bus.agents.dead()
            assert not dead, f"{bus.agents.describe(dead)}\nreplies:\n{report}"
            assert not problems, f"{len(problems)} of {len(batch)} payloads:\n{report}"
    finally:
        fuzzer.close()
    assert fuzzer.sent == count
    # session subjects answer only while the question beside runs (503 otherwise); an unknown
    # verb on an expert's subject never (nobody subscribes to it)
    if kinds != ["verb"]:
        assert fuzzer.answered > count // 100, f"agents answered {fuzzer.answered}: not listening?"
    after_fuzzing(bus, fuzzer, started, restarts)


@pytest.mark.parametrize(
    ("bus", "batches"),
    [("replay_bus", 25), pytest.param("model_bus", 10, marks=pytest.mark.model)],
)
def test_fuzz_every_subject(
    bus: str, batches: int, request: pytest.FixtureRequest, portal: BlockingPortal
) -> None:
    """A few hundred payloads (20 a batch) against replay experts, fewer at the real model."""
    fuzz(request.getfixturevalue(bus), portal, batches=batches, size=20)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_ten_thousand_payloads_per_subject(
    kind: str, replay_bus: Bus, portal: BlockingPortal
) -> None:
    """10,000 payloads (each sent twice: without and with a reply subject) on each kind of
    subject an agent listens on, the $SRV services and the Agent Protocol's among them."""
    fuzz_fast(replay_bus, portal, [kind], PER_SUBJECT, size=500)


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(1200)
def test_fuzz_ten_thousand_payloads_at_the_model(model_bus: Bus, portal: BlockingPortal) -> None:
    """The same generators on every subject at once, the real SmolLM2 expert behind."""
    fuzz_fast(model_bus, portal, KINDS, PER_SUBJECT, size=500)


PER_SUBJECT = 10_000


# --- the generator itself -------------------------------------------------------------------------

LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(VALUES)
def test_pack_writes_what_msgspec_reads(value: object) -> None:
    assert msgspec.msgpack.decode(pack(value)) == value


@settings(max_examples=300, deadline=None)
@given(shots(["e1", "e2"]))
def test_generated_payloads_fit_and_the_valid_ones_decode(shot: Shot) -> None:
    """Every payload fits the suite's max_payload; those that may go unanswered or get a
    Scored are real wire messages; every kind of subject is drawn."""
    subject, data = shot.render("f" * 32, ["e1", "e2"])
    assert subject.startswith((f"{ROOT}.", "$SRV.", "agents.")) and " " not in subject
    assert len(data) < 256 * 1024
    if shot.expect in (Expect.LENIENT, Expect.SCORED):
        wire.decode(data)
