"""Live re-selection on a real nats-server, with experts in their own processes: kill one and a
new S leaves it out within 3 s; start one and it is in S within 3 s of its first heartbeat. New
sessions use the new S; a session in flight keeps the S it started with."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from nats.aio.msg import Msg

import moe2
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime import wire
from moe2.runtime.client import Client
from moe2.runtime.connection import close_nats, connect_nats, flush_subscriptions
from moe2.runtime.subjects import Subjects
from moe2.selection.costs import Application, Budgets, ComputeFit, ExpertCost
from moe2.selection.live import LiveSelection
from moe2.selection.oracle import LossOracle
from moe2.selection.profiles import Profiles

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ["a", "b", "c", "d"]
pytestmark = pytest.mark.anyio


def owners_oracle(experts: list[str]) -> LossOracle:
    """Each expert alone knows a quarter of the gold tokens, so every expert lowers the loss."""
    n = len(experts)
    gold = []
    for _ in range(8):
        probs = np.full((n, n), 0.05)
        np.fill_diagonal(probs, 0.9)  # token j belongs to expert j
        gold.append(np.log(probs))
    return LossOracle(experts, np.full((8, n), 1.0 / n), gold)


def live_selection() -> LiveSelection:
    fit = ComputeFit(0.01, 1e-4, 0.01, 0.0, power_w=10.0)
    profiles = Profiles(
        experts={e: ExpertCost(e, fit) for e in EXPERTS},
        applications={"chat": Application("chat", 32, 16)},
    )
    return LiveSelection(owners_oracle(EXPERTS), profiles, Budgets())


class Watch:
    """Every Selection and first heartbeat on the bus, with the time it arrived."""

    def __init__(self) -> None:
        self.selections: list[tuple[float, wire.SubsetAnnouncement]] = []
        self.first_heartbeat: dict[str, float] = {}
        self.changed = anyio.Event()

    async def on_message(self, msg: Msg) -> None:
        message = wire.decode(msg.data)
        if isinstance(message, wire.SubsetAnnouncement):
            self.selections.append((time.monotonic(), message))
        elif isinstance(message, wire.Heartbeat):
            self.first_heartbeat.setdefault(message.expert, time.monotonic())
        self.changed.set()
        self.changed = anyio.Event()

    async def until(
        self, ok: Callable[[wire.SubsetAnnouncement], bool], after: float, limit: float
    ) -> float:
        """The arrival time of the first Selection after ``after`` that satisfies ``ok``."""
        with anyio.fail_after(limit):
            while True:
                for at, s in self.selections:
                    if at >= after and ok(s):
                        return at
                await self.changed.wait()


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    yield procs
    for p in procs.values():
        p.kill()
        p.wait(10)


def start_expert(procs: dict[str, subprocess.Popen[bytes]], url: str, expert: str) -> None:
    """A scripted expert with the expert agent's default 1 s heartbeat, 0.3 s per step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.live_expert", url, expert, "1.0", "0.3"]
    procs[expert] = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)


async def test_kill_and_start_experts_reselect_within_3_s(
    nats_url: str, processes: dict[str, subprocess.Popen[bytes]]
) -> None:
    watch = Watch()
    nc = await connect_nats(nats_url, name="fusion")
    observer = await connect_nats(nats_url, name="observer")
    subjects = Subjects("moe2")
    try:
        await observer.subscribe(subjects.selection, cb=watch.on_message)
        await observer.subscribe(subjects.members, cb=watch.on_message)
        await flush_subscriptions(observer)
        agent = FusionAgent(
            nc, FusionConfig(step_deadline_s=5.0, missed_heartbeats=2), selector=live_selection()
        )
        async with anyio.create_task_group() as tg:
            await tg.start(agent.run)
            for e in ("a", "b", "c"):
                start_expert(processes, nats_url, e)
            await watch.until(lambda s: s.experts == ["a", "b", "c"], 0.0, 30)
            async with moe2.connect(nats_url) as client:
                await check_join_keeps_sessions_in_flight(client, watch, processes, nats_url)
                await check_kill(client, watch, processes)
            tg.cancel_scope.cancel()
    finally:
        await close_nats(observer)
        await close_nats(nc)


async def check_join_keeps_sessions_in_flight(
    client: Client,
    watch: Watch,
    processes: dict[str, subprocess.Popen[bytes]],
    url: str,
) -> None:
    in_flight = client.ask("Hello?", max_tokens=19)
    chunks = aiter(in_flight)
    await anext(chunks)  # the session runs, with S = {a, b, c}
    start_expert(processes, url, "d")
    seen = await watch.until(lambda s: "d" in s.experts, 0.0, 30)
    print(f"d joined: in S {seen - watch.first_heartbeat['d']:.2f} s after its first heartbeat")
    assert seen - watch.first_heartbeat["d"] <= 3.0
    assert in_flight.final is None, "the session in flight should outlast the join"
    async for _ in chunks:
        pass
    assert in_flight.final is not None
    assert in_flight.final.experts == ["a", "b", "c"]  # S was chosen when it started
    after = await client.ask("Hello?", max_tokens=3).collect()
    assert sorted(after.experts) == ["a", "b", "c", "d"]


async def check_kill(
    client: Client, watch: Watch, processes: dict[str, subprocess.Popen[bytes]]
) -> None:
    killed_at = time.monotonic()
    processes["c"].kill()
    seen = await watch.until(lambda s: "c" not in s.experts + s.live, killed_at, 10)
    print(f"c killed: out of S {seen - killed_at:.2f} s after the kill")
    assert seen - killed_at <= 3.0
    latest = watch.selections[-1][1]
    assert latest.experts == ["a", "b", "d"]
    assert latest.reason == "left c"
    final = await client.ask("Hello?", max_tokens=3).collect()
    assert sorted(final.experts) == ["a", "b", "d"]
