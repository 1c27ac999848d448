"""Conversations that keep their experts and their KV caches, on real SmolLM2 experts through a
real nats-server: a later turn goes to the first turn's experts, prefills only its new tokens,
and answers exactly as the same turn asked cold; an eviction or a restart only costs time."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import openai
import pytest
from anyio.abc import TaskGroup
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

import moe2
from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends import Backend, load_backend
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.expert.conversations import ConversationStore
from moe2.agents.expert.models import resolve_model
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.agents.fusion.conversations import ConversationRoutes
from moe2.gateway_bodies import ChatBody, QuestionDefaults
from moe2.gating import Gate
from moe2.runtime import wire
from moe2.runtime.client import new_conversation
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import Subjects
from moe2.runtime.wire import ChatMessage

pytestmark = [pytest.mark.anyio, pytest.mark.model]
_prefixes = (f"cv{i}" for i in itertools.count())
TURN1 = [ChatMessage("user", "Name three colours of the sea.")]
QUESTION2 = "Which of them is the darkest?"
ANSWER_TOKENS = 12


def turn2(answer: str) -> list[ChatMessage]:
    return [*TURN1, ChatMessage("assistant", answer), ChatMessage("user", QUESTION2)]


@pytest.fixture(scope="module")
def second_backend() -> TransformersBackend:
    """A second SmolLM2 (agents in one process never share a backend object)."""
    loaded = load_backend("transformers", resolve_model())
    assert isinstance(loaded, TransformersBackend)
    return loaded


@pytest.fixture
def two(smollm2: TransformersBackend, second_backend: TransformersBackend) -> dict[str, Backend]:
    """Two experts' backends, e1 and e2."""
    return {"e1": smollm2, "e2": second_backend}


@dataclass
class Pool:
    """Experts and one fusion agent under a fresh prefix, and a client."""

    url: str
    prefix: str
    tg: TaskGroup
    client: moe2.Client
    fusion: FusionAgent
    experts: dict[str, ExpertAgent] = field(default_factory=dict)
    stops: dict[str, tuple[anyio.CancelScope, anyio.Event]] = field(default_factory=dict)

    async def start_expert(self, expert: str, backend: Backend, **config: Any) -> ExpertAgent:
        cfg = ExpertConfig(
            expert_id=expert,
            prefix=self.prefix,
            heartbeat_s=0.3,  # missed twice: gone (a loaded box may stall a loop for 0.2 s)
            warmup=False,
            energy_source="declared",
            discovery=False,
            **config,
        )
        nc = await connect_nats(self.url, name=f"test-{expert}")
        agent = ExpertAgent(nc, backend, cfg)
        scope, stopped = anyio.CancelScope(), anyio.Event()

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                with scope:
                    await agent.run(task_status=task_status)
            finally:
                with anyio.CancelScope(shield=True):
                    await close_nats(nc)
                stopped.set()

        await self.tg.start(serve)
        self.experts[expert], self.stops[expert] = agent, (scope, stopped)
        return agent

    async def stop_expert(self, expert: str) -> None:
        """Stop the expert as its process would end: gone from the bus when this returns."""
        scope, stopped = self.stops.pop(expert)
        scope.cancel()
        with anyio.fail_after(10):
            await stopped.wait()
        self.experts.pop(expert)

    def live(self, expert: str) -> bool:
        """Whether the fusion agent counts ``expert`` as live now."""
        return expert in self.fusion.membership.live(time.monotonic())

    async def ask(self, messages: list[ChatMessage], conversation: str | None) -> wire.Final:
        with anyio.fail_after(120):
            answer = self.client.ask(messages, max_tokens=ANSWER_TOKENS, conversation=conversation)
            return await answer.collect()


class HistoryGate:
    """A gate that changes its mind as the history grows: e1 first for a prompt of one message,
    e2 first for a longer one, so a later turn planned afresh would go to other experts."""

    def gate(self, messages: Sequence[ChatMessage], experts: Sequence[str]) -> list[float]:
        first = "e1" if len(messages) == 1 else "e2"
        return [3.0 if e == first else 1.0 for e in experts]


@asynccontextmanager
async def pool(
    url: str, backends: dict[str, Backend], gate: Gate | None = None, **config: Any
) -> AsyncIterator[Pool]:
    prefix = next(_prefixes)
    nc = await connect_nats(url, name="test-fusion")
    try:
        async with anyio.create_task_group() as tg, moe2.connect(url, prefix=prefix) as client:
            fusion_config = FusionConfig(
                prefix=prefix, step_deadline_s=30, prefill_deadline_s=60, discovery=False
            )
            fusion = FusionAgent(nc, fusion_config, gate=gate)
            await tg.start(fusion.run)
            bus = Pool(url, prefix, tg, client, fusion)
            for expert, backend in backends.items():
                await bus.start_expert(expert, backend, **config)
            await fusion.wait_for_experts(len(backends), limit_s=30)
            yield bus
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


async def until(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait, bounded, for what the agents show only in their figures (no event to wait on)."""
    with anyio.fail_after(limit_s):
        while not condition():  # noqa: ASYNC110  # a metric or a membership table has no event
            await anyio.sleep(0.02)


def sample(agent: ExpertAgent | FusionAgent, name: str, **labels: str) -> float:
    """A metric as a user scraping /metrics reads it."""
    return agent.metrics.registry.get_sample_value(name, labels) or 0.0


def prefilled(agent: ExpertAgent) -> float:
    return sample(agent, "moe2_expert_conversation_prompt_tokens_total", kind="prefilled")


def turns(agent: ExpertAgent, start: str) -> float:
    return sample(agent, "moe2_expert_conversation_turns_total", start=start)


async def test_turn_two_keeps_its_experts_prefills_only_new_tokens_and_answers_as_cold(
    nats_url: str, two: dict[str, Backend]
) -> None:
    async with pool(nats_url, two, HistoryGate()) as bus:
        cid = new_conversation()
        first = await bus.ask(TURN1, cid)
        assert first.usage.completion_tokens == ANSWER_TOKENS  # "length": 11 tokens were fed
        cold = await bus.ask(turn2(first.text), None)
        before = {e: prefilled(a) for e, a in bus.experts.items()}
        warm = await bus.ask(turn2(first.text), cid)
        after = {e: prefilled(a) for e, a in bus.experts.items()}
    # two copies of one model fuse to that model whatever the weights: the same greedy text,
    # whether each expert started from its kept cache (warm) or prefilled it all (cold)
    assert warm.text == cold.text
    assert cold.experts == ["e2", "e1"]  # the gate's choice for this history
    assert warm.experts == first.experts == ["e1", "e2"]  # the first turn's, kept
    assert warm.weights == first.weights == [0.75, 0.25]
    assert sample(bus.fusion, "moe2_fusion_conversation_turns_total", outcome="kept") == 1
    # Each expert computed only what follows turn 1's prompt and the 11 answer tokens it was fed.
    ids1, ids2 = two["e1"].encode_chat(TURN1), two["e1"].encode_chat(turn2(first.text))
    new_tokens = len(ids2) - len(ids1) - (ANSWER_TOKENS - 1)
    assert 0 < new_tokens < 25 < len(ids2)
    for expert in ("e1", "e2"):
        assert after[expert] - before[expert] == new_tokens
        assert turns(bus.experts[expert], "resumed") == 1
        assert turns(bus.experts[expert], "cold") == 1  # turn 1


async def test_an_evicted_or_restarted_expert_answers_the_same_turn_cold(
    nats_url: str, two: dict[str, Backend]
) -> None:
    other = [ChatMessage("user", "What is the capital of France?")]
    async with pool(nats_url, two, max_conversations=1) as bus:
        cid = new_conversation()
        first = await bus.ask(TURN1, cid)
        cold = await bus.ask(turn2(first.text), None)
        await bus.ask(other, new_conversation())  # one kept per expert: turn 1's is evicted
        e1 = bus.experts["e1"]
        await until(  # when the expert has handled the Close that follows the Final
            lambda: sample(e1, "moe2_expert_conversations_evicted_total", reason="count") == 1
        )
        evicted = await bus.ask(turn2(first.text), cid)
        assert turns(e1, "resumed") == 0 and turns(e1, "cold") == 3
        # turn 3 after a restart of e1: the new process has no cache, e2 still has its own
        third = [*turn2(evicted.text), ChatMessage("assistant", evicted.text)]
        third.append(ChatMessage("user", "Why?"))
        cold3 = await bus.ask(third, None)
        await bus.stop_expert("e1")
        await until(lambda: not bus.live("e1"))
        restarted_backend = load_backend("transformers", resolve_model())
        restarted = await bus.start_expert("e1", restarted_backend, max_conversations=1)
        await until(lambda: bus.live("e1"))
        warm3 = await bus.ask(third, cid)
        assert turns(restarted, "cold") == 1
        assert turns(bus.experts["e2"], "resumed") == 1
    assert evicted.text == cold.text
    assert warm3.text == cold3.text
    assert warm3.experts == first.experts == ["e1", "e2"]


async def test_a_turn_whose_expert_has_gone_is_planned_again_and_says_so(
    nats_url: str, two: dict[str, Backend]
) -> None:
    async with pool(nats_url, two) as bus:
        cid = new_conversation()
        first = await bus.ask(TURN1, cid)
        await bus.stop_expert("e2")
        await until(lambda: not bus.live("e2"))
        again = await bus.ask(turn2(first.text), cid)
    assert again.experts == ["e1"]
    assert sample(bus.fusion, "moe2_fusion_conversation_turns_total", outcome="rerouted") == 1


async def test_bad_conversation_ids_are_refused_with_invalid_field(
    nats_url: str, smollm2: TransformersBackend
) -> None:
    async with pool(nats_url, {"e1": smollm2}) as bus:
        for bad in ("a.b", "", "x" * 65, "with space", "*"):
            with pytest.raises(Moe2Error) as refused:
                bus.client.ask("Hi", conversation=bad)
            assert refused.value.code == ErrorCode.INVALID_FIELD
            assert "conversation" in refused.value.message
        # another language's client sends the id anyway: the fusion agent answers an Error
        nc = bus.client.nc
        body = {"type": "moe2.v1.prompt", "messages": [{"role": "user", "content": "Hi"}]}
        reply = await nc.request(
            Subjects(bus.prefix).prompt,
            msgspec.msgpack.encode({**body, "conversation": "a.b"}),
            timeout=10,
        )
        error = wire.decode(reply.data)
        assert isinstance(error, wire.Error) and error.code == "invalid_field"
        assert "conversation" in error.message
        # ... and an expert refuses an Open with one (to its reply subject: no session is named)
        subjects = Subjects(bus.prefix)
        open_ = {"type": "moe2.v1.open", "session": "s1", "messages": body["messages"]}
        bad_open = msgspec.msgpack.encode({**open_, "conversation": "a b"})
        answered = await nc.request(subjects.expert_open("e1"), bad_open, timeout=10)
        refused_open = wire.decode(answered.data)
        assert isinstance(refused_open, wire.Error) and refused_open.code == "invalid_field"
        assert "conversation" in refused_open.message
        assert bus.experts["e1"].sessions == 0
    with pytest.raises(ValidationError, match="conversation"):
        ChatBody.model_validate(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "Hi"}],
                "moe2": {"conversation": "a.b"},
            }
        )
    body_ok = ChatBody.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Hi"}],
            "moe2": {"conversation": "c-1"},
        }
    )
    assert body_ok.question(QuestionDefaults()).conversation == "c-1"


# --- the store and the routes, without a bus --------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def kept_turn(store: ConversationStore, backend: Backend, conversation: str, text: str) -> int:
    """One short turn of ``conversation`` on ``backend``, kept: the tokens it holds."""
    ids = backend.encode_chat([ChatMessage("user", text)])
    session = f"s-{conversation}"
    store.start(session, conversation, ids, 4, None)
    store.keep(session, conversation)
    return len(ids)


def test_the_store_evicts_the_least_recently_used_over_its_bounds_and_when_idle(
    smollm2: TransformersBackend,
) -> None:
    clock = Clock()
    sessions = smollm2.sessions
    store = ConversationStore(
        smollm2, max_conversations=2, max_tokens=10_000, idle_s=60, clock=clock
    )
    size = kept_turn(store, smollm2, "a", "One")
    kept_turn(store, smollm2, "b", "Two")
    clock.now = 1
    ids = smollm2.encode_chat([ChatMessage("user", "One"), ChatMessage("assistant", "Yes")])
    started = store.start("s-a2", "a", ids, 4, None)  # "a" is used: "b" is now the oldest
    assert started.reused == size - 1 or started.reused == size
    assert started.prefilled == len(ids) - started.reused
    store.keep("s-a2", "a")
    kept_turn(store, smollm2, "c", "Three")
    assert ("a" in store, "b" in store, "c" in store) == (True, False, True)
    store.max_tokens = store.tokens - 1  # over the token budget: the oldest goes
    kept_turn(store, smollm2, "c", "Three")
    assert ("a" in store, "c" in store) == (False, True)
    clock.now = 1000
    store.expire()
    assert len(store) == 0 and store.tokens == 0
    assert smollm2.sessions == sessions  # every kept cache was released in the backend


def test_routes_are_bounded_least_recently_used_and_forgotten_after_their_ttl() -> None:
    clock = Clock()
    routes = ConversationRoutes(capacity=2, ttl_s=10, clock=clock)
    routes.remember("a", ["e1", "e2"], [0.5, 0.5])
    routes.remember("b", ["e1"], [1.0])
    assert routes.route("a", {"e1", "e2"})[0] is not None  # "a" used: "b" is the oldest
    routes.remember("c", ["e2"], [1.0])
    assert routes.route("b", {"e1", "e2"}) == (None, False)
    assert routes.route("a", {"e1"}) == (None, True)  # e2 has gone: plan again
    assert routes.route("a", {"e1", "e2"}) == (None, False)
    clock.now = 10
    assert routes.route("c", {"e2"}) == (None, False)
    assert len(routes) == 0


async def test_the_gateway_takes_the_conversation_from_the_moe2_field(
    nats_url: str, smollm2: TransformersBackend
) -> None:
    """The official openai client, unchanged: ``extra_body={"moe2": {"conversation": id}}``."""
    from tests.test_gateway import (
        error_of,
        stack,
    )  # its stack: an expert, a fusion agent, a gateway

    cid = new_conversation()
    history: list[dict[str, str]] = [{"role": "user", "content": TURN1[0].content}]
    async with stack(nats_url, smollm2) as s:
        create = s.openai.chat.completions.create
        same: dict[str, Any] = {"model": s.model, "temperature": 0.0, "max_tokens": ANSWER_TOKENS}
        first = await create(messages=history, extra_body={"moe2": {"conversation": cid}}, **same)
        history += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": QUESTION2},
        ]
        expert = s.experts[0]
        await s.until(s.idle)
        cold = await create(messages=history, **same)
        await s.until(s.idle)
        warm = await create(messages=history, extra_body={"moe2": {"conversation": cid}}, **same)
        with pytest.raises(openai.BadRequestError) as caught:
            await create(messages=history, extra_body={"moe2": {"conversation": "a.b"}}, **same)
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert turns(expert, "resumed") == 1 and turns(expert, "cold") == 1
    assert sample(expert, "moe2_expert_conversation_prompt_tokens_total", kind="reused") > 40
    assert error_of(caught)["param"] == "moe2.conversation"


def test_a_full_llamacpp_context_gives_back_the_least_recently_used_conversation() -> None:
    """llama.cpp's kept caches hold sequences of its one context: a session that finds none
    free (``busy``) gets the oldest kept conversation's."""
    pytest.importorskip("llama_cpp", reason="pip install 'moe2[llamacpp]'")
    backend = load_backend("llamacpp", resolve_model(), threads=1)
    backend._free = backend._free[-2:]  # type: ignore[attr-defined]  # two sequences left
    registry = CollectorRegistry()
    store = ConversationStore(
        backend, max_conversations=8, max_tokens=10_000, idle_s=60, registry=registry
    )
    kept_turn(store, backend, "a", "One")
    kept_turn(store, backend, "b", "Two")
    ids = backend.encode_chat([ChatMessage("user", "Three")])
    with pytest.raises(Moe2Error) as full:
        backend.prefill("alone", ids, 4)  # both sequences hold kept conversations
    assert full.value.code == ErrorCode.BUSY
    started = store.start("s-c", None, ids, 4, None)
    assert started.prefilled == len(ids) and len(started.top.ids) == 4
    assert ("a" in store, "b" in store) == (False, True)
    evicted = "moe2_expert_conversations_evicted_total"
    assert registry.get_sample_value(evicted, {"reason": "room"}) == 1
    backend.release("s-c")
    store.clear()
