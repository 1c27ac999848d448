"""The OpenAI-compatible gateway through the official ``openai`` client, unchanged: a real gateway
on uvicorn, a real fusion agent, nats-server and SmolLM2 expert (docs/gateway.md)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import openai
import pytest
from anyio.abc import TaskStatus
from anyio.streams.text import TextReceiveStream
from nats.aio.msg import Msg

import moe2
from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.gateway import GatewaySettings, serve_gateway
from moe2.gateway_errors import HTTP_STATUS
from moe2.runtime import wire
from moe2.runtime.auth import AuthDir, NatsAuth
from moe2.runtime.connection import close_nats, connect_nats, flush_subscriptions
from moe2.runtime.errors import ErrorCode
from moe2.runtime.server import NatsServer
from moe2.runtime.subjects import Subjects
from tests.scripted import Script, ScriptedExpert

pytestmark = pytest.mark.anyio
_prefixes = (f"gw{i}" for i in itertools.count())
QUESTION = "What is the capital of France?"
STORY = "Write a very long story about a dragon who learns to fly."
GREEDY = {"temperature": 0.0, "max_tokens": 24}


@dataclass
class Stack:
    """One pool under a fresh prefix, and an openai client pointed at its gateway."""

    openai: openai.AsyncOpenAI
    model: str
    nats_url: str
    experts: list[ExpertAgent]
    fusion: FusionAgent | None
    gateway: anyio.CancelScope  # cancel it to stop the gateway alone
    steps: list[wire.Step] = field(default_factory=list)  # every Step sent to an expert
    closes: list[wire.Close] = field(default_factory=list)  # every Close sent to an expert

    def messages(self, text: str = QUESTION) -> list[Any]:
        return [{"role": "user", "content": text}]

    async def chat(self, text: str = QUESTION, **fields: Any) -> Any:
        """``chat.completions.create`` of one user message to this pool."""
        create = self.openai.chat.completions.create
        return await create(model=self.model, messages=self.messages(text), **fields)

    async def complete(self, prompt: str | list[str] = QUESTION, **fields: Any) -> Any:
        return await self.openai.completions.create(model=self.model, prompt=prompt, **fields)

    async def until(self, ok: Callable[[], bool], limit: float = 5.0) -> None:
        """Bounded wait for agent counters, which have no event."""
        with anyio.fail_after(limit):
            while not ok():  # noqa: ASYNC110  # the agents' session counters have no event
                await anyio.sleep(0.01)

    async def cancelled(self, limit: float = 2.0) -> None:
        """Wait until the one session was cancelled on the expert, and every count is back to 0."""
        await self.until(lambda: self.idle() and len(self.closes) == 1, limit)
        assert self.closes[0].reason == "cancelled"

    def idle(self) -> bool:
        fusion_idle = self.fusion is None or self.fusion.sessions == 0
        return fusion_idle and all(e.sessions == 0 for e in self.experts)


@asynccontextmanager
async def stack(
    url: str,
    backend: TransformersBackend | None = None,
    *,
    fusion: dict[str, Any] | None = None,
    expert: dict[str, Any] | None = None,
    with_fusion: bool = True,
    more: tuple[TransformersBackend, ...] = (),
) -> AsyncIterator[Stack]:
    """SmolLM2 experts e0 (``backend``), e1… (``more``; none without ``backend``), a fusion
    agent and a gateway. Each expert has its own backend: a backend serves one agent's worker
    thread at a time, and two agents on one would call it from two threads at once."""
    prefix = next(_prefixes)
    nc = await connect_nats(url, name="test-gateway")
    try:
        async with anyio.create_task_group() as tg:
            agent = None
            if with_fusion:  # first, so that it hears the expert's first heartbeat
                settings = {"step_deadline_s": 30, "prefill_deadline_s": 60, **(fusion or {})}
                agent = FusionAgent(nc, FusionConfig(prefix=prefix, **settings))
                await tg.start(agent.run)
            experts = []
            for i, own in enumerate((backend, *more) if backend is not None else ()):
                cfg = ExpertConfig(f"e{i}", prefix=prefix, warmup=False, **(expert or {}))
                experts.append(ExpertAgent(nc, own, cfg))
                await tg.start(experts[-1].run)
            if agent is not None:
                await agent.wait_for_experts(len(experts), limit_s=10)
            gateway = anyio.CancelScope()

            async def serve(*, task_status: TaskStatus[int]) -> None:
                with gateway:
                    settings = GatewaySettings(nats_url=url, port=0, prefixes=(prefix,))
                    await serve_gateway(settings, task_status=task_status)

            port = await tg.start(serve)
            client = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60
            )
            s = Stack(client, prefix, url, experts, agent, gateway)
            await _record(nc, Subjects(prefix), s)
            yield s
            await client.close()
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


@pytest.fixture
async def pool(nats_url: str, smollm2: TransformersBackend) -> AsyncIterator[Stack]:
    """The default stack: one SmolLM2 expert, a fusion agent, a gateway."""
    async with stack(nats_url, smollm2) as s:
        yield s


async def _record(nc: Any, subjects: Subjects, s: Stack) -> None:
    async def note(msg: Msg) -> None:
        message = wire.decode(msg.data)
        if isinstance(message, wire.Step):
            s.steps.append(message)
        elif isinstance(message, wire.Close):
            s.closes.append(message)

    await nc.subscribe(subjects.expert_step("*"), cb=note)
    await nc.subscribe(subjects.expert_close("*"), cb=note)
    await flush_subscriptions(nc)


async def _first(stream: Any, n: int) -> AsyncIterator[Any]:
    """The first ``n`` chunks of an open stream, which goes on."""
    for _ in range(n):
        yield await anext(stream)


def error_of(caught: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    """The whole body the client received: OpenAI's error shape."""
    body = caught.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# --- no model needed -------------------------------------------------------------------------


def test_every_moe2_error_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert HTTP_STATUS[ErrorCode.BUSY][0] == 429 and HTTP_STATUS[ErrorCode.TIMEOUT][0] == 504


async def test_models_lists_the_pool_and_an_unknown_model_is_404(nats_url: str) -> None:
    async with stack(nats_url, with_fusion=False) as s:
        models = await s.openai.models.list()
        assert [(m.id, m.owned_by) for m in models.data] == [(s.model, "moe2")]
        with pytest.raises(openai.NotFoundError) as caught:
            await s.openai.chat.completions.create(model="gpt-4o", messages=s.messages())
    error = error_of(caught)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert s.model in error["message"]


async def test_status_is_the_pool_as_moe2_status_shows_it_and_the_page_is_served(
    nats_url: str,
) -> None:
    """``GET /status``: the fusion agent (from $SRV.INFO) in the status view's columns, no expert
    yet; an unknown model is a 404. ``GET /`` is the dashboard page."""
    async with stack(nats_url) as s:
        root = str(s.openai.base_url).removesuffix("v1/")
        assert s.fusion is not None
        with anyio.fail_after(10):
            while not (shot := await _get_json(root + "status"))["fusion"]["rows"]:  # noqa: ASYNC110  # an HTTP poll: no event
                await anyio.sleep(0.2)  # $SRV.INFO was asked at start: its answer is on its way
            page = await anyio.to_thread.run_sync(_get, root)
            missing = await anyio.to_thread.run_sync(_get, root + "status?model=nope")
    assert (shot["model"], shot["models"]) == (s.model, [s.model])
    assert shot["experts"]["rows"] == [] and shot["experts"]["columns"][:2] == ["expert", "model"]
    agent_row = shot["fusion"]["rows"][0]
    assert agent_row[:4] == [s.fusion.agent_id, "all-live", "-", "all live"]
    assert shot["summary"].startswith("0 of 0 experts live · sessions in flight: 0")
    assert page[0] == 200 and b'<table id="experts">' in page[1]
    assert missing[0] == 404 and json.loads(missing[1])["error"]["code"] == "model_not_found"


async def test_under_per_role_users_the_pool_view_needs_a_user_that_may_read_the_pool(
    nats_server: NatsServer, nats_auth: AuthDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway as the ``client`` role (docs/security.md) answers, but may not read the
    pool: its view stays empty. With ``status_auth`` (the ``admin`` seed, ``--status-nkey``) its
    second connection shows the expert and the fusion agent."""
    bare = f"nats://{nats_server.host}:{nats_server.port}"
    monkeypatch.setenv("MOE2_NATS_NKEY", str(nats_auth.seed_file("client")))
    admin = NatsAuth(nkey=nats_auth.seed_file("admin"))
    nc = await connect_nats(nats_server.url, name="test-gateway-roles")  # the superuser
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(ScriptedExpert(nc, "a", Script(text=b"Paris.")).run)
            fusion = FusionAgent(nc, FusionConfig(step_deadline_s=5, wait_for_experts_s=3))
            await tg.start(fusion.run)
            await fusion.wait_for_experts(1, limit_s=10)
            seen = {}
            for name, status_auth in (("client", None), ("admin", admin)):
                settings = GatewaySettings(nats_url=bare, port=0, status_auth=status_auth)
                port = await tg.start(serve_gateway, settings)
                root = f"http://127.0.0.1:{port}/"
                with anyio.fail_after(20):
                    oa = openai.AsyncOpenAI(base_url=root + "v1", api_key="-", max_retries=0)
                    answer = await oa.chat.completions.create(
                        model="moe2",
                        messages=[{"role": "user", "content": "Capital?"}],
                        temperature=0,
                    )
                    await oa.close()
                    await anyio.sleep(2.5)  # heartbeats every 0.2 s, $SRV.INFO asked at start
                    seen[name] = (answer, await _get_json(root + "status"))
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)
    for answer, _ in seen.values():
        assert answer.choices[0].message.content == "Paris."  # the client role may ask
    _, as_client = seen["client"]
    assert (as_client["experts"]["rows"], as_client["fusion"]["rows"]) == ([], [])
    _, as_admin = seen["admin"]
    assert [r[0] for r in as_admin["experts"]["rows"]] == ["a"]
    assert [r[0] for r in as_admin["fusion"]["rows"]] == [fusion.agent_id]
    assert "moe2-test" not in as_admin["source"]  # not the superuser's URL: the bare one


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


async def _get_json(url: str) -> Any:
    status, body = await anyio.to_thread.run_sync(_get, url)
    assert status == 200, body
    return json.loads(body)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": True}, "logprobs"),
        ({"extra_body": {"moe2": {"experts": 0}}}, "moe2.experts"),
        ({"extra_body": {"moe2": {"step_deadline_s": 0}}}, "moe2.step_deadline_s"),
        ({"extra_body": {"moe2": {"step_deadline_s": 61}}}, "moe2.step_deadline_s"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
        ({"stop": [f"s{i}" for i in range(17)]}, None),  # refused by the fusion agent
        ({"messages": [{"role": "user", "content": "  "}]}, None),  # empty_prompt
    ],
)
async def test_an_invalid_field_is_400_naming_it(
    nats_url: str, fields: dict[str, Any], param: str | None
) -> None:
    async with stack(nats_url) as s:
        request = {"model": s.model, "messages": s.messages(), **fields}
        with pytest.raises(openai.BadRequestError) as caught:
            await s.openai.chat.completions.create(**request)
    error = error_of(caught)
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] in ("invalid_field", "empty_prompt")
    assert error["message"]


async def test_no_fusion_agent_on_the_bus_is_503(nats_url: str) -> None:
    async with stack(nats_url, with_fusion=False) as s:
        with pytest.raises(openai.InternalServerError) as caught:
            await s.complete()
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "1"
    assert error_of(caught)["code"] == "no_fusion_agent"


async def test_a_fusion_agent_with_no_experts_is_503(nats_url: str) -> None:
    async with stack(nats_url) as s:
        with pytest.raises(openai.InternalServerError) as caught:
            await s.chat(stream=True)
    assert caught.value.status_code == 503
    error = error_of(caught)
    assert (error["type"], error["code"]) == ("service_unavailable_error", "no_experts")


async def test_the_moe2_gateway_command_serves_and_stops_on_sigterm(nats_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "moe2", "gateway", "--nats", nats_url, "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    async with await anyio.open_process(
        [*command, "--prefix", "edu", "--prefix", "moe2"], stderr=subprocess.PIPE, env=env
    ) as proc:
        assert proc.stderr is not None
        with anyio.fail_after(30):
            logged = ""
            async for text in TextReceiveStream(proc.stderr):
                logged += text
                if "gateway_ready" in logged:
                    break
            assert "gateway_ready" in logged, logged
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-") as c:
                models = await c.models.list()
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0  # drained and stopped cleanly
    assert [m.id for m in models.data] == ["edu", "moe2"]


# --- with the real SmolLM2 expert --------------------------------------------------------------


@pytest.mark.model
async def test_a_chat_completion_is_the_fused_answer_with_its_usage_and_experts(
    pool: Stack,
) -> None:
    with anyio.fail_after(60):
        completion = await pool.chat(**GREEDY)
        async with moe2.connect(pool.nats_url, prefix=pool.model) as direct:
            final = await direct.ask(QUESTION, max_tokens=24).collect()
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == final.text
    assert "Paris" in final.text
    assert choice.finish_reason == ("length" if final.finish_reason == "length" else "stop")
    assert completion.object == "chat.completion"
    assert completion.model == pool.model
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == final.usage.prompt_tokens > 10
    assert completion.usage.completion_tokens == final.usage.completion_tokens
    total = final.usage.prompt_tokens + final.usage.completion_tokens
    assert completion.usage.total_tokens == total
    extension = (completion.model_extra or {})["moe2"]
    assert extension["experts"] == ["e0"] and extension["weights"] == [1.0]
    assert completion.id == f"chatcmpl-{extension['session']}"
    assert extension["finish_reason"] == final.finish_reason and extension["late"] == {}


@pytest.mark.model
async def test_a_streamed_chat_gives_the_same_text_and_usage_in_its_last_chunk(
    pool: Stack,
) -> None:
    with anyio.fail_after(60):
        whole = await pool.chat(**GREEDY)
        stream = await pool.chat(
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
        chunks = [c async for c in stream]
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(pieces) > 5  # streamed piece by piece, not in one event
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert (chunks[-2].model_extra or {})["moe2"]["experts"] == ["e0"]
    assert len({c.id for c in chunks}) == 1
    # each piece names, per token, the expert that weighed most for it: here the only one
    leads = [(c.model_extra or {})["moe2"]["dominant"] for c in chunks if c.choices and
             c.choices[0].delta.content]  # fmt: skip
    assert len(leads) == len([p for p in pieces if p]) and all(leads)
    assert {e for lead in leads for e in lead} == {"e0"}


@pytest.mark.model
async def test_models_names_the_live_experts_and_fusion_agents_behind_each_model(
    pool: Stack,
) -> None:
    """The model to pick is the pool's prefix; ``moe2`` says who serves it now (heard from
    their heartbeats and $SRV.INFO, so it can take a heartbeat to fill in)."""
    assert pool.fusion is not None
    with anyio.fail_after(10):
        while True:
            models = await pool.openai.models.list()
            behind = (models.data[0].model_extra or {})["moe2"]
            if behind["experts"] and behind["fusion_agents"]:
                break
            await anyio.sleep(0.2)
    assert [(m.id, m.owned_by, m.object) for m in models.data] == [(pool.model, "moe2", "model")]
    assert behind == {"experts": ["e0"], "fusion_agents": [pool.fusion.agent_id]}
    assert models.data[0].created > 1_700_000_000  # when the gateway started, not 0


@pytest.mark.model
async def test_a_request_may_give_its_steps_their_own_deadline(pool: Stack) -> None:
    """``moe2.step_deadline_s`` holds for that request's session only: 1 ms leaves every step
    after the prefill without a slice (504), and the next request has the agent's 30 s again."""
    with anyio.fail_after(60):
        with pytest.raises(openai.InternalServerError) as caught:
            await pool.chat(extra_body={"moe2": {"step_deadline_s": 0.001}}, **GREEDY)
        after = await pool.chat(**GREEDY)
    assert caught.value.status_code == 504
    assert error_of(caught)["code"] == "no_slices"
    assert after.choices[0].message.content


@pytest.mark.model
async def test_a_completion_answers_the_prompt_as_one_user_turn(
    pool: Stack,
) -> None:
    with anyio.fail_after(60):
        chat = await pool.chat(**GREEDY)
        text = await pool.complete(**GREEDY)
        stream = await pool.complete([QUESTION], stream=True, **GREEDY)
        streamed = [c async for c in stream]
    assert text.object == "text_completion" and text.id.startswith("cmpl-")
    assert text.choices[0].text == chat.choices[0].message.content
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert streamed[-1].choices[0].finish_reason == text.choices[0].finish_reason
    assert text.usage == chat.usage


@pytest.mark.model
async def test_stop_ends_before_the_stop_string_and_a_seed_repeats_a_sampled_answer(
    pool: Stack,
) -> None:
    with anyio.fail_after(60):
        full = await pool.chat(**GREEDY)
        cut = await pool.chat(stop="Paris", **GREEDY)
        sampled = {"temperature": 1.5, "top_p": 0.9, "seed": 7, "max_tokens": 16}
        once = await pool.chat(**sampled)
        again = await pool.chat(**sampled)
    text = full.choices[0].message.content or ""
    assert cut.choices[0].message.content == text[: text.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"
    assert once.choices[0].message.content == again.choices[0].message.content
    assert once.choices[0].message.content != text[: len(once.choices[0].message.content or "")]


@pytest.mark.model
async def test_the_moe2_field_picks_how_many_experts_answer(
    nats_url: str, smollm2: TransformersBackend
) -> None:
    from moe2.agents.expert.backends.transformers_backend import load_transformers
    from moe2.agents.expert.models import resolve_model

    second = load_transformers(resolve_model())  # from the conversion cache: seconds
    async with stack(nats_url, smollm2, more=(second,)) as s:
        with anyio.fail_after(60):
            both = await s.chat(**GREEDY)
            one = await s.chat(extra_body={"moe2": {"experts": 1}}, **GREEDY)
    assert both.model_extra["moe2"]["experts"] == ["e0", "e1"]
    assert both.model_extra["moe2"]["weights"] == [0.5, 0.5]
    assert one.model_extra["moe2"]["experts"] == ["e0"]
    assert one.model_extra["moe2"]["weights"] == [1.0]
    # two copies of one model with equal weights fuse to that model's own greedy answer
    assert both.choices[0].message.content == one.choices[0].message.content


@pytest.mark.model
async def test_a_step_with_no_slice_is_504_or_an_error_event_once_streaming(
    nats_url: str, smollm2: TransformersBackend
) -> None:
    # the prefill has its own deadline; every decode step after it is late
    async with stack(nats_url, smollm2, fusion={"step_deadline_s": 0.001}) as s:
        with anyio.fail_after(60):
            with pytest.raises(openai.InternalServerError) as caught:
                await s.chat(**GREEDY)
            stream = await s.chat(stream=True, **GREEDY)
            first = await anext(stream)
            with pytest.raises(openai.APIError) as mid_stream:
                await anext(stream)
    assert caught.value.status_code == 504
    assert error_of(caught)["code"] == "no_slices"
    assert first.choices[0].delta.content  # the prefill's token came through
    body = mid_stream.value.body  # the event's "error" object
    assert isinstance(body, dict) and body["code"] == "no_slices"
    assert "no slice arrived for step 1" in mid_stream.value.message


@pytest.mark.model
async def test_a_prompt_longer_than_the_experts_context_is_413(
    nats_url: str, smollm2: TransformersBackend
) -> None:
    long = "Tell me about the sea. " * 40  # about 240 tokens, over the expert's 128
    async with stack(nats_url, smollm2, expert={"max_context": 128}) as s:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as caught:
                await s.chat(long, stream=stream)
            assert caught.value.status_code == 413
            error = error_of(caught)
            assert (error["type"], error["code"]) == ("invalid_request_error", "prompt_too_long")
            assert "128-token context" in error["message"] or "context" in error["message"]


@pytest.mark.model
async def test_a_fusion_agent_at_its_session_limit_is_429(
    nats_url: str, smollm2: TransformersBackend
) -> None:
    async with stack(nats_url, smollm2, fusion={"max_sessions": 1}) as s:
        with anyio.fail_after(60):
            busy = await s.chat(STORY, max_tokens=300, stream=True)
            first = await anext(aiter(busy))
            assert first.choices[0].delta.role == "assistant"
            with pytest.raises(openai.RateLimitError) as caught:
                await s.complete()
            await busy.close()
            await s.until(s.idle)
            after = await s.complete(max_tokens=4)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1"
    error = error_of(caught)
    assert (error["type"], error["code"]) == ("rate_limit_error", "busy")
    assert after.usage is not None and after.usage.completion_tokens == 4  # served again


@pytest.mark.model
async def test_an_answer_slower_than_its_timeout_is_504_and_its_session_ends(
    pool: Stack,
) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await pool.chat(STORY, max_tokens=300, extra_body={"moe2": {"timeout_s": 0.001}})
    await pool.cancelled()
    assert caught.value.status_code == 504
    error = error_of(caught)
    assert (error["type"], error["code"]) == ("timeout_error", "timeout")
    assert len(pool.steps) <= 2


@pytest.mark.model
async def test_a_client_that_disconnects_mid_stream_frees_the_expert_within_a_step(
    pool: Stack,
) -> None:
    with anyio.fail_after(60):
        stream = await pool.chat(STORY, max_tokens=300, stream=True, temperature=0)
        assert len([c async for c in _first(stream, 4)]) == 4
        steps_at_close = len(pool.steps)
        await stream.close()
        assert pool.experts[0].sessions == 1  # it was still writing
        await pool.cancelled()
    assert len(pool.steps) <= steps_at_close + 2, (steps_at_close, len(pool.steps))
    assert len(pool.steps) < 100  # nowhere near the 300 asked for


@pytest.mark.model
async def test_a_client_that_gives_up_on_a_whole_answer_ends_its_session(
    pool: Stack,
) -> None:
    with pytest.raises(openai.APITimeoutError):
        await pool.chat(STORY, max_tokens=300, timeout=1.0)
    await pool.cancelled()
    assert len(pool.steps) < 100  # nowhere near the 300 asked for


@pytest.mark.model
async def test_a_gateway_that_stops_ends_its_open_streams_and_their_sessions(pool: Stack) -> None:
    with anyio.fail_after(30):
        stream = await pool.chat(STORY, max_tokens=300, stream=True)
        pieces = [c async for c in _first(stream, 3)]
        pool.gateway.cancel()
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                pass
        await pool.cancelled()
    assert len(pieces) == 3 and len(pool.steps) < 100


@pytest.mark.model
async def test_16_concurrent_streams_all_complete_with_the_same_greedy_answer(
    pool: Stack,
) -> None:
    answers: list[tuple[str, int]] = []

    async def one() -> None:
        stream = await pool.chat(
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
            max_tokens=12,
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None
        answers.append((text, chunks[-1].usage.completion_tokens))

    with anyio.fail_after(60):
        reference = await pool.chat(temperature=0, max_tokens=12)
        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(one)
    await pool.until(pool.idle)
    assert reference.usage is not None
    expected = (reference.choices[0].message.content, reference.usage.completion_tokens)
    assert answers == [expected] * 16
