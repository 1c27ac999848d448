"""The shipped deployment (deploy/nats) laid out on loopback for the tests: its secrets made by
deploy/nats/gen-secrets.sh in a temporary directory, its configs with that directory for
/etc/moe2/nats and free local ports for the fixed ones, and real nats-server processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

import moe2
from moe2.runtime import wire
from moe2.runtime.auth import NatsAuth
from moe2.runtime.errors import Moe2Error
from moe2.runtime.server import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[1]
NATS_DIR = ROOT / "deploy" / "nats"
ETC = "/etc/moe2/nats"
HUBS = ("hub-1", "hub-2", "hub-3")


def make_secrets(directory: Path, hubs: str = "hub-1:7422 hub-2:7422 hub-3:7422") -> str:
    """Run gen-secrets.sh into ``directory``; what it printed. Skips where openssl is missing."""
    if shutil.which("openssl") is None:
        pytest.skip("gen-secrets.sh needs openssl")
    env = {**os.environ, "HUBS": hubs, "EXPERTS": "a,b,c", "MOE2": f"{sys.executable} -m moe2"}
    done = subprocess.run(
        ["bash", str(NATS_DIR / "gen-secrets.sh"), str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def shipped(name: str, directory: Path) -> str:
    """A shipped config with ``directory`` for /etc/moe2/nats, includes inlined."""
    text = (NATS_DIR / name).read_text().replace(ETC, str(directory))
    if 'include "hub.conf"' in text:
        text = text.replace('include "hub.conf"', shipped("hub.conf", directory))
    return text


@dataclass
class Ports:
    client: int = field(default_factory=free_port)
    cluster: int = field(default_factory=free_port)
    leaf: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)


@dataclass
class Site:
    """Three hub nodes (a cluster) and an edge leaf node, on loopback."""

    directory: Path
    hub_ports: list[Ports]
    edge_ports: Ports
    hubs: list[NatsServer] = field(default_factory=list)
    edge: NatsServer | None = None

    def auth(self, role: str) -> NatsAuth:
        """What a process of ``role`` connects with: its nkey and the deployment's CA."""
        return NatsAuth(nkey=self.directory / "auth" / f"{role}.nk", ca=self.ca)

    @property
    def ca(self) -> Path:
        return self.directory / "certs" / "ca.pem"

    def env(self, role: str) -> dict[str, str]:
        """A child process's environment with ``role``'s MOE2_NATS_* variables."""
        return {**os.environ, "PYTHONPATH": str(ROOT), **self.auth(role).env()}

    def hub_url(self, i: int) -> str:
        return f"tls://127.0.0.1:{self.hub_ports[i].client}"  # as the env files say

    @property
    def hub_urls(self) -> str:
        """All three hub nodes, as a process of the hub site is given them."""
        return ",".join(self.hub_url(i) for i in range(len(HUBS)))

    @property
    def edge_url(self) -> str:
        return f"tls://127.0.0.1:{self.edge_ports.client}"

    def hub_config(self, i: int) -> Path:
        text = shipped(f"{HUBS[i]}.conf", self.directory)
        own = self.hub_ports[i]
        for j, name in enumerate(HUBS):
            text = text.replace(f"{name}:6222", f"127.0.0.1:{self.hub_ports[j].cluster}")
        text = (
            text.replace("0.0.0.0:4222", f"127.0.0.1:{own.client}")
            .replace("0.0.0.0:6222", f"127.0.0.1:{own.cluster}")
            .replace("0.0.0.0:7422", f"127.0.0.1:{own.leaf}")
            .replace("127.0.0.1:8222", f"127.0.0.1:{own.http}")
        )
        path = self.directory / f"{HUBS[i]}.conf"
        path.write_text(text)
        return path

    def edge_config(self) -> Path:
        text = shipped("edge.conf", self.directory)
        text = text.replace("0.0.0.0:4222", f"127.0.0.1:{self.edge_ports.client}").replace(
            "127.0.0.1:8222", f"127.0.0.1:{self.edge_ports.http}"
        )
        path = self.directory / "edge.conf"
        path.write_text(text)
        return path

    def monitor(self, port: int, endpoint: str) -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{endpoint}", timeout=2) as r:
            data: dict[str, object] = json.loads(r.read())
        return data

    def wait_connected(self, limit_s: float = 15.0) -> None:
        """Until every live hub node has a route to every other live one, and the edge its
        leaf connection."""
        deadline = time.monotonic() + limit_s
        live = [i for i, h in enumerate(self.hubs) if h.running]
        while True:
            routes = [self.monitor(self.hub_ports[i].http, "routez")["num_routes"] for i in live]
            leaf = self.monitor(self.edge_ports.http, "leafz")["leafnodes"] if self.edge else 1
            # nats-server 2.10+ pools routes: several per pair of nodes
            if all(isinstance(n, int) and n >= len(live) - 1 for n in routes) and leaf == 1:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster not formed: routes {routes}, leaf {leaf}")
            time.sleep(0.1)


@contextmanager
def local_site(directory: Path, *, edge: bool = True) -> Iterator[Site]:
    """The shipped hub cluster (and an edge leaf node) running on loopback."""
    hub_ports = [Ports() for _ in HUBS]
    site = Site(directory, hub_ports, Ports())
    make_secrets(directory, " ".join(f"127.0.0.1:{p.leaf}" for p in hub_ports))
    try:
        for i in range(len(HUBS)):
            server = NatsServer(config=site.hub_config(i), port=hub_ports[i].client)
            site.hubs.append(server.start())
        if edge:
            site.edge = NatsServer(config=site.edge_config(), port=site.edge_ports.client)
            site.edge.start()
        site.wait_connected()
        yield site
    finally:
        for server in [*site.hubs, *([site.edge] if site.edge else [])]:
            server.stop()


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A process of the test, its output in ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def fusion_process(site: Site, url: str, log: Path) -> subprocess.Popen[bytes]:
    """``moe2 fusion`` with the fusion user's credentials, as its systemd unit runs it."""
    args = [sys.executable, "-m", "moe2", "fusion", "--nats", url, "--log-level", "info"]
    return spawn(args, site.env("fusion"), log)


def scripted_expert(
    site: Site, url: str, expert: str, log: Path, delay_s: float = 0.0
) -> subprocess.Popen[bytes]:
    """A scripted expert (tests/live_expert.py) with expert-<id>'s credentials."""
    args = [sys.executable, "-m", "tests.live_expert", url, expert, "0.5", str(delay_s)]
    return spawn(args, site.env(f"expert-{expert}"), log)


async def first_answer(client: moe2.Client, limit_s: float = 30.0) -> wire.Final:
    """Ask until the pool answers (the fusion agent and the experts come up meanwhile)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return await client.ask("x", max_tokens=64, timeout=5).collect()
        except Moe2Error:
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.3)
