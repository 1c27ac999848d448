"""Discovery the NATS way (docs/discovery.md): each agent answers ``$SRV.PING``, ``$SRV.INFO``
and ``$SRV.STATS`` in nats.micro's JSON schema, and the fusion agent is an agent of the Synadia
Agent Protocol that the ``synadia-ai-agents`` client finds and prompts with no moe2 code.

One pool: a real nats-server, the real SmolLM2 expert in-process and a fusion agent; a second
fusion agent on a pool with no experts shows how a refusal reaches a protocol caller."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from nats.aio.client import Client as NATS
from synadia_ai.agent_service import AgentService
from synadia_ai.agents import Agents, DiscoverFilter, ProtocolError, ResponseChunk

import moe2
from moe2.agents.discovery import MicroService
from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime.client import Client
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import FUSION_QUEUE, Subjects

pytestmark = [pytest.mark.anyio, pytest.mark.model]
PREFIX = "disc"
EMPTY = "disc-empty"  # a pool with a fusion agent and no expert
ANSWER_TOKENS = 6
QUESTION = "What is the capital of France?"


@dataclass
class Pool:
    nc: NATS
    expert: ExpertAgent
    fusion: FusionAgent


@pytest.fixture
async def pool(nats_url: str, smollm2: TransformersBackend) -> AsyncIterator[Pool]:
    nc = await connect_nats(nats_url, name="test-discovery")
    try:
        async with anyio.create_task_group() as tg:
            config = FusionConfig(prefix=PREFIX, step_deadline_s=30, agent_max_tokens=ANSWER_TOKENS)
            fusion = FusionAgent(nc, config)
            await tg.start(fusion.run)
            await tg.start(FusionAgent(nc, FusionConfig(prefix=EMPTY)).run)
            expert = ExpertAgent(nc, smollm2, ExpertConfig("e0", prefix=PREFIX, warmup=False))
            await tg.start(expert.run)
            await fusion.wait_for_experts(1, limit_s=10)
            yield Pool(nc, expert, fusion)
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


async def gather(nc: NATS, subject: str, payload: bytes = b"") -> list[dict[str, Any]]:
    """Every answer to one request on ``subject`` within a short bounded wait."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, payload, reply=inbox)
    answers: list[dict[str, Any]] = []
    with anyio.move_on_after(0.5):
        async for msg in sub.messages:
            if msg.data:  # not the server's empty no-responders status
                answers.append(json.loads(msg.data))
    await sub.unsubscribe()
    return answers


async def one(nc: NATS, subject: str) -> dict[str, Any]:
    msg = await nc.request(subject, b"", timeout=5)
    answer: dict[str, Any] = json.loads(msg.data)
    return answer


def endpoint(stats: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [e for e in stats["endpoints"] if e["name"] == name]
    return found


async def test_every_agent_answers_ping_with_its_name_and_version(pool: Pool) -> None:
    pings = await gather(pool.nc, "$SRV.PING")
    names = sorted(p["name"] for p in pings if p["name"].startswith("moe2-"))
    assert names == ["moe2-expert", "moe2-fusion", "moe2-fusion"]
    assert {p["type"] for p in pings} == {"io.nats.micro.v1.ping_response"}
    assert {p["version"] for p in pings if p["name"].startswith("moe2-")} == {moe2.__version__}
    [expert] = [p for p in pings if p["name"] == "moe2-expert"]
    assert expert["metadata"]["expert"] == "e0"


async def test_expert_info_names_its_model_and_device_profile(pool: Pool) -> None:
    info = await one(pool.nc, "$SRV.INFO.moe2-expert")
    assert info["type"] == "io.nats.micro.v1.info_response"
    meta, model = info["metadata"], pool.expert.info
    assert (meta["model"], meta["backend"], meta["tokenizer"]) == (
        model.model,
        "transformers",
        model.tokenizer,
    )
    assert meta["quantisation"] == model.quantisation
    assert meta["adapter"] == ""
    assert meta["device"] == pool.expert.config.declared.name
    profile = json.loads(meta["device_profile"])
    assert profile["max_context"] == pool.expert.max_context
    assert profile["power_w"] == pool.expert.config.declared.power_w
    subjects = Subjects(PREFIX)
    served = {e["name"]: e["subject"] for e in info["endpoints"]}
    assert served == {
        "open": subjects.expert_open("e0"),
        "step": subjects.expert_step("e0"),
        "close": subjects.expert_close("e0"),
        "score": subjects.expert_score("e0"),
    }


async def test_fusion_info_names_its_settings(pool: Pool) -> None:
    infos = await gather(pool.nc, "$SRV.INFO.moe2-fusion")
    [info] = [i for i in infos if i["metadata"]["prefix"] == PREFIX]
    meta = info["metadata"]
    assert (meta["gate"], meta["k"], meta["selection"]) == ("uniform", "all", "all-live")
    assert meta["agent"] == pool.fusion.agent_id
    assert meta["experts"] == "1"
    prompt = endpoint(info, "prompt")
    assert (prompt["subject"], prompt["queue_group"]) == (f"{PREFIX}.v1.prompt", FUSION_QUEUE)


async def fusion_stats(nc: NATS, prefix: str = PREFIX) -> dict[str, Any]:
    stats = await gather(nc, "$SRV.STATS.moe2-fusion")
    [ours] = [s for s in stats if s["metadata"]["prefix"] == prefix]
    return ours


async def test_stats_move_after_a_real_question_and_count_errors(pool: Pool) -> None:
    nc = pool.nc
    expert_before = await one(nc, "$SRV.STATS.moe2-expert")
    fusion_before = await fusion_stats(nc)
    answer = Client(nc, prefix=PREFIX).ask(QUESTION, max_tokens=ANSWER_TOKENS, timeout=30)
    final = await answer.collect()
    assert final.usage.completion_tokens > 0
    await nc.request(f"{PREFIX}.v1.prompt", b"not msgpack", timeout=5)  # answered with an Error
    expert_after = await one(nc, "$SRV.STATS.moe2-expert")
    fusion_after = await fusion_stats(nc)
    assert expert_after["type"] == "io.nats.micro.v1.stats_response"
    opened = [endpoint(s, "open") for s in (expert_before, expert_after)]
    assert opened[1]["num_requests"] == opened[0]["num_requests"] + 1
    assert opened[1]["processing_time"] > opened[0]["processing_time"]
    steps = [endpoint(s, "step")["num_requests"] for s in (expert_before, expert_after)]
    assert (
        steps[1] - steps[0] >= final.usage.completion_tokens - 1
    )  # one Step per token after the prefill
    prompts = [endpoint(s, "prompt") for s in (fusion_before, fusion_after)]
    assert prompts[1]["num_requests"] == prompts[0]["num_requests"] + 2
    assert prompts[1]["num_errors"] == prompts[0]["num_errors"] + 1
    assert prompts[1]["last_error"].startswith("[malformed]")
    assert prompts[1]["data"]["errors"]["malformed"] >= 1
    assert prompts[1]["average_processing_time"] > 0
    assert fusion_after["metadata"]["sessions"] == "0"  # the session is over


async def test_control_requests_of_any_payload_leave_agents_serving(pool: Pool) -> None:
    for subject in ("$SRV.PING", "$SRV.INFO.moe2-expert", "$SRV.STATS.moe2-fusion"):
        await pool.nc.publish(subject, b"\xff\x00 not json")  # no reply subject
        assert await gather(pool.nc, subject, b"{[garbage")  # still answered
    answer = await Client(pool.nc, prefix=PREFIX).ask(QUESTION, max_tokens=2).collect()
    assert answer.usage.completion_tokens > 0


async def test_agent_protocol_client_discovers_moe2_and_gets_a_fused_answer(pool: Pool) -> None:
    agents = Agents(nc=pool.nc)
    try:
        found = await agents.discover(filter=DiscoverFilter(agent="moe2", session_name=PREFIX))
        [agent] = found
        assert (agent.owner, agent.metadata["prefix"]) == ("moe2", PREFIX)
        assert agent.metadata["selection"] == "all-live"
        prompts_before = endpoint(await fusion_stats(pool.nc), "prompt")["num_requests"]
        with anyio.fail_after(30):
            chunks = [m async for m in agent.prompt(QUESTION)]
        text = "".join(c.text for c in chunks if isinstance(c, ResponseChunk))
        prompts_after = endpoint(await fusion_stats(pool.nc), "prompt")["num_requests"]
        assert prompts_after == prompts_before + 1  # a moe2 session on the bus
        direct = Client(pool.nc, prefix=PREFIX).ask(QUESTION, max_tokens=ANSWER_TOKENS)
        assert text == (await direct.collect()).text  # greedy: the same fused answer
        assert text.strip()
    finally:
        await agents.close()


async def test_agent_protocol_caller_sees_a_moe2_refusal(pool: Pool) -> None:
    agents = Agents(nc=pool.nc)
    try:
        [agent] = await agents.discover(filter=DiscoverFilter(agent="moe2", session_name=EMPTY))
        with anyio.fail_after(30), pytest.raises(ProtocolError, match=r"503.*no_experts"):
            _ = [m async for m in agent.prompt(QUESTION)]
    finally:
        await agents.close()


async def test_an_agent_whose_registrations_fail_still_serves(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(self: object) -> None:
        raise RuntimeError("no $SRV for you")

    monkeypatch.setattr(MicroService, "start", refuse)
    monkeypatch.setattr(AgentService, "start", refuse)
    nc = await connect_nats(nats_url, name="test-discovery-broken")
    try:
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(10):
                await tg.start(FusionAgent(nc, FusionConfig(prefix="disc-broken")).run)
            answer = Client(nc, prefix="disc-broken").ask(QUESTION, timeout=10)
            with pytest.raises(Moe2Error) as refused:
                await answer.collect()
            assert refused.value.code == ErrorCode.NO_EXPERTS  # served: the agent is up
            pings = await gather(nc, "$SRV.PING")
            assert all(p.get("metadata", {}).get("prefix") != "disc-broken" for p in pings)
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)
