"""What the benchmarks share: quiet logs, latency summaries, markdown tables, helper processes."""

from __future__ import annotations

import json
import os
import platform
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from moe2.agents.traces.replay import serve_replay_experts
from moe2.runtime.logs import configure_logging
from moe2.runtime.server import nats_server_binary

READY = "ready"  # what a helper process prints on stdout once it serves


def quiet_logs() -> None:
    """Warnings and worse only, so that nothing interleaves with the table."""
    configure_logging("warning")


@dataclass(frozen=True, slots=True)
class Latency:
    samples: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    @classmethod
    def of(cls, ms: Sequence[float]) -> Latency:
        a = np.asarray(ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no samples")
        p50, p99 = np.percentile(a, [50, 99])
        return cls(a.size, float(p50), float(p99), float(a.mean()), float(a.min()))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def machine() -> dict[str, Any]:
    """Where a figure was measured."""
    version = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nats_server": version,
    }


@contextmanager
def helper_process(
    args: Sequence[str], *, timeout: float = 30.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``python ARGS``; wait for it to print READY; terminate (then kill) it on the way out.
    Its stdin is a pipe it watches (see ``exit_with_parent``), so it dies with this process."""
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        _wait_ready(proc, timeout)
        yield proc
    finally:
        _stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stdout], [], [], left)[0]:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"helper process exited with {proc.wait()} before it was ready")
        if line.decode().strip() == READY:
            return
    raise TimeoutError(f"helper process not ready within {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def exit_with_parent() -> None:
    """In a helper process: exit as soon as the parent closes our stdin (or dies)."""

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


async def serve_replay(url: str, trace: Path, delay_s: float, prefix: str) -> None:
    """In a helper process: replay experts of ``trace`` under ``prefix`` (each step batched,
    ``delay_s`` a batch); prints READY once they serve, then serves until killed."""
    async with anyio.create_task_group() as tg:
        serving = partial(
            serve_replay_experts, url, trace, delay_s=delay_s, per_batch=True, prefix=prefix
        )
        await tg.start(serving)
        print(READY, flush=True)


def run_and_report(
    args: Any, run_bench: Callable[[Any], dict[str, Any]], render: Callable[[dict[str, Any]], str]
) -> int:
    """A bench's main after its options: run it (SIGTERM still runs its cleanup), print the
    table, and write the results as JSON where ``--json`` says."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    result = run_bench(args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0
