"""The expert agent with the real SmolLM2 model on a real nats-server, as a fusion agent sees it."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import nats.errors
import numpy as np
import pytest
import structlog
from nats.aio.client import Client as NATS

from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends.base import Backend, BackendInfo, PrefixCache, TopK
from moe2.agents.expert.energy import CounterMeter, EnergyMeter
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.subjects import Subjects

pytestmark = [pytest.mark.anyio, pytest.mark.model]
_prefixes = (f"x{i}" for i in itertools.count())
HELLO = [wire.ChatMessage("user", "Say hello in one short sentence.")]
EXPERT = "e1"


@pytest.fixture
def backend(smollm2: Backend) -> Backend:
    return smollm2


@dataclass
class Bus:
    """A fusion agent's view: publish to the expert, read its slices and heartbeats."""

    agent: ExpertAgent
    nc: Any
    s: Subjects
    heartbeats: Any

    async def send(self, verb: str, message: wire.Message) -> None:
        await self.raw(verb, wire.encode(message))

    async def raw(self, verb: str, data: bytes) -> None:
        await self.nc.publish(f"{self.s.root}.expert.{EXPERT}.{verb}", data)

    async def listen(self, session: str) -> Any:
        sub = await self.nc.subscribe(self.s.session_slices(session))
        await self.nc.flush()
        return sub

    async def reply(self, sub: Any) -> wire.Message:
        msg = await sub.next_msg(timeout=20)
        assert msg.subject == self.s.slice(msg.subject.split(".")[3], EXPERT)
        return wire.decode(msg.data)

    async def open(
        self, session: str, messages: list[wire.ChatMessage] = HELLO, top_k: int = 32
    ) -> Any:
        sub = await self.listen(session)
        await self.send("open", wire.Open(session=session, messages=messages, top_k=top_k))
        return sub

    async def heartbeat(self) -> wire.Heartbeat:
        message = wire.decode((await self.heartbeats.next_msg(timeout=5)).data)
        assert isinstance(message, wire.Heartbeat)
        return message

    async def sessions_drop_to(self, n: int) -> None:
        """Wait for a heartbeat sent from now on that counts ``n`` sessions."""
        fresh = await self.nc.subscribe(self.s.member(EXPERT))
        await self.nc.flush()
        try:
            while wire.decode((await fresh.next_msg(timeout=5)).data).sessions != n:  # type: ignore[union-attr]
                pass
        finally:
            await fresh.unsubscribe()


@asynccontextmanager
async def expert_on_bus(
    backend: Backend, url: str, meter: EnergyMeter | None = None, **config: Any
) -> AsyncIterator[Bus]:
    """One expert agent under a fresh prefix, and a client connection beside it.

    No warm-up and the declared power, unless a test asks: quick starts, the same on every box.
    """
    config = {"warmup": False, "energy_source": "declared", **config}
    cfg = ExpertConfig(expert_id=EXPERT, prefix=next(_prefixes), heartbeat_s=0.05, **config)
    agent_nc = await connect_nats(url, name="test-expert")
    nc = await connect_nats(url, name="test-fusion")
    try:
        with anyio.fail_after(60):
            heartbeats = await nc.subscribe(Subjects(cfg.prefix).member(EXPERT))
            await nc.flush()
            await nc.flush()  # nats-py 2.16: the first PONG may overtake the SUB (see expert.py)
            async with anyio.create_task_group() as tg:
                agent = ExpertAgent(agent_nc, backend, cfg, meter)
                await tg.start(agent.run)
                yield Bus(agent, nc, Subjects(cfg.prefix), heartbeats)
                tg.cancel_scope.cancel()
    finally:
        await nc.close()  # the test's side: nothing to drain
        await close_nats(agent_nc)


def slice_of(message: wire.Message, step: int) -> wire.Slice:
    assert isinstance(message, wire.Slice), message
    assert message.step == step
    wire.check_slice(message, vocab_size=49152)
    return message


def error_of(message: wire.Message, code: str, step: int) -> wire.Error:
    assert isinstance(message, wire.Error), message
    assert (message.code, message.expert, message.step) == (code, EXPERT, step)
    return message


async def greedy_over_bus(bus: Bus, session: str, n: int) -> list[int]:
    sub = await bus.open(session)
    first = slice_of(await bus.reply(sub), 0)
    tokens = [int(first.ids_array()[0])]
    for step in range(1, n):
        await bus.send("step", wire.Step(session=session, step=step, token=tokens[-1]))
        tokens.append(int(slice_of(await bus.reply(sub), step).ids_array()[0]))
    await bus.send("close", wire.Close(session=session))
    return tokens


def greedy_alone(backend: Backend, n: int) -> list[int]:
    tokens = [int(backend.prefill("ref", backend.encode_chat(HELLO), 1).ids[0])]
    while len(tokens) < n:
        tokens.append(int(backend.decode("ref", tokens[-1], 1).ids[0]))
    backend.release("ref")
    return tokens


# --- the normal path -------------------------------------------------------------------------


async def test_open_publishes_slice_zero_with_the_prompt_length(
    backend: Backend, nats_url: str
) -> None:
    prompt_tokens = len(backend.encode_chat(HELLO))
    async with expert_on_bus(backend, nats_url) as bus:
        sub = await bus.open("s1", top_k=8)
        first = slice_of(await bus.reply(sub), 0)
    assert first.session == "s1" and first.expert == EXPERT
    assert first.prompt_tokens == prompt_tokens
    ids, logprobs = first.ids_array(), first.logprobs_array()
    assert len(ids) == 8 and np.all(np.diff(logprobs) <= 0)
    assert first.pieces == [backend.token_bytes[i] for i in ids]
    assert first.rest == pytest.approx(1 - np.exp(logprobs.astype(np.float64)).sum(), abs=1e-6)
    assert first.compute_s > 0
    assert first.energy_j == pytest.approx(15.0 * first.compute_s)


@pytest.mark.parametrize(("asked", "served"), [(0, 5), (3, 3), (100, 10)])
async def test_top_k_defaults_and_limits_come_from_the_config(
    backend: Backend, nats_url: str, asked: int, served: int
) -> None:
    async with expert_on_bus(backend, nats_url, top_k=5, max_top_k=10) as bus:
        sub = await bus.open("k", top_k=asked)
        assert len(slice_of(await bus.reply(sub), 0).ids_array()) == served
        await bus.send("step", wire.Step(session="k", step=1, token=42))
        assert len(slice_of(await bus.reply(sub), 1).ids_array()) == served


async def test_steps_follow_the_greedy_chain_of_the_model(backend: Backend, nats_url: str) -> None:
    expected = greedy_alone(backend, 12)
    async with expert_on_bus(backend, nats_url) as bus:
        assert await greedy_over_bus(bus, "s1", 12) == expected
        await bus.sessions_drop_to(0)  # close freed the session


async def test_heartbeats_announce_the_model_and_the_declared_device(
    backend: Backend, nats_url: str
) -> None:
    device = {"name": "pi5", "power_w": 7.5}
    async with expert_on_bus(backend, nats_url, device=device) as bus:
        first, second = await bus.heartbeat(), await bus.heartbeat()
    info: BackendInfo = backend.info
    assert (first.expert, first.model, first.backend) == (EXPERT, info.model, "transformers")
    assert first.tokenizer == info.tokenizer and first.tokenizer.startswith("SmolLM2")
    assert (first.vocab_size, first.eos_ids) == (49152, [2])
    assert first.quantisation == info.quantisation == "Q4_1"
    assert first.device is not None
    assert (first.device.name, first.device.power_w, first.device.profile) == ("pi5", 7.5, 1)
    assert first.energy_source == "declared"
    assert (first.sessions, first.interval_s) == (0, 0.05)
    assert (first.seq, second.seq) == (1, 2)


class CountingMeter(CounterMeter):
    """A hardware-like counter that gains 0.25 J between two reads."""

    source = "rapl"

    def __init__(self) -> None:
        self.joules = 0.0

    def read_j(self) -> float:
        self.joules += 0.25
        return self.joules


async def test_slices_carry_the_meters_joules_and_heartbeats_name_its_source(
    backend: Backend, nats_url: str
) -> None:
    async with expert_on_bus(backend, nats_url, meter=CountingMeter()) as bus:
        sub = await bus.open("m")
        first = slice_of(await bus.reply(sub), 0)
        await bus.send("step", wire.Step(session="m", step=1, token=int(first.ids_array()[0])))
        second = slice_of(await bus.reply(sub), 1)
        beat = await bus.heartbeat()
    assert (first.energy_j, second.energy_j) == (0.25, 0.25)
    assert first.compute_s > 0 and second.compute_s > 0
    assert beat.energy_source == "rapl"


async def test_a_warmed_up_expert_announces_measured_speeds_in_its_first_heartbeat(
    backend: Backend, nats_url: str
) -> None:
    async with expert_on_bus(backend, nats_url, warmup=True) as bus:
        first = await bus.heartbeat()
        assert first.seq == 1 and first.device is not None
        assert 0 < first.device.decode_s < 5
        assert 0 < first.device.prefill_s_per_token < first.device.decode_s
        sub = await bus.open("p", [wire.ChatMessage("user", "the sea and the sky " * 50)])
        slice_of(await bus.reply(sub), 0)
    assert bus.agent.stats.prefill_s_per_token != first.device.prefill_s_per_token


async def test_an_idle_expert_measures_itself_again(backend: Backend, nats_url: str) -> None:
    async with expert_on_bus(backend, nats_url, warmup=True, remeasure_idle_s=0.2) as bus:
        first = await bus.heartbeat()
        measured = bus.agent.stats.measured_at
        with anyio.fail_after(20):
            while bus.agent.stats.measured_at == measured:
                await bus.heartbeat()
        assert bus.agent.stats.measured_at > measured
        later = await bus.heartbeat()
    assert later.device is not None and first.device is not None
    assert later.device.decode_s > 0 and first.device.decode_s > 0


async def test_without_warm_up_the_first_heartbeat_has_measured_nothing(
    backend: Backend, nats_url: str
) -> None:
    async with expert_on_bus(backend, nats_url) as bus:
        first = await bus.heartbeat()
    assert first.device is not None
    assert (first.device.decode_s, first.device.prefill_s_per_token) == (0.0, 0.0)


async def test_heartbeats_continue_while_a_long_prompt_prefills(
    backend: Backend, nats_url: str
) -> None:
    long_prompt = [wire.ChatMessage("user", "the sea and the sky " * 150)]
    async with expert_on_bus(backend, nats_url) as bus:
        times = [time.monotonic()]
        sub = await bus.open("long", long_prompt)
        async with anyio.create_task_group() as tg:

            async def note_beats() -> None:
                while True:
                    await bus.heartbeat()
                    times.append(time.monotonic())

            tg.start_soon(note_beats)
            first = slice_of(await bus.reply(sub), 0)
            times.append(time.monotonic())
            tg.cancel_scope.cancel()
    assert first.compute_s > 0.2  # long enough for a blocked event loop to show
    assert max(np.diff(times)) < first.compute_s / 2


async def test_two_sessions_interleaved_match_each_alone(backend: Backend, nats_url: str) -> None:
    expected = greedy_alone(backend, 6)
    async with expert_on_bus(backend, nats_url) as bus, anyio.create_task_group() as tg:
        results: dict[str, list[int]] = {}

        async def run(session: str) -> None:
            results[session] = await greedy_over_bus(bus, session, 6)

        for session in ("a", "b", "c"):
            tg.start_soon(run, session)
    assert results == {"a": expected, "b": expected, "c": expected}


async def test_a_step_sent_right_behind_its_open_waits_for_the_prefill(
    backend: Backend, nats_url: str
) -> None:
    async with expert_on_bus(backend, nats_url) as bus:
        sub = await bus.open("eager")
        await bus.send("step", wire.Step(session="eager", step=1, token=42))
        slice_of(await bus.reply(sub), 0)
        slice_of(await bus.reply(sub), 1)


# --- refusals that name a session ------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [wire.ChatMessage("user", "")],
        [wire.ChatMessage("system", ""), wire.ChatMessage("user", "")],
    ],
)
async def test_an_empty_prompt_is_refused(
    backend: Backend, nats_url: str, messages: list[wire.ChatMessage]
) -> None:
    async with expert_on_bus(backend, nats_url) as bus:
        sub = await bus.open("empty", messages)
        error_of(await bus.reply(sub), "empty_prompt", 0)
        await greedy_over_bus(bus, "after", 2)


async def test_a_prompt_longer_than_the_context_is_refused_with_both_lengths(
    backend: Backend, nats_url: str
) -> None:
    n = len(backend.encode_chat(HELLO))
    async with expert_on_bus(backend, nats_url, max_context=16) as bus:
        sub = await bus.open("long")
        error = error_of(await bus.reply(sub), "prompt_too_long", 0)
        assert f"{n} tokens" in error.message and "16 tokens" in error.message
        await bus.sessions_drop_to(0)


async def test_a_full_context_refuses_the_next_step(backend: Backend, nats_url: str) -> None:
    n = len(backend.encode_chat(HELLO))
    async with expert_on_bus(backend, nats_url, max_context=n + 2) as bus:
        sub = await bus.open("full")
        token = int(slice_of(await bus.reply(sub), 0).ids_array()[0])
        await bus.send("step", wire.Step(session="full", step=1, token=token))
        slice_of(await bus.reply(sub), 1)
        await bus.send("step", wire.Step(session="full", step=2, token=token))
        error = error_of(await bus.reply(sub), "prompt_too_long", 2)
        assert "context is full" in error.message and f"{n + 2}-token" in error.message


async def test_a_step_for_an_unknown_session_is_refused(backend: Backend, nats_url: str) -> None:
    async with expert_on_bus(backend, nats_url) as bus:
        sub = await bus.listen("ghost")
        await bus.send("step", wire.Step(session="ghost", step=1, token=5))
        error_of(await bus.reply(sub), "unknown_session", 1)


async def test_a_wrong_step_is_refused_and_nothing_advances(
    backend: Backend, nats_url: str
) -> None:
    expected = greedy_alone(backend, 3)

    async def step(bus: Bus, sub: Any, n: int, token: int) -> wire.Message:
        await bus.send("step", wire.Step(session="s", step=n, token=token))
        return await bus.reply(sub)

    async with expert_on_bus(backend, nats_url) as bus:
        sub = await bus.open("s")
        slice_of(await bus.reply(sub), 0)
        error = error_of(await step(bus, sub, 2, expected[0]), "wrong_step", 2)  # ahead
        assert error.message == "expected step 1, got 2"
        error_of(await step(bus, sub, 0, expected[0]), "wrong_step", 0)  # behind
        assert int(slice_of(await step(bus, sub, 1, expected[0]), 1).ids_array()[0]) == expected[1]
        error_of(await step(bus, sub, 1, expected[0]), "wrong_step", 1)  # a duplicate
        assert int(slice_of(await step(bus, sub, 2, expected[1]), 2).ids_array()[0]) == expected[2]


async def test_a_token_outside_the_vocabulary_is_refused(backend: Backend, nats_url: str) -> None:
    async with expert_on_bus(backend, nats_url) as bus:
        sub = await bus.open("s")
        slice_of(await bus.reply(sub), 0)
        for token in (49152, -1):
            await bus.send("step", wire.Step(session="s", step=1, token=token))
            error_of(await bus.reply(sub), "invalid_field", 1)
        await bus.send("step", wire.Step(session="s", step=1, token=42))
        slice_of(await bus.reply(sub), 1)


async def test_a_second_open_of_a_live_session_is_refused(backend: Backend, nats_url: str) -> None:
    async with expert_on_bus(backend, nats_url) as bus:
        sub = await bus.open("s")
        slice_of(await bus.reply(sub), 0)
        await bus.send("open", wire.Open(session="s", messages=HELLO))
        assert "already open" in error_of(await bus.reply(sub), "invalid_field", 0).message
        await bus.send("step", wire.Step(session="s", step=1, token=42))
        slice_of(await bus.reply(sub), 1)


async def test_a_message_on_the_wrong_verb_subject_is_refused(
    backend: Backend, nats_url: str
) -> None:
    async with expert_on_bus(backend, nats_url) as bus:
        sub = await bus.listen("s")
        await bus.send("step", wire.Open(session="s", messages=HELLO))
        reply = await bus.nc.request(
            bus.s.expert_step(EXPERT), wire.encode(wire.Open(session="s", messages=HELLO))
        )
        assert (
            "carries moe2.v1.step" in error_of(wire.decode(reply.data), "unknown_type", -1).message
        )
        with pytest.raises(nats.errors.TimeoutError):  # no session was opened or answered
            await sub.next_msg(timeout=0.2)
        assert bus.agent.error_counts() == {"unknown_type": 2} and bus.agent.sessions == 0


async def test_the_session_limit_answers_busy(backend: Backend, nats_url: str) -> None:
    async with expert_on_bus(backend, nats_url, max_sessions=1) as bus:
        first = await bus.open("one")
        slice_of(await bus.reply(first), 0)
        second = await bus.open("two")
        error_of(await bus.reply(second), "busy", 0)


async def test_an_idle_session_is_freed(backend: Backend, nats_url: str) -> None:
    with structlog.testing.capture_logs() as logs:
        async with expert_on_bus(backend, nats_url, idle_timeout_s=0.3) as bus:
            sub = await bus.open("idle")
            slice_of(await bus.reply(sub), 0)
            await bus.sessions_drop_to(0)
            await bus.send("step", wire.Step(session="idle", step=1, token=42))
            error_of(await bus.reply(sub), "unknown_session", 1)
    assert any(e["event"] == "session_idle_freed" and e["session"] == "idle" for e in logs)


# --- messages that name no session: dropped, logged, counted --------------------------------

_open = {"type": "moe2.v1.open", "session": "bad", "messages": [{"role": "user", "content": "x"}]}
_slice = wire.make_slice(
    session="bad", expert="z", step=0, ids=np.zeros(1), logprobs=np.zeros(1), pieces=[b""]
)


@pytest.mark.parametrize(
    ("verb", "data", "code"),
    [
        ("open", b"\xc1 not msgpack", "malformed"),
        ("open", msgspec.msgpack.encode([1, 2, 3]), "malformed"),
        ("open", msgspec.msgpack.encode({**_open, "type": "moe2.v2.open"}), "unsupported_version"),
        ("open", msgspec.msgpack.encode({**_open, "type": "moe2.v1.bogus"}), "unknown_type"),
        (
            "step",
            msgspec.msgpack.encode({"type": "moe2.v1.step", "session": "bad"}),
            "invalid_field",
        ),
        ("open", msgspec.msgpack.encode({**_open, "session": "a.b"}), "invalid_field"),
        ("open", msgspec.msgpack.encode({**_open, "session": 7}), "invalid_field"),
        ("open", wire.encode(_slice), "unknown_type"),
    ],
    ids=["bytes", "list", "v2", "bogus", "missing", "dotted", "typed", "slice"],
)
async def test_bad_messages_are_dropped_logged_and_counted(
    backend: Backend, nats_url: str, verb: str, data: bytes, code: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with expert_on_bus(backend, nats_url) as bus:
            bad = await bus.listen("bad")
            await bus.raw(verb, data)
            await greedy_over_bus(bus, "after", 2)  # handled after the bad one, in order
            with pytest.raises(nats.errors.TimeoutError):
                await bad.next_msg(timeout=0.2)
            assert bus.agent.error_counts() == {code: 1}
    dropped = [e for e in logs if e["event"] == "message_dropped"]
    assert [e["code"] for e in dropped] == [code]
    assert dropped[0]["subject"].endswith(f".expert.{EXPERT}.{verb}")


class FailingDecode:
    """The real backend, except that decode raises."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.info = inner.info
        self.token_bytes = inner.token_bytes

    def encode_chat(self, messages: Any) -> list[int]:
        return self.inner.encode_chat(messages)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def encode_answer(self, text: str) -> list[int]:
        return self.inner.encode_answer(text)

    def keep_prefix(self, ids: Any) -> PrefixCache | None:
        return self.inner.keep_prefix(ids)

    def prefill(self, session: str, prompt_ids: Any, top_k: int, prefix: Any = None) -> TopK:
        return self.inner.prefill(session, prompt_ids, top_k, prefix)

    def score(self, prompt_ids: Any, targets_ids: Any, top_k: int, prefix: Any = None) -> Any:
        return self.inner.score(prompt_ids, targets_ids, top_k, prefix)

    def decode(self, session: str, token: int, top_k: int) -> TopK:
        raise RuntimeError("the accelerator caught fire")

    def decode_batch(self, requests: Any) -> list[TopK]:
        raise RuntimeError("the accelerator caught fire")

    def rewrite(self, session: str, ids: Any, top_k: int) -> TopK:
        raise RuntimeError("the accelerator caught fire")

    def release(self, session: str) -> None:
        self.inner.release(session)


async def test_a_failing_model_call_answers_internal_and_the_agent_lives_on(
    backend: Backend, nats_url: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with expert_on_bus(FailingDecode(backend), nats_url) as bus:
            sub = await bus.open("s")
            slice_of(await bus.reply(sub), 0)
            await bus.send("step", wire.Step(session="s", step=1, token=42))
            error_of(await bus.reply(sub), "internal", 1)
            await bus.send("step", wire.Step(session="s", step=1, token=42))
            error_of(await bus.reply(sub), "unknown_session", 1)  # the session was ended
            again = await bus.open("t")
            slice_of(await bus.reply(again), 0)
            assert bus.agent.error_counts() == {"internal": 1, "unknown_session": 1}
    assert any(e["event"] == "handler_failed" and e["exc_info"] for e in logs)


# --- the process a user starts ---------------------------------------------------------------


@asynccontextmanager
async def expert_process(
    command: list[str], url: str, prefix: str, expert: str
) -> AsyncIterator[tuple[Any, NATS, wire.Message, bytearray]]:
    """A real expert process, once its first heartbeat is in: the process, a connection of the
    test's own, that heartbeat, and everything the process has written so far."""
    nc = await connect_nats(url, name="test-watch")
    beats = await nc.subscribe(Subjects(prefix).member(expert))
    await nc.flush()
    output = bytearray()
    try:
        with anyio.fail_after(120):
            async with (
                await anyio.open_process(command, stderr=subprocess.STDOUT) as proc,
                anyio.create_task_group() as tg,
            ):
                assert proc.stdout is not None
                tg.start_soon(collect, proc.stdout, output)
                first = wire.decode((await beats.next_msg(timeout=110)).data)
                yield proc, nc, first, output
    finally:
        await nc.close()


async def test_serve_expert_runs_until_sigterm(nats_url: str) -> None:
    code = (
        "import anyio, sys; from moe2.agents.expert.agent import ExpertConfig, serve_expert; "
        "anyio.run(serve_expert, sys.argv[1], ExpertConfig('proc', prefix='proc'))"
    )
    command = [sys.executable, "-c", code, nats_url]
    async with expert_process(command, nats_url, "proc", "proc") as (proc, _, heartbeat, output):
        assert isinstance(heartbeat, wire.Heartbeat) and heartbeat.expert == "proc"
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0, output.decode(errors="replace")[-2000:]
    assert b"expert_stopped" in output


async def test_sigterm_while_busy_with_abandoned_scores_stops_within_seconds(
    nats_url: str,
) -> None:
    """32 long Score requests whose requester has given up (nobody reads the replies): SIGTERM
    drops the queued ones and the one on the model, and the process exits within seconds."""
    command = [sys.executable, "-m", "moe2", "expert", "--id", "busy", "--prefix", "busy"]
    command += ["--no-warmup", "--nats", nats_url]
    long_target = "the sea and the sky and the land " * 40
    request = wire.Score([wire.ChatMessage("user", "Describe the world.")], [long_target] * 4)
    async with expert_process(command, nats_url, "busy", "busy") as (proc, nc, _, output):
        for _ in range(32):  # replies go to an inbox nobody listens on
            subject = Subjects("busy").expert_score("busy")
            await nc.publish(subject, wire.encode(request), reply=nc.new_inbox())
        await nc.flush()
        await anyio.sleep(1.0)  # the first score is on the model, 31 are queued
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0, output.decode(errors="replace")[-2000:]
        took = time.monotonic() - stopped_at
    assert took < 5.0, f"stopping took {took:.1f} s: " + output.decode(errors="replace")[-3000:]


async def collect(stream: Any, into: bytearray) -> None:
    async for chunk in stream:
        into.extend(chunk)
