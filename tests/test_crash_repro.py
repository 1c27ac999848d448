"""Issue 8, "The crash": payloads that stopped agents, fired at agent processes on a real server.

Five bytes ``hello`` on ``moe2.v1.members.<anything>`` made every fusion agent on the bus exit
with status 1; on ``moe2.v1.prompt`` they stopped the fusion agent that took them; a replay
expert stopped too, and the real expert answered a garbage ``Score`` with nothing. Each test fires
the payloads without and with a reply subject, then checks that every process still runs, that
the replies are the wire ``Error`` docs/protocol.md §11–12 promise, and that a normal question
still gets the answer of the recorded trace.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import numpy as np
import pytest
from nats.aio.msg import Msg

from moe2.agents.traces.synthetic import synthetic_trace
from moe2.runtime import wire
from moe2.runtime.connection import nats_connection
from moe2.runtime.server import NatsServer
from tests.fuzz_payloads import (
    CRASHERS,
    QUESTION,
    ROOT,
    VALID,
    Agents,
    fire,
    fusion_ready,
    is_no_responders,
    logged,
    pack,
    selection_watcher_ready,
    wire_error,
)
from tests.fuzz_payloads import ask as ask_question

EXPERTS = ["e1", "e2"]
STEPS = 12
PAYLOADS = sorted(CRASHERS)
VERBS = ["open", "step", "close", "score"]


@dataclass
class Bus:
    url: str
    agents: Agents
    expected: str

    async def answer(self) -> str:
        """The answer to the recorded question (asked again while an expert is re-joining)."""
        return await ask_question(self.url, QUESTION, STEPS, patient=True)


@pytest.fixture(scope="module")
def bus(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """Two `moe2 fusion`, `moe2 replay --experts` (e1, e2) and `moe2 selection`, as processes."""
    tmp = tmp_path_factory.mktemp("crash")
    trace = tmp / "trace.moe2"
    question = [wire.ChatMessage("user", QUESTION)]
    chosen = synthetic_trace(trace, experts=EXPERTS, prompt_messages=question, steps=STEPS)
    agents = Agents(nats_server.url, tmp)
    try:
        for name in ("fusion-a", "fusion-b"):
            agents.add(name, "fusion", ready=fusion_ready(len(EXPERTS)))
        agents.add(
            "replay", "replay", str(trace), "--experts", ready=logged("replay_experts_ready")
        )
        agents.add("watcher", "selection", ready=selection_watcher_ready(nats_server.url))
        agents.wait_ready()
        expected = "".join(f" t{t}" for t in chosen[:STEPS])
        bus = Bus(nats_server.url, agents, expected)
        assert anyio.run(bus.answer) == expected
        yield bus
    finally:
        agents.stop()


@pytest.fixture
def agents(bus: Bus) -> Bus:
    """The bus, with any agent a previous test stopped started again."""
    bus.agents.revive()
    return bus


async def replies(url: str, sends: list[tuple[str, bytes]]) -> list[list[Msg]]:
    """The replies to each (subject, data), sent once without and once with a reply subject."""
    async with nats_connection(url, name="crash-repro") as nc:
        return await fire(nc, sends, [True] * len(sends), wait_s=3)


def codes(msgs: list[Msg]) -> list[str]:
    """The code of each reply, after checking that it is a well-formed wire Error."""
    found = []
    for msg in msgs:
        assert wire_error(msg.data) is None, wire_error(msg.data)
        error = wire.decode(msg.data)
        assert isinstance(error, wire.Error)
        found.append(error.code)
    return found


async def still_serving(bus: Bus, payload: str) -> None:
    bus.agents.assert_alive(f"after {payload!r}: ")
    assert await bus.answer() == bus.expected


@pytest.mark.anyio
@pytest.mark.parametrize("payload", PAYLOADS)
async def test_garbage_heartbeat_stops_no_fusion_agent(agents: Bus, payload: str) -> None:
    [got] = await replies(agents.url, [(f"{ROOT}.members.anything", CRASHERS[payload])])
    agents.agents.assert_alive(f"after {payload!r} on members: ")
    assert codes(got) == ["malformed", "malformed"], "one Error from each fusion agent"
    await still_serving(agents, payload)


@pytest.mark.anyio
@pytest.mark.parametrize("payload", PAYLOADS)
async def test_garbage_prompt_is_answered_malformed(agents: Bus, payload: str) -> None:
    """Six times, so that both fusion agents of the queue group take some."""
    got = await replies(agents.url, [(f"{ROOT}.prompt", CRASHERS[payload])] * 6)
    agents.agents.assert_alive(f"after {payload!r} on the prompt subject: ")
    assert [codes(r) for r in got] == [["malformed"]] * 6
    await still_serving(agents, payload)


@pytest.mark.anyio
@pytest.mark.parametrize("payload", PAYLOADS)
async def test_garbage_to_replay_experts_is_answered_malformed(agents: Bus, payload: str) -> None:
    subjects = [f"{ROOT}.expert.{e}.{verb}" for e in EXPERTS for verb in VERBS]
    got = await replies(agents.url, [(s, CRASHERS[payload]) for s in subjects])
    agents.agents.assert_alive(f"after {payload!r} on the experts' subjects: ")
    assert {s: codes(r) for s, r in zip(subjects, got, strict=True)} == {
        s: ["malformed"] for s in subjects
    }
    await still_serving(agents, payload)


@pytest.mark.anyio
@pytest.mark.parametrize("payload", PAYLOADS)
async def test_garbage_on_other_subjects_stops_nobody(agents: Bus, payload: str) -> None:
    """The selection watcher answers; a session nobody runs and an unknown verb may get 503."""
    nobody = [
        f"{ROOT}.session.{'a' * 32}.slice.e1",
        f"{ROOT}.session.{'a' * 32}.cancel",
        f"{ROOT}.expert.e1.frob",
    ]
    sends = [(s, CRASHERS[payload]) for s in [f"{ROOT}.selection", *nobody]]
    selection, *others = await replies(agents.url, sends)
    agents.agents.assert_alive(f"after {payload!r}: ")
    assert codes(selection) == ["malformed"]
    for subject, got in zip(nobody, others, strict=True):
        assert got, f"{subject}: not even the server's 503"
        assert all(is_no_responders(m) or wire_error(m.data) is None for m in got), subject
    await still_serving(agents, payload)


@pytest.mark.anyio
async def test_replay_experts_answer_a_score_with_an_error(agents: Bus) -> None:
    """A replay expert has no model to score with: it must say so, not stay silent."""
    sends = [(f"{ROOT}.expert.{e}.score", pack(VALID["score"])) for e in EXPERTS]
    got = await replies(agents.url, sends)
    assert [len(codes(r)) for r in got] == [1, 1]
    await still_serving(agents, "a valid score")


def session_errors(expert: str) -> list[tuple[str, bytes]]:
    """A Step for a session never opened, and an Open with ``top_k`` -1 (both decode)."""
    never_opened = {"type": "moe2.v1.step", "session": "f" * 32, "step": 1, "token": 5}
    negative_k = {**VALID["open"], "session": "e" * 32, "top_k": -1}
    return [
        (f"{ROOT}.expert.{expert}.step", pack(never_opened)),
        (f"{ROOT}.expert.{expert}.open", pack(negative_k)),
    ]


async def check_session_errors(url: str, expert: str, open_: dict[str, object]) -> None:
    """With a reply subject, an expert's session errors go to it, one Error each: for a session
    never opened, a bad Open, and a Step out of order in a session it holds (``open_``)."""
    step, bad_open = await replies(url, session_errors(expert))
    assert codes(step) == ["unknown_session"]
    assert len(codes(bad_open)) == 1
    session = uuid.uuid4().hex
    async with nats_connection(url, name="crash-repro") as nc:
        slices = await nc.subscribe(f"{ROOT}.session.{session}.slice.{expert}")
        await nc.publish(f"{ROOT}.expert.{expert}.open", pack({**open_, "session": session}))
        assert isinstance(wire.decode((await slices.next_msg(timeout=60)).data), wire.Slice)
        await slices.unsubscribe()
        out_of_order = {"type": "moe2.v1.step", "session": session, "step": 7, "token": 5}
        [held] = await fire(nc, [(f"{ROOT}.expert.{expert}.step", pack(out_of_order))], [True])
        close = {"type": "moe2.v1.close", "session": session, "reason": "done"}
        await nc.publish(f"{ROOT}.expert.{expert}.close", pack(close))
    assert len(codes(held)) == 1, "a Step out of order in a held session"


RECORDED_OPEN = {**VALID["open"], "messages": [{"role": "user", "content": QUESTION}]}
RECORDED_OPEN |= {"top_k": 32, "max_tokens": STEPS}  # what synthetic_trace records


@pytest.mark.anyio
async def test_replay_experts_answer_session_errors_on_the_reply_subject(agents: Bus) -> None:
    for expert in EXPERTS:
        await check_session_errors(agents.url, expert, RECORDED_OPEN)
    await still_serving(agents, "session errors")


# --- the real expert ------------------------------------------------------------------------------


@dataclass
class RealExpert:
    url: str
    agents: Agents
    baseline: wire.Scored


@pytest.fixture(scope="module")
def real_expert(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealExpert]:
    """`moe2 expert --id r1` with SmolLM2, alone on its own server."""
    tmp = tmp_path_factory.mktemp("real")
    with NatsServer(max_payload=256 * 1024) as server:
        agents = Agents(server.url, tmp)
        try:
            args = ["--id", "r1", "--threads", "1", "--no-warmup"]
            agents.add("r1", "expert", *args, ready=logged("expert_ready"))
            agents.wait_ready(limit_s=180)
            yield RealExpert(server.url, agents, anyio.run(score, server.url))
        finally:
            agents.stop()


async def score(url: str) -> wire.Scored:
    [[msg]] = await replies(url, [(f"{ROOT}.expert.r1.score", pack(VALID["score"]))])
    scored = wire.decode(msg.data)
    assert isinstance(scored, wire.Scored), scored
    return scored


@pytest.mark.model
@pytest.mark.anyio
@pytest.mark.parametrize("payload", PAYLOADS)
async def test_a_real_expert_answers_garbage_with_malformed(
    real_expert: RealExpert, payload: str
) -> None:
    real_expert.agents.revive()
    subjects = [f"{ROOT}.expert.r1.{verb}" for verb in VERBS]
    got = await replies(real_expert.url, [(s, CRASHERS[payload]) for s in subjects])
    real_expert.agents.assert_alive(f"after {payload!r}: ")
    assert {s: codes(r) for s, r in zip(subjects, got, strict=True)} == {
        s: ["malformed"] for s in subjects
    }
    await scores_as_before(real_expert)


async def scores_as_before(real_expert: RealExpert) -> None:
    """A valid Score still gets the Scored it got before anything hostile was sent."""
    scored, baseline = await score(real_expert.url), real_expert.baseline
    [target], [want] = scored.targets, baseline.targets
    assert target.ids == want.ids
    assert np.allclose(target.logprobs_array(), want.logprobs_array(), atol=1e-4)


@pytest.mark.model
@pytest.mark.anyio
async def test_a_real_expert_answers_session_errors_on_the_reply_subject(
    real_expert: RealExpert,
) -> None:
    real_expert.agents.revive()
    await check_session_errors(real_expert.url, "r1", VALID["open"])
    await scores_as_before(real_expert)
