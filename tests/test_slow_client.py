"""Fault 6 of issue 12: a client that stops reading does not make memory grow without bound.

A real nats-server, a real ``moe2 fusion`` process and two scripted experts (tests/scripted.py)
whose answers are long (400 tokens, one chunk each). Two clients stop reading while they keep
asking:

- a raw TCP client (no NATS library) that subscribes to its inbox and publishes prompts with that
  inbox as reply subject, and never reads its socket (a 4 KiB receive buffer). The server holds
  at most ``max_pending`` for it, then closes it as a slow consumer; the inbox then has no
  subscriber, the fusion agent's next Chunk gets 503 *no responders*, and it cancels the session.
- a nats-py client whose inbox subscription has a pending limit of 4 messages and a callback that
  never returns: nats-py drops what does not fit; the server sees a reader, the sessions run to
  their end.

Meanwhile a third client asks normal questions and must get its answers in normal time; the
fusion agent's resident memory (``/proc``) and its ``moe2_fusion_sessions_active`` (its
``/metrics``) must stay bounded, and drop back to zero once the stalled clients stop asking.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.msg import Msg

import moe2
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.server import NatsServer, free_port
from tests.fuzz_payloads import Agents, fusion_ready
from tests.scripted import Script, ScriptedExpert

# 414 tokens, then EOS (a scripted expert's alternatives are x, y and z: not in its answer)
ANSWER = bytes(range(ord("a"), ord("w") + 1)) * 18
MAX_PENDING = 256 * 1024  # what the server holds for one client before it drops it
STALL_S = 4.0  # how long the stalled clients keep asking once the server dropped the raw one
LIMIT_S = 60.0
ROOT = "moe2.v1"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def metric(port: int, name: str, label: str = "") -> float:
    """One sample of the fusion agent's /metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = f"{name}{{{label}}}" if label else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of its own: a small ``max_pending`` so that the slow consumer shows quickly."""
    conf = tmp_path / "nats.conf"
    conf.write_text(f"max_payload: 262144\nmax_pending: {MAX_PENDING}\nwrite_deadline: 2s\n")
    with NatsServer(config=conf) as s:
        yield s


class RawStalledClient:
    """Speaks the NATS text protocol over a socket it never reads after CONNECT."""

    def __init__(self, url_host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((url_host, port))
        self.sock.recv(4096)  # INFO
        connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True}
        self.send(f"CONNECT {json.dumps(connect)}\r\nSUB _INBOX.stalled.> 1\r\n".encode())
        self.sent = 0
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.settimeout(1.0)
        self.sock.sendall(data)

    def ask(self, max_tokens: int) -> None:
        if self.closed:
            return
        prompt = wire.Prompt(messages=[wire.ChatMessage("user", "stall")], max_tokens=max_tokens)
        data = wire.encode(prompt)
        head = f"PUB {ROOT}.prompt _INBOX.stalled.{self.sent} {len(data)}\r\n".encode()
        try:
            self.send(head + data + b"\r\n")
            self.sent += 1
        except OSError:  # the server closed it (slow consumer) or our send buffer is full
            self.closed = True

    def close(self) -> None:
        self.sock.close()


async def stalled_nats_py(url: str, stop: anyio.Event, dropped: list[Exception]) -> None:
    """A nats-py client whose inbox holds 4 messages and whose callback never returns; what
    nats-py drops goes to ``dropped``."""

    async def error_cb(exc: Exception) -> None:
        dropped.append(exc)

    nc = await nats.connect(url, name="stalled-nats-py", error_cb=error_cb)
    forever = anyio.Event()
    asked = 0

    async def never_returns(_: Msg) -> None:
        await forever.wait()

    try:
        inbox = nc.new_inbox()
        await nc.subscribe(f"{inbox}.*", cb=never_returns, pending_msgs_limit=4)
        while not stop.is_set():
            prompt = wire.Prompt(messages=[wire.ChatMessage("user", "stall")], max_tokens=400)
            await nc.publish(f"{ROOT}.prompt", wire.encode(prompt), reply=f"{inbox}.{asked}")
            asked += 1
            await anyio.sleep(0.5)
    finally:
        forever.set()
        await nc.close()


@pytest.mark.anyio
@pytest.mark.slow  # real processes, about 15 s: run by .ci/run after make test
async def test_a_client_that_stops_reading_costs_bounded_memory(
    server: NatsServer, tmp_path: Path
) -> None:
    metrics_port = free_port()
    conf = tmp_path / "fusion.toml"
    # the raw client must be sent more than the server's socket buffer (4 MiB) and max_pending
    conf.write_text("[fusion]\nmax_sessions = 128\nprompt_rate_per_s = 40.0\nprompt_burst = 40\n")
    agents = Agents(server.url, tmp_path)
    expert_nc = await connect_nats(server.url, name="scripted-experts")
    try:
        async with anyio.create_task_group() as tg:
            for name in ("a", "b"):
                script = Script(text=ANSWER, heartbeat_s=0.5, delay_s=0.002)
                await tg.start(ScriptedExpert(expert_nc, name, script).run)
            fusion = ["fusion", "--config", str(conf), "--metrics-port", str(metrics_port)]
            agents.add("fusion", *fusion, ready=fusion_ready(2))
            await anyio.to_thread.run_sync(agents.wait_ready)
            proc = agents.agents["fusion"].proc
            assert proc is not None
            await _check(server, proc.pid, metrics_port, agents)
            tg.cancel_scope.cancel()
    finally:
        agents.stop()
        await close_nats(expert_nc)


async def _check(server: NatsServer, pid: int, port: int, agents: Agents) -> None:
    async with moe2.connect(server.url, name="healthy") as healthy:
        first = await healthy.ask("hi", max_tokens=16, timeout=10).collect()
        assert first.text == ANSWER[:16].decode()
        rss_start = rss_mb(pid)

        raw = RawStalledClient(server.host, server.port)
        stop = anyio.Event()
        rss, active = [rss_start], list[float]()
        answered: list[tuple[str, float]] = []
        dropped: list[Exception] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(stalled_nats_py, server.url, stop, dropped)
            started, dropped_at = time.monotonic(), None
            # until the server has dropped the raw client, and STALL_S more (at most LIMIT_S)
            while time.monotonic() - (dropped_at or time.monotonic()) < STALL_S:
                assert time.monotonic() - started < LIMIT_S, "the server never dropped it"
                if dropped_at is None and "Slow Consumer" in server.log_text:
                    dropped_at = time.monotonic()
                for _ in range(4):
                    raw.ask(400)
                t0 = time.monotonic()
                final = await healthy.ask("hi", max_tokens=16, timeout=10).collect()
                answered.append((final.text, time.monotonic() - t0))
                rss.append(rss_mb(pid))
                active.append(await anyio.to_thread.run_sync(metric, port, SESSIONS_ACTIVE))
                await anyio.sleep(0.1)
            stop.set()
        raw.close()

        # the healthy client was served all along, in normal time
        assert {text for text, _ in answered} == {ANSWER[:16].decode()}
        assert max(took for _, took in answered) < 5.0, answered
        # the server dropped the raw client as a slow consumer, and the fusion agent cancelled
        # the sessions it could no longer deliver to
        # and nats-py dropped what the stalled callback could not take
        assert any(isinstance(e, nats.errors.SlowConsumerError) for e in dropped)
        cancelled = await anyio.to_thread.run_sync(metric, port, DONE, 'finish_reason="cancelled"')
        assert cancelled >= 1
        # bounded: the fusion agent's memory, and its sessions once nobody stalled asks any more
        assert max(rss) < rss_start * 1.25 + 10, f"RSS {rss_start:.0f} MB -> {rss}"
        deadline = time.monotonic() + 20
        while (now := await anyio.to_thread.run_sync(metric, port, SESSIONS_ACTIVE)) > 0:
            assert time.monotonic() < deadline, f"{now} sessions still active"
            await anyio.sleep(0.2)
        agents.assert_alive()
        last = await healthy.ask("hi", max_tokens=16, timeout=10).collect()
        assert last.text == ANSWER[:16].decode()
        print(
            f"raw client asked {raw.sent}; nats-py dropped {len(dropped)}; "
            f"RSS {rss_start:.1f} -> max {max(rss):.1f} MB; "
            f"active sessions max {max(active):.0f}; cancelled {cancelled:.0f}; "
            f"healthy answers {len(answered)}, slowest {max(t for _, t in answered):.2f} s"
        )


SESSIONS_ACTIVE = "moe2_fusion_sessions_active"
DONE = "moe2_fusion_sessions_done_total"
