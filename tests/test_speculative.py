"""Speculative fusion (docs/speculative.md): the round machine alone, the expert's speculative
Steps on a real nats-server, and fused answers of real SmolLM2 experts that disagree now and
then: greedy speculation answers exactly what plain fusion answers, in fewer round trips."""

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
from moe2.agents.expert.backends import load_backend
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.expert.models import resolve_model
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.decoding import Arrived, DecodeSettings, SessionPlan, Tick, ToClient, ToExpert
from moe2.runtime.sampling import SamplingParams
from moe2.runtime.speculative import DraftSampler, SpeculativeDecoding, sampled_distribution
from moe2.runtime.subjects import Subjects
from tests.test_expert import expert_on_bus, greedy_alone, slice_of

_prefixes = (f"sp{i}" for i in itertools.count())
V = 8  # the vocabulary of the machine tests
EOS = 7


# --- the round machine, no bus ---------------------------------------------------------------


def scripted_slice(expert: str, step: int, best: int, more: int = 0) -> wire.Slice:
    """A slice whose most likely id is ``best`` (p 0.7), then the next two ids."""
    ids = np.array([best, (best + 1) % V, (best + 2) % V], dtype=np.uint32)
    probs = np.array([0.7, 0.2, 0.05])
    return wire.make_slice(
        session="s",
        expert=expert,
        step=step,
        ids=ids,
        logprobs=np.log(probs),
        pieces=[bytes([65 + int(i)]) for i in ids],
        more=more,
    )


def machine(max_tokens: int = 20, speculate: int = 3) -> SpeculativeDecoding:
    prompt = wire.Prompt(messages=[wire.ChatMessage("user", "hi")], max_tokens=max_tokens)
    plan = SessionPlan("s", prompt, ["a", "b"], [0.5, 0.5], V, frozenset({EOS}))
    return SpeculativeDecoding(plan, DecodeSettings(step_deadline_s=5.0), 0.0, speculate)


def run(
    m: SpeculativeDecoding, expert: str, step: int, bests: list[int], now: float = 1.0
) -> list[Any]:
    """``expert`` answers a run of slices from ``step`` on; the actions of the last one."""
    out: list[Any] = []
    for i, best in enumerate(bests):
        more = len(bests) - 1 - i
        out = m.apply(Arrived(expert, scripted_slice(expert, step + i, best, more)), now)
    return out


def steps_of(actions: list[Any]) -> dict[str, wire.Step]:
    return {
        a.expert: a.message
        for a in actions
        if isinstance(a, ToExpert) and isinstance(a.message, wire.Step)
    }


def test_a_round_accepts_the_draft_up_to_the_first_fused_disagreement() -> None:
    m = machine()
    m.start(0.0)
    run(m, "b", 0, [1])  # b answers the prefill first: b drafts
    out = run(m, "a", 0, [1])
    assert steps_of(out) == {"b": wire.Step(session="s", step=1, token=1, propose=3)}
    out = run(m, "b", 1, [2, 3, 4, 5])  # b's draft: 2 3 4; a verifies while b drafts ahead
    assert steps_of(out) == {
        "a": wire.Step(session="s", step=1, token=1, draft=[2, 3, 4]),
        "b": wire.Step(session="s", step=5, token=5, propose=3),  # as if 2 3 4 and 5 were taken
    }
    out = run(m, "a", 1, [2, 3, 4, 6])  # a agrees with the whole draft
    # the last position has no draft token: its fused choice is one more token (6: a's best,
    # b's second) and the next round starts after it
    assert m.tokens == [1, 2, 3, 4, 6]
    assert steps_of(out) == {"b": wire.Step(session="s", step=5, token=6, propose=3)}
    assert (m.drafted, m.accepted, m.rounds) == (3, 3, 3)


def test_a_draft_asked_for_ahead_is_verified_at_once_when_the_round_took_it_all() -> None:
    m = machine()
    m.start(0.0)
    run(m, "a", 0, [1])
    run(m, "b", 0, [1])
    run(m, "a", 1, [2, 3, 4, 5])  # a's draft 2 3 4, and a drafts ahead: 5, then 6 6 6
    run(m, "a", 5, [6, 6, 6, 6])  # the draft ahead comes in while b verifies
    out = run(m, "b", 1, [2, 3, 4, 5])  # b takes it all, and the fused next token is a's 5
    assert m.tokens == [1, 2, 3, 4, 5]
    assert steps_of(out) == {
        "b": wire.Step(session="s", step=5, token=5, draft=[6, 6, 6]),  # no draft round trip
        "a": wire.Step(session="s", step=9, token=6, propose=3),
    }
    assert m.rounds == 3  # the draft wave of the second round was never needed
    run(m, "b", 5, [6, 6, 6, 0])
    assert m.tokens[5:] == [6, 6, 6, 0]


def test_a_rejected_draft_continues_from_the_fused_choice() -> None:
    m = machine()
    m.start(0.0)
    run(m, "a", 0, [1])
    run(m, "b", 0, [1])  # a answered first: a drafts
    run(m, "a", 1, [2, 3, 4, 5])
    out = run(m, "b", 1, [2, 0, 0, 0])  # b disagrees at position 1: 3 and 0 tie, 0 wins
    assert m.tokens == [1, 2, 0]  # the draft's 2, then the fused choice instead of its 3
    assert steps_of(out) == {"a": wire.Step(session="s", step=3, token=0, propose=3)}
    assert (m.drafted, m.accepted) == (3, 1)


def test_a_late_experts_stale_run_is_never_taken_for_a_fresh_one() -> None:
    m = machine()
    m.start(0.0)
    run(m, "a", 0, [1])
    run(m, "b", 0, [1])
    run(m, "a", 1, [2, 3, 4, 5])
    assert m.apply(Arrived("b", scripted_slice("b", 1, 2, more=3)), 6.0)  # half a run, late
    out = m.apply(Tick(), 30.0)  # the verification's deadline (1 + 4 x 5 s) has passed
    assert m.tokens == [1, 2, 3, 4, 5]  # a's draft, taken alone (b was late)
    assert steps_of(out) == {}  # a's next draft, from step 5 after 5, was asked for ahead
    run(m, "a", 5, [6, 6, 6, 6], now=31.0)
    for i in range(1, 4):  # the rest of b's stale run: steps 2..4, dropped
        m.apply(Arrived("b", scripted_slice("b", 1 + i, 6, more=3 - i)), 32.0)
    assert m.step == 5 and "b" in m._wait.waiting and len(m.tokens) == 5
    run(m, "b", 5, [6, 6, 6, 6], now=33.0)
    assert m.tokens[5:] == [6, 6, 6, 6] and m.tracker.late == {"b": 1}


def test_an_expert_that_does_not_speculate_turns_the_session_to_plain_rounds() -> None:
    m = machine()
    m.start(0.0)
    run(m, "a", 0, [1])
    run(m, "b", 0, [1])
    run(m, "a", 1, [2, 3, 4, 5])
    out = run(m, "b", 1, [2])  # an expert from before speculation: one slice, the draft ignored
    assert m.tokens == [1, 2]  # position 0 alone: what a plain step gives
    plain = wire.Step(session="s", step=2, token=2)
    assert steps_of(out) == {"a": plain, "b": plain}  # the rest of the session: plain rounds
    run(m, "a", 5, [6, 6, 6, 6])  # the draft a was asked for ahead comes first: dropped
    assert m.tokens == [1, 2] and m.step == 2
    run(m, "a", 2, [3])
    assert steps_of(run(m, "b", 2, [3])) == {
        e: wire.Step(session="s", step=3, token=3) for e in "ab"
    }


def test_the_answer_stops_at_max_tokens_and_at_eos_inside_a_draft() -> None:
    m = machine(max_tokens=3)
    m.start(0.0)
    run(m, "a", 0, [1])
    run(m, "b", 0, [1])
    assert m.speculate == 3 and m._span == 2  # 3 tokens at most: 1 drafted after the first
    run(m, "a", 1, [2, 3])
    out = run(m, "b", 1, [2, 3])
    assert m.tokens == [1, 2, 3] and m.outcome == "length"
    assert any(isinstance(a, ToClient) and isinstance(a.message, wire.Final) for a in out)
    m = machine()
    m.start(0.0)
    run(m, "a", 0, [1])
    run(m, "b", 0, [1])
    run(m, "a", 1, [2, EOS])  # the drafter stops at its end: a run of two
    run(m, "b", 1, [2, EOS])
    assert m.tokens == [1, 2, EOS] and m.outcome == "eos"


def test_speculative_sampling_draws_each_token_from_the_plain_samplers_distribution() -> None:
    """Accept the draft d with p(d), else draw from p without d: every token comes out ∝ p."""

    class Dist:
        ids = np.array([0, 3, 5, 6], dtype=np.uint32)
        probs = np.array([0.1, 0.4, 0.3, 0.2])

    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    p = sampled_distribution(Dist.probs, params)
    sampler = DraftSampler(params)
    for draft in (3, 0, 4):  # the favourite, one top-p cuts, one outside the candidates
        sampler.draft = draft
        counts = np.bincount([sampler.choose_index(Dist) for _ in range(20000)], minlength=4)
        np.testing.assert_allclose(counts / counts.sum(), p, atol=0.015)
    assert p[0] == 0 and p.sum() == pytest.approx(1.0)


# --- an expert's speculative Steps, on a real nats-server --------------------------------------


@pytest.mark.anyio
@pytest.mark.model
async def test_an_expert_verifies_a_draft_in_one_pass_and_goes_back(
    smollm2: TransformersBackend, nats_url: str
) -> None:
    greedy = greedy_alone(smollm2, 6)
    async with expert_on_bus(smollm2, nats_url) as bus:
        sub = await bus.open("spec")
        with anyio.fail_after(60):
            assert int(slice_of(await bus.reply(sub), 0).ids_array()[0]) == greedy[0]
            draft = wire.Step(session="spec", step=1, token=greedy[0], draft=greedy[1:4])
            await bus.send("step", draft)
            run_ = [slice_of(await bus.reply(sub), step) for step in range(1, 5)]
            assert [s.more for s in run_] == [3, 2, 1, 0]
            assert [int(s.ids_array()[0]) for s in run_] == greedy[1:5]
            back = wire.Step(session="spec", step=3, token=greedy[2], propose=2)
            await bus.send("step", back)  # keep two answer tokens; draft two after the third
            proposed = [slice_of(await bus.reply(sub), step) for step in range(3, 6)]
            assert [int(s.ids_array()[0]) for s in proposed] == greedy[3:6]
            assert smollm2._ids["spec"][-5:] == greedy[:5]
            for step in (
                wire.Step(session="spec", step=0, token=greedy[2]),  # before the first step
                wire.Step(session="spec", step=7, token=greedy[2]),  # beyond the next: 6
                wire.Step(session="spec", step=6, token=-1, text=b"x"),  # by id, not bytes
                wire.Step(session="spec", step=6, token=greedy[5], draft_text=[b"x"]),
            ):
                await bus.send("step", step)
                error = await bus.reply(sub)
                assert isinstance(error, wire.Error) and error.step == step.step
                by_bytes = step.text or step.draft_text
                assert error.code == ("invalid_field" if by_bytes else "wrong_step"), error


# --- fused answers of real experts ------------------------------------------------------------

CONTEXTS = {
    "plain": (),
    "brief": (wire.ChatMessage("system", "You answer briefly and precisely."),),
    "teacher": (wire.ChatMessage("system", "You are a patient geography teacher."),),
}


@pytest.fixture(scope="module")
def backends(smollm2: TransformersBackend) -> Iterator[dict[str, TransformersBackend]]:
    """Three SmolLM2 backends (one per expert agent: a backend is never shared)."""
    twins = [load_backend("transformers", resolve_model()) for _ in range(2)]
    loaded = dict(zip(CONTEXTS, [smollm2, *twins], strict=True))
    assert all(isinstance(b, TransformersBackend) for b in loaded.values())
    yield loaded  # type: ignore[misc]  # checked just above


class Pool:
    """Experts and one fusion agent under a fresh prefix; records every Step the agent sends."""

    def __init__(self, client: moe2.Client) -> None:
        self.client = client
        self.steps: list[tuple[str, wire.Step]] = []

    async def ask(self, question: str, **kwargs: Any) -> tuple[wire.Final, list[str]]:
        self.steps.clear()
        with anyio.fail_after(300):
            answer = self.client.ask(question, **kwargs)
            chunks = [c.text async for c in answer]
        assert answer.final is not None
        return answer.final, chunks

    def waves(self) -> int:
        """Round trips after the prefill: a Step sent to several experts at once is one."""
        return len({(s.step, s.propose, tuple(s.draft)) for _, s in self.steps})

    def rounds(self) -> list[tuple[int, int, int]]:
        """Per verified draft: (its step, its length, the draft tokens accepted)."""
        verified = sorted({(s.step, len(s.draft)) for _, s in self.steps if s.draft})
        starts = sorted({s.step for _, s in self.steps if not s.draft})
        after = [(step, n, min((x for x in starts if x > step), default=0)) for step, n in verified]
        return [(step, n, nxt - step - 1) for step, n, nxt in after if nxt]


@asynccontextmanager
async def pool(
    url: str, backends: dict[str, TransformersBackend], **config: Any
) -> AsyncIterator[Pool]:
    prefix = next(_prefixes)
    nc = await connect_nats(url, name="speculative-test")
    try:
        async with anyio.create_task_group() as tg, moe2.connect(url, prefix=prefix) as client:
            for e, backend in backends.items():
                context = CONTEXTS.get(e, ())
                cfg = ExpertConfig(
                    expert_id=e, prefix=prefix, warmup=False, heartbeat_s=0.2, context=context
                )
                await tg.start(ExpertAgent(nc, backend, cfg).run)
            settings = {"step_deadline_s": 60, "prefill_deadline_s": 120, **config}
            fusion = FusionAgent(nc, FusionConfig(prefix=prefix, **settings))
            await tg.start(fusion.run)
            await fusion.wait_for_experts(len(backends), limit_s=30)
            bus = Pool(client)

            async def record(msg: Any) -> None:
                message = wire.decode(msg.data)
                assert isinstance(message, wire.Step)
                bus.steps.append((msg.subject.split(".")[-2], message))

            await nc.subscribe(Subjects(prefix).expert_step("*"), cb=record)
            await nc.flush()
            yield bus
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


QUESTIONS = ("What is the capital of France?", "Name three rivers of Europe.")


@pytest.mark.anyio
@pytest.mark.model
async def test_greedy_speculation_answers_as_plain_fusion_in_fewer_round_trips(
    nats_url: str, backends: dict[str, TransformersBackend]
) -> None:
    answers: dict[int, list[tuple[wire.Final, list[str]]]] = {}
    waves: dict[int, list[int]] = {}
    rounds: list[tuple[int, int, int]] = []
    for speculate in (0, 4):
        async with pool(nats_url, backends, speculate=speculate) as bus:
            answers[speculate] = []
            waves[speculate] = []
            for question in QUESTIONS:
                answers[speculate].append(await bus.ask(question, max_tokens=48))
                waves[speculate].append(bus.waves())
                rounds += bus.rounds() if speculate else []
    for (plain, _), (spec, chunks) in zip(answers[0], answers[4], strict=True):
        assert spec.experts == plain.experts == sorted(CONTEXTS)
        assert (spec.text, spec.finish_reason) == (plain.text, plain.finish_reason)
        assert spec.usage == plain.usage and "".join(chunks) == spec.text
    tokens = [final.usage.completion_tokens for final, _ in answers[4]]
    assert waves[0] == [n - 1 for n in tokens]  # plain: a round trip per token after the first
    assert sum(waves[4]) < 0.6 * sum(tokens)  # speculation: well under one per token
    # whole drafts went through; whether one is also cut here depends on which expert drafts
    # (the fastest measured prefill, so the box's load picks it): a CI run where it agreed with
    # the fused choice throughout had no cut. Cuts are asserted where the draft is fixed:
    # test_a_rejected_draft_continues_from_the_fused_choice and, on a real model through the
    # bus, test_an_expert_verifies_a_draft_in_one_pass_and_goes_back.
    assert any(accepted == n for _, n, accepted in rounds)


@pytest.mark.anyio
@pytest.mark.model
async def test_sampled_speculation_gives_a_well_formed_answer(
    nats_url: str, backends: dict[str, TransformersBackend]
) -> None:
    async with pool(nats_url, backends, speculate=4) as bus:
        final, chunks = await bus.ask(QUESTIONS[0], max_tokens=32, temperature=0.9, seed=3)
        assert any(s.draft for _, s in bus.steps)
    assert final.finish_reason in ("eos", "length") and final.text.strip()
    assert "".join(chunks) == final.text
    assert 0 < final.usage.completion_tokens <= 32 and final.experts == sorted(CONTEXTS)


@pytest.fixture(scope="module")
def gemma3() -> Iterator[TransformersBackend]:
    """Gemma-3-270M, whose tokenizer is not SmolLM2's: a pool of the two is fused by bytes."""
    loaded = load_backend("transformers", resolve_model("gemma3-270m"))
    assert isinstance(loaded, TransformersBackend)
    yield loaded


@pytest.mark.anyio
@pytest.mark.model
async def test_a_mixed_tokenizer_session_speculates_by_bytes_and_answers_as_plain_fusion(
    nats_url: str, backends: dict[str, TransformersBackend], gemma3: TransformersBackend
) -> None:
    """SmolLM2 + Gemma-3, fused by bytes: the draft is the drafter's pieces (``draft_text``),
    each verifier's slice after each piece is the one a plain text step gives, and the greedy
    answer is plain byte-path fusion's, in fewer round trips than tokens."""
    mixed = {"plain": backends["plain"], "gemma": gemma3}
    async with pool(nats_url, mixed, speculate=4) as bus:
        spec, chunks = await bus.ask(QUESTIONS[0], max_tokens=32)
        steps, waves = list(bus.steps), bus.waves()
    async with pool(nats_url, mixed) as bus:
        plain, _ = await bus.ask(QUESTIONS[0], max_tokens=32)
        plain_waves = bus.waves()
    assert spec.experts == plain.experts == ["gemma", "plain"]
    assert (spec.text, spec.finish_reason, spec.usage) == (
        plain.text,
        plain.finish_reason,
        plain.usage,
    )
    assert "".join(chunks) == spec.text and "Paris" in spec.text
    assert all(s.token == -1 and s.text and not s.draft for _, s in steps)  # by bytes
    assert any(s.draft_text for _, s in steps) and any(s.propose for _, s in steps)
    assert plain_waves == plain.usage.completion_tokens - 1
    assert waves < 0.75 * spec.usage.completion_tokens
