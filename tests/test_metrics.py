"""/metrics of a live expert, fusion agent and gateway, scraped over HTTP and parsed by
prometheus_client's own parser: what a Prometheus server would read (docs/metrics.md).

One pool (a real nats-server, the real SmolLM2 expert in-process, a fusion agent with SMO over a
synthetic oracle, the gateway on uvicorn) answers one real question; every counter the question
should move is compared before and after."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.gateway import GatewaySettings, serve_gateway
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.subjects import Subjects
from moe2.selection.costs import Application, Budgets, ComputeFit, ExpertCost
from moe2.selection.live import LiveSelection
from moe2.selection.profiles import Profiles
from tests.test_selection_live import owners_oracle

pytestmark = pytest.mark.anyio
PREFIX = "metrics"
BUDGETS = Budgets(tau_s={"chat": 0.5}, energy_j=40.0)


@dataclass
class Pool:
    expert: str  # http://host:port/metrics of each
    fusion: str
    gateway: str
    gateway_own: str  # the same registry on a port of its own (--metrics-port)
    api: str  # the gateway's /v1
    energy_source: str
    nats_url: str


def live_selection() -> LiveSelection:
    """SMO over one expert e0, costed by a profile, under BUDGETS."""
    fit = ComputeFit(0.01, 1e-4, 0.01, 0.0, power_w=10.0)
    profiles = Profiles({"e0": ExpertCost("e0", fit)}, {"chat": Application("chat", 32, 16)})
    return LiveSelection(owners_oracle(["e0"]), profiles, BUDGETS)


@pytest.fixture
async def pool(nats_url: str, smollm2: TransformersBackend) -> AsyncIterator[Pool]:
    nc = await connect_nats(nats_url, name="test-metrics")
    try:
        async with anyio.create_task_group() as tg:
            config = FusionConfig(prefix=PREFIX, step_deadline_s=30, metrics_port=0)
            fusion = FusionAgent(nc, config, selector=live_selection())
            await tg.start(fusion.run)
            expert_config = ExpertConfig("e0", prefix=PREFIX, warmup=False, metrics_port=0)
            expert = ExpertAgent(nc, smollm2, expert_config)
            await tg.start(expert.run)
            await fusion.wait_for_experts(1, limit_s=10)
            with anyio.fail_after(5):  # SMO runs again within 0.2 s of the join
                while fusion.selector.select(["e0"]) != ["e0"]:  # noqa: ASYNC110  # no event for it
                    await anyio.sleep(0.05)
            own = free_port()
            settings = GatewaySettings(
                nats_url=nats_url, port=0, prefixes=(PREFIX,), metrics_port=own
            )
            port = await tg.start(serve_gateway, settings)
            yield Pool(
                expert=f"http://127.0.0.1:{expert.metrics_port}/metrics",
                fusion=f"http://127.0.0.1:{fusion.metrics_port}/metrics",
                gateway=f"http://127.0.0.1:{port}/metrics",
                gateway_own=f"http://127.0.0.1:{own}/metrics",
                api=f"http://127.0.0.1:{port}/v1",
                energy_source=expert.meter.source,
                nats_url=nats_url,
            )
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Scrape:
    """One scrape, parsed: samples by name, and the families' declared types."""

    def __init__(self, text: str) -> None:
        families = list(text_string_to_metric_families(text))
        self.types = {f.name: f.type for f in families}
        self.samples: list[Sample] = [s for f in families for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["content-type"], response.read().decode()


async def scrape(url: str) -> Scrape:
    """GET /metrics as Prometheus does (in a thread: the agents' loop is this test's loop)."""
    status, content_type, text = await anyio.to_thread.run_sync(get, url)
    assert status == 200 and content_type.startswith("text/plain")
    return Scrape(text)


async def scraped_until(url: str, name: str, at_least: float, **labels: str) -> Scrape:
    """Scrape until ``name`` reaches ``at_least`` (bounded): a Close reaches the expert a moment
    after the client has its answer."""
    with anyio.fail_after(5):
        while (s := await scrape(url)).value(name, **labels) < at_least:  # noqa: ASYNC110  # a scrape has no event
            await anyio.sleep(0.05)
    return s


def client(pool: Pool) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=pool.api, api_key="unused", max_retries=0, timeout=60)


async def test_a_question_moves_the_counters_of_expert_fusion_agent_and_gateway(
    pool: Pool,
) -> None:
    e0, f0, g0 = [await scrape(url) for url in (pool.expert, pool.fusion, pool.gateway)]
    async with client(pool) as api:
        reply = await api.chat.completions.create(
            model=PREFIX,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=6,
            temperature=0,
        )
    assert reply.usage is not None and reply.model_extra is not None
    n, prompt_tokens = reply.usage.completion_tokens, reply.usage.prompt_tokens
    finish = reply.model_extra["moe2"]["finish_reason"]  # moe2's own: eos, stop or length
    expert = await scraped_until(pool.expert, "moe2_expert_sessions_ended_total", 1, reason="done")
    fusion = await scrape(pool.fusion)
    gateway = await scrape(pool.gateway)

    def moved(now: Scrape, then: Scrape, name: str, **labels: str) -> float:
        return now.value(name, **labels) - then.value(name, **labels)

    # the fusion agent: one session done with the reply's finish reason, its tokens, n - 1 steps
    assert moved(fusion, f0, "moe2_fusion_sessions_started_total") == 1
    assert moved(fusion, f0, "moe2_fusion_sessions_done_total", finish_reason=finish) == 1
    assert moved(fusion, f0, "moe2_fusion_tokens_total", kind="completion") == n
    assert moved(fusion, f0, "moe2_fusion_tokens_total", kind="prompt") == prompt_tokens
    assert moved(fusion, f0, "moe2_fusion_step_seconds_count") == n - 1  # step 0 is the prefill
    assert moved(fusion, f0, "moe2_fusion_gate_choices_total", expert="e0") == 1
    assert fusion.value("moe2_fusion_sessions_active") == 0
    assert fusion.value("moe2_fusion_selection_member", expert="e0") == 1
    assert fusion.value("moe2_fusion_budget_energy_joules") == 40.0
    assert fusion.value("moe2_fusion_budget_delay_seconds", application="chat") == 0.5
    assert fusion.types["moe2_fusion_step_seconds"] == "histogram"
    # the expert: the prompt prefilled once, a decode per later token, joules by its meter
    assert moved(expert, e0, "moe2_expert_tokens_total", phase="prefill") == prompt_tokens
    assert moved(expert, e0, "moe2_expert_tokens_total", phase="decode") == n - 1
    assert moved(expert, e0, "moe2_expert_slices_total") == n
    assert moved(expert, e0, "moe2_expert_decode_batch_sessions_count") == n - 1
    assert moved(expert, e0, "moe2_expert_decode_batch_sessions_sum") == n - 1  # one each
    joules = moved(expert, e0, "moe2_expert_energy_joules_total", energy_source=pool.energy_source)
    assert joules > 0
    assert expert.value("moe2_expert_sessions_active") == 0
    info = expert.labels("moe2_expert_info")
    assert info[0]["expert"] == "e0" and info[0]["model"].startswith("SmolLM2")
    # the gateway: the question's request, answered 200
    route = {"route": "/v1/chat/completions", "status": "200"}
    assert moved(gateway, g0, "moe2_gateway_requests_total", **route) == 1
    assert moved(gateway, g0, "moe2_gateway_request_seconds_count", route=route["route"]) == 1


async def test_refusals_are_counted_by_endpoint_and_code(pool: Pool) -> None:
    """A Step for a session the expert never opened is unknown_session on its step endpoint; a
    body without messages is a 400 at the gateway."""
    nc = await connect_nats(pool.nats_url, name="test-metrics-refusal")
    try:
        step = wire.Step(session="never-opened", step=1, token=5)
        subject = Subjects(PREFIX).expert_step("e0")
        reply = wire.decode((await nc.request(subject, wire.encode(step), timeout=5)).data)
    finally:
        await close_nats(nc)
    assert isinstance(reply, wire.Error) and reply.code == "unknown_session"
    expert = await scrape(pool.expert)
    async with client(pool) as api:
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(model=PREFIX, messages=[], max_tokens=-1)
    gateway = await scrape(pool.gateway)
    own_port = await scrape(pool.gateway_own)
    errors = {"endpoint": "step", "code": "unknown_session"}
    assert expert.value("moe2_endpoint_errors_total", **errors) == 1
    assert expert.value("moe2_endpoint_requests_total", endpoint="step") == 1
    route = {"route": "/v1/chat/completions", "status": "400"}
    assert gateway.value("moe2_gateway_requests_total", **route) == 1
    assert own_port.value("moe2_gateway_requests_total", **route) == 1
