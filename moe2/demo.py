"""``moe2 demo``: the shipped heterogeneous pool on one machine, started, asked, shut down.

A local nats-server, the first experts of the pool file as separate ``moe2 expert`` processes
(each on the fastest backend of the default install that serves it, ``demo_backend``), and a
fusion agent in this process with the pool's gate and SMO over the pool's profiles. It
prints the S that SMO chose and the budget that binds, then for each question the gate's top-k
of S with their weights, the fused answer token by token, and the summary line.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import anyio
from nats.aio.msg import Msg

import moe2
from moe2.agents.fusion.agent import FusionAgent, serve_fusion
from moe2.agents.fusion.config import FusionConfig
from moe2.pool import DEFAULT_POOL, BudgetReport, Pool, PoolExpert, budget_report, load_pool
from moe2.runtime import wire
from moe2.runtime.auth import AuthDir
from moe2.runtime.client import Client
from moe2.runtime.connection import flush_subscriptions
from moe2.runtime.errors import ErrorCode, Moe2Error, error_code
from moe2.runtime.lifecycle import stop_processes
from moe2.runtime.server import NatsServer
from moe2.runtime.wire import ChatMessage
from moe2.selection.costs import Budgets

QUESTIONS = (
    "Which gas do plants take in from the air to make their food?",
    "Explain supply and demand in two sentences.",
)
# A base model (Gemma-3-270M) goes on to write the next turn, or, after a blank line, a numbered
# exercise of its own ("2. Explain the difference…"): the demo's answer is its first paragraph.
STOP = ("\nUser:", "\n\n")


@dataclass(frozen=True, slots=True)
class DemoSettings:
    questions: tuple[str, ...] = QUESTIONS
    pool: Path = DEFAULT_POOL
    experts: int | None = None  # None: the pool's demo_experts
    gate: Path | None = None  # None: the pool's
    outputs: Path | None = None
    tau_s: Mapping[str, float] = field(default_factory=dict)  # over the pool's applications'
    energy_j: float | None = None  # None: the pool's
    experts_per_prompt: int | None = None  # None: the pool's
    max_tokens: int = 48
    step_deadline_s: float = 5.0
    start_timeout_s: float = 600.0


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def demo_pool(settings: DemoSettings) -> Pool:
    """The pool file with the settings' gate and outputs, both present."""
    pool = load_pool(settings.pool)
    pool = replace(pool, gate=settings.gate or pool.gate, outputs=settings.outputs or pool.outputs)
    pool.check_artifacts()
    return pool


async def run_demo(settings: DemoSettings) -> None:
    pool = demo_pool(settings)
    experts = pool.first(settings.experts or pool.demo_experts)
    logs = Path(tempfile.mkdtemp(prefix="moe2-demo-"))
    auth = AuthDir(logs / "nats")  # per-role users for this run (docs/security.md)
    auth.init([e.id for e in experts])
    with NatsServer(auth=auth) as server:
        _say(f"· nats-server on {server.url} · {_auth_line(auth)}")
        with expert_processes(server.url, experts, logs, auth) as started:
            _say(_pool_table(pool, experts, logs))
            await _demonstrate(server.url, pool, started, settings, auth)
    _say("· shut down: fusion agent, experts and nats-server stopped")


async def _demonstrate(
    url: str,
    pool: Pool,
    started: Sequence[ExpertProcess],
    settings: DemoSettings,
    auth: AuthDir,
) -> None:
    """Start the fusion agent, wait for the experts and S, ask every question; then stop it."""
    began = time.monotonic()
    budgets = pool.budgets(settings.tau_s, settings.energy_j)
    config = FusionConfig(
        step_deadline_s=settings.step_deadline_s,
        experts_per_prompt=settings.experts_per_prompt or pool.experts_per_prompt,
        gate=str(pool.gate),
        outputs=str(pool.outputs),
        tau_s=dict(budgets.tau_s),
        energy_j=budgets.energy_j,
        # the experts share this box, so their measured step times say nothing about the
        # boxes they stand for: SMO keeps the pool's costs (no drift re-selection)
        drift=math.inf,
    )
    serve = partial(serve_fusion, profiles=pool.profiles, auth=auth.auth("fusion"))
    async with anyio.create_task_group() as tg:
        agent: FusionAgent = await tg.start(serve, url, config)
        selection = SelectionWatch([p.expert for p in started])
        await selection.watch(agent)
        await wait_for_experts(agent, started, settings.start_timeout_s)
        _say(f"· experts live after {time.monotonic() - began:.0f} s; fusion agent ready")
        _say(_selection_lines(pool, budgets, await selection.chosen(30.0)))
        async with moe2.connect(url, auth=auth.auth("client")) as client:
            for question in settings.questions:
                await _ask(client, agent, question, settings.max_tokens)
        tg.cancel_scope.cancel()


@dataclass(frozen=True, slots=True)
class ExpertProcess:
    expert: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 800) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    async def failed(self, limiter: anyio.CapacityLimiter) -> None:
        """Wait for the process to exit, then raise what its log says went wrong."""
        code = await anyio.to_thread.run_sync(
            self.process.wait, abandon_on_cancel=True, limiter=limiter
        )
        said = re.findall(r"^error \[(\w+)\]: (.*)$", self.tail(), re.M)
        if said:
            raise Moe2Error(error_code(said[-1][0]), f"expert {self.expert}: {said[-1][1]}")
        raise Moe2Error(
            ErrorCode.INTERNAL,
            f"expert {self.expert} exited with {code} before it was live; "
            f"its log {self.log} ends:\n{self.tail()}",
        )


def demo_backend(expert: PoolExpert) -> str:
    """The fastest backend of the default install (``make demo``) that serves ``expert``: ONNX
    Runtime with dynamic int8 (a decode step about 0.35x transformers' on this 2-core box,
    bench/backends.py; its export is made once and cached in $MOE2_CACHE/onnx) for a plain
    model; transformers for a LoRA expert, whose adapter only transformers merges. llama.cpp is
    faster still but an extra that builds for minutes, so the demo does not assume it."""
    if expert.adapter is None and importlib.util.find_spec("onnxruntime") is not None:
        return "onnx-int8"
    return "transformers"


@contextmanager
def expert_processes(
    url: str, experts: Sequence[PoolExpert], logs: Path, auth: AuthDir | None = None
) -> Iterator[list[ExpertProcess]]:
    """Start the experts as separate processes, each with its own credentials from ``auth``
    (``MOE2_NATS_NKEY``); terminate (then kill) them on the way out."""
    started: list[ExpertProcess] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for expert in experts:
            log = logs / f"{expert.id}.log"
            with log.open("wb") as out:
                command = [*expert.command(url), "--backend", demo_backend(expert)]
                own = auth.auth(f"expert-{expert.id}").env() if auth else {}
                proc = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, env={**env, **own}
                )
            started.append(ExpertProcess(expert.id, proc, log))
        yield started
    finally:
        stop_processes([p.process for p in started])


def _auth_line(auth: AuthDir) -> str:
    experts = auth.experts()
    return (
        f"authentication on: per-role users (client, fusion, admin, {len(experts)} experts), "
        f"nkey seeds in {auth.path}"
    )


def _pool_table(pool: Pool, experts: Sequence[PoolExpert], logs: Path) -> str:
    rows = [
        (
            e.id,
            e.model + (f" + {e.adapter.name}" if e.adapter else ""),
            demo_backend(e),
            e.device,
            e.domain,
        )
        for e in experts
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    padded = [[f"{c:<{w}}" for c, w in zip(r[:-1], widths, strict=True)] + [r[-1]] for r in rows]
    lines = ["    " + "  ".join(cells) for cells in padded]
    return (
        f"· {len(experts)} of the {len(pool.experts)} experts of pool {pool.name!r} starting "
        f"(logs in {logs}):\n" + "\n".join(lines) + "\n  (each stands for a box of its device "
        "class; here all share this one, priced by the pool's profiles)"
    )


async def wait_for_experts(
    agent: FusionAgent, started: Sequence[ExpertProcess], limit_s: float
) -> None:
    """Until every started expert is live; an expert that exits first is the error."""
    async with anyio.create_task_group() as tg:
        limiter = anyio.CapacityLimiter(len(started))  # not the agent's worker threads
        for p in started:
            tg.start_soon(p.failed, limiter)
        try:
            await agent.wait_for_experts(len(started), limit_s)
        except TimeoutError:
            tails = "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in started)
            raise Moe2Error(
                ErrorCode.TIMEOUT, f"experts not live after {limit_s:.0f}s; their logs:\n{tails}"
            ) from None
        tg.cancel_scope.cancel()


class SelectionWatch:
    """The first S a fusion agent announces once every started expert is live."""

    def __init__(self, experts: Sequence[str]) -> None:
        self.experts = set(experts)
        self.found: wire.SubsetAnnouncement | None = None
        self.announced = anyio.Event()

    async def watch(self, agent: FusionAgent) -> None:
        await agent.nc.subscribe(agent.subjects.selection, cb=self._on_message)
        await flush_subscriptions(agent.nc)

    async def _on_message(self, msg: Msg) -> None:
        message = wire.decode(msg.data)
        if isinstance(message, wire.SubsetAnnouncement) and set(message.live) == self.experts:
            self.found = message
            self.announced.set()

    async def chosen(self, limit_s: float) -> wire.SubsetAnnouncement:
        with anyio.fail_after(limit_s):  # the agent re-selects within 0.2 s of a join
            await self.announced.wait()
        assert self.found is not None
        if not self.found.experts:
            raise Moe2Error(ErrorCode.INFEASIBLE, f"SMO chose no experts: {self.found.error}")
        return self.found


def _selection_lines(pool: Pool, budgets: Budgets, choice: wire.SubsetAnnouncement) -> str:
    candidates = [e for e in choice.live if e not in choice.left_out]
    report = budget_report(pool.profiles, budgets, candidates, choice.experts)
    calls = f"{choice.oracle_calls} oracle call{'s' * (choice.oracle_calls != 1)}"
    figures = [_use(name, value, limit) for name, value, limit in report.used]
    if choice.loss is not None:
        figures.insert(0, f"loss {choice.loss:.3f} {_loss_unit(pool)}")
    lines = [
        f"· SMO chose S = {{{', '.join(choice.experts)}}} of the {len(choice.live)} live experts "
        f"({calls}, {choice.solve_s * 1e3:.0f} ms)",
        "S: " + " · ".join(figures),
        *binding_lines(report),
        *(f"left out: {e} ({why})" for e, why in choice.left_out.items()),
    ]
    return "\n    ".join(lines) + "\n"


def _loss_unit(pool: Pool) -> str:
    """A store of one tokenizer scores per token; of several, per answer (docs/gating.md)."""
    from moe2.gating.store import read_meta

    mixed = len({e.tokenizer for e in read_meta(pool.outputs).experts}) > 1
    return "nats/answer" if mixed else "nats/token"


def _use(name: str, value: float, limit: float) -> str:
    if name == "energy":
        return f"energy {value:.1f} of {limit:.1f} J/answer"
    return f"{name} {value:.3f} of {limit:.3f} s/token"


def _over(name: str, value: float, limit: float) -> str:
    if name == "energy":
        return f"{value:.1f} J > {limit:.1f} J"
    return f"{value:.3f} s > {limit:.3f} s"


def binding_lines(report: BudgetReport) -> list[str]:
    """Which budgets bind, each with an expert it keeps out and what S plus that expert would
    need; then the experts that would fit but that SMO left out for the loss."""
    if not report.left_out:
        return ["binding: none — every live expert fits and is in S"]
    lines = []
    for name in report.binding:
        blocked = [
            (e, value, limit)
            for e, broken in report.left_out.items()
            for n, value, limit in broken
            if n == name
        ]
        e, value, limit = blocked[0]
        more = f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else ""
        lines.append(f"binding: {name} — adding {e} would need {_over(name, value, limit)}{more}")
    if not lines:
        lines.append("binding: none — every expert left out would fit")
    if report.by_loss:
        lines.append(f"left out by the loss: {', '.join(report.by_loss)} (would fit the budgets)")
    return lines


async def _ask(client: Client, agent: FusionAgent, question: str, max_tokens: int) -> None:
    from moe2.cli import summary_line

    _say(f"> {question}")
    experts, weights = await gate_choice(agent, question)
    chosen = " · ".join(f"{e} {w:.2f}" for e, w in zip(experts, weights, strict=True))
    _say(f"· the gate's top-{len(experts)} of S for this prompt: {chosen}\n")
    answer = client.ask(question, max_tokens=max_tokens, stop=STOP)
    async for chunk in answer:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n\n")
    sys.stdout.flush()
    assert answer.final is not None, "a finished stream has its final message"
    _say(summary_line(answer.final) + "\n")


async def gate_choice(agent: FusionAgent, question: str) -> tuple[list[str], list[float]]:
    """The top-k of S and their weights, as the fusion agent will compute them (eq. 28)."""
    _, experts, weights = await agent.choose([ChatMessage("user", question)])
    return experts, weights
