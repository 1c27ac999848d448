"""Score requests to the expert agent: the real SmolLM2 model on a real nats-server, as the gating
collector sees it (request/reply on ``<prefix>.v1.expert.<id>.score``)."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import nats.errors
import numpy as np
import pytest
import structlog

from moe2.agents.expert.backends.base import Backend
from moe2.runtime import wire
from tests.test_expert import (
    EXPERT,
    Bus,
    FailingDecode,
    expert_on_bus,
    greedy_alone,
    greedy_over_bus,
)

pytestmark = [pytest.mark.anyio, pytest.mark.model]
CLOZE = [wire.ChatMessage("user", "Which planet is closest to the Sun? Answer with its name.")]
OPTIONS = ["Mercury", "Venus", "Mars, the red planet", "Jupiter"]


@pytest.fixture
def backend(smollm2: Backend) -> Backend:
    return smollm2


async def request(bus: Bus, score: wire.Score | bytes) -> wire.Message:
    data = score if isinstance(score, bytes) else wire.encode(score)
    reply = await bus.nc.request(bus.s.expert_score(EXPERT), data, timeout=30)
    return wire.decode(reply.data)


def scored_of(message: wire.Message, n: int) -> wire.Scored:
    assert isinstance(message, wire.Scored), message
    assert message.expert == EXPERT and len(message.targets) == n
    return message


def error_of(message: wire.Message, code: str) -> wire.Error:
    assert isinstance(message, wire.Error), message
    assert (message.code, message.expert, message.session, message.step) == (code, EXPERT, "", -1)
    return message


# --- the normal path -------------------------------------------------------------------------


async def test_a_cloze_score_holds_the_models_teacher_forced_logprobs(
    backend: Backend, nats_url: str
) -> None:
    prompt = backend.encode_chat(CLOZE)
    targets = [backend.encode(t) for t in OPTIONS]
    expected = backend.score(prompt, targets, 5)
    async with expert_on_bus(backend, nats_url, device={"name": "t", "power_w": 4.0}) as bus:
        answer = scored_of(await request(bus, wire.Score(CLOZE, OPTIONS, top_k=5)), 4)
        assert bus.agent.stats.scores == 1
    assert answer.prompt_tokens == len(prompt)
    assert answer.compute_s > 0 and answer.energy_j == pytest.approx(4.0 * answer.compute_s)
    for ids, want, got in zip(targets, expected, answer.targets, strict=True):
        assert got.ids_array().tolist() == ids
        np.testing.assert_allclose(got.logprobs_array(), want.logprobs, atol=1e-5)
        top_ids, top_logprobs = got.top_arrays()
        assert top_ids.shape == (len(ids), 5)
        np.testing.assert_array_equal(top_ids, want.top_ids)
        np.testing.assert_allclose(top_logprobs, want.top_logprobs, atol=1e-5)


@pytest.mark.parametrize(("asked", "served"), [(0, 0), (3, 3), (100, 10)])
async def test_score_top_k_is_capped_like_open_and_zero_means_none(
    backend: Backend, nats_url: str, asked: int, served: int
) -> None:
    async with expert_on_bus(backend, nats_url, top_k=5, max_top_k=10) as bus:
        answer = scored_of(await request(bus, wire.Score(CLOZE, ["Venus"], top_k=asked)), 1)
    top_ids, top_logprobs = answer.targets[0].top_arrays()
    assert top_ids.shape == top_logprobs.shape == (len(backend.encode("Venus")), served)


async def test_sessions_and_scores_share_the_model_without_colliding(
    backend: Backend, nats_url: str
) -> None:
    expected_chain = greedy_alone(backend, 6)
    expected = backend.score(backend.encode_chat(CLOZE), [backend.encode(t) for t in OPTIONS], 0)
    answers: list[wire.Message] = []
    async with expert_on_bus(backend, nats_url) as bus, anyio.create_task_group() as tg:
        chains: list[list[int]] = []

        async def session() -> None:
            chains.append(await greedy_over_bus(bus, "s", 6))

        async def scores() -> None:
            for _ in range(3):
                answers.append(await request(bus, wire.Score(CLOZE, OPTIONS)))

        tg.start_soon(session)
        tg.start_soon(scores)
    assert chains == [expected_chain]
    for answer in answers:
        for want, got in zip(expected, scored_of(answer, 4).targets, strict=True):
            np.testing.assert_allclose(got.logprobs_array(), want.logprobs, atol=1e-5)


# --- refusals: an Error on the reply subject, and the agent serves on ----------------------------

_score = {"type": "moe2.v1.score", "messages": [{"role": "user", "content": "x"}], "targets": ["a"]}


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (wire.Score([], ["a"]), "empty_prompt", "no message with content"),
        (wire.Score([wire.ChatMessage("user", "")], ["a"]), "empty_prompt", "no message"),
        (wire.Score([wire.ChatMessage("user", " \n\t")], ["a"]), "empty_prompt", "no message"),
        (wire.Score(CLOZE, []), "invalid_field", "at least one target"),
        (wire.Score(CLOZE, ["Venus", ""]), "invalid_field", "target 1 is empty"),
        (wire.Score(CLOZE, ["Venus"], top_k=-1), "invalid_field", "top_k"),
        (b"\xc1 not msgpack", "malformed", "not a msgpack"),
        (msgspec.msgpack.encode({**_score, "type": "moe2.v2.score"}), "unsupported_version", "v2"),
        (msgspec.msgpack.encode({**_score, "targets": "a"}), "invalid_field", "targets"),
        (
            wire.encode(wire.Open(session="s", messages=CLOZE)),
            "unknown_type",
            "carries moe2.v1.score, not moe2.v1.open",
        ),
    ],
    ids=[
        "no-messages",
        "blank",
        "whitespace",
        "no-targets",
        "empty-target",
        "top-k",
        "bytes",
        "v2",
        "typed",
        "open",
    ],
)
async def test_a_bad_score_request_gets_an_error_and_the_agent_serves_on(
    backend: Backend, nats_url: str, data: wire.Score | bytes, code: str, words: str
) -> None:
    async with expert_on_bus(backend, nats_url) as bus:
        assert words in error_of(await request(bus, data), code).message
        assert bus.agent.error_counts() == {code: 1}
        await greedy_over_bus(bus, "after", 2)
        scored_of(await request(bus, wire.Score(CLOZE, ["Venus"])), 1)


async def test_a_prompt_and_target_beyond_the_context_are_refused(
    backend: Backend, nats_url: str
) -> None:
    """A target is scored when a session could have generated it: prompt + target <= context."""
    n = len(backend.encode_chat(CLOZE))
    fits, too_long = "Venus", "Venus is the second planet from the Sun"
    t = len(backend.encode(fits))
    async with expert_on_bus(backend, nats_url, max_context=n + t) as bus:
        scored_of(await request(bus, wire.Score(CLOZE, [fits])), 1)
        error = error_of(await request(bus, wire.Score(CLOZE, [fits, too_long])), "prompt_too_long")
        assert f"({n} tokens) and target 1" in error.message and f"{n + t}-token" in error.message
    async with expert_on_bus(backend, nats_url, max_context=n + t - 1) as bus:
        error_of(await request(bus, wire.Score(CLOZE, [fits])), "prompt_too_long")


async def test_a_reply_over_max_payload_is_refused_as_too_large(
    backend: Backend, nats_url: str
) -> None:
    long_target = "the sea and the sky " * 10  # ~50 positions x 1024 x 8 bytes > 256 KiB
    async with expert_on_bus(backend, nats_url) as bus:
        error = error_of(
            await request(bus, wire.Score(CLOZE, [long_target], top_k=1024)), "payload_too_large"
        )
        assert "max_payload" in error.message
        scored_of(await request(bus, wire.Score(CLOZE, [long_target], top_k=8)), 1)


async def test_a_score_without_a_reply_subject_is_dropped_logged_and_counted(
    backend: Backend, nats_url: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with expert_on_bus(backend, nats_url) as bus:
            await bus.nc.publish(bus.s.expert_score(EXPERT), wire.encode(wire.Score(CLOZE, ["a"])))
            await greedy_over_bus(bus, "after", 2)  # handled after the score, in order
            assert bus.agent.error_counts() == {"invalid_field": 1}
            assert bus.agent.stats.scores == 0
            scored_of(await request(bus, wire.Score(CLOZE, ["Venus"])), 1)
    dropped = [e for e in logs if e["event"] == "message_dropped"]
    assert [(e["code"], e["error"]) for e in dropped] == [
        ("invalid_field", "a score needs a reply subject")
    ]


async def test_scores_beyond_the_queue_limit_are_answered_busy(
    backend: Backend, nats_url: str
) -> None:
    async with expert_on_bus(backend, nats_url, max_pending_scores=1) as bus:
        inboxes = [bus.nc.new_inbox() for _ in range(3)]
        subs = [await bus.nc.subscribe(inbox) for inbox in inboxes]
        for inbox in inboxes:  # all three arrive while the first is being scored
            data = wire.encode(wire.Score(CLOZE, OPTIONS))
            await bus.nc.publish(bus.s.expert_score(EXPERT), data, reply=inbox)
        answers = [wire.decode((await sub.next_msg(timeout=30)).data) for sub in subs]
        assert bus.agent.scores_pending == 0
    scored_of(answers[0], 4)
    for answer in answers[1:]:
        assert "at most 1 score" in error_of(answer, "busy").message


class FailingScore(FailingDecode):
    """The real backend, except that score raises (and decode too, which is not used here)."""

    def score(self, prompt_ids: Any, targets_ids: Any, top_k: int, prefix: Any = None) -> Any:
        raise RuntimeError("out of memory")


async def test_a_failing_score_answers_internal_and_the_agent_lives_on(
    backend: Backend, nats_url: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with expert_on_bus(FailingScore(backend), nats_url) as bus:
            error_of(await request(bus, wire.Score(CLOZE, OPTIONS)), "internal")
            sub = await bus.open("s")
            assert isinstance(await bus.reply(sub), wire.Slice)
            assert bus.agent.error_counts() == {"internal": 1}
    assert any(e["event"] == "handler_failed" and e["exc_info"] for e in logs)


async def test_nobody_answers_a_score_on_another_experts_subject(
    backend: Backend, nats_url: str
) -> None:
    async with expert_on_bus(backend, nats_url) as bus:
        with pytest.raises(nats.errors.NoRespondersError):
            await bus.nc.request(bus.s.expert_score("other"), b"", timeout=5)
