"""Collecting expert outputs for gating: scripted scoring experts on a real nats-server.

The scripted experts answer Score requests with known log-probabilities (no model): token ids
are the target's UTF-8 bytes and each token's log-probability is a fixed function of the expert,
the target and the position, so every stored figure can be checked.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
import numpy as np
import pytest
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from moe2.agents.measure.collect import (
    CollectConfig,
    choose_examples,
    collect_live,
    discover_experts,
    requests_for,
    store_from_trace,
)
from moe2.agents.traces.recorder import Recorder
from moe2.gating.data import McExample, cloze_targets, load_examples
from moe2.gating.evaluate import evaluate_all
from moe2.gating.pools import MMLU_GROUPS, MMLU_SUBCATEGORIES, build_pool
from moe2.gating.store import (
    RECORDS,
    DatasetSpec,
    ExpertIdentity,
    OutputStore,
    StoreMeta,
    check_resumable,
    examples_digest,
)
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.endpoint import Endpoint, Request
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import Subjects
from moe2.runtime.trace import object_end

if TYPE_CHECKING:
    from moe2.agents.expert.backends.transformers_backend import TransformersBackend

_prefixes = (f"g{i}" for i in itertools.count())

QUESTIONS = {
    "anatomy": [
        ("Which organ pumps blood?", "Heart", "Liver", "Lung", "Skin", "A"),
        ("How many chambers has the human heart?", "Two", "Three", "Four", "Five", "C"),
        ("Which bone is in the thigh?", "Radius", "Femur", "Ulna", "Tibia", "B"),
    ],
    "philosophy": [
        ("Who wrote the Republic?", "Kant", "Hume", "Plato", "Locke", "C"),
        ("Cogito, ergo sum is from", "Descartes", "Spinoza", "Leibniz", "Hobbes", "A"),
        ("Utilitarianism is linked to", "Nietzsche", "Mill", "Sartre", "Kierkegaard", "B"),
    ],
}


def write_mmlu(
    root: Path, split: str = "val", questions: dict[str, list[tuple[str, ...]]] | None = None
) -> Path:
    """A directory in MMLU's layout: ``<split>/<subject>_<split>.csv``, no header."""
    import csv

    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for subject, rows in (questions or QUESTIONS).items():
        with (folder / f"{subject}_{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    return folder


def write_mmlu_dev(root: Path) -> Path:
    """Five subjects per MMLU group, five questions each: the dev split's shape."""
    for subcategories, _ in MMLU_GROUPS.values():
        subjects = [s for s, sub in MMLU_SUBCATEGORIES.items() if sub in subcategories][:5]
        questions = {
            s: [(f"{s} question {i}?", "w", "x", "y", "z", "ABCD"[i % 4]) for i in range(5)]
            for s in subjects
        }
        write_mmlu(root, "dev", questions)
    return root / "dev"


def token_logprob(expert: str, target: str, t: int) -> float:
    """The scripted expert's log f(y_t): a fixed value in [-3, -0.05]."""
    return -0.05 - (zlib.crc32(f"{expert}|{target}|{t}".encode()) % 1000) / 1000 * 2.95


def scripted_target(
    expert: str, target: str, top_k: int, tokenizer: str = "bytes"
) -> wire.TargetScore:
    """One token per byte; the "pairs" tokenizer: one per two bytes (its id: the first's)."""
    ids = np.frombuffer(target.encode(), dtype=np.uint8).astype("<u4")
    if tokenizer == "pairs":
        ids = ids[::2]
    lps = np.array([token_logprob(expert, target, t) for t in range(ids.size)], dtype="<f4")
    top_ids = np.zeros((ids.size, top_k), dtype="<u4")
    top_lps = np.zeros((ids.size, top_k), dtype="<f4")
    for t in range(ids.size):  # the target token first, then lower-ranked others
        top_ids[t] = [(int(ids[t]) + j) % 256 for j in range(top_k)]
        top_lps[t] = [lps[t] - j for j in range(top_k)]
    return wire.TargetScore(
        ids=ids.tobytes(),
        logprobs=lps.tobytes(),
        top_ids=top_ids.tobytes(),
        top_logprobs=top_lps.tobytes(),
    )


@dataclass
class Tally:
    """Answers counted over several experts; ``reached`` is set at ``goal``."""

    goal: int
    count: int = 0
    reached: anyio.Event = field(default_factory=anyio.Event)

    def add(self) -> None:
        self.count += 1
        if self.count >= self.goal:
            self.reached.set()


@dataclass
class ScoringScript:
    delay_s: float = 0.0
    tokenizer: str = "bytes"
    refuse: set[str] = field(default_factory=set)  # questions answered with prompt_too_long
    silent: set[str] = field(default_factory=set)  # questions never answered
    asked: list[str] = field(default_factory=list)  # every request's first message, in order
    answered: int = 0
    tally: Tally | None = None


class ScoringExpert:
    """Answers Score requests with ``scripted_target``; heartbeats like a real expert."""

    def __init__(self, nc: NATS, expert: str, script: ScoringScript, prefix: str) -> None:
        self.nc, self.expert, self.script, self.s = nc, expert, script, Subjects(prefix)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        subject = self.s.expert_score(self.expert)
        scores = Endpoint(
            self.nc, "score", subject, wire.Score, self._answer, agent=self.expert, concurrency=64
        )
        async with anyio.create_task_group() as tg:
            await tg.start(scores.serve)
            tg.start_soon(self._heartbeats)
            task_status.started()

    async def _heartbeats(self) -> None:
        for seq in itertools.count():
            hb = wire.Heartbeat(
                expert=self.expert,
                model=f"scripted/{self.expert}",
                tokenizer=self.script.tokenizer,
                backend="script",
                vocab_size=256,
                eos_ids=[0],
                seq=seq,
                interval_s=0.2,
            )
            await self.nc.publish(self.s.member(self.expert), wire.encode(hb))
            await anyio.sleep(0.2)

    async def _answer(self, request: Request[wire.Score]) -> None:
        """Publishes its own reply, so that the tally counts answers already sent."""
        score = request.message
        question = score.messages[-1].content
        self.script.asked.append(question)
        await anyio.sleep(self.script.delay_s)
        if any(q in question for q in self.script.silent):
            return
        if any(q in question for q in self.script.refuse):
            reply: wire.Message = wire.Error(
                code=str(ErrorCode.PROMPT_TOO_LONG), message="too long", expert=self.expert
            )
        else:
            targets = [
                scripted_target(self.expert, t, score.top_k, self.script.tokenizer)
                for t in score.targets
            ]
            reply = wire.Scored(expert=self.expert, prompt_tokens=len(question), targets=targets)
        await self.nc.publish(request.reply, wire.encode(reply))
        self.script.answered += 1
        if self.script.tally is not None:
            self.script.tally.add()


@asynccontextmanager
async def scoring_experts(
    url: str, scripts: dict[str, ScoringScript]
) -> AsyncIterator[tuple[str, NATS]]:
    """Scripted experts under a fresh prefix; yields the prefix and their connection."""
    prefix = next(_prefixes)
    nc = await connect_nats(url, name="test-scoring")
    try:
        async with anyio.create_task_group() as tg:
            for expert, script in scripts.items():
                await tg.start(ScoringExpert(nc, expert, script, prefix).run)
            yield prefix, nc
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


def dataset_of(path: Path, examples: Sequence[McExample]) -> DatasetSpec:
    return DatasetSpec(path=str(path), examples=len(examples), digest=examples_digest(examples))


def config(prefix: str, **kw: object) -> CollectConfig:
    base: dict[str, object] = {
        "prefix": prefix,
        "top_k": 3,
        "wait_s": 5.0,
        "settle_s": 0.5,
        "timeout_s": 2.0,
        "retries": 1,
        "backoff_s": 0.05,
        "progress": False,
    }
    return CollectConfig(**{**base, **kw})  # type: ignore[arg-type]


def raw_record_keys(store_dir: Path) -> list[tuple[str, str]]:
    """Every whole record in the file, duplicates included (the store's reader drops them)."""
    buf = (store_dir / RECORDS).read_bytes()
    keys, pos = [], 0
    while pos < len(buf):
        end = object_end(buf, pos)
        raw = msgspec.msgpack.decode(buf[pos:end])
        keys.append((raw["example"], raw["expert"]))
        pos = end
    return keys


@pytest.fixture
def mmlu(tmp_path: Path) -> Path:
    return write_mmlu(tmp_path / "mmlu")


# ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_example_is_scored_by_every_expert_in_both_formats(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    examples = load_examples(mmlu)
    scripts = {e: ScoringScript() for e in ("b", "a", "c")}
    async with scoring_experts(nats_url, scripts) as (prefix, _):
        with anyio.fail_after(20):
            summary = await collect_live(
                nats_url, examples, tmp_path / "out", dataset_of(mmlu, examples), config(prefix)
            )
    assert (summary.pairs, summary.collected, summary.failed) == (18, 18, 0)
    store = OutputStore(tmp_path / "out")
    assert store.expert_ids == ["a", "b", "c"]  # the expert axis is in id order
    assert store.meta.experts[0] == ExpertIdentity(
        id="a", model="scripted/a", tokenizer="bytes", backend="script", vocab_size=256
    )
    assert [e.id for e in store.examples] == [e.id for e in examples]
    assert len(store.complete_examples()) == 6
    for script in scripts.values():
        assert len(script.asked) == 12  # 6 examples x (letter, cloze), nothing twice

    data = store.to_gating_data()
    ex = examples[1]  # "How many chambers …", gold "Four"
    assert data.example_ids[1] == ex.id and "A. Two" in data.texts[1]
    want = [[token_logprob(e, "Four", t) for t in range(4)] for e in ("a", "b", "c")]
    np.testing.assert_allclose(data.gold_logprobs[1], want, rtol=1e-6)

    arrays = store.score_arrays()
    letters = [[token_logprob(e, x, 0) for x in "ABCD"] for e in ("a", "b", "c")]
    np.testing.assert_allclose(arrays.examples[1].letter, letters, rtol=1e-6)
    assert [c.shape for c in arrays.examples[1].cloze] == [(3, 3), (3, 5), (3, 4), (3, 4)]
    assert arrays.examples[1].top_ids is not None
    assert arrays.examples[1].top_ids.shape == (3, 4, 3)
    assert arrays.vocab_size == 256 and arrays.has_top_k


@pytest.mark.anyio
async def test_a_larger_collection_reuses_an_earlier_ones_answers(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    examples = load_examples(mmlu)
    scripts = {e: ScoringScript() for e in ("a", "b")}
    async with scoring_experts(nats_url, scripts) as (prefix, _):
        first = examples[:4]
        with anyio.fail_after(20):
            await collect_live(
                nats_url, first, tmp_path / "small", dataset_of(mmlu, first), config(prefix)
            )
        assert [len(s.asked) for s in scripts.values()] == [8, 8]
        with anyio.fail_after(20):
            summary = await collect_live(
                nats_url,
                examples,
                tmp_path / "large",
                dataset_of(mmlu, examples),
                config(prefix, reuse=(tmp_path / "small",)),
            )
    assert (summary.done_before, summary.collected) == (8, 4)
    assert [len(s.asked) for s in scripts.values()] == [12, 12]  # only the 2 new examples
    small, large = OutputStore(tmp_path / "small"), OutputStore(tmp_path / "large")
    assert len(large.complete_examples()) == 6
    assert large.score_arrays([e.id for e in first]).examples[0].letter.tolist() == (
        small.score_arrays().examples[0].letter.tolist()
    )


@pytest.mark.anyio
async def test_an_interrupted_collection_resumes_with_nothing_lost_or_collected_twice(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    examples = load_examples(mmlu)
    out, dataset = tmp_path / "out", dataset_of(mmlu, examples)
    tally = Tally(goal=14)  # part way: 7 of 18 pairs
    scripts = {e: ScoringScript(delay_s=0.01, tally=tally) for e in ("a", "b", "c")}
    async with scoring_experts(nats_url, scripts) as (prefix, _):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect_live, nats_url, examples, out, dataset, config(prefix))
                await tally.reached.wait()
                tg.cancel_scope.cancel()
        first = raw_record_keys(out)
        assert 0 < len(first) < 18
        assert len(set(first)) == len(first)
        asked_before = sum(len(s.asked) for s in scripts.values())

        with anyio.fail_after(20):
            summary = await collect_live(nats_url, examples, out, dataset, config(prefix))
    assert summary.done_before == len(first)
    assert summary.collected == 18 - len(first)
    every = raw_record_keys(out)
    assert len(every) == len(set(every)) == 18
    assert every[: len(first)] == first
    asked_after = sum(len(s.asked) for s in scripts.values()) - asked_before
    assert asked_after == 2 * (18 - len(first))  # only the pending pairs were asked again
    assert len(OutputStore(out).complete_examples()) == 6


@pytest.mark.anyio
async def test_a_record_cut_off_by_a_kill_is_ignored_and_collected_again(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    examples = load_examples(mmlu)
    out, dataset = tmp_path / "out", dataset_of(mmlu, examples)
    async with scoring_experts(nats_url, {"a": ScoringScript()}) as (prefix, _):
        with anyio.fail_after(20):
            await collect_live(nats_url, examples, out, dataset, config(prefix))
        records = out / RECORDS
        whole = records.read_bytes()
        last = raw_record_keys(out)[-1]
        records.write_bytes(whole[:-7])  # the last record, cut short
        assert len(OutputStore(out).done()) == 5
        assert last not in OutputStore(out).done()
        with anyio.fail_after(20):
            summary = await collect_live(nats_url, examples, out, dataset, config(prefix))
    assert summary.collected == 1
    assert raw_record_keys(out)[-1] == last
    assert records.read_bytes() == whole  # the same bytes: the cut record was cut off first


@pytest.mark.anyio
async def test_a_trace_of_a_live_collection_builds_the_same_store(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    examples = load_examples(mmlu)
    dataset = dataset_of(mmlu, examples)
    trace = tmp_path / "collect.moe2"
    scripts = {"a": ScoringScript(), "b": ScoringScript(refuse={"Plato"})}
    async with scoring_experts(nats_url, scripts) as (prefix, _):
        recorder = Recorder(nats_url, trace)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(recorder.run)
                await collect_live(nats_url, examples, tmp_path / "live", dataset, config(prefix))
                recorder.stop()
    summary = store_from_trace(trace, examples, tmp_path / "replayed", dataset, prefix=prefix)
    assert (summary.collected, summary.failed) == (12, 1)
    live, replayed = OutputStore(tmp_path / "live"), OutputStore(tmp_path / "replayed")
    assert {(r.example, r.expert): r for r in live.records()} == {
        (r.example, r.expert): r for r in replayed.records()
    }
    assert replayed.examples == live.examples
    strip = {"created": "", "source": ""}
    assert msgspec.structs.replace(replayed.meta, **strip) == msgspec.structs.replace(
        live.meta, **strip
    )
    assert replayed.meta.source == f"trace:{trace}"
    assert replayed.to_gating_data().data_hash() == live.to_gating_data().data_hash()


@pytest.mark.anyio
async def test_a_refusal_is_stored_once_and_the_example_left_out_of_training(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    examples = load_examples(mmlu)
    out, dataset = tmp_path / "out", dataset_of(mmlu, examples)
    scripts = {"a": ScoringScript(), "b": ScoringScript(refuse={"Plato"})}
    async with scoring_experts(nats_url, scripts) as (prefix, _):
        with anyio.fail_after(20):
            summary = await collect_live(nats_url, examples, out, dataset, config(prefix))
            again = await collect_live(nats_url, examples, out, dataset, config(prefix))
    assert (summary.collected, summary.failed, again.collected) == (12, 1, 0)
    assert sum("Plato" in q for q in scripts["b"].asked) == 1  # refused once, never re-asked
    store = OutputStore(out)
    [failed] = store.failed()
    assert failed.expert == "b" and failed.error is not None
    assert failed.error.code == ErrorCode.PROMPT_TOO_LONG
    assert "Plato" not in " ".join(store.to_gating_data().texts)
    assert len(store.to_gating_data()) == 5


@pytest.mark.anyio
async def test_an_expert_that_never_answers_stops_the_run_with_a_clear_error(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    examples = load_examples(mmlu)
    out, dataset = tmp_path / "out", dataset_of(mmlu, examples)
    scripts = {"a": ScoringScript(silent={"Femur"})}
    async with scoring_experts(nats_url, scripts) as (prefix, _):
        with anyio.fail_after(20), pytest.raises(Moe2Error) as caught:
            await collect_live(
                nats_url, examples, out, dataset, config(prefix, timeout_s=0.3, concurrency=1)
            )
    assert caught.value.code == ErrorCode.TIMEOUT
    message = caught.value.message
    assert "expert a" in message and "mmlu/val/anatomy/2" in message and "2 tries" in message
    assert "run the same command again to resume" in message
    assert len(OutputStore(out).done()) == 2  # what came before it is saved


@pytest.mark.anyio
async def test_no_live_expert_and_missing_experts_are_clear_errors(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    examples = load_examples(mmlu)
    dataset = dataset_of(mmlu, examples)
    with anyio.fail_after(10), pytest.raises(Moe2Error) as none:
        await collect_live(
            nats_url, examples, tmp_path / "x", dataset, config("nobody", wait_s=0.3)
        )
    assert none.value.code == ErrorCode.NO_EXPERTS
    assert "no expert heartbeat on nobody.v1.members.*" in none.value.message
    async with scoring_experts(nats_url, {"a": ScoringScript()}) as (prefix, _):
        with anyio.fail_after(10), pytest.raises(Moe2Error) as missing:
            cfg = config(prefix, wait_s=0.5, experts=("a", "z"))
            await collect_live(nats_url, examples, tmp_path / "y", dataset, cfg)
    assert "experts ['z'] sent no heartbeat" in missing.value.message
    assert "live: ['a']" in missing.value.message


@pytest.mark.anyio
async def test_without_experts_named_the_collector_waits_for_latecomers(nats_url: str) -> None:
    """Experts still loading join one by one: each new one restarts the quiet period."""
    prefix = next(_prefixes)
    nc = await connect_nats(nats_url, name="test-latecomers")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(ScoringExpert(nc, "a", ScoringScript(), prefix).run)

            async def late() -> None:
                for expert in ("b", "c"):
                    await anyio.sleep(0.6)  # each within the 1 s quiet period of the last
                    await tg.start(ScoringExpert(nc, expert, ScoringScript(), prefix).run)

            tg.start_soon(late)
            with anyio.fail_after(10):
                found = await discover_experts(nc, Subjects(prefix), None, 5.0, 1.0)
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)
    assert sorted(found) == ["a", "b", "c"]


@pytest.mark.anyio
async def test_experts_with_different_tokenizers_are_scored_per_answer_text_in_bytes(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    """A mixed pool has no common token axis: each option is one unit per expert (its log-
    probability of the whole text, summed over that expert's own tokens), lengths in bytes."""
    examples = load_examples(mmlu)
    scripts = {"a": ScoringScript(), "g": ScoringScript(tokenizer="pairs")}
    async with scoring_experts(nats_url, scripts) as (prefix, _):
        with anyio.fail_after(20):
            summary = await collect_live(
                nats_url, examples, tmp_path / "o", dataset_of(mmlu, examples), config(prefix)
            )
    assert summary.complete
    store = OutputStore(tmp_path / "o")
    assert store.mixed
    arrays = store.score_arrays()
    assert arrays.unit == "byte" and arrays.vocab_size == 0
    ex, scores = examples[0], arrays.examples[0]
    for o, text in enumerate(cloze_targets(ex)):
        size = len(text.encode())
        want = [
            sum(token_logprob("a", text, t) for t in range(size)),
            sum(token_logprob("g", text, t) for t in range((size + 1) // 2)),
        ]
        np.testing.assert_allclose(scores.cloze[o][:, 0], want, rtol=1e-5)
        assert scores.cloze[o].shape == (2, 1) and scores.length(o) == size
    data = store.to_gating_data()
    assert [lp.shape for lp in data.gold_logprobs] == [(2, 1)] * len(examples)
    rows = {r.method: r for r in evaluate_all(arrays, None)}
    gold_bytes = sum(len(cloze_targets(e)[e.answer].encode()) for e in examples)
    nll_a = -sum(float(s.gold[0, 0]) for s in arrays.examples)
    assert rows["single: a"].nll_per_token == pytest.approx(nll_a / gold_bytes)


@pytest.mark.anyio
async def test_resuming_with_other_experts_or_examples_is_refused(
    nats_url: str, mmlu: Path, tmp_path: Path
) -> None:
    examples = load_examples(mmlu)
    out, dataset = tmp_path / "out", dataset_of(mmlu, examples)
    async with scoring_experts(nats_url, {"a": ScoringScript(), "b": ScoringScript()}) as (p, _):
        with anyio.fail_after(20):
            await collect_live(nats_url, examples, out, dataset, config(p, experts=("a",)))
            with pytest.raises(Moe2Error, match=r"started with experts \['a'\], not \['a', 'b'\]"):
                await collect_live(nats_url, examples, out, dataset, config(p, experts=("a", "b")))
            with pytest.raises(Moe2Error, match="holds 6 other examples"):
                await collect_live(nats_url, examples[:3], out, dataset, config(p))
            with pytest.raises(Moe2Error, match="--top-k 3"):
                await collect_live(nats_url, examples, out, dataset, config(p, top_k=5))


def test_a_second_writer_is_refused(mmlu: Path, tmp_path: Path) -> None:
    examples = load_examples(mmlu)
    meta = StoreMeta(
        experts=[ExpertIdentity(id="a", model="m", tokenizer="t")],
        dataset=dataset_of(mmlu, examples),
    )
    with (
        OutputStore.create(tmp_path / "s", meta, examples),
        pytest.raises(Moe2Error, match="another collection is writing"),
    ):
        OutputStore.create(tmp_path / "s", meta, examples)
    OutputStore.create(tmp_path / "s", meta, examples).close()  # free again once closed


def test_check_resumable_names_what_differs(mmlu: Path) -> None:
    examples = load_examples(mmlu)
    ident = ExpertIdentity(id="a", model="m1", tokenizer="t")
    meta = StoreMeta(experts=[ident], dataset=dataset_of(mmlu, examples), top_k=8)
    check_resumable(meta, examples, meta, examples)
    other_model = msgspec.structs.replace(
        meta, experts=[msgspec.structs.replace(ident, model="m2")]
    )
    with pytest.raises(Moe2Error, match="expert a now serves m2"):
        check_resumable(meta, examples, other_model, examples)
    changed = [dataclasses.replace(examples[0], answer=3), *examples[1:]]
    with pytest.raises(Moe2Error, match="other examples"):
        check_resumable(meta, examples, meta, changed)


def test_a_directory_that_is_no_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Moe2Error, match="is not a gating output store"):
        OutputStore(tmp_path)


def test_limit_takes_a_seeded_sample_in_the_original_order(mmlu: Path) -> None:
    examples = load_examples(mmlu)
    sample = choose_examples(examples, 3, seed=1)
    assert sample == choose_examples(examples, 3, seed=1)
    assert [examples.index(e) for e in sample] == sorted(examples.index(e) for e in sample)
    assert choose_examples(examples, 3, seed=2) != sample or len(examples) <= 3
    assert choose_examples(examples, None) == examples


def test_requests_ask_the_letter_and_the_cloze_format(mmlu: Path) -> None:
    ex = load_examples(mmlu)[0]
    letter, cloze = requests_for(ex, 4)
    assert letter.targets == ["A", "B", "C", "D"] and letter.top_k == 4
    assert "A. Heart" in letter.messages[-1].content
    assert cloze.targets == ["Heart", "Liver", "Lung", "Skin"]
    assert "A. Heart" not in cloze.messages[-1].content


@pytest.mark.model
@pytest.mark.anyio
async def test_real_smollm2_experts_with_pool_contexts_score_mmlu_examples(
    nats_url: str, mmlu: Path, tmp_path: Path, smollm2: TransformersBackend
) -> None:
    """Three MMLU-format examples scored by two SmolLM2 experts holding two pool contexts."""
    from moe2.agents.expert.agent import ExpertAgent, ExpertConfig

    pool = build_pool(load_examples(write_mmlu_dev(tmp_path / "dev")))
    examples = load_examples(mmlu)[:3]
    prefix = next(_prefixes)
    nc = await connect_nats(nats_url, name="test-real-experts")
    try:
        async with anyio.create_task_group() as tg:
            for group in ("stem", "humanities"):
                cfg = ExpertConfig(
                    expert_id=group,
                    prefix=prefix,
                    context=tuple(pool[group].context.messages),
                    context_name=group,
                    heartbeat_s=0.2,
                )
                await tg.start(ExpertAgent(nc, smollm2, cfg).run)
            with anyio.fail_after(240):
                summary = await collect_live(
                    nats_url,
                    examples,
                    tmp_path / "out",
                    dataset_of(mmlu, examples),
                    config(prefix, wait_s=60, timeout_s=120, concurrency=1, top_k=4),
                )
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)
    assert (summary.collected, summary.failed) == (6, 0)
    store = OutputStore(tmp_path / "out")
    assert [e.model.split("+ctx:")[-1].split("@")[0] for e in store.meta.experts] == [
        "humanities",
        "stem",
    ]
    data = store.to_gating_data()
    assert data.expert_ids == ["humanities", "stem"]
    for lp in data.gold_logprobs:
        assert lp.shape[0] == 2 and np.all(lp <= 0) and np.all(np.isfinite(lp))
        assert not np.allclose(lp[0], lp[1])  # different contexts, different answers
    ex = store.score_arrays().examples[0]
    assert ex.top_ids is not None and ex.top_ids.shape[2] == 4
    ids = smollm2.encode(cloze_targets(examples[0])[examples[0].answer])
    assert ex.cloze_ids[examples[0].answer].tolist() == list(ids)
