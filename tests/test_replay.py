"""`moe2 replay`: re-publishing a trace, and replay experts answering a fusion agent from one."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS

import moe2
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.agents.traces.recorded import recorded_experts
from moe2.agents.traces.recorder import Recorder
from moe2.agents.traces.replay import serve_replay_experts
from moe2.agents.traces.republish import republish, subject_matches
from moe2.agents.traces.synthetic import synthetic_trace
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats, nats_connection
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.fusion import ExpertSlice, fuse
from moe2.runtime.subjects import Subjects
from moe2.runtime.trace import TraceRecord, TraceWriter, load_trace, new_header

SUB = Subjects()
PROMPT = [wire.ChatMessage(role="user", content="Why is the sky blue?")]
EXPERTS = ["e1", "e2"]
STEPS = 6


@pytest.fixture
def trace(tmp_path: Path) -> tuple[Path, list[int]]:
    path = tmp_path / "synthetic.moe2"
    chosen = synthetic_trace(path, experts=EXPERTS, prompt_messages=PROMPT, steps=STEPS, top_k=8)
    return path, chosen


def recorded_slices(path: Path) -> dict[tuple[str, int], bytes]:
    """(expert, step) -> the recorded slice bytes."""
    found: dict[tuple[str, int], bytes] = {}
    for record in load_trace(path)[1]:
        if ".slice." in record.subject:
            message = wire.decode(record.data)
            assert isinstance(message, wire.Slice)
            found[(message.expert, message.step)] = record.data
    return found


def with_session(data: bytes, session: str) -> bytes:
    message = wire.decode(data)
    assert isinstance(message, wire.Slice | wire.Error)
    return wire.encode(msgspec.structs.replace(message, session=session))


class FusionStandIn:
    """The test plays the fusion agent: publish Open/Step, read what comes back per expert."""

    def __init__(self, nc: NATS, session: str) -> None:
        self.nc, self.session = nc, session

    async def __aenter__(self) -> FusionStandIn:
        self.sub = await self.nc.subscribe(SUB.session_slices(self.session))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def send(self, message: wire.Message, experts: list[str] = EXPERTS) -> None:
        for e in experts:
            verb = SUB.expert_open if isinstance(message, wire.Open) else SUB.expert_step
            await self.nc.publish(verb(e), wire.encode(message))

    async def answers(self, n: int = len(EXPERTS)) -> dict[str, bytes]:
        got: dict[str, bytes] = {}
        for _ in range(n):
            msg = await self.sub.next_msg(timeout=3)
            got[SUB.expert_of_slice(msg.subject)] = msg.data
        return got

    def open(self, messages: list[wire.ChatMessage] = PROMPT, max_tokens: int = STEPS) -> wire.Open:
        return wire.Open(session=self.session, messages=messages, top_k=8, max_tokens=max_tokens)

    def step(self, step: int, token: int) -> wire.Step:
        return wire.Step(session=self.session, step=step, token=token)


@asynccontextmanager
async def replaying(url: str, path: Path, **options: object) -> AsyncIterator[list[str]]:
    async with anyio.create_task_group() as tg:
        ids = await tg.start(partial(serve_replay_experts, url, path, **options))  # type: ignore[arg-type]
        yield ids
        tg.cancel_scope.cancel()


def error_of(data: bytes) -> wire.Error:
    message = wire.decode(data)
    assert isinstance(message, wire.Error), message
    return message


# --- replay experts ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_replay_experts_answer_byte_identically_but_for_the_session(
    nats_url: str, trace: tuple[Path, list[int]]
) -> None:
    path, chosen = trace
    recorded = recorded_slices(path)
    with anyio.fail_after(15):
        async with replaying(nats_url, path) as ids, nats_connection(nats_url, name="t") as nc:
            assert ids == EXPERTS
            async with FusionStandIn(nc, "fresh-1") as fusion:
                await fusion.send(fusion.open())
                for step in range(STEPS + 1):
                    if step:
                        await fusion.send(fusion.step(step, chosen[step - 1]))
                    for expert, data in (await fusion.answers()).items():
                        assert wire.decode(data).session == "fresh-1"  # type: ignore[union-attr]
                        assert with_session(data, "synthetic-0") == recorded[(expert, step)]


@pytest.mark.anyio
async def test_diverging_token_unknown_session_and_unknown_open_are_errors(
    nats_url: str, trace: tuple[Path, list[int]]
) -> None:
    path, chosen = trace
    with anyio.fail_after(15):
        async with replaying(nats_url, path), nats_connection(nats_url, name="t") as nc:
            async with FusionStandIn(nc, "s-div") as fusion:
                await fusion.send(fusion.open())
                await fusion.answers()
                await fusion.send(fusion.step(1, chosen[0] + 1))
                for data in (await fusion.answers()).values():
                    err = error_of(data)
                    assert (err.code, err.step, err.session) == ("trace_diverged", 1, "s-div")
                await fusion.send(fusion.step(STEPS + 1, 5))  # past the end of the trace
                assert error_of((await fusion.answers())["e1"]).code == "trace_diverged"
            async with FusionStandIn(nc, "s-never-opened") as fusion:
                await fusion.send(fusion.step(1, chosen[0]))
                for data in (await fusion.answers()).values():
                    assert error_of(data).code == ErrorCode.UNKNOWN_SESSION
            async with FusionStandIn(nc, "s-other") as fusion:
                await fusion.send(fusion.open(max_tokens=STEPS + 1))  # not what was recorded
                for data in (await fusion.answers()).values():
                    assert error_of(data).code == ErrorCode.TRACE_DIVERGED


@pytest.mark.anyio
async def test_delayed_expert_answers_no_earlier_than_its_delay(
    nats_url: str, trace: tuple[Path, list[int]]
) -> None:
    path, chosen = trace
    with anyio.fail_after(15):
        async with (
            replaying(nats_url, path, delays={"e2": 0.3}),
            nats_connection(nats_url, name="t") as nc,
            FusionStandIn(nc, "s-slow") as fusion,
        ):
            for message in (fusion.open(), fusion.step(1, chosen[0])):
                sent = anyio.current_time()
                await fusion.send(message)
                first = await fusion.sub.next_msg(timeout=3)
                fast_s = anyio.current_time() - sent
                second = await fusion.sub.next_msg(timeout=3)
                slow_s = anyio.current_time() - sent
                assert SUB.expert_of_slice(first.subject) == "e1" and fast_s < 0.3
                assert SUB.expert_of_slice(second.subject) == "e2" and slow_s >= 0.3


@pytest.mark.anyio
async def test_heartbeats_are_republished(nats_url: str, trace: tuple[Path, list[int]]) -> None:
    path, _ = trace
    with anyio.fail_after(15):
        async with nats_connection(nats_url, name="t") as nc:
            sub = await nc.subscribe(SUB.members)
            async with replaying(nats_url, path, heartbeat_s=0.05):
                beats = [wire.decode((await sub.next_msg(timeout=3)).data) for _ in range(8)]
    seqs: dict[str, list[int]] = {}
    for beat in beats:
        assert isinstance(beat, wire.Heartbeat) and beat.backend == "replay"
        seqs.setdefault(beat.expert, []).append(beat.seq)
    assert set(seqs) == set(EXPERTS)
    assert all(len(s) >= 3 and s == sorted(s) and len(set(s)) == len(s) for s in seqs.values())


def handmade_trace(path: Path, answers: list[tuple[str, wire.Slice | wire.Error]]) -> None:
    """One expert ``x``, one Open per answer, in order, all for the same prompt."""
    opened = wire.Open(session="", messages=PROMPT, top_k=8, max_tokens=4)
    with TraceWriter(path, new_header(server="", subjects=[">"])) as w:
        for i, (session, answer) in enumerate(answers):
            records = [
                (SUB.expert_open("x"), msgspec.structs.replace(opened, session=session)),
                (SUB.slice(session, "x"), answer),
            ]
            for j, (subject, message) in enumerate(records):
                w.write(TraceRecord(i + j / 10, subject, data=wire.encode(message)))


def a_slice(session: str, first_id: int) -> wire.Slice:
    return wire.make_slice(
        session=session,
        expert="x",
        step=0,
        ids=np.array([first_id, 2]),
        logprobs=np.array([-0.1, -3.0]),
        pieces=[b"a", b"b"],
    )


@pytest.mark.anyio
async def test_several_matching_recordings_replay_in_order_and_errors_replay(
    nats_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "hand.moe2"
    failed = wire.Error(code="prompt_too_long", message="too long", session="r3", expert="x")
    handmade_trace(path, [("r1", a_slice("r1", 11)), ("r2", a_slice("r2", 22)), ("r3", failed)])
    firsts: list[int | str] = []
    with anyio.fail_after(15):
        async with replaying(nats_url, path), nats_connection(nats_url, name="t") as nc:
            for n in range(4):
                async with FusionStandIn(nc, f"new-{n}") as fusion:
                    open_ = wire.Open(session=f"new-{n}", messages=PROMPT, top_k=8, max_tokens=4)
                    await fusion.send(open_, ["x"])
                    answer = wire.decode((await fusion.answers(1))["x"])
                    assert answer.session == f"new-{n}"  # type: ignore[union-attr]
                    if isinstance(answer, wire.Slice):
                        firsts.append(int(answer.ids_array()[0]))
                    elif isinstance(answer, wire.Error):
                        firsts.append(answer.code)
    assert firsts == [11, 22, "prompt_too_long", 11]  # recorded order, then round again


@pytest.mark.anyio
async def test_a_session_fused_by_bytes_replays_by_its_texts(nats_url: str, tmp_path: Path) -> None:
    """A byte-path Step (token -1, text) is recorded by its text; replay answers the same text
    and refuses another one with trace_diverged."""
    path = tmp_path / "bytes.moe2"
    opened = wire.Open(session="rec", messages=PROMPT, top_k=8, max_tokens=4)
    records = [
        (SUB.expert_open("x"), opened),
        (SUB.slice("rec", "x"), a_slice("rec", 11)),
        (SUB.expert_step("x"), wire.Step(session="rec", step=1, token=-1, text=b" Par")),
        (SUB.slice("rec", "x"), msgspec.structs.replace(a_slice("rec", 33), step=1)),
    ]
    with TraceWriter(path, new_header(server="", subjects=[">"])) as w:
        for i, (subject, message) in enumerate(records):
            w.write(TraceRecord(i / 10, subject, data=wire.encode(message)))
    assert recorded_experts(load_trace(path)[1])["x"].sessions  # indexed
    with anyio.fail_after(15):
        async with replaying(nats_url, path), nats_connection(nats_url, name="t") as nc:
            for text, expected in ((b" Par", 33), (b" Pa", "trace_diverged")):
                async with FusionStandIn(nc, f"b-{expected}") as fusion:
                    again = msgspec.structs.replace(opened, session=fusion.session)
                    await fusion.send(again, ["x"])
                    await fusion.answers(1)
                    step = wire.Step(session=fusion.session, step=1, token=-1, text=text)
                    await fusion.send(step, ["x"])
                    answer = wire.decode((await fusion.answers(1))["x"])
                    got = (
                        int(answer.ids_array()[0])
                        if isinstance(answer, wire.Slice)
                        else answer.code  # type: ignore[union-attr]
                    )
                    assert got == expected


@pytest.mark.anyio
async def test_unknown_expert_is_refused(nats_url: str, trace: tuple[Path, list[int]]) -> None:
    with anyio.fail_after(5), pytest.raises(Moe2Error) as err:
        await serve_replay_experts(nats_url, trace[0], experts=["nobody"])
    assert err.value.code == ErrorCode.NO_EXPERTS


@pytest.mark.anyio
async def test_unreachable_server_is_a_plain_error(trace: tuple[Path, list[int]]) -> None:
    for run in (serve_replay_experts, republish):
        with anyio.fail_after(10), pytest.raises(Moe2Error) as err:
            await run("nats://127.0.0.1:1", trace[0])
        assert err.value.code == ErrorCode.UNREACHABLE


@pytest.mark.anyio
async def test_a_recorded_conversation_replays(nats_url: str, tmp_path: Path) -> None:
    """Record replay experts talking to a stand-in fusion agent; the recording replays again."""
    source, out = tmp_path / "source.moe2", tmp_path / "recorded.moe2"
    chosen = synthetic_trace(source, experts=["e1"], prompt_messages=PROMPT, steps=2, top_k=8)
    recorder = Recorder(nats_url, out)
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg, nats_connection(nats_url, name="t") as nc:
            await tg.start(recorder.run)  # first, so it sees the replay experts' first heartbeat
            async with replaying(nats_url, source), FusionStandIn(nc, "live-1") as fusion:
                await fusion.send(fusion.open(max_tokens=2), ["e1"])
                await fusion.answers(1)
                await fusion.send(fusion.step(1, chosen[0]), ["e1"])
                await fusion.answers(1)
            recorder.stop()
    experts = recorded_experts(load_trace(out)[1])
    [session] = [s for ss in experts["e1"].sessions.values() for s in ss]
    assert session.session == "live-1" and set(session.answers) == {0, 1}
    assert dict(session.tokens) == {1: chosen[0]}
    assert experts["e1"].heartbeat is not None


@pytest.mark.anyio
async def test_a_fusion_agent_answers_from_a_synthetic_trace(nats_url: str, tmp_path: Path) -> None:
    """The benchmark's set-up: the real fusion agent, replay experts, no model."""
    path, prefix = tmp_path / "bench.moe2", "rpfusion"
    chosen = synthetic_trace(
        path, experts=["a", "b", "c"], prompt_messages=PROMPT, steps=24, prefix=prefix
    )
    nc = await connect_nats(nats_url, name="t")
    try:
        with anyio.fail_after(20):
            async with (
                replaying(nats_url, path, prefix=prefix, heartbeat_s=0.1),
                moe2.connect(nats_url, prefix=prefix) as client,
                anyio.create_task_group() as tg,
            ):
                agent = FusionAgent(nc, FusionConfig(prefix=prefix))
                await tg.start(agent.run)
                await agent.wait_for_experts(3, limit_s=5)
                for _ in range(2):  # one recording serves repeated prompts
                    final = await client.ask(PROMPT, max_tokens=24).collect()
                    assert final.text == "".join(f" t{t}" for t in chosen[:24])
                    assert final.finish_reason == "length" and final.late == {}
                tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


def test_synthetic_slices_make_greedy_fusion_pick_the_recorded_tokens(tmp_path: Path) -> None:
    path = tmp_path / "s.moe2"
    chosen = synthetic_trace(path, experts=["a", "b", "c"], prompt_messages=PROMPT, steps=20)
    slices: dict[int, list[wire.Slice]] = {}
    for record in load_trace(path)[1]:
        message = wire.decode(record.data)
        if isinstance(message, wire.Slice):
            wire.check_slice(message, vocab_size=49152)
            slices.setdefault(message.step, []).append(message)
    rng = np.random.default_rng(1)
    for step, group in slices.items():
        arrays = [ExpertSlice(s.ids_array(), s.logprobs_array(), s.rest) for s in group]
        dist = fuse(arrays, rng.dirichlet(np.ones(len(group)) * 0.3).tolist(), 49152)
        assert int(dist.ids[np.argmax(dist.probs)]) == chosen[step]
    assert len(chosen) == 21 and 0 not in chosen
    with pytest.raises(ValueError):
        synthetic_trace(path, experts=["a"], prompt_messages=PROMPT, steps=2, tokens=[5, 0, 6])


def test_replay_does_not_import_a_model_runtime() -> None:
    code = "import sys, moe2.agents.traces.replay; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


# --- re-publishing -------------------------------------------------------------------------------


def paced_trace(path: Path) -> list[TraceRecord]:
    records = [
        TraceRecord(1.0, "rp.a", data=b"0"),
        TraceRecord(1.1, "rp.b", reply="_INBOX.r", headers={"H": "1"}, data=b"1"),
        TraceRecord(1.3, "other.c", data=b"2"),
        TraceRecord(1.4, "rp.a.deep", data=bytes(range(256))),
    ]
    with TraceWriter(path, new_header(server="", subjects=[">"])) as w:
        for r in records:
            w.write(r)
    return records


async def received(
    url: str, path: Path, pattern: str, n: int, **options: object
) -> list[tuple[float, TraceRecord]]:
    """Re-publish ``path`` and return what a subscriber on ``pattern`` got, with arrival times."""
    got: list[tuple[float, TraceRecord]] = []
    async with nats_connection(url, name="t") as nc:
        sub = await nc.subscribe(pattern)
        await nc.flush()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(republish, url, path, **options))  # type: ignore[arg-type]
            for _ in range(n):
                m = await sub.next_msg(timeout=3)
                record = TraceRecord(0, m.subject, m.reply or None, m.headers or None, m.data)
                got.append((anyio.current_time(), record))
    return got


@pytest.mark.anyio
async def test_republish_keeps_order_payloads_and_timing(nats_url: str, tmp_path: Path) -> None:
    path = tmp_path / "paced.moe2"
    records = paced_trace(path)
    with anyio.fail_after(15):
        got = await received(nats_url, path, ">", 4, speed=1.0)
    assert [r for _, r in got] == [msgspec.structs.replace(r, t=0) for r in records]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(got)]
    for gap, want in zip(gaps, [0.1, 0.2, 0.1], strict=True):
        assert want * 0.8 <= gap <= want + 0.1
    assert 0.36 <= got[-1][0] - got[0][0] <= 0.6


@pytest.mark.anyio
async def test_republish_fast_and_filtered(nats_url: str, tmp_path: Path) -> None:
    path = tmp_path / "paced.moe2"
    paced_trace(path)
    with anyio.fail_after(15):
        started = anyio.current_time()
        got = await received(nats_url, path, ">", 2, speed=0, subjects=["rp.*"])
    assert [r.subject for _, r in got] == ["rp.a", "rp.b"]
    assert got[-1][0] - started < 0.3
    with pytest.raises(ValueError):
        await republish(nats_url, path, speed=-1)


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        (">", "a", True),
        (">", "a.b.c", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a", False),
        ("a.>", "a.b.c", True),
        ("a.*.c", "a.x.c", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
    ],
)
def test_subject_matches_like_nats(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches
