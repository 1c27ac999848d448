"""Experts that differ by context: messages put before every conversation, sessions and scores
alike, announced by heartbeat, read by ``moe2 expert --context FILE``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from moe2 import cli
from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends.base import Backend
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.contexts import ExpertContext, context_digest, load_context
from moe2.runtime.errors import Moe2Error
from tests.test_expert import EXPERT, HELLO, error_of, expert_on_bus, slice_of
from tests.test_expert_score import request, scored_of

M = wire.ChatMessage
GEOGRAPHY = (
    M("system", "You are a geography teacher. Answer in one short sentence."),
    M("user", "What is the capital of Spain?"),
    M("assistant", "The capital of Spain is Madrid."),
)
POETRY = (
    M("system", "You are a poet. Answer every question with a rhyming couplet."),
    M("user", "What is the capital of Spain?"),
    M("assistant", "In Spain the crown of cities, grand and glad, / is Madrid, loved by all."),
)
QUESTION = [M("user", "What is the capital of France?")]


@pytest.fixture
def backend(smollm2: Backend) -> Backend:
    return smollm2


# --- on the bus, with the real model -----------------------------------------------------------


async def first_slice(
    backend: Backend, url: str, messages: list[wire.ChatMessage], **config: Any
) -> wire.Slice:
    async with expert_on_bus(backend, url, **config) as bus:
        sub = await bus.open("s", messages, top_k=16)
        return slice_of(await bus.reply(sub), 0)


@pytest.mark.anyio
@pytest.mark.model
async def test_experts_with_different_contexts_answer_differently(
    backend: Backend, nats_url: str
) -> None:
    slices = {
        name: await first_slice(backend, nats_url, QUESTION, context=ctx, context_name=name)
        for name, ctx in [("geo", GEOGRAPHY), ("poet", POETRY), ("none", ())]
    }
    for name, ctx in [("geo", GEOGRAPHY), ("poet", POETRY), ("none", ())]:
        ids = backend.encode_chat([*ctx, *QUESTION])
        alone = backend.prefill("ref", ids, 16)  # what the model says with the context in front
        backend.release("ref")
        got = slices[name]
        assert got.prompt_tokens == len(ids)  # the context counts as prompt
        np.testing.assert_array_equal(got.ids_array()[:4], alone.ids[:4])
        np.testing.assert_allclose(got.logprobs_array(), alone.logprobs, atol=1e-4)
    geo, poet, none = (slices[n].logprobs_array() for n in ("geo", "poet", "none"))
    assert np.abs(geo - poet).max() > 0.1 and np.abs(geo - none).max() > 0.1


@pytest.mark.anyio
@pytest.mark.model
async def test_scores_come_from_behind_the_context_too(backend: Backend, nats_url: str) -> None:
    targets = ["Paris.", "The capital of France is Paris."]
    ids = backend.encode_chat([*GEOGRAPHY, *QUESTION])
    expected = backend.score(ids, [backend.encode(t) for t in targets], 0)
    async with expert_on_bus(backend, nats_url, context=GEOGRAPHY) as bus:
        answer = scored_of(await request(bus, wire.Score(QUESTION, targets)), 2)
    assert answer.prompt_tokens == len(ids)
    for want, got in zip(expected, answer.targets, strict=True):
        np.testing.assert_allclose(got.logprobs_array(), want.logprobs, atol=1e-4)


@pytest.mark.anyio
@pytest.mark.model
async def test_the_context_cache_changes_nothing_but_time(backend: Backend, nats_url: str) -> None:
    """Every prompt starting from a copy of the context's KV cache: same slices, same scores."""
    runs = {}
    for cached in (True, False):
        async with expert_on_bus(backend, nats_url, context=POETRY, context_cache=cached) as bus:
            assert (bus.agent._context_head is not None) == cached
            sub = await bus.open("s", QUESTION, top_k=8)
            chain = [slice_of(await bus.reply(sub), 0)]
            for step in range(1, 6):
                token = int(chain[-1].ids_array()[0])
                await bus.send("step", wire.Step(session="s", step=step, token=token))
                chain.append(slice_of(await bus.reply(sub), step))
            score = scored_of(await request(bus, wire.Score(QUESTION, ["Paris, of course."])), 1)
            runs[cached] = (chain, score)
    (with_cache, score_cached), (without, score_fresh) = runs[True], runs[False]
    assert [s.ids_array().tolist() for s in with_cache] == [s.ids_array().tolist() for s in without]
    for a, b in zip(with_cache, without, strict=True):
        np.testing.assert_allclose(a.logprobs_array(), b.logprobs_array(), atol=1e-4)
    np.testing.assert_allclose(
        score_cached.targets[0].logprobs_array(), score_fresh.targets[0].logprobs_array(), atol=1e-4
    )


@pytest.mark.anyio
@pytest.mark.model
async def test_heartbeats_name_the_context(backend: Backend, nats_url: str) -> None:
    async with expert_on_bus(backend, nats_url, context=GEOGRAPHY, context_name="geo") as bus:
        beat = await bus.heartbeat()
        tokens = bus.agent.context_tokens
    label = f"geo@{context_digest(GEOGRAPHY)}"
    assert beat.model == f"{backend.info.model}+ctx:{label}"
    assert beat.device is not None and beat.device.context == label
    assert len(backend.encode_chat(GEOGRAPHY[:1])) < tokens < len(backend.encode_chat(GEOGRAPHY))
    assert beat.device.context_tokens == tokens
    assert beat.tokenizer == backend.info.tokenizer  # still fusable with any SmolLM2 expert


@pytest.mark.anyio
@pytest.mark.model
async def test_the_context_counts_toward_max_context(backend: Backend, nats_url: str) -> None:
    bare, full = len(backend.encode_chat(HELLO)), len(backend.encode_chat([*GEOGRAPHY, *HELLO]))
    assert bare < full
    async with expert_on_bus(backend, nats_url, context=GEOGRAPHY, max_context=full) as bus:
        sub = await bus.open("s", HELLO)
        error = error_of(await bus.reply(sub), "prompt_too_long", 0)
        assert f"{full} tokens" in error.message
        answer = await request(bus, wire.Score(HELLO, ["Hello!"]))
        assert isinstance(answer, wire.Error) and answer.code == "prompt_too_long"


@pytest.mark.anyio
@pytest.mark.model
async def test_a_context_longer_than_max_context_stops_the_agent_at_start(
    backend: Backend, nats_url: str
) -> None:
    config = ExpertConfig(expert_id=EXPERT, prefix="ctxlong", context=POETRY, max_context=20)
    nc = await connect_nats(nats_url, name="test-expert")
    try:
        with pytest.raises(Moe2Error, match="the context context@") as info:
            await ExpertAgent(nc, backend, config).run()
    finally:
        await close_nats(nc)
    assert info.value.code == "prompt_too_long"


# --- the context file and the CLI ----------------------------------------------------------------


def write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "ctx.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_a_context_file_loads_with_a_stable_label(tmp_path: Path) -> None:
    messages = [{"role": m.role, "content": m.content} for m in GEOGRAPHY]
    context = load_context(write(tmp_path, {"name": "geo", "messages": messages, "note": "x"}))
    assert context == ExpertContext("geo", GEOGRAPHY)
    assert context.label == f"geo@{context_digest(GEOGRAPHY)}"
    assert len(context.label) == len("geo@") + 8
    assert context_digest(GEOGRAPHY) != context_digest(POETRY)
    assert context_digest(GEOGRAPHY) != context_digest(GEOGRAPHY[:2])


runner = CliRunner()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "cannot read"),
        ("{not json", "is not a context file"),
        ({"name": "x"}, "messages"),
        ({"name": "x", "messages": "hi"}, "messages"),
        ({"name": "x", "messages": [{"role": "user"}]}, "content"),
        ({"name": "x", "messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
        ({"name": "x", "messages": [{"role": "user", "content": ""}]}, "no message with content"),
        ({"name": "a b", "messages": [{"role": "user", "content": "hi"}]}, "context name"),
    ],
    ids=["missing", "json", "no-messages", "not-a-list", "no-content", "role", "empty", "name"],
)
def test_a_bad_context_file_is_a_clear_cli_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: object, words: str
) -> None:
    monkeypatch.setattr(cli, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(cli, "run_async", lambda main: pytest.fail("the expert was started"))
    path = tmp_path / "absent.json" if content is None else write(tmp_path, content)
    result = runner.invoke(cli.app, ["expert", "--id", "e", "--context", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error [invalid_field]: ") and words in result.stderr
    assert str(path) in result.stderr


def test_a_good_context_file_reaches_the_expert_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[ExpertConfig] = []

    async def serve(url: str, config: ExpertConfig) -> None:
        started.append(config)

    monkeypatch.setattr(cli, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr("moe2.agents.expert.agent.serve_expert", serve)
    messages = [{"role": m.role, "content": m.content} for m in POETRY]
    path = write(tmp_path, {"name": "poet", "messages": messages})
    args = ["expert", "--id", "e", "--context", str(path), "--no-context-cache"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    (config,) = started
    assert (config.context, config.context_name, config.context_cache) == (POETRY, "poet", False)
