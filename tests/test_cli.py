"""The `moe2` command as a user runs it: real processes, a real server, exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import moe2
from moe2.agents.fusion.config import FusionConfig
from moe2.agents.traces.synthetic import synthetic_trace
from moe2.runtime.auth import AuthDir, NatsAuth
from moe2.runtime.errors import Moe2Error
from moe2.runtime.server import NatsServer, free_port
from moe2.runtime.trace import load_trace
from moe2.runtime.wire import ChatMessage

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "server", "expert", "fusion", "ask", "record", "replay", "demo", "profile", "select",
    "selection",
]  # fmt: skip


def moe2_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moe2", *args], capture_output=True, text=True, timeout=timeout
    )


def spawn(*args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("wb") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "moe2", *args], stdout=out, stderr=out)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.terminate()
    for p in started:
        p.wait(10)


def test_every_command_has_help() -> None:
    top = moe2_cli("--help")
    assert top.returncode == 0
    for command in COMMANDS:
        assert command in top.stdout
        sub = moe2_cli(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "Usage" in sub.stdout


@pytest.mark.parametrize("command", [["ask", "hi"], ["fusion"], ["record", "--out", "x.moe2"]])
def test_no_server_is_a_clear_error_and_a_non_zero_exit(command: list[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    done = moe2_cli(*command, "--nats", url)
    assert done.returncode == 1
    assert f"error [unreachable]: no NATS server reachable at {url}" in done.stderr


def test_bad_arguments_are_refused_clearly(tmp_path: Path) -> None:
    bad_id = moe2_cli("expert", "--id", "a.b", "--nats", "nats://127.0.0.1:1")
    assert bad_id.returncode == 2
    assert "expert id 'a.b'" in bad_id.stderr
    conf = tmp_path / "fusion.toml"
    conf.write_text("[fusion]\nstep_deadline = 1\n")
    with NatsServer() as server:
        bad_conf = moe2_cli("fusion", "--nats", server.url, "--config", str(conf))
    assert bad_conf.returncode == 1
    assert "unknown fusion settings: ['step_deadline']" in bad_conf.stderr


def test_the_shipped_fusion_config_is_the_default() -> None:
    assert FusionConfig.load(ROOT / "deploy" / "fusion.toml") == FusionConfig()


def test_server_command_serves_until_terminated(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """`moe2 server` has per-role users by default: the client's credentials get in, none don't."""
    port = free_port()
    auth = AuthDir(tmp_path / "auth")
    processes.append(spawn("server", "--port", str(port), "--auth-dir", str(auth.path)))
    url = f"nats://127.0.0.1:{port}"

    async def ping() -> None:
        with anyio.fail_after(10):
            while True:
                try:
                    async with moe2.connect(url, auth=auth.auth("client")):
                        return
                except Moe2Error:
                    await anyio.sleep(0.1)
        with pytest.raises(Moe2Error, match="Authorization Violation"):
            async with moe2.connect(url, auth=NatsAuth()):
                pass

    anyio.run(ping)
    assert (auth.path.stat().st_mode & 0o777, auth.seed_file("client").stat().st_mode & 0o777) == (
        0o700,
        0o600,
    )
    processes[-1].terminate()
    assert processes[-1].wait(10) == 0
    assert not [p for p in Path("/proc").iterdir() if _runs_on_port(p, port)]  # nothing left


def test_a_killed_owner_takes_its_nats_server_with_it() -> None:
    port = free_port()
    code = f"from moe2.runtime.server import NatsServer; NatsServer(port={port}).start(); print(1)"
    owner = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while not [p for p in Path("/proc").iterdir() if _runs_on_port(p, port)]:
            assert time.monotonic() < deadline, "the server never started"
            time.sleep(0.05)
    finally:
        owner.kill()
        owner.wait(10)
    deadline = time.monotonic() + 10
    while [p for p in Path("/proc").iterdir() if _runs_on_port(p, port)]:
        assert time.monotonic() < deadline, "nats-server outlived the process that started it"
        time.sleep(0.05)


def _runs_on_port(proc: Path, port: int) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"nats-server" in cmdline[0] and str(port).encode() in cmdline


def test_roles_as_processes_answer_through_ask_record_and_replay(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """`moe2 replay --experts`, `moe2 fusion`, `moe2 record` and `moe2 ask`, each a process."""
    question = [ChatMessage("user", "What does the trace say?")]
    trace = tmp_path / "synthetic.moe2"
    synthetic_trace(trace, experts=["e1", "e2"], prompt_messages=question, steps=12)
    recorded = tmp_path / "recorded.moe2"
    with NatsServer() as server:
        processes.append(
            spawn("replay", str(trace), "--experts", "--nats", server.url, log=tmp_path / "r.log")
        )
        fusion_log = tmp_path / "fusion.log"
        processes.append(spawn("fusion", "--nats", server.url, log=fusion_log))
        record_log = tmp_path / "record.log"
        processes.append(
            spawn("record", "--out", str(recorded), "--nats", server.url, log=record_log)
        )
        _wait_for_line(record_log, "recording")
        # the recorder hears prompts too, so a prompt sent before the fusion agent subscribed
        # gets no no-responders answer and waits out its timeout: wait for the agent instead
        _wait_for_line(fusion_log, "fusion_ready")
        answer = _ask_until_served(server.url)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip()
        assert "12 tokens in" in answer.stderr
        assert "experts used: e1, e2 · late slices: 0 · finish: length" in answer.stderr
        processes[-1].terminate()
        assert processes[-1].wait(10) == 0
    _, records = load_trace(recorded)
    subjects = {r.subject for r in records}
    assert {"moe2.v1.prompt", "moe2.v1.expert.e1.open", "moe2.v1.expert.e2.open"} <= subjects


def _wait_for_line(log: Path, event: str) -> None:
    """Wait (bounded) until a process has logged ``event``."""
    for _ in range(1200):  # 60 s: a loaded box starts a process slowly
        if log.exists() and f"] {event} " in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{log.name} never logged {event!r}: {log.read_text()}")


def _ask_until_served(url: str) -> subprocess.CompletedProcess[str]:
    """Ask; while the agents are still starting the answer is no_experts or no_fusion_agent."""
    for _ in range(100):
        done = moe2_cli(
            "ask",
            "What does the trace say?",
            "--nats",
            url,
            "--max-tokens",
            "12",
            "--timeout",
            "10",
        )
        if "no_experts" not in done.stderr and "no_fusion_agent" not in done.stderr:
            return done
    raise AssertionError(f"never served: {done.stderr}")
