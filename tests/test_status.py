"""``moe2 status --once`` against a live pool, by its rendered text: a real nats-server, the real
SmolLM2 expert and a fusion agent with SMO run in a background event loop while the command runs
in this thread (it installs signal handlers, which only the main thread may)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from nats.errors import NoRespondersError
from typer.testing import CliRunner

import moe2
from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.cli import app
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.subjects import Subjects
from moe2.status import INFO_KEPT_S, PoolView, model_parts, public_url, snapshot
from tests.test_metrics import live_selection

PREFIX = "status"
MAX_TOKENS = 8
WAIT_S = 10  # the command listens this long: the pool starts, answers, and heartbeats after


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command configures structlog on the stderr of the moment; in-process runs must keep
    the test session's logging, or later tests' captured logs come back empty."""
    monkeypatch.setattr("moe2.status.configure_logging", lambda *a, **k: None)


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal("asyncio") as portal:
        yield portal


async def until_watched(nc: object, subject: str) -> None:
    """Wait until someone (the status command) subscribes to ``subject``: until then a request
    there has no responders; after, it times out (the watcher never answers)."""
    with anyio.fail_after(30):
        while True:
            try:
                await nc.request(subject, b"", timeout=0.2)  # type: ignore[attr-defined]
            except NoRespondersError:
                await anyio.sleep(0.05)
                continue
            except TimeoutError:
                return


async def live_pool(
    url: str, backend: TransformersBackend, done: anyio.Event
) -> tuple[wire.Final, float]:
    """Once the watcher listens: a fusion agent with SMO, then expert e0 joins (S is announced),
    then one question; the pool runs until ``done``. The answer's Final, and when it came."""
    nc = await connect_nats(url, name="test-status")
    try:
        async with anyio.create_task_group() as tg:
            fusion = FusionAgent(
                nc, FusionConfig(prefix=PREFIX, step_deadline_s=30), selector=live_selection()
            )
            await tg.start(fusion.run)
            await until_watched(nc, Subjects(PREFIX).selection)
            expert = ExpertAgent(nc, backend, ExpertConfig("e0", prefix=PREFIX, warmup=False))
            await tg.start(expert.run)
            with anyio.fail_after(10):
                while fusion.selector.select(["e0"]) != ["e0"]:  # noqa: ASYNC110  # no event for it
                    await anyio.sleep(0.05)
            async with moe2.connect(url, prefix=PREFIX) as client:
                answer = client.ask("Name a colour.", max_tokens=MAX_TOKENS, temperature=0.0)
                async for _ in answer:
                    pass
            answered = time.monotonic()
            await done.wait()
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)
    assert answer.final is not None
    return answer.final, answered


def row(text: str, first_cell: str) -> list[str]:
    """The cells of the table row that starts with ``first_cell``."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


@pytest.mark.model
def test_once_shows_the_expert_its_health_s_and_tokens_per_second(
    portal: BlockingPortal, nats_url: str, smollm2: TransformersBackend
) -> None:
    done = portal.call(anyio.Event)
    pool = portal.start_task_soon(live_pool, nats_url, smollm2, done)
    args = ["status", "--nats", nats_url, "--prefix", PREFIX, "--once", "--wait", str(WAIT_S)]
    result = CliRunner().invoke(app, args)
    printed = time.monotonic()
    portal.call(done.set)
    final, answered = pool.result(timeout=30)
    assert result.exit_code == 0, result.output
    # the expert's heartbeats (every 1 s) must have told that the session is over
    assert answered < printed - 1.5, "the pool answered too late for this snapshot: a slow box"
    text = result.output
    print(text)  # the view, in the test's log
    cells = row(text, "e0")
    _, model, adapter, quant, backend, device, *_, heartbeat, sessions, rate, late = cells
    assert (model, adapter, quant) == ("SmolLM2-135M-Instruct", "-", "Q4_1")
    assert backend == "transformers"
    assert device.startswith("cpu 15 W")
    assert heartbeat.endswith("s ago") and float(heartbeat.split()[0]) < 3  # 1 s heartbeats
    assert sessions == "0"  # the answer is over
    n = final.usage.completion_tokens  # one slice per token, over the WAIT_S watched
    assert float(rate) == pytest.approx(n / WAIT_S, abs=0.1)
    assert late == f"0% (0/{n})"
    agents = re.findall(r"fusion-[0-9a-f]{8}", text)
    assert len(set(agents)) == 1
    _, selection, version, s, delay, energy, _, budgets, in_flight, _ = row(text, agents[0])
    assert s == "{e0}" and version.startswith("v") and delay.startswith("chat ")
    assert selection == "smo" and energy.endswith(" J")
    assert budgets == "delay chat ≤ 0.5 s · energy ≤ 40 J"  # tests.test_metrics.BUDGETS
    assert in_flight == "0"
    summary = text.strip().splitlines()[-1]
    assert summary == (
        "1 of 1 experts live · sessions in flight: 0 (fusion agents), 0 held by experts · "
        f"in the last {WAIT_S} s: 1 sessions, {n / WAIT_S:.1f} tokens/s"
    )


def test_late_slices_are_those_after_the_next_step_went_out() -> None:
    """PoolView on its own: a slice for a step the fusion agent has moved past is late, and
    each new step of a session is one token of the pool."""
    view = PoolView(started=0.0)
    hb = wire.Heartbeat(
        expert="a", model="m", tokenizer="t", backend="b", vocab_size=8, eos_ids=[0]
    )
    view.heard(hb, 0.0)
    for step, at in ((0, 1.0), (1, 2.0)):
        view.sliced(_slice("a", step), at)
        view.stepped(wire.Step(session="s", step=step + 1, token=3))
    view.sliced(_slice("a", 1), 3.0)  # step 2 went out already: late
    seen = view.experts["a"]
    assert (len(seen.slices), len(seen.late)) == (3, 1)
    assert view.tokens_per_s(now=4.0) == 2 / 4  # steps 0 and 1, over 4 s watched


def test_budgets_and_sessions_come_from_the_fusion_agents_srv_info() -> None:
    """A fusion agent heard only through $SRV.INFO: no SMO, so S is every live expert; its
    budgets read from the metadata's strings, ``?`` when they cannot be read."""
    view = PoolView(started=0.0)
    meta = {"agent": "fusion-1", "selection": "all-live", "tau_s": '{"chat": 2.0}', "sessions": "3"}
    view.described({**meta, "energy_j": "12.5"}, now=0.0)
    view.described({**meta, "agent": "fusion-2", "tau_s": "{oops", "energy_j": ""}, now=0.0)
    shot = snapshot(view, 1.0, "nats://h")
    assert shot.fusion == [
        ["fusion-1", "all-live", "-", "all live", "-", "-", "-",
         "delay chat ≤ 2 s · energy ≤ 12.5 J", "3", ""],
        ["fusion-2", "all-live", "-", "all live", "-", "-", "-", "?", "3", ""],
    ]  # fmt: skip
    assert "sessions in flight: 6 (fusion agents)" in shot.summary
    assert snapshot(view, 1.0 + INFO_KEPT_S + 1, "x").fusion == []  # silent: forgotten


def test_a_printed_url_has_no_password() -> None:
    assert public_url("nats://u:secret@127.0.0.1:4222") == "nats://u@127.0.0.1:4222"
    assert public_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_model_parts_name_the_adapter_and_context() -> None:
    assert model_parts("SmolLM2-135M-Instruct+lora:cluster-3@b96c4cd9") == (
        "SmolLM2-135M-Instruct",
        "cluster-3",
    )
    assert model_parts("gemma+ctx:stem@1a2b3c4d") == ("gemma", "ctx:stem")
    assert model_parts("SmolLM2") == ("SmolLM2", "")


def _slice(expert: str, step: int) -> wire.Slice:
    import numpy as np

    return wire.make_slice(
        session="s", expert=expert, step=step, ids=np.array([1]), logprobs=np.array([0.0]),
        pieces=[b"x"], compute_s=0.01, energy_j=0.0,
    )  # fmt: skip
