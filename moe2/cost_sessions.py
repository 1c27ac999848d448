"""``moe2 eval --record-sessions N``: real sessions of each chosen S, recorded for the cost side.

For each subset S: a local nats-server, the experts of S as separate ``moe2 expert`` processes
(as ``moe2 demo`` starts them), a fusion agent in this process with the pool's gate and k and no
selection (S is every live expert), and a recorder on the subjects the cost side reads (requests,
slices, heartbeats). The questions are asked one at a time, so no session slows another down,
each for the pool's answer length. The trace is
``<directory>/<experts of S joined by +>.trace``; ``selection.session_costs`` reads it.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
from tqdm.auto import tqdm

import moe2
from moe2.agents.fusion.agent import FusionAgent, serve_fusion
from moe2.agents.fusion.config import FusionConfig
from moe2.agents.traces.recorder import Recorder
from moe2.demo import expert_processes, wait_for_experts
from moe2.pool import Pool, PoolExpert
from moe2.runtime import wire
from moe2.runtime.auth import AuthDir
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.server import NatsServer
from moe2.runtime.subjects import Subjects
from moe2.selection.session_costs import trace_name

log = structlog.get_logger("moe2.cost_sessions")


def record_subsets(
    pool: Pool,
    subsets: Sequence[Sequence[str]],
    questions: Sequence[str],
    directory: Path,
    *,
    max_tokens: int,
    progress: bool = True,
    start_timeout_s: float = 600.0,
) -> list[Path]:
    """Record ``questions`` answered by each subset; returns the trace files written."""
    by_id = {e.id: e for e in pool.experts}
    unknown = sorted({e for s in subsets for e in s} - set(by_id))
    if unknown:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"experts {unknown} are not in pool {pool.name}")
    directory.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(subsets) * len(questions), desc="sessions", disable=not progress)
    written = []
    try:
        for subset in subsets:
            path = directory / trace_name(subset)
            bar.set_postfix_str("+".join(subset))
            experts = [by_id[e] for e in subset]
            anyio.run(_record_one, pool, experts, questions, path, max_tokens, start_timeout_s, bar)
            written.append(path)
    finally:
        bar.close()
    return written


async def _record_one(
    pool: Pool,
    experts: Sequence[PoolExpert],
    questions: Sequence[str],
    path: Path,
    max_tokens: int,
    start_timeout_s: float,
    bar: tqdm[Any],
) -> None:
    logs = Path(tempfile.mkdtemp(prefix="moe2-sessions-"))
    config = FusionConfig(gate=str(pool.gate), experts_per_prompt=pool.experts_per_prompt)
    partial = path.with_suffix(".partial")
    auth = AuthDir(logs / "nats")  # per-role users, as `moe2 demo` runs (docs/security.md)
    auth.init([e.id for e in experts])
    with (
        NatsServer(auth=auth) as server,
        expert_processes(server.url, experts, logs, auth) as started,
    ):
        async with anyio.create_task_group() as tg:
            fusion = auth.auth("fusion")
            agent: FusionAgent = await tg.start(
                functools.partial(serve_fusion, auth=fusion), server.url, config
            )
            await wait_for_experts(agent, started, start_timeout_s)
            async with anyio.create_task_group() as recording:
                subjects = Subjects()  # what the cost side reads: requests, slices, heartbeats
                wanted = [
                    f"{subjects.root}.expert.>",
                    f"{subjects.root}.session.>",
                    subjects.members,
                ]
                recorder = Recorder(server.url, partial, subjects=wanted, auth=auth.auth("admin"))
                await recording.start(recorder.run)
                # every expert's costs, as its heartbeat announces them, before the first Open
                await _next_heartbeats(agent, [e.id for e in experts])
                async with moe2.connect(server.url, auth=auth.auth("client")) as client:
                    for question in questions:
                        answer = client.ask(question, max_tokens=max_tokens)
                        async for _ in answer:
                            pass
                        if answer.final is None:
                            raise Moe2Error(ErrorCode.INTERNAL, "a session ended with no Final")
                        bar.update()
                recorder.stop()
            tg.cancel_scope.cancel()
    path.with_suffix(".partial").replace(path)  # whole traces only: a killed run leaves none
    log.info("sessions_recorded", trace=str(path), sessions=len(questions), logs=str(logs))


async def _next_heartbeats(agent: FusionAgent, experts: Sequence[str]) -> None:
    """Until each of ``experts`` has sent a heartbeat (within 10 s: they beat every second)."""
    waiting = set(experts)
    sub = await agent.nc.subscribe(Subjects().members)
    try:
        with anyio.fail_after(10):
            while waiting:
                message = wire.decode((await sub.next_msg(timeout=10)).data)
                if isinstance(message, wire.Heartbeat):
                    waiting.discard(message.expert)
    finally:
        await sub.unsubscribe()
