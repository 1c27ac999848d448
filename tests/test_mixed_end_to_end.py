"""The byte path with real models: expert agents and a fusion agent in this process, on a real
nats-server. docs/protocol.md §5 (the expert's append), §7 (the byte path), §10 (membership)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import moe2
from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.answer_tokens import AnswerTokenizer
from moe2.agents.expert.backends import transformers_scoring
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
        self.steps: list[tuple[str, wire.Step]] = []  # (the expert it went to, the Step)

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
                bus.steps.append((msg.subject.split(".")[-2], message))

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
        assert {s.text for _, s in by_id.steps} == {None}
    async with pool(nats_url, {"s1": smollm2}, fusion_path="bytes") as by_bytes:
        text = await by_bytes.ask(max_tokens=40)
        assert by_bytes.steps and all(s.token == -1 and s.text for _, s in by_bytes.steps)
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
        assert {s.text for _, s in auto.steps} == {None}
    async with pool(nats_url, experts, fusion_path="bytes") as by_bytes:
        text = await by_bytes.ask(question, max_tokens=48)
        assert by_bytes.steps and {s.token for _, s in by_bytes.steps} == {-1}
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


@pytest.fixture(scope="module")
def gemma3() -> Iterator[TransformersBackend]:
    """Gemma-3-270M (base), whose 262,144-token sentencepiece vocabulary is not SmolLM2's."""
    from moe2.agents.expert.backends import load_backend
    from moe2.agents.expert.models import resolve_model

    loaded = load_backend("transformers", resolve_model("gemma3-270m"))
    assert isinstance(loaded, TransformersBackend)
    yield loaded


class Recording:
    """A backend that keeps the ids of every ``rewrite`` (what a text step made the session
    hold), so a test can read an expert's history after the session is closed."""

    def __init__(self, inner: TransformersBackend) -> None:
        self.inner = inner
        self.rewrites: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def rewrite(self, session: str, ids: Any, top_k: int) -> Any:
        self.rewrites.append(list(ids))
        return self.inner.rewrite(session, ids, top_k)


async def test_smollm2_and_gemma3_fuse_a_coherent_answer_by_bytes(
    nats_url: str, smollm2: TransformersBackend, gemma3: TransformersBackend
) -> None:
    """Two families, two tokenizers: both experts answer every step, the session is fused by
    bytes, and each expert's history is its own tokenizer's tokens of the committed text."""
    assert smollm2.info.tokenizer != gemma3.info.tokenizer
    backends = {"smol": Recording(smollm2), "gemma": Recording(gemma3)}
    async with pool(nats_url, backends) as bus:  # type: ignore[arg-type]
        final = await bus.ask(max_tokens=24)
        steps = list(bus.steps)
    assert sorted(final.experts) == ["gemma", "smol"]
    assert final.late == {} and final.dropped == []  # both slices fused at every step
    assert "Paris" in final.text, final.text
    assert steps and {s.token for _, s in steps} == {-1}  # fused by bytes
    for expert, backend in backends.items():
        texts = [s.text for e, s in steps if e == expert]
        assert len(texts) == final.usage.completion_tokens - (final.finish_reason == "eos")
        committed = b"".join(t or b"" for t in texts)
        assert final.text.encode().startswith(committed)
        prompt = backend.inner.encode_chat([wire.ChatMessage("user", QUESTION)])
        last = backend.rewrites[-1]
        assert last[: len(prompt)] == prompt
        assert last[len(prompt) :] == backend.inner.encode(committed.decode())


def test_a_cache_past_gemmas_sliding_window_is_recomputed_when_it_must_be_cut(
    gemma3: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma-3's sliding-window layers keep only the last 512 positions: a roll-back past
    them cannot cut the cache, so ``rewrite`` recomputes it; the slice is a fresh prefill's."""
    from moe2.agents.expert.backends import transformers_backend

    cuts: list[tuple[int, bool]] = []

    def spy(cache: Any, remove: int) -> bool:
        cuts.append((remove, cut := transformers_scoring.cut_cache(cache, remove)))
        return cut

    monkeypatch.setattr(transformers_backend, "cut_cache", spy)
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 70)
    prompt = gemma3.encode_chat([wire.ChatMessage("user", long)])
    assert len(prompt) > 600
    tokens = AnswerTokenizer(gemma3.encode, gemma3.token_bytes)
    gemma3.prefill("w", prompt, 8)
    done = b""
    for piece in (b" caf", b"\xc3", b"\xa9 au lait"):  # é split: its byte token is rolled back
        done += piece
        top = gemma3.rewrite("w", [*prompt, *tokens.ids(done)], 8)
    assert gemma3._ids["w"][len(prompt) :] == gemma3.encode(" café au lait")
    assert cuts == [(0, True), (0, True), (2, False)]  # " caf" + <0xC3> -> " café", " au", …
    gemma3.release("w")
    fresh = gemma3.prefill("fresh", [*prompt, *gemma3.encode(" café au lait")], 8)
    gemma3.release("fresh")
    assert top.ids.tolist() == fresh.ids.tolist()
    np.testing.assert_allclose(top.logprobs, fresh.logprobs, atol=2e-3)


async def test_gating_collects_trains_and_evaluates_on_a_smollm2_and_gemma3_pool(
    nats_url: str, smollm2: TransformersBackend, gemma3: TransformersBackend, tmp_path: Path
) -> None:
    """The gating workflow on two tokenizers: the collector keeps both experts, the store scores
    each option per answer text (the sum of each expert's own token log-probabilities) in bytes,
    a gate trains on it and the evaluation reports per byte; the fusion agent then serves the
    pool with that gate, fusing by bytes."""
    from moe2.agents.measure.collect import CollectConfig, collect_live
    from moe2.gating.data import cloze_targets, load_examples
    from moe2.gating.embed import load_embedder
    from moe2.gating.evaluate import run_evaluation
    from moe2.gating.model import TrainConfig
    from moe2.gating.store import DatasetSpec, OutputStore, examples_digest
    from moe2.gating.train import train_gating
    from tests.test_gating_collect import write_mmlu

    examples = load_examples(write_mmlu(tmp_path / "mmlu"))
    backends = {"smol": smollm2, "gemma": gemma3}
    async with pool(nats_url, backends) as bus:
        prefix = bus.client.subjects.prefix
        config = CollectConfig(prefix=prefix, top_k=0, wait_s=30, progress=False)
        dataset = DatasetSpec(path="mmlu", examples=len(examples), digest=examples_digest(examples))
        with anyio.fail_after(300):
            summary = await collect_live(nats_url, examples, tmp_path / "o", dataset, config)
        assert summary.complete and summary.failed == 0
        store = OutputStore(tmp_path / "o")
        assert store.mixed and store.expert_ids == ["gemma", "smol"]
        arrays = store.score_arrays()
        assert arrays.unit == "byte"
        ex, scores = examples[1], arrays.examples[1]
        for o, text in enumerate(cloze_targets(ex)):
            assert scores.length(o) == len(text.encode())
            for n, backend in enumerate((gemma3, smollm2)):
                record = store._record(ex.id, ("gemma", "smol")[n])
                assert record.cloze is not None
                per_token = record.cloze.targets[o].logprobs_array()
                assert len(per_token) == len(backend.encode_answer(text))  # its own tokens
                assert scores.cloze[o][n, 0] == pytest.approx(float(per_token.sum()), rel=1e-5)

    gate = tmp_path / "gate"
    train_gating(
        store.to_gating_data(),
        load_embedder(),
        TrainConfig(max_epochs=5, batch=2, grad_accum=1),
        gate,
        progress=False,
    )
    report = run_evaluation(tmp_path / "o", gate, "all", tmp_path / "report")
    assert "| method | NLL / byte |" in report and "| MoE² gating (all) |" in report

    async with pool(nats_url, backends, gate=str(gate)) as gated:
        final = await gated.ask(max_tokens=12)
    assert sorted(final.experts) == ["gemma", "smol"] and "Paris" in final.text
    assert sum(final.weights) == pytest.approx(1.0)
