"""Deployment across sites (issue 12 part 4, docs/deploy.md): the shipped nats-server configs
(deploy/nats) pass nats-server's config test with the secrets gen-secrets.sh makes, and run as a
3-node hub cluster with an edge leaf node over which a session crosses; the systemd units of an
edge box (deploy/systemd) pass systemd-analyze and name only options moe2 has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import moe2
from moe2.runtime.auth import ENV
from moe2.runtime.lifecycle import stop_processes
from moe2.runtime.server import nats_server_binary
from tests.deploy_site import (
    HUBS,
    ROOT,
    first_answer,
    fusion_process,
    local_site,
    make_secrets,
    scripted_expert,
    shipped,
    spawn,
)

CONFIGS = [f"{h}.conf" for h in HUBS] + ["edge.conf"]
SYSTEMD = ROOT / "deploy" / "systemd"


def config_test(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30
    )


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("etc") / "nats"
    make_secrets(directory)
    return directory


@pytest.mark.parametrize("name", CONFIGS)
def test_nats_server_accepts_every_shipped_config(secrets: Path, name: str) -> None:
    path = secrets / name
    path.write_text(shipped(name, secrets))
    done = config_test(path)
    assert done.returncode == 0, done.stderr
    assert "is valid" in done.stderr + done.stdout


def test_the_config_test_refuses_an_edge_without_its_leaf_remote(secrets: Path) -> None:
    """So the test above can fail: a missing include is an error, not a silent default."""
    path = secrets / "edge-broken.conf"
    path.write_text(shipped("edge.conf", secrets).replace("leaf-remote.conf", "missing.conf"))
    done = config_test(path)
    assert done.returncode != 0
    assert "missing.conf" in done.stderr


def test_gen_secrets_makes_owner_only_files_a_valid_certificate_and_keeps_them(
    secrets: Path,
) -> None:
    for f in [*secrets.rglob("*.pem"), *secrets.rglob("*.nk"), *secrets.glob("*.conf")]:
        if f.name in CONFIGS or f.name.startswith("edge-"):
            continue  # the configs the tests above wrote
        assert f.stat().st_mode & 0o077 == 0, f
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", "certs/ca.pem", "certs/server.pem"],
        cwd=secrets,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", "certs/server.pem", "-noout", "-text"],
        cwd=secrets,
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:hub-1" in text and "TLS Web Client Authentication" in text  # routes: mutual TLS
    users = (secrets / "authorization.conf").read_text()
    assert "# expert-a" in users and "# fusion" in users and "# client" in users
    before = {f: f.read_bytes() for f in secrets.rglob("*") if f.is_file()}
    make_secrets(secrets)  # a second run keeps what is there
    assert all(f.read_bytes() == data for f, data in before.items())
    password = re.search(r'password: "(\w+)"', (secrets / "leaf-users.conf").read_text())
    assert password and password.group(1) in (secrets / "leaf-remote.conf").read_text()


@pytest.mark.anyio
async def test_a_session_crosses_a_leaf_node(tmp_path: Path) -> None:
    """Expert on the edge site's leaf node, fusion agent and client on the hub cluster (on
    different hub nodes), each with its own role's nkey and the CA: the answer arrives."""
    with local_site(tmp_path / "nats") as site:
        assert site.edge is not None
        procs = [
            scripted_expert(site, site.edge_url, "a", tmp_path / "expert.log"),
            fusion_process(site, site.hub_url(0), tmp_path / "fusion.log"),
        ]
        try:
            async with moe2.connect(site.hub_url(2), auth=site.auth("client")) as client:
                with anyio.fail_after(40):
                    final = await first_answer(client)
            leafz = site.monitor(site.edge_ports.http, "leafz")
        finally:
            stop_processes(procs)
        logs = (tmp_path / "fusion.log").read_text() + (tmp_path / "expert.log").read_text()
    assert final.text == "Hello from the bus.", logs
    assert final.experts == ["a"]
    assert "Violation" not in site.edge.log_text + site.hubs[0].log_text  # permissions held
    assert leafz["leafnodes"] == 1


# --- systemd units of an edge box ----------------------------------------------------------------

UNITS = {  # unit -> (instance to verify, env file)
    "moe2-expert@.service": ("moe2-expert@a.service", "expert-a.env"),
    "moe2-fusion.service": ("moe2-fusion.service", "fusion.env"),
    "moe2-gateway.service": ("moe2-gateway.service", "gateway.env"),
    "nats-edge.service": ("nats-edge.service", None),
}
VENV_BIN = "/opt/moe2/venv/bin/"


def env_file(name: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (SYSTEMD / name).read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


def units_in(directory: Path, binary_dir: str) -> list[str]:
    """The shipped units in ``directory`` with ``binary_dir`` for the venv; the names to verify."""
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text().replace(VENV_BIN, binary_dir)
        (directory / unit).write_text(text)
        (directory / UNITS[unit][0]).write_text(text)  # the template's instance, for verify
    return [instance for instance, _ in UNITS.values()]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_accepts_the_units(tmp_path: Path) -> None:
    names = units_in(tmp_path, f"{Path(sys.executable).parent}/")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Unknown" not in done.stderr and "ignoring" not in done.stderr, done.stderr
    # and it would have said so: a unit whose program is missing fails
    broken = units_in(tmp_path, "/nonexistent/")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", broken[1]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "not executable" in done.stderr


def test_every_service_restarts_and_reads_its_credentials_from_its_env_file() -> None:
    known = {"MOE2_NATS", *ENV.values(), "MOE2_EXPERT_ARGS", "MOE2_FUSION_ARGS"}
    known |= {"MOE2_GATEWAY_ARGS"}
    for unit, (_, env) in UNITS.items():
        text = (SYSTEMD / unit).read_text()
        assert re.search(r"^Restart=always$", text, re.M), unit
        if env is None:
            continue
        values = env_file(env)
        assert set(values) <= known, (env, set(values) - known)
        assert values["MOE2_NATS"].startswith("tls://") and values["MOE2_NATS_NKEY"].endswith(".nk")
        assert values["MOE2_NATS_CA"] == "/etc/moe2/nats/certs/ca.pem"


@pytest.mark.parametrize("unit", [u for u in UNITS if u.startswith("moe2-")])
def test_each_exec_start_names_only_options_moe2_has(unit: str) -> None:
    """The ExecStart line as systemd runs it (%i the instance, $VARS from the env file, split
    into words), with --help appended: moe2 refuses an option it does not have."""
    text = (SYSTEMD / unit).read_text()
    line = re.search(r"^ExecStart=(.+)$", text, re.M)
    assert line is not None
    env = env_file(UNITS[unit][1] or "")
    words = line.group(1).replace("%i", "a").split()
    args = [w for word in words for w in (env[word[1:]].split() if word[0] == "$" else [word])]
    assert args[0] == f"{VENV_BIN}moe2"
    done = subprocess.run(
        [sys.executable, "-m", "moe2", *args[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Usage" in done.stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in done.stdout, flag


@pytest.mark.anyio
@pytest.mark.model
async def test_a_smollm2_expert_on_the_leaf_answers_a_client_on_the_hub(tmp_path: Path) -> None:
    """The same with a real `moe2 expert` (SmolLM2-135M) on the edge: greedy, so the answer is
    the model's own."""
    with local_site(tmp_path / "nats") as site:
        expert = [sys.executable, "-m", "moe2", "expert", "--id", "b", "--nats", site.edge_url]
        expert += ["--threads", "1", "--no-warmup", "--log-level", "warning"]
        procs = [
            spawn(expert, site.env("expert-b"), tmp_path / "expert.log"),
            fusion_process(site, site.hub_urls, tmp_path / "fusion.log"),
        ]
        try:
            async with moe2.connect(site.hub_urls, auth=site.auth("client")) as client:
                with anyio.fail_after(90):
                    await first_answer(client, limit_s=80)  # the model loads meanwhile
                    answer = client.ask("What is the capital of France?", max_tokens=12)
                    final = await answer.collect()
        finally:
            stop_processes(procs)
        logs = (tmp_path / "fusion.log").read_text() + (tmp_path / "expert.log").read_text()
    assert final.experts == ["b"], logs
    assert "Paris" in final.text, final.text
    assert site.edge is not None and "Violation" not in site.edge.log_text
