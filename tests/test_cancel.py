"""A client that stops reading ends its session on every expert within a step: it breaks out of
the answer, publishes a Cancel, times out, or disconnects (docs/protocol.md §5)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import numpy as np
import pytest
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

import moe2
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats, flush_subscriptions
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import Subjects
from tests.scripted import Script, ScriptedExpert

pytestmark = pytest.mark.anyio
_prefixes = (f"c{i}" for i in itertools.count())
ENDLESS = b"an answer that goes on and on " * 40  # no EOS within 500 tokens


@dataclass
class Seen:
    """What one expert received, with an event per change."""

    steps: list[int] = field(default_factory=list)
    closes: list[wire.Close] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def note(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class RecordingExpert(ScriptedExpert):
    """A scripted expert that also notes every Step and Close it receives."""

    def __init__(self, nc: NATS, expert: str, script: Script, prefix: str, seen: Seen) -> None:
        super().__init__(nc, expert, script, prefix)
        self.seen = seen

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        closes = await self.nc.subscribe(self.s.expert_close(self.expert), cb=self._on_close)
        await flush_subscriptions(self.nc)
        try:
            await super().run(task_status=task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await closes.unsubscribe()

    async def _on_close(self, msg: Msg) -> None:
        close = wire.decode(msg.data)
        assert isinstance(close, wire.Close)
        self.seen.closes.append(close)
        self.seen.note()

    async def _answer(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.Step):
            self.seen.steps.append(msg.step)
            self.seen.note()
        await super()._answer(msg)


@dataclass
class Bus:
    client: moe2.Client
    agent: FusionAgent
    seen: dict[str, Seen]
    subjects: Subjects

    async def until(self, ok: Callable[[], bool], limit: float = 5.0) -> None:
        """Wait, bounded, until ``ok()`` holds; re-checked whenever an expert receives a message."""
        with anyio.fail_after(limit):
            while not ok():
                with anyio.move_on_after(0.02):  # the agent's session count has no event
                    await self.seen["a"].changed.wait()

    async def started(self) -> tuple[Subscription, wire.Chunk]:
        """A 500-token question asked by hand: its inbox, once its first Chunk is in."""
        nc = self.client.nc
        inbox = await nc.subscribe(nc.new_inbox())
        await flush_subscriptions(nc)
        prompt = wire.Prompt(messages=[wire.ChatMessage("user", "x")], max_tokens=500)
        await self.client.publish_prompt(prompt, reply=inbox.subject)
        first = wire.decode((await inbox.next_msg(timeout=5)).data)
        assert isinstance(first, wire.Chunk)
        return inbox, first

    async def closed(self, reason: str = "cancelled") -> None:
        await self.until(lambda: all(s.closes for s in self.seen.values()))
        assert [[c.reason for c in s.closes] for s in self.seen.values()] == [[reason]] * len(
            self.seen
        )
        await self.until(lambda: self.agent.sessions == 0)


@asynccontextmanager
async def bus(url: str, delay_s: float = 0.05, **config: object) -> AsyncIterator[Bus]:
    """Two recording experts writing an endless answer, 50 ms a step, and one fusion agent."""
    prefix = next(_prefixes)
    cfg = FusionConfig(prefix=prefix, **{"step_deadline_s": 2.0, **config})  # type: ignore[arg-type]
    nc = await connect_nats(url, name="test-cancel")
    seen = {"a": Seen(), "b": Seen()}
    try:
        async with anyio.create_task_group() as tg, moe2.connect(url, prefix=prefix) as client:
            for expert, s in seen.items():
                script = Script(text=ENDLESS, delay_s=delay_s)
                await tg.start(RecordingExpert(nc, expert, script, prefix, s).run)
            agent = FusionAgent(nc, cfg)
            await tg.start(agent.run)
            await agent.wait_for_experts(2, limit_s=5)
            yield Bus(client, agent, seen, Subjects(prefix))
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


async def test_breaking_out_after_5_chunks_closes_every_expert_within_a_step(
    nats_url: str,
) -> None:
    async with bus(nats_url) as b:
        with anyio.fail_after(10):
            answer = b.client.ask("x", max_tokens=500)
            got = 0
            async for _ in answer:
                got += 1
                if got == 5:
                    break
            await b.closed("cancelled")
        assert answer.final is None and answer.session
        for s in b.seen.values():  # Step 5 was in flight when chunk 5 left; at most one more
            assert max(s.steps) <= 6, s.steps


async def test_a_published_cancel_ends_the_session_and_no_final_follows(nats_url: str) -> None:
    async with bus(nats_url) as b:
        nc = b.client.nc
        with anyio.fail_after(10):
            inbox, first = await b.started()
            cancel = wire.Cancel(session=first.session, reason="user pressed stop")
            await nc.publish(b.subjects.cancel(first.session), wire.encode(cancel))
            await b.closed("cancelled")
        steps = max(b.seen["a"].steps)
        with anyio.move_on_after(0.3):  # whatever was in flight may land; then nothing at all
            while True:
                msg = wire.decode((await inbox.next_msg(timeout=1)).data)
                assert isinstance(msg, wire.Chunk), msg  # never a Final
        assert max(b.seen["a"].steps) == steps


async def test_a_client_that_disconnects_mid_answer_ends_the_session(nats_url: str) -> None:
    async with bus(nats_url) as b:
        gone = await connect_nats(nats_url, name="test-vanishing-client")
        inbox = await gone.subscribe(gone.new_inbox())
        await flush_subscriptions(gone)
        prompt = wire.Prompt(messages=[wire.ChatMessage("user", "x")], max_tokens=500)
        with anyio.fail_after(10):
            await gone.publish(b.subjects.prompt, wire.encode(prompt), reply=inbox.subject)
            for _ in range(3):
                await inbox.next_msg(timeout=5)
            await gone.close()  # no Cancel: the server's no-responders tells the agent
            await b.closed("cancelled")
        assert max(b.seen["a"].steps) <= 6


async def test_a_client_timeout_before_the_first_chunk_ends_the_session(nats_url: str) -> None:
    async with bus(nats_url, delay_s=0.4) as b:
        with anyio.fail_after(10):
            with pytest.raises(Moe2Error) as caught:
                await b.client.ask("x", max_tokens=500, timeout=0.2).collect()
            assert caught.value.code == ErrorCode.TIMEOUT
            await b.closed("cancelled")  # the first Chunk found no inbox
        assert max(b.seen["a"].steps, default=0) <= 2


async def test_the_session_count_drops_and_the_agent_serves_on(nats_url: str) -> None:
    async with bus(nats_url, delay_s=0.0) as b:
        with anyio.fail_after(20):
            for _ in range(3):
                answer = b.client.ask("x", max_tokens=500)
                async for _ in answer:
                    break
            await b.until(lambda: b.agent.sessions == 0)
            # the Closes went out before the count dropped; wait for them to arrive
            await b.until(lambda: [len(s.closes) for s in b.seen.values()] == [3, 3])
            final = await b.client.ask("x", max_tokens=4).collect()
        assert final.text == "an a"


# --- the client keeps to its own session ----------------------------------------------------------


async def test_the_client_ignores_messages_of_another_session(nats_url: str) -> None:
    """A fake fusion agent answers one prompt with two sessions' messages interleaved."""
    prefix = next(_prefixes)
    subjects = Subjects(prefix)
    agent = await connect_nats(nats_url, name="fake-fusion")

    def chunk(session: str, index: int, text: str) -> bytes:
        return wire.encode(wire.Chunk(session=session, index=index, text=text, tokens=[1]))

    def final(session: str, text: str) -> bytes:
        usage = wire.Usage(prompt_tokens=1, completion_tokens=1)
        timings = wire.Timings(0.0, 0.0, 0.0, 0.0, 0.0)
        return wire.encode(
            wire.Final(session, text, "length", usage, timings, ["a"], [1.0], {}, [])
        )

    async def answer(msg: Msg) -> None:
        for data in [
            chunk("mine", 0, "right "),
            chunk("other", 0, "WRONG "),
            final("other", "WRONG"),
            wire.encode(wire.Error(code="busy", message="not for you", session="other")),
            chunk("mine", 1, "answer"),
            final("mine", "right answer"),
        ]:
            await agent.publish(msg.reply, data)

    try:
        await agent.subscribe(subjects.prompt, cb=answer)
        await flush_subscriptions(agent)
        async with moe2.connect(nats_url, prefix=prefix) as client:
            with anyio.fail_after(10):
                got = client.ask("x")
                texts = [c.text async for c in got]
        assert texts == ["right ", "answer"]
        assert got.final is not None and got.final.text == "right answer"
        assert got.session == "mine"
    finally:
        await close_nats(agent)


async def test_bad_messages_with_a_reply_subject_on_session_subjects_get_errors(
    nats_url: str,
) -> None:
    """Slices and Cancels are not requests, but one that asks (has a reply subject) and is not
    taken is told why, like every subject an agent serves (§12)."""
    async with bus(nats_url) as b:
        nc = b.client.nc
        with anyio.fail_after(20):
            _, first = await b.started()
            sid, s = first.session, b.subjects
            forged = _slice(sid, "b", 0)
            cases: list[tuple[str, bytes, ErrorCode]] = [
                (s.cancel(sid), b"\xc1", ErrorCode.MALFORMED),
                (
                    s.cancel(sid),
                    wire.encode(wire.Cancel(session="x" * 32)),
                    ErrorCode.INVALID_FIELD,
                ),
                (
                    s.cancel(sid),
                    wire.encode(wire.Step(session=sid, step=1, token=1)),
                    ErrorCode.UNKNOWN_TYPE,
                ),
                (s.slice(sid, "a"), b"\xc1", ErrorCode.MALFORMED),
                (s.slice(sid, "b"), wire.encode(forged), ErrorCode.INVALID_FIELD),
                (s.slice(sid, "zz"), wire.encode(_slice(sid, "zz", 1)), ErrorCode.NOT_IN_SESSION),
                (s.slice(sid, "a"), wire.encode(_slice(sid, "a", 0)), ErrorCode.WRONG_STEP),
            ]
            for subject, data, code in cases:
                reply = wire.decode((await nc.request(subject, data, timeout=5)).data)
                assert isinstance(reply, wire.Error), (subject, data)
                assert reply.code == code, (subject, data)
                assert reply.session in (sid, ""), reply  # "" when the cancel did not decode
            assert not any(s.closes for s in b.seen.values())  # the session runs on
            slices, cancels = b.agent.endpoint_stats()[2:]
            assert dict(cancels.errors) == {"malformed": 1, "invalid_field": 1, "unknown_type": 1}
            assert dict(slices.errors) == {
                "malformed": 1,
                "invalid_field": 1,
                "not_in_session": 1,
                "wrong_step": 1,
            }
            await nc.publish(s.cancel(sid), wire.encode(wire.Cancel(session=sid)))
            await b.closed("cancelled")


def _slice(session: str, expert: str, step: int) -> wire.Slice:
    return wire.make_slice(
        session=session,
        expert="a" if expert == "b" else expert,  # on b's subject, a slice naming a: a forgery
        step=step,
        ids=np.array([ord("a")]),
        logprobs=np.zeros(1),
        pieces=[b"a"],
    )
