"""bench/load: many concurrent sessions for a minute, every process's memory at start and end.

Issue 12 §3: N concurrent sessions (default 256) against replay experts for a fixed time (default
60 s), through real fusion agents on a real nats-server, each in its own process:

- ``nats-server`` (runtime/server.py, no users: the bench measures the runtime, not auth);
- the replay experts (2, a synthetic trace of ``--steps`` tokens; ``per_batch``: the answers
  waiting when a batch starts go out together ``--batch-ms`` later), in a helper process (this
  file, ``--serve``);
- ``--fusion`` fusion agents (default 2, a queue group), each ``python -m moe2 fusion`` with
  ``max_sessions`` = N and no per-client prompt rate;
- the clients: this process, N loops on 8 connections, each asking the same question again and
  again until the time is up (then it finishes the answer in flight).

Reported: sessions started and completed (every other one counted by its error code, and an
answer that differs from the trace counted as ``wrong_text``), p50/p99 time to first token (the
prompt published to its first chunk) and per-token latency (the gaps between an answer's
chunks), tokens/s, and the resident memory (``/proc/PID/status`` VmRSS) of every process after a
warm-up (``--warmup``, default 20 s of the same load: the baseline; each process's heap first grows
to the working set of N sessions in flight, which takes more than 5 s on a busy 2-core box), every
10 s, and at the end, once the last answer is in. Target: started = completed, and every
process's RSS grows less than 10 %. Also the sessions the fusion agents ran against the prompts
asked: more sessions than prompts are the client's retries (runtime/client.py asks again when
no message came within 1 s), each a duplicate session whose answer the client ignores.

    python bench/load.py [--sessions 256] [--duration 60] [--warmup 20] [--fusion 2]
                         [--steps 24] [--batch-ms 20] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from _common import (
    Latency,
    exit_with_parent,
    helper_process,
    machine,
    markdown_table,
    quiet_logs,
    run_and_report,
    serve_replay,
)

import moe2
from moe2.agents.traces.synthetic import synthetic_trace
from moe2.runtime import wire
from moe2.runtime.errors import Moe2Error
from moe2.runtime.lifecycle import stop_processes
from moe2.runtime.server import NatsServer, free_port

try:
    from suite import SUITE_ROWS, suite_row
except ModuleNotFoundError:  # bench/suite.py is bench/run.py's; the script runs without it
    SUITE_ROWS = "suite_rows"

    def suite_row(
        key: str,
        baseline: str,
        measured: str,
        passed: bool | None,
        *,
        row: str = "",
        note: str = "",
    ) -> dict[str, Any]:
        return {"key": key, "baseline": baseline, "measured": measured, "passed": passed}


PREFIX = "benchload"
EXPERTS = ["r0", "r1"]
PROMPT = [wire.ChatMessage("user", "How does the bus hold up under load?")]
CONNECTIONS = 8
GROWTH_LIMIT = 0.10
TIMEOUT_S = 120.0  # one answer's inactivity limit
SAMPLE_S = 10.0


# --- the processes --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metric(port: int, name: str) -> float:
    """The sum of a fusion agent's /metrics samples named ``name`` (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.split("{")[0].split(" ")[0] == name
    )


@dataclass
class Fusion:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


@contextmanager
def fusion_agents(url: str, n: int, sessions: int, tmp: Path) -> Iterator[list[Fusion]]:
    """``n`` ``moe2 fusion`` processes, each ready once it has seen both replay experts."""
    conf = tmp / "fusion.toml"
    conf.write_text(f'[fusion]\nprefix = "{PREFIX}"\nmax_sessions = {sessions}\n')
    conf.write_text(conf.read_text() + "prompt_rate_per_s = 0.0\n")  # one bench, many sessions
    agents: list[Fusion] = []
    try:
        for i in range(n):
            port, log = free_port(), tmp / f"fusion{i}.log"
            args = ["fusion", "--nats", url, "--config", str(conf), "--log-level", "warning"]
            args += ["--metrics-port", str(port)]
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moe2", *args], stdout=out, stderr=subprocess.STDOUT
                )
            agents.append(Fusion(proc, port, log))
        deadline = time.monotonic() + 60
        for agent in agents:
            while not _ready(agent):
                if agent.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fusion agent not ready:\n{agent.log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield agents
    finally:
        stop_processes([agent.proc for agent in agents])


def _ready(agent: Fusion) -> bool:
    try:
        return metric(agent.port, "moe2_fusion_members_live") >= len(EXPERTS)
    except OSError:
        return False


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the client loops saw."""

    expected: str
    started: int = 0
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # the first message of each code
    # latencies as C doubles: a list of Python floats would be most of this process's growth
    ttft_ms: array[float] = field(default_factory=lambda: array("d"))
    token_ms: array[float] = field(default_factory=lambda: array("d"))
    asked: int = 0  # prompts asked, warm-up included (against the fusion agents' sessions)
    tokens: int = 0
    measuring: bool = False  # latencies and counts of the measured phase only


async def one_answer(client: moe2.Client, steps: int, tally: Tally) -> None:
    measured = tally.measuring
    tally.asked += 1
    if measured:
        tally.started += 1
    times: list[float] = []
    asked = time.perf_counter()
    answer = client.ask(PROMPT, max_tokens=steps, timeout=TIMEOUT_S)
    try:
        async for _ in answer:
            times.append(time.perf_counter())
    except Moe2Error as exc:
        if measured:
            tally.errors[str(exc.code)] += 1
            tally.examples.setdefault(str(exc.code), exc.message)
        return
    if not measured:
        return
    if answer.text != tally.expected:
        tally.errors["wrong_text"] += 1
        return
    tally.completed += 1
    tally.tokens += len(times)
    if times:
        tally.ttft_ms.append((times[0] - asked) * 1000)
        tally.token_ms.extend((b - a) * 1000 for a, b in itertools.pairwise(times))


async def load(
    url: str, sessions: int, steps: int, warmup_s: float, duration_s: float, tally: Tally, on: Any
) -> dict[str, float]:
    """``sessions`` loops for ``warmup_s`` + ``duration_s``; ``on(phase)`` is called at the
    start of the measured phase ("start") and once every answer is in ("end")."""
    stop = anyio.Event()

    async def loop(client: moe2.Client) -> None:
        while not stop.is_set():
            await one_answer(client, steps, tally)

    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(moe2.connect(url, prefix=PREFIX, name=f"load-{i}"))
            for i in range(CONNECTIONS)
        ]
        walls: dict[str, float] = {}
        async with anyio.create_task_group() as tg:
            for i in range(sessions):
                tg.start_soon(loop, clients[i % len(clients)])
            await anyio.sleep(warmup_s)
            tally.measuring = True
            on("start")
            walls["started"] = time.perf_counter()
            with anyio.move_on_after(duration_s):
                while True:  # every process's RSS every SAMPLE_S: growth or a plateau?
                    await anyio.sleep(SAMPLE_S)
                    on("sample")
            stop.set()
            walls["stopped"] = time.perf_counter()
        walls["drained"] = time.perf_counter()
        on("end")
    return walls


# --- the run -------------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        server = stack.enter_context(NatsServer())
        trace_path = tmp / "synthetic.moe2"
        chosen = synthetic_trace(
            trace_path, experts=EXPERTS, prompt_messages=PROMPT, steps=args.steps, prefix=PREFIX
        )
        expected = "".join(f" t{t}" for t in chosen[: args.steps])
        serving = [
            __file__,
            "--serve",
            server.url,
            str(trace_path),
            "--batch-ms",
            str(args.batch_ms),
        ]
        replay = stack.enter_context(helper_process(serving))
        agents = stack.enter_context(fusion_agents(server.url, args.fusion, args.sessions, tmp))
        assert server._proc is not None
        pids = {"nats-server": server._proc.pid, "replay experts": replay.pid}
        pids |= {f"fusion agent {i}": a.proc.pid for i, a in enumerate(agents)}
        pids["clients (this process)"] = os.getpid()
        memory: dict[str, dict[str, float]] = {name: {} for name in pids}
        trace: dict[str, list[float]] = {name: [] for name in pids}
        sessions_left: dict[str, float] = {}
        fusion_sessions = [0.0]

        def on(phase: str) -> None:
            for name, pid in pids.items():
                if phase == "sample":
                    trace[name].append(round(rss_mb(pid), 1))
                else:
                    memory[name][phase] = rss_mb(pid)
            if phase == "end":
                for i, a in enumerate(agents):
                    sessions_left[f"fusion agent {i}"] = metric(
                        a.port, "moe2_fusion_sessions_active"
                    )
                    fusion_sessions[0] += metric(a.port, "moe2_fusion_sessions_started_total")

        tally = Tally(expected)
        walls = anyio.run(
            load, server.url, args.sessions, args.steps, args.warmup, args.duration, tally, on
        )
        alive = {f"fusion agent {i}": a.proc.poll() is None for i, a in enumerate(agents)}
        alive["replay experts"] = replay.poll() is None
    result = report(args, tally, walls, memory, sessions_left, alive)
    result["memory_every_10s_mb"] = trace
    result["asked"], result["fusion_sessions"] = tally.asked, fusion_sessions[0]
    return result


def report(
    args: argparse.Namespace,
    tally: Tally,
    walls: dict[str, float],
    memory: dict[str, dict[str, float]],
    sessions_left: dict[str, float],
    alive: dict[str, bool],
) -> dict[str, Any]:
    growth = {name: m["end"] / m["start"] - 1 for name, m in memory.items()}
    accounted = tally.completed + sum(tally.errors.values())
    result: dict[str, Any] = {
        "bench": "load",
        "machine": machine(),
        "sessions": args.sessions,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "fusion_agents": args.fusion,
        "steps": args.steps,
        "batch_ms": args.batch_ms,
        "started": tally.started,
        "completed": tally.completed,
        "errors": dict(tally.errors),
        "error_examples": tally.examples,
        "unaccounted": tally.started - accounted,
        "tokens": tally.tokens,
        "tokens_per_s": tally.tokens / (walls["drained"] - walls["started"]),
        "drain_s": walls["drained"] - walls["stopped"],
        "ttft": Latency.of(tally.ttft_ms).as_dict() if tally.ttft_ms else None,
        "per_token": Latency.of(tally.token_ms).as_dict() if tally.token_ms else None,
        "memory_mb": memory,
        "growth": growth,
        "sessions_active_at_end": sessions_left,
        "agents_alive": alive,
    }
    all_done = tally.started == tally.completed and tally.started > 0
    bounded = all(g < GROWTH_LIMIT for g in growth.values())
    result["passed"] = {"started_eq_completed": all_done, "memory_growth": bounded}
    worst = max(growth, key=lambda name: growth[name])
    errors = ", ".join(f"{code} {n}" for code, n in sorted(tally.errors.items())) or "none"
    result[SUITE_ROWS] = [
        suite_row(
            "load_256",
            f"RSS after {args.warmup:g} s warm-up: "
            + ", ".join(f"{name} {m['start']:.0f} MiB" for name, m in memory.items()),
            f"{tally.started} started = {tally.completed} completed (errors: {errors}); "
            f"worst RSS growth {growth[worst]:+.1%} ({worst}); "
            f"TTFT p50 {_p(result['ttft'], 'p50_ms')} p99 {_p(result['ttft'], 'p99_ms')}; "
            f"per token p50 {_p(result['per_token'], 'p50_ms')} "
            f"p99 {_p(result['per_token'], 'p99_ms')}",
            all_done and bounded,
            row=f"{args.sessions} concurrent sessions for {args.duration:g} s, replay experts, "
            f"{args.fusion} fusion agents, each its own process",
        )
    ]
    return result


def _p(latency: dict[str, float] | None, key: str) -> str:
    return "n/a" if latency is None else f"{latency[key]:.0f} ms"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(result: dict[str, Any]) -> str:
    ttft, tok = result["ttft"] or {}, result["per_token"] or {}
    errors = ", ".join(f"`{c}` {n}" for c, n in sorted(result["errors"].items())) or "none"
    head = [
        f"{result['sessions']} concurrent sessions for {result['duration_s']:g} s "
        f"(after {result['warmup_s']:g} s of warm-up), {result['fusion_agents']} fusion agents, "
        f"2 replay experts ({result['steps']} tokens an answer, {result['batch_ms']:g} ms a "
        f"batch); {result['machine']['cpus']} CPUs, load {result['machine']['loadavg']}",
        "",
        markdown_table(
            ["figure", "measured", "target", "result"],
            [
                [
                    "sessions started / completed",
                    f"{result['started']} / {result['completed']} (errors: {errors}; "
                    f"unaccounted {result['unaccounted']})",
                    "started = completed",
                    verdict(result["passed"]["started_eq_completed"]),
                ],
                [
                    "time to first token p50 / p99",
                    f"{_p(ttft, 'p50_ms')} / {_p(ttft, 'p99_ms')}",
                    "",
                    "",
                ],
                [
                    "per-token latency p50 / p99",
                    f"{_p(tok, 'p50_ms')} / {_p(tok, 'p99_ms')}",
                    "",
                    "",
                ],
                ["tokens/s (all sessions)", f"{result['tokens_per_s']:.0f}", "", ""],
                ["drain after the time was up", f"{result['drain_s']:.1f} s", "", ""],
                [
                    "sessions the fusion agents ran / prompts asked (warm-up included)",
                    f"{result.get('fusion_sessions', 0):.0f} / {result.get('asked', 0)}",
                    "",
                    "",
                ],
            ],
        ),
        "",
        markdown_table(
            ["process", "RSS at start (MiB)", "RSS at end (MiB)", "growth", "< 10 %"],
            [
                [
                    name,
                    f"{m['start']:.1f}",
                    f"{m['end']:.1f}",
                    f"{result['growth'][name]:+.1%}",
                    verdict(result["growth"][name] < GROWTH_LIMIT),
                ]
                for name, m in result["memory_mb"].items()
            ],
        ),
    ]
    trace = result.get("memory_every_10s_mb", {})
    for name, samples in trace.items():
        head.append(f"\n{name}, RSS every {SAMPLE_S:g} s (MiB): {', '.join(map(str, samples))}")
    for code, message in sorted(result["error_examples"].items()):
        head.append(f"\nfirst `{code}`: {message}")
    return "\n".join(head)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sessions", type=int, default=256, help="concurrent sessions (256)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds measured (60)")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of load before (20)")
    p.add_argument("--fusion", type=int, default=2, help="fusion agent processes (2)")
    p.add_argument("--steps", type=int, default=24, help="tokens per answer (24)")
    p.add_argument("--batch-ms", type=float, default=20.0, help="replay experts' batch (20 ms)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="10 s warm-up, 20 s measured")
    p.add_argument("--serve", nargs=2, metavar=("URL", "TRACE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = min(args.duration, 20.0), min(args.warmup, 10.0)
    if min(args.sessions, args.fusion, args.steps) < 1 or args.duration <= 0:
        p.error("every count must be >= 1 and the duration > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    quiet_logs()
    if args.serve:
        exit_with_parent()
        url, trace = args.serve
        anyio.run(serve_replay, url, Path(trace), args.batch_ms / 1000, PREFIX)
        return 0
    return run_and_report(args, run_bench, render)


if __name__ == "__main__":
    sys.exit(main())
