"""``moe2 demo``: everything on one machine, started, used once and shut down cleanly."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

import moe2
from moe2.agents.fusion.agent import FusionAgent, serve_fusion
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.server import NatsServer


@dataclass(frozen=True, slots=True)
class DemoSettings:
    prompt: str
    experts: int = 3
    model: str = "smollm2-135m"
    max_tokens: int = 96
    step_deadline_s: float = 5.0
    start_timeout_s: float = 600.0


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@contextmanager
def expert_processes(url: str, settings: DemoSettings, logs: Path) -> Iterator[list[Path]]:
    """Start the experts as separate processes; terminate (then kill) them on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    files: list[Path] = []
    try:
        for i in range(1, settings.experts + 1):
            log_file = logs / f"expert-{i}.log"
            files.append(log_file)
            cmd = [
                sys.executable,
                "-m",
                "moe2",
                "expert",
                "--id",
                f"expert-{i}",
                "--model",
                settings.model,
                "--nats",
                url,
                "--threads",
                "1",
            ]
            with log_file.open("wb") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
        yield files
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


async def run_demo(settings: DemoSettings) -> None:
    logs = Path(tempfile.mkdtemp(prefix="moe2-demo-"))
    with NatsServer() as server:
        _say(f"· nats-server on {server.url}")
        with expert_processes(server.url, settings, logs) as log_files:
            _say(f"· {settings.experts} experts starting ({settings.model}); logs in {logs}")
            config = FusionConfig(step_deadline_s=settings.step_deadline_s)
            async with anyio.create_task_group() as tg:
                agent: FusionAgent = await tg.start(serve_fusion, server.url, config)
                await _wait_for_experts(agent, settings, log_files)
                await _ask(server.url, settings)
                tg.cancel_scope.cancel()
    _say("· shut down: fusion agent, experts and nats-server stopped")


async def _wait_for_experts(agent: FusionAgent, settings: DemoSettings, logs: list[Path]) -> None:
    try:
        live = await agent.wait_for_experts(settings.experts, settings.start_timeout_s)
    except TimeoutError:
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-800:]}" for p in logs)
        raise Moe2Error(
            ErrorCode.TIMEOUT,
            f"experts not live after {settings.start_timeout_s:.0f}s; their logs:\n{tails}",
        ) from None
    _say(f"· experts live: {', '.join(live)}; fusion agent ready\n")
    _say(f"> {settings.prompt}\n")


async def _ask(url: str, settings: DemoSettings) -> None:
    from moe2.cli import summary_line

    async with moe2.connect(url) as client:
        answer = client.ask(settings.prompt, max_tokens=settings.max_tokens)
        async for chunk in answer:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n\n")
        assert answer.final is not None, "a finished stream has its final message"
        _say(summary_line(answer.final))
