"""The byte path with real models: expert agents and a fusion agent in this process, on a real
nats-server. docs/protocol.md §5 (the expert's append), §7 (the byte path), §10 (membership)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np
import pytest

import moe2
from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.subjects import Subjects

pytestmark = [pytest.mark.anyio, pytest.mark.model]
_prefixes = (f"mx{i}" for i in itertools.count())
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2_twin() -> Iterator[TransformersBackend]:
    """A second SmolLM2 (a backend holds one KV cache per session id, so two experts in one
    process need two backends)."""
    from moe2.agents.expert.backends import load_backend
    from moe2.agents.expert.models import resolve_model

    loaded = load_backend("transformers", resolve_model())
    assert isinstance(loaded, TransformersBackend)
    yield loaded


class Pool:
    """Expert agents, a fusion agent and a client under one fresh prefix; records every Step."""

    def __init__(self, client: moe2.Client, agents: dict[str, ExpertAgent]) -> None:
        self.client, self.agents = client, agents
        self.steps: list[wire.Step] = []

    async def ask(self, question: str = QUESTION, **kwargs: Any) -> wire.Final:
        self.steps.clear()
        with anyio.fail_after(240):
            return await self.client.ask(question, **kwargs).collect()


@asynccontextmanager
async def pool(
    url: str, backends: dict[str, TransformersBackend], **config: Any
) -> AsyncIterator[Pool]:
    prefix = next(_prefixes)
    subjects = Subjects(prefix)
    nc = await connect_nats(url, name="mixed-e2e")
    try:
        async with anyio.create_task_group() as tg, moe2.connect(url, prefix=prefix) as client:
            agents = {
                e: ExpertAgent(
                    nc,
                    b,
                    ExpertConfig(expert_id=e, prefix=prefix, warmup=False, heartbeat_s=0.2),
                )
                for e, b in backends.items()
            }
            for agent in agents.values():
                await tg.start(agent.run)
            cfg = FusionConfig(prefix=prefix, step_deadline_s=60, prefill_deadline_s=120, **config)
            fusion = FusionAgent(nc, cfg)
            await tg.start(fusion.run)
            await fusion.wait_for_experts(len(backends), limit_s=30)
            bus = Pool(client, agents)

            async def record(msg: Any) -> None:
                message = wire.decode(msg.data)
                assert isinstance(message, wire.Step)
                bus.steps.append(message)

            await nc.subscribe(subjects.expert_step("*"), cb=record)
            await nc.flush()
            yield bus
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


async def test_one_expert_fused_by_bytes_answers_as_by_id(
    nats_url: str, smollm2: TransformersBackend
) -> None:
    async with pool(nats_url, {"s1": smollm2}, fusion_path="ids") as by_id:
        ids = await by_id.ask(max_tokens=40)
        assert {s.text for s in by_id.steps} == {None}
    async with pool(nats_url, {"s1": smollm2}, fusion_path="bytes") as by_bytes:
        text = await by_bytes.ask(max_tokens=40)
        assert by_bytes.steps and all(s.token == -1 and s.text for s in by_bytes.steps)
    assert "Paris" in ids.text
    assert (text.text, text.finish_reason) == (ids.text, ids.finish_reason)
    assert text.usage == ids.usage


async def test_two_experts_fused_by_bytes_answer_as_by_id(
    nats_url: str, smollm2: TransformersBackend, smollm2_twin: TransformersBackend
) -> None:
    experts = {"s1": smollm2, "s2": smollm2_twin}
    question = "Write a haiku about the sea."
    async with pool(nats_url, experts) as auto:  # one tokenizer: by id
        ids = await auto.ask(question, max_tokens=48)
        assert {s.text for s in auto.steps} == {None}
    async with pool(nats_url, experts, fusion_path="bytes") as by_bytes:
        text = await by_bytes.ask(question, max_tokens=48)
        assert by_bytes.steps and {s.token for s in by_bytes.steps} == {-1}
    assert ids.experts == text.experts == ["s1", "s2"]
    assert (text.text, text.finish_reason) == (ids.text, ids.finish_reason)


async def test_text_steps_cut_anywhere_leave_the_history_the_tokenizers_own(
    nats_url: str, smollm2: TransformersBackend
) -> None:
    """Steps whose texts split words, characters (UTF-8 bytes one at a time) and emoji: after
    each, the expert's history is its tokenizer's tokens of the committed bytes, and its slice is
    the one a fresh prefill of prompt + those tokens gives (the cache was cut back correctly)."""
    texts = [b"The capital of Fr", b"ance is Par", b"is", b", na", b"\xc3", b"\xaf", b"ve "]
    texts += [b"caf\xc3", b"\xa9 \xf0\x9f", b"\x8c\x8a", b"!"]  # é and 🌊 split mid-character
    async with pool(nats_url, {"s1": smollm2}) as bus:
        agent = bus.agents["s1"]
        prefix, session = Subjects(agent.config.prefix), "h" * 32
        slices = await bus.client.nc.subscribe(prefix.session_slices(session))
        open_ = wire.Open(session=session, messages=[wire.ChatMessage("user", QUESTION)], top_k=8)
        await bus.client.nc.publish(prefix.expert_open("s1"), wire.encode(open_))
        prompt = smollm2.encode_chat(open_.messages)
        committed = b""
        with anyio.fail_after(120):
            await slices.next_msg(timeout=60)
            for step, text in enumerate(texts, start=1):
                step_ = wire.Step(session=session, step=step, token=-1, text=text)
                await bus.client.nc.publish(prefix.expert_step("s1"), wire.encode(step_))
                got = wire.decode((await slices.next_msg(timeout=60)).data)
                assert isinstance(got, wire.Slice) and got.step == step, got
                committed += text
                history = smollm2._ids[session][len(prompt) :]
                assert b"".join(smollm2.token_bytes[i] for i in history) == committed
                assert history == agent.answer_tokenizer.ids(committed)
        assert committed == "The capital of France is Paris, naïve café 🌊!".encode()
        assert history == smollm2.encode("The capital of France is Paris, naïve café 🌊!")
        fresh = smollm2.prefill("fresh", [*prompt, *history], 8)
        smollm2.release("fresh")
        assert got.ids_array().tolist() == fresh.ids.tolist()
        np.testing.assert_allclose(got.logprobs_array(), fresh.logprobs, atol=2e-3)


async def test_a_text_step_that_is_empty_is_refused(
    nats_url: str, smollm2: TransformersBackend
) -> None:
    async with pool(nats_url, {"s1": smollm2}) as bus:
        prefix, session = Subjects(bus.agents["s1"].config.prefix), "e" * 32
        slices = await bus.client.nc.subscribe(prefix.session_slices(session))
        open_ = wire.Open(session=session, messages=[wire.ChatMessage("user", "Hi")], top_k=4)
        await bus.client.nc.publish(prefix.expert_open("s1"), wire.encode(open_))
        with anyio.fail_after(60):
            await slices.next_msg(timeout=60)
            empty = wire.Step(session=session, step=1, token=-1, text=b"")
            await bus.client.nc.publish(prefix.expert_step("s1"), wire.encode(empty))
            error = wire.decode((await slices.next_msg(timeout=60)).data)
            assert isinstance(error, wire.Error) and error.code == "invalid_field", error
            no_text = wire.Step(session=session, step=1, token=-1)  # an id path step: no id
            await bus.client.nc.publish(prefix.expert_step("s1"), wire.encode(no_text))
            error = wire.decode((await slices.next_msg(timeout=60)).data)
            assert isinstance(error, wire.Error) and error.code == "invalid_field", error
