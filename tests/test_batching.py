"""Continuous batching in the expert: the scheduler alone (pure, no model), then the real SmolLM2
expert on a real nats-server serving several sessions at once."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe2.agents.expert.backends.base import Backend
from moe2.agents.expert.scheduler import ModelScheduler
from moe2.runtime import wire
from moe2.runtime.connection import nats_connection
from moe2.runtime.errors import ErrorCode, Moe2Error
from tests.test_expert import Bus, error_of, expert_on_bus, slice_of
from tests.test_replay import FusionStandIn, replaying, trace

__all__ = ["trace"]  # test_replay's fixture, used here

pytestmark = pytest.mark.anyio

QUESTIONS = (
    "Name three colours of the sea.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling on a quiet river at dusk.",
    "How many legs does a spider have?",
    "Hi",
    "Why is the sky blue? Explain it to a child.",
)


# --- the scheduler, with plain functions for a model ------------------------------------------


class Model:
    """Records what the scheduler runs: ``("batch", items)`` or ``("job", name)``."""

    def __init__(self, job_s: float = 0.1, batch_s: float = 0.0) -> None:
        self.job_s, self.batch_s = job_s, batch_s  # how long each call takes
        self.calls: list[tuple[str, Any]] = []
        self.gate = threading.Event()  # the jobs wait on it: calls queue up behind the first
        self.gate.set()
        self.busy = threading.Event()  # a job has started

    def batch(self, items: list[int]) -> list[int]:
        self.calls.append(("batch", list(items)))
        time.sleep(self.batch_s)
        if any(i < 0 for i in items):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "a negative item")
        return [i * 10 for i in items]

    def job(self, name: str) -> Callable[[], str]:
        def run() -> str:
            self.busy.set()
            self.gate.wait(10)
            self.calls.append(("job", name))
            time.sleep(self.job_s)
            return name

        return run


def scheduler(
    model: Model, expected: Callable[[], int] = lambda: 0, gather_s: float = 0.0
) -> ModelScheduler[int, int]:
    return ModelScheduler(model.batch, max_batch=3, gather_s=gather_s, expected=expected)


async def test_waiting_steps_run_as_one_batch_and_jobs_take_turns_with_batches() -> None:
    model = Model()
    sched = scheduler(model)
    results: dict[str, Any] = {}

    async def step(i: int) -> None:
        results[f"s{i}"] = await sched.step(i)

    async def job(name: str) -> None:
        results[name] = await sched.call(model.job(name))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            model.gate.clear()
            tg.start_soon(job, "blocker")  # holds the worker while the rest queue up
            await wait_until(model.busy.is_set)
            for name in ("prefill-a", "prefill-b"):
                tg.start_soon(job, name)
            for i in range(1, 6):
                tg.start_soon(step, i)
            await wait_until(lambda: sched.waiting == 7)
            model.gate.set()
            await wait_until(lambda: len(results) == 8)
            tg.cancel_scope.cancel()
    assert model.calls == [
        ("job", "blocker"),
        ("batch", [1, 2, 3]),  # at most max_batch
        ("job", "prefill-a"),
        ("batch", [4, 5]),
        ("job", "prefill-b"),
    ]
    assert results == {"blocker": "blocker", "prefill-a": "prefill-a", "prefill-b": "prefill-b"} | {
        f"s{i}": i * 10 for i in range(1, 6)
    }


async def test_after_a_batch_jobs_run_until_their_time_adds_up_to_the_batchs() -> None:
    """A burst of prefills: a few per turn (about one batch's time of them), not one."""
    model = Model(job_s=0.05, batch_s=0.4)
    sched = scheduler(model)
    done: list[int] = []

    async def session(i: int) -> None:
        for _ in range(3):
            done.append(await sched.step(i))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            for i in range(2):
                tg.start_soon(session, i)
            await wait_until(lambda: bool(model.calls))
            for i in range(12):
                tg.start_soon(sched.call, model.job(f"prefill-{i}"))
            await wait_until(lambda: len(done) == 6 and sched.waiting == 0)
            tg.cancel_scope.cancel()
    kinds = "".join(kind[0] for kind, _ in model.calls)  # b: a batch, j: a job
    runs = [len(run) for run in kinds.split("b") if run]
    assert kinds.startswith("b") and kinds.count("b") == 3
    assert len(runs) >= 2 and all(2 <= n <= 9 for n in runs[:-1]), kinds  # several, not one


async def test_a_failed_batch_fails_each_of_its_steps_and_the_scheduler_lives_on() -> None:
    model = Model()
    expected = [2]
    sched = scheduler(model, expected=lambda: expected[0], gather_s=5.0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            failures: list[str] = []

            async def failing(i: int) -> None:
                with pytest.raises(Moe2Error) as refused:
                    await sched.step(i)
                failures.append(refused.value.code)

            tg.start_soon(failing, 1)
            tg.start_soon(failing, -1)
            await wait_until(lambda: len(failures) == 2)
            expected[0] = 1
            assert await sched.step(7) == 70
            tg.cancel_scope.cancel()
    assert failures == [ErrorCode.INVALID_FIELD] * 2
    assert model.calls == [("batch", [1, -1]), ("batch", [7])]


async def test_a_batch_waits_for_the_expected_steps_but_no_longer_than_gather_s() -> None:
    for gather_s, expected in ((5.0, [("batch", [1, 2])]), (0.0, [("batch", [1]), ("batch", [2])])):
        model = Model()
        sched = scheduler(model, expected=lambda: 2, gather_s=gather_s)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(sched.run)
                tg.start_soon(sched.step, 1)
                await anyio.sleep(0.05)  # the second session's step comes a round trip later
                assert await sched.step(2) == 20
                tg.cancel_scope.cancel()
        assert model.calls == expected


async def test_a_lone_sessions_step_and_prefill_wait_for_nothing() -> None:
    """One session (two experts fused, one session each): its step runs the moment it comes,
    whatever the gathering window, and so does a new session's prefill."""
    model = Model()
    decoding = [0]
    sched = scheduler(model, expected=lambda: decoding[0], gather_s=5.0)

    def prefill(items: list[int]) -> list[int]:
        return items

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            started = time.perf_counter()
            assert await sched.call_batched(prefill, 7, cost=20) == 7
            decoding[0] = 1
            for i in range(1, 6):
                assert await sched.step(i) == i * 10
            took = time.perf_counter() - started
            tg.cancel_scope.cancel()
    assert took < 0.5  # a wait of gather_s (5 s) would show
    assert model.calls == [("batch", [i]) for i in range(1, 6)]


async def test_a_step_whose_waiter_is_gone_is_not_run() -> None:
    model = Model()
    sched = scheduler(model)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            await hold_the_worker(tg, sched, model)
            with anyio.move_on_after(0.05):
                await sched.step(1)  # given up on while the worker is busy
            tg.start_soon(sched.step, 2)
            await wait_until(lambda: sched.waiting == 2)
            model.gate.set()
            await wait_until(lambda: len(model.calls) == 2)
            tg.cancel_scope.cancel()
    assert model.calls == [("job", "blocker"), ("batch", [2])]


async def hold_the_worker(
    tg: anyio.abc.TaskGroup, sched: ModelScheduler[int, int], model: Model
) -> None:
    """Start a job that holds the worker until ``model.gate`` is set; return once it runs."""
    model.gate.clear()
    model.busy.clear()
    tg.start_soon(sched.call, model.job("blocker"))
    await wait_until(model.busy.is_set)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll (bounded by the test's fail_after): the scheduler's queues have no event to await."""
    while not condition():  # noqa: ASYNC110  # the queues have no event
        await anyio.sleep(0.005)


# --- the expert on the bus, the real model ------------------------------------------------------


@pytest.fixture
def backend(smollm2: Backend) -> Backend:
    return smollm2


def greedy_alone(backend: Backend, question: str, n: int) -> list[int]:
    prompt = backend.encode_chat([wire.ChatMessage("user", question)])
    tokens = [int(backend.prefill("ref", prompt, 1).ids[0])]
    while len(tokens) < n:
        tokens.append(int(backend.decode("ref", tokens[-1], 1).ids[0]))
    backend.release("ref")
    return tokens


async def greedy_session(
    bus: Bus, session: str, question: str, n: int, joules: list[float] | None = None
) -> list[int]:
    """A fusion agent's greedy loop for one session: open, step on the best id, close; each
    slice's ``energy_j`` goes into ``joules``."""
    sub = await bus.open(session, [wire.ChatMessage("user", question)], top_k=4)
    tokens: list[int] = []
    for step in range(n):
        if step:
            await bus.send("step", wire.Step(session=session, step=step, token=tokens[-1]))
        got = slice_of(await bus.reply(sub), step)
        tokens.append(int(got.ids_array()[0]))
        assert got.energy_j == pytest.approx(15.0 * got.compute_s)  # the declared 15 W
        if joules is not None:
            joules.append(got.energy_j)
    await bus.send("close", wire.Close(session=session, reason="done"))
    await sub.unsubscribe()
    return tokens


def batch_sizes(port: int) -> tuple[float, float, float]:
    """The expert's /metrics, as Prometheus reads it: decode batches, sessions in them, and
    batches of exactly one session."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {
        (s.name, s.labels.get("le", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("moe2_expert_decode_batch_sessions")
    }
    name = "moe2_expert_decode_batch_sessions"
    return (
        samples[(f"{name}_count", "")],
        samples[(f"{name}_sum", "")],
        samples[(f"{name}_bucket", "1.0")],
    )


@pytest.mark.model
async def test_concurrent_sessions_answer_as_one_at_a_time_in_batches(
    backend: Backend, nats_url: str
) -> None:
    steps = 12
    alone = [greedy_alone(backend, q, steps) for q in QUESTIONS]
    held_before = getattr(backend, "sessions", None)  # KV caches the backend holds
    answers: dict[int, list[int]] = {}
    async with expert_on_bus(backend, nats_url, metrics_port=0, batch_gather_s=0.05) as bus:
        assert bus.agent.metrics_port is not None

        joules: list[float] = []

        async def session(i: int) -> None:
            answers[i] = await greedy_session(bus, f"c{i}", QUESTIONS[i], steps, joules)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(len(QUESTIONS)):
                    tg.start_soon(session, i)
        batches, sessions, singles = await anyio.to_thread.run_sync(
            batch_sizes, bus.agent.metrics_port
        )
        energy = bus.agent.metrics.registry.get_sample_value(
            "moe2_expert_energy_joules_total", {"energy_source": "declared", "phase": "decode"}
        ) + bus.agent.metrics.registry.get_sample_value(
            "moe2_expert_energy_joules_total", {"energy_source": "declared", "phase": "prefill"}
        )
        await bus.sessions_drop_to(0)  # every session's KV cache freed on Close
    assert [answers[i] for i in range(len(QUESTIONS))] == alone
    assert getattr(backend, "sessions", None) == held_before
    assert sum(joules) == pytest.approx(energy, rel=1e-3)  # each batch's energy split, none lost
    assert sessions == len(QUESTIONS) * (steps - 1)  # every decode step went through a batch
    assert sessions / batches >= 3  # mostly batched: the prefills split a few of them
    assert singles < batches


@pytest.mark.model
async def test_a_score_shares_the_model_with_decoding_sessions(
    backend: Backend, nats_url: str
) -> None:
    cloze = [wire.ChatMessage("user", "Which planet is closest to the Sun?")]
    options = ["Mercury", "Venus"]
    expected = backend.score(backend.encode_chat(cloze), [backend.encode(o) for o in options], 3)
    async with expert_on_bus(backend, nats_url) as bus:
        scored: list[wire.Message] = []

        async def score() -> None:
            request = wire.encode(wire.Score(cloze, options, top_k=3))
            reply = await bus.nc.request(bus.s.expert_score("e1"), request, timeout=60)
            scored.append(wire.decode(reply.data))

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(greedy_session, bus, f"d{i}", QUESTIONS[i], 8)
                tg.start_soon(score)
    answer = scored[0]
    assert isinstance(answer, wire.Scored), answer
    for want, got in zip(expected, answer.targets, strict=True):
        np.testing.assert_allclose(got.logprobs_array(), want.logprobs, atol=1e-5)


@pytest.mark.model
async def test_opens_beyond_max_sessions_are_refused_busy_until_one_closes(
    backend: Backend, nats_url: str
) -> None:
    async with expert_on_bus(backend, nats_url, max_sessions=3) as bus:
        subs = [await bus.open(f"m{i}") for i in range(3)]
        for sub in subs:
            slice_of(await bus.reply(sub), 0)
        refused = await bus.open("m3")
        error = error_of(await bus.reply(refused), "busy", 0)
        assert "at most 3 sessions" in error.message
        await bus.send("close", wire.Close(session="m0", reason="done"))
        await bus.sessions_drop_to(2)
        again = await bus.open("m4")
        slice_of(await bus.reply(again), 0)


# --- replay experts that answer in batches (bench/batching.py's stand-ins) ----------------------


async def test_a_per_batch_replay_expert_holds_answers_for_the_batch_in_progress(
    nats_url: str, trace: tuple[Path, list[int]]
) -> None:
    """Answers that come in while a batch is out wait for the next one, and go out together."""
    path, _ = trace
    batch_s = 0.3
    with anyio.fail_after(15):
        async with (
            replaying(nats_url, path, delay_s=batch_s, per_batch=True),
            nats_connection(nats_url, name="t") as nc,
            FusionStandIn(nc, "b1") as first,
            FusionStandIn(nc, "b2") as second,
            FusionStandIn(nc, "b3") as third,
        ):
            await nc.flush()
            sent = anyio.current_time()
            await first.send(first.open(), ["e1"])
            await anyio.sleep(batch_s / 3)  # the first batch is out by now
            for later in (second, third):
                await later.send(later.open(), ["e1"])
            arrivals = {}
            for fusion in (first, second, third):
                await fusion.answers(1)
                arrivals[fusion.session] = anyio.current_time() - sent
    assert batch_s <= arrivals["b1"] < 2 * batch_s
    assert arrivals["b2"] >= 2 * batch_s and arrivals["b3"] >= 2 * batch_s  # the next batch
    assert abs(arrivals["b2"] - arrivals["b3"]) < batch_s / 2  # together


async def test_call_soon_runs_in_its_turn_and_on_the_way_out() -> None:
    """Freeing a cache never runs beside a model call, even when the agent is stopping."""
    model = Model(job_s=0.0)
    sched = scheduler(model)
    freed: list[str] = []
    sched.call_soon(lambda: freed.append("before run"))  # nothing runs: at once
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            await hold_the_worker(tg, sched, model)
            sched.call_soon(lambda: freed.append("in turn"))
            await anyio.sleep(0.05)
            assert freed == ["before run"]  # the blocker still holds the model
            model.gate.set()
            await wait_until(lambda: len(freed) == 2)
            await hold_the_worker(tg, sched, model)
            sched.call_soon(lambda: freed.append("on the way out"))
            tg.cancel_scope.cancel()  # the agent stops while the worker is busy
            model.gate.set()
    assert freed == ["before run", "in turn", "on the way out"]


async def test_waiting_prefills_run_as_one_call_within_a_steps_time() -> None:
    """Batchable jobs (prefills) waiting together run as one call of their runner; with
    sessions decoding, a batch holds no more tokens than fit in the last batch's time; an
    item's own error reaches only its caller."""
    model = Model(job_s=0.0, batch_s=0.2)
    runs: list[list[int]] = []

    def prefills(items: list[int]) -> list[int | BaseException]:
        runs.append(list(items))
        time.sleep(0.01 * sum(items))  # 10 ms per "token"
        return [Moe2Error(ErrorCode.EMPTY_PROMPT, "no tokens") if i == 0 else -i for i in items]

    decoding = [0]  # sessions past their prefill
    sched = scheduler(model, expected=lambda: decoding[0])
    results: dict[str, Any] = {}

    async def prefill(name: str, tokens: int) -> None:
        try:
            results[name] = await sched.call_batched(prefills, tokens, cost=tokens)
        except Moe2Error as exc:
            results[name] = exc.code

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            await hold_the_worker(tg, sched, model)
            for name, tokens in (("a", 3), ("b", 0), ("c", 2)):
                tg.start_soon(prefill, name, tokens)
            await wait_until(lambda: sched.waiting == 3)
            model.gate.set()
            await wait_until(lambda: len(results) == 3)
            assert runs == [[3, 0, 2]]  # nothing decodes yet: all at once
            decoding[0] = 1
            tg.start_soon(sched.step, 1)  # a session decodes: 200 ms per batch
            await wait_until(lambda: model.calls[-1] == ("batch", [1]))
            await hold_the_worker(tg, sched, model)
            for i, tokens in enumerate((8, 8, 8, 4)):
                tg.start_soon(prefill, f"d{i}", tokens)
            tg.start_soon(sched.step, 2)
            await wait_until(lambda: sched.waiting == 5)
            model.gate.set()
            await wait_until(lambda: len(results) == 7)
            tg.cancel_scope.cancel()
    assert results["a"] == -3 and results["c"] == -2
    assert results["b"] == ErrorCode.EMPTY_PROMPT
    # about 10 ms per token measured, 200 ms per step: under 20 tokens a turn, the first always
    assert runs[1] == [8, 8]
    assert [i for run in runs[1:] for i in run] == [8, 8, 8, 4]
    assert all(sum(run) < 20 or len(run) == 1 for run in runs)
