"""End to end with the real model: expert processes, a fusion agent, a client, a recorded trace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from nats.aio.msg import Msg

import moe2
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.agents.traces.recorder import Recorder
from moe2.agents.traces.replay import serve_replay_experts
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.server import NatsServer
from moe2.runtime.subjects import Subjects
from moe2.runtime.wire import ChatMessage

pytestmark = [pytest.mark.anyio, pytest.mark.model]
QUESTION = "What is the capital of France?"
EXPERTS = ["e1", "e2", "e3"]


@pytest.fixture(scope="module")
def live_experts(nats_server: NatsServer) -> Iterator[str]:
    """Three `moe2 expert` processes serving SmolLM2 on the module's nats-server."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moe2",
                "expert",
                "--id",
                e,
                "--nats",
                nats_server.url,
                "--threads",
                "1",
                "--log-level",
                "warning",
            ],
        )
        for e in EXPERTS
    ]
    try:
        yield nats_server.url
    finally:
        for p in procs:
            p.terminate()
        assert [p.wait(20) for p in procs] == [0, 0, 0]  # a clean, drained exit on SIGTERM


@asynccontextmanager
async def fusion(url: str, n_experts: int) -> AsyncIterator[moe2.Client]:
    nc = await connect_nats(url, name="e2e-fusion")
    try:
        async with anyio.create_task_group() as tg, moe2.connect(url) as client:
            agent = FusionAgent(nc, FusionConfig(step_deadline_s=30, prefill_deadline_s=60))
            await tg.start(agent.run)
            await agent.wait_for_experts(n_experts, limit_s=180)
            yield client
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


def reference_greedy(backend: TransformersBackend, n: int) -> str:
    """The single model's own greedy generation (transformers' generate) of the same prompt."""
    import torch

    ids = backend.encode_chat([ChatMessage("user", QUESTION)])
    model, tokenizer = backend._model, backend._tokenizer
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


async def test_one_expert_through_the_bus_equals_the_models_greedy_generation(
    live_experts: str, smollm2: TransformersBackend
) -> None:
    async with fusion(live_experts, 3) as client:
        with anyio.fail_after(120):
            answer = client.ask(QUESTION, max_tokens=40, experts=1)
            chunks = [c.text async for c in answer]
    assert answer.final is not None
    assert answer.final.experts == ["e1"]
    assert "".join(chunks) == answer.final.text == reference_greedy(smollm2, 40)
    assert "Paris" in answer.final.text


async def test_three_experts_fuse_a_coherent_answer(
    live_experts: str, smollm2: TransformersBackend
) -> None:
    async with fusion(live_experts, 3) as client:
        with anyio.fail_after(180):
            final = await client.ask(QUESTION, max_tokens=40).collect()
    assert final.experts == EXPERTS
    assert final.usage.prompt_tokens > 10
    assert final.late == {} and final.dropped == []
    # Three copies of one model with equal weights fuse to that model's own distribution.
    assert final.text == reference_greedy(smollm2, 40)
    assert "Paris" in final.text


async def test_a_recorded_live_run_replays_to_the_same_tokens(
    live_experts: str, tmp_path: Path
) -> None:
    trace = tmp_path / "live.moe2"
    sampling = {"max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 11}
    recorder = Recorder(live_experts, trace)
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
        async with fusion(live_experts, 3) as client:
            with anyio.fail_after(180):
                live = client.ask(QUESTION, **sampling)  # type: ignore[arg-type]
                live_tokens = [t async for c in live for t in c.tokens]
        recorder.stop()
    assert live.final is not None and recorder.count > 50

    with NatsServer() as fresh:  # no model anywhere on this bus: only the trace answers
        async with anyio.create_task_group() as tg:
            await tg.start(serve_replay_experts, fresh.url, trace)
            async with fusion(fresh.url, 3) as client:
                with anyio.fail_after(60):
                    again = client.ask(QUESTION, **sampling)  # type: ignore[arg-type]
                    replayed_tokens = [t async for c in again for t in c.tokens]
            tg.cancel_scope.cancel()
    assert again.final is not None
    assert replayed_tokens == live_tokens
    assert again.final.text == live.final.text


async def test_a_client_that_stops_reading_frees_the_session_on_every_expert(
    live_experts: str,
) -> None:
    """Break out after 5 chunks of a 500-token answer: the Cancel reaches the fusion agent, which
    closes the session on every expert (their heartbeats count it gone) within a second or two."""
    sessions: dict[str, tuple[float, int]] = {}  # expert -> (arrival, sessions) of its heartbeat
    changed = anyio.Event()

    async def heartbeat(msg: Msg) -> None:
        nonlocal changed
        hb = wire.decode(msg.data)
        if isinstance(hb, wire.Heartbeat):
            sessions[hb.expert] = (anyio.current_time(), hb.sessions)
            changed.set()
            changed = anyio.Event()

    nc = await connect_nats(live_experts, name="e2e-cancel")
    watcher = await connect_nats(live_experts, name="e2e-heartbeats")
    try:
        await watcher.subscribe(Subjects().members, cb=heartbeat)
        async with anyio.create_task_group() as tg, moe2.connect(live_experts) as client:
            agent = FusionAgent(nc, FusionConfig(step_deadline_s=30, prefill_deadline_s=60))
            await tg.start(agent.run)
            await agent.wait_for_experts(3, limit_s=180)
            with anyio.fail_after(180):
                answer = client.ask("Count from 1 to 1000, separated by commas.", max_tokens=500)
                got = 0
                async for _ in answer:
                    got += 1
                    if got == 5:
                        break
                stopped = anyio.current_time()
                assert agent.sessions <= 1
                while not (
                    len(sessions) == 3
                    and all(at > stopped and n == 0 for at, n in sessions.values())
                ):
                    await changed.wait()
                freed = max(at for at, _ in sessions.values()) - stopped
                assert agent.sessions == 0  # it ended right after sending its Closes
            tg.cancel_scope.cancel()
    finally:
        await close_nats(watcher)
        await close_nats(nc)
    assert answer.final is None
    assert freed < 3.0  # the next heartbeat of each (1 s apart) already counts it gone


@pytest.mark.model
@pytest.mark.timeout(900)
def test_the_readme_demo_runs_the_shipped_pool_and_leaves_no_process_behind() -> None:
    """`make demo` as shipped: both families and adapters start, SMO chooses S under the pool's
    budgets, the shipped gate weighs S per prompt, both questions are answered, all stops."""
    done = subprocess.run(
        [sys.executable, "-m", "moe2", "demo", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=840,
    )
    err = done.stderr
    assert done.returncode == 0, err
    table = err[: err.index("experts live")]
    assert "gemma3-270m" in table and "smollm2-135m + cluster-" in table  # two families, LoRA
    assert re.search(r"· SMO chose S = \{[^}]+\} of the 4 live experts", err)
    assert re.search(r"binding: (energy|delay|none)", err)
    choices = re.findall(r"top-\d of S for this prompt: (.+)", err)
    assert len(choices) == 2 and all(re.search(r"\S+ \d\.\d\d", c) for c in choices)
    assert len(re.findall(r"── \d+ tokens in [\d.]+ s", err)) == 2
    assert len([a for a in done.stdout.split("\n\n") if a.strip()]) == 2
    url = re.search(r"nats-server on (nats://\S+)", err)
    assert url is not None
    assert not [pid for pid in _pids() if url.group(1) in _cmdline(pid)]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
