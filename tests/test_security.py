"""Secure by default (issue 12 part 1, docs/security.md): every attack of the issue against a real
nats-server with the shipped per-role users, each refused by the server (a permissions violation
that the attacker's own connection is told about, and the server logs) or by moe2 (a check that
holds even where the permissions are misconfigured: here the tests' superuser plays the attacker).
The honest path works with each role's own credentials."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import nats
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from structlog.testing import capture_logs

import moe2
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.agents.fusion.limits import PromptRate, client_of
from moe2.agents.fusion.membership import Membership
from moe2.runtime import wire
from moe2.runtime.auth import AuthDir, NatsAuth
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.server import NatsServer
from moe2.runtime.subjects import Subjects
from moe2.runtime.wire import MAX_HEARTBEAT_INTERVAL_S
from moe2.status import PoolWatch
from tests.scripted import Script, ScriptedExpert

pytestmark = pytest.mark.anyio
S = Subjects()  # the shipped permissions are for the prefix moe2
ROOT = Path(__file__).resolve().parents[1]


class Conn:
    """One connection with one role's credentials, and what the server told it."""

    def __init__(self, nc: NATS, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors

    async def violation(self, kind: str, subject: str) -> str:
        """Wait for the server's permissions violation for ``kind`` ("publish" or
        "subscription") on ``subject``; the error text."""
        wanted = f'permissions violation for {kind} to "{subject}"'.lower()  # as nats-py says it
        with anyio.fail_after(5):
            while not any(wanted in e.lower() for e in self.errors):
                await self.nc.flush()
                await anyio.sleep(0.02)
        return next(e for e in self.errors if wanted in e.lower())


@asynccontextmanager
async def role(server: NatsServer, auth: NatsAuth, name: str) -> AsyncIterator[Conn]:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    url = server.plain_url
    nc = await nats.connect(
        url, name=name, error_cb=on_error, allow_reconnect=False, **auth.connect_options(url)
    )
    try:
        yield Conn(nc, errors)
    finally:
        await close_nats(nc)


class Watch:
    """The superuser listening on a subject: what reached it."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def start(self, nc: NATS, subject: str) -> Watch:
        async def take(msg: nats.aio.msg.Msg) -> None:
            self.got.append(msg.data)

        await nc.subscribe(subject, cb=take)
        await nc.flush()
        return self


@asynccontextmanager
async def honest_pool(
    server: NatsServer,
    auth: AuthDir,
    scripts: dict[str, Script],
    **config: object,
) -> AsyncIterator[tuple[moe2.Client, FusionAgent, dict[str, Conn]]]:
    """Scripted experts, a fusion agent and a client, each on its own role's credentials."""
    cfg = FusionConfig(step_deadline_s=2.0, wait_for_experts_s=3.0, **config)  # type: ignore[arg-type]
    async with AsyncExitStack() as stack:
        conns = {
            "fusion": await stack.enter_async_context(role(server, auth.auth("fusion"), "fusion")),
            "client": await stack.enter_async_context(role(server, auth.auth("client"), "client")),
        }
        for expert in scripts:
            who = f"expert-{expert}"
            conns[who] = await stack.enter_async_context(role(server, auth.auth(who), who))
        tg = await stack.enter_async_context(anyio.create_task_group())
        for expert, script in scripts.items():
            await tg.start(ScriptedExpert(conns[f"expert-{expert}"].nc, expert, script).run)
        agent = FusionAgent(conns["fusion"].nc, cfg)
        await tg.start(agent.run)
        if scripts:
            await agent.wait_for_experts(len(scripts), limit_s=10)
        yield moe2.Client(conns["client"].nc), agent, conns
        tg.cancel_scope.cancel()


@pytest.fixture
async def superuser(nats_url: str) -> AsyncIterator[NATS]:
    """The tests' superuser: every subject, as with permissions misconfigured."""
    nc = await connect_nats(nats_url, name="superuser")
    yield nc
    await close_nats(nc)


def heartbeat(expert: str, **fields: object) -> wire.Heartbeat:
    hb = wire.Heartbeat(
        expert=expert, model="forged", tokenizer="bytes", backend="x", vocab_size=256, eos_ids=[0]
    )
    return msgspec.structs.replace(hb, **fields) if fields else hb


# --- the honest path -----------------------------------------------------------------------------


async def test_each_role_with_its_own_credentials_answers_end_to_end(
    nats_server: NatsServer, nats_auth: AuthDir
) -> None:
    async with honest_pool(nats_server, nats_auth, {"a": Script(), "b": Script()}) as (
        client,
        _,
        conns,
    ):
        with anyio.fail_after(20):
            final = await client.ask("Say hello", max_tokens=64).collect()
        await anyio.sleep(0.3)  # a late violation would arrive by now
    assert final.text == "Hello from the bus."
    assert final.experts == ["a", "b"]
    assert {who: c.errors for who, c in conns.items() if c.errors} == {}  # no role was refused
    assert client_inbox(nats_auth) in conns["client"].nc._inbox_prefix.decode()


def client_inbox(auth: AuthDir) -> str:
    inbox = auth.auth("client").inbox()
    assert inbox is not None and inbox.startswith("_INBOX.U")
    return inbox


async def test_a_server_without_users_makes_every_agent_warn() -> None:
    with NatsServer() as bare, capture_logs() as logs:
        nc = await connect_nats(bare.url, name="moe2-expert-a", auth=NatsAuth())
        await close_nats(nc)
    warned = [e for e in logs if e["event"] == "nats_without_authentication"]
    assert len(warned) == 1 and "no users" in warned[0]["warning"]


async def test_wrong_credentials_are_refused_at_connect(nats_server: NatsServer) -> None:
    with pytest.raises(Moe2Error, match="Authorization Violation") as refused:
        await connect_nats(nats_server.plain_url, name="x", auth=NatsAuth(user="x", password="y"))
    assert refused.value.code == ErrorCode.UNREACHABLE
    with pytest.raises(Moe2Error, match="Authorization Violation"):
        await connect_nats(nats_server.plain_url, name="anonymous", auth=NatsAuth())


# --- the attacks of the issue, each refused ------------------------------------------------------


async def test_a_client_cannot_read_prompts_sent_to_experts(
    nats_server: NatsServer, nats_auth: AuthDir
) -> None:
    """Refused by the SERVER: a client may subscribe to its own inbox only."""
    async with (
        honest_pool(nats_server, nats_auth, {"a": Script()}) as (client, _, _conns),
        role(nats_server, nats_auth.auth("client"), "snoop") as snoop,
    ):
        seen = await Watch().start(snoop.nc, "moe2.v1.expert.*.open")
        said = await snoop.violation("subscription", "moe2.v1.expert.*.open")
        with anyio.fail_after(20):
            final = await client.ask("a secret question", max_tokens=8).collect()
    assert final.experts == ["a"]
    assert seen.got == []
    assert "Subscription Violation" in nats_server.log_text
    assert "permissions violation" in said


async def test_nobody_but_the_expert_publishes_its_slices(
    nats_server: NatsServer, nats_auth: AuthDir, superuser: NATS
) -> None:
    """Refused by the SERVER: slices in expert a's name, from a client and from expert b."""
    subject = S.slice("live-session", "a")
    seen = await Watch().start(superuser, S.session_slices("live-session"))
    forged = wire.make_slice(
        session="live-session", expert="a", step=0, ids=np.array([88]), logprobs=np.array([0.0]),
        pieces=[b"X"], compute_s=0.0, energy_j=0.0,
    )  # fmt: skip
    for who in ("client", "expert-b"):
        async with role(nats_server, nats_auth.auth(who), who) as attacker:
            await attacker.nc.publish(subject, wire.encode(forged))
            await attacker.violation("publish", subject)
    await superuser.flush()
    await anyio.sleep(0.2)
    assert seen.got == []


async def test_forged_heartbeats_do_not_join_the_pool(
    nats_server: NatsServer, nats_auth: AuthDir, superuser: NATS
) -> None:
    """Refused by the SERVER (a client, or expert b in a's name, may not publish heartbeats) and
    by MOE2 (a heartbeat from the superuser for an expert nobody serves: its probe finds no
    responder, so it is never selected)."""
    async with honest_pool(nats_server, nats_auth, {"a": Script()}) as (client, agent, _conns):
        for who, expert in (("client", "ghost"), ("expert-b", "a")):
            async with role(nats_server, nats_auth.auth(who), who) as attacker:
                await attacker.nc.publish(S.member(expert), wire.encode(heartbeat(expert)))
                await attacker.violation("publish", S.member(expert))
        with capture_logs() as logs:
            for _ in range(3):
                await superuser.publish(S.member("ghost"), wire.encode(heartbeat("ghost")))
                await anyio.sleep(0.1)
            with anyio.fail_after(5):
                while not any(e["event"] == "expert_probe_failed" for e in logs):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
        assert "ghost" not in agent.membership.live(time.monotonic())
        with anyio.fail_after(20):
            final = await client.ask("who answers?", max_tokens=8).collect()
    assert final.experts == ["a"]
    failed = [e for e in logs if e["event"] == "expert_probe_failed"]
    assert failed[0]["expert"] == "ghost"
    assert failed[0]["error"] == "nobody subscribes to its subjects"
    assert len(failed) == 1  # probed once; the next heartbeats within PROBE_RETRY_S are not


async def test_a_heartbeat_with_a_huge_interval_cannot_keep_an_expert(
    nats_server: NatsServer, nats_auth: AuthDir, superuser: NATS
) -> None:
    """Refused by the SERVER for a client, and by MOE2 from the superuser: ``interval_s`` 1e9 is
    refused on decode (``invalid_field``), and even a heartbeat that got in with it counts for at
    most MAX_HEARTBEAT_INTERVAL_S: the expert still expires."""
    huge = msgspec.msgpack.encode({**msgspec.to_builtins(heartbeat("a")), "interval_s": 1e9})
    async with role(nats_server, nats_auth.auth("client"), "client") as attacker:
        await attacker.nc.publish(S.member("a"), huge)
        await attacker.violation("publish", S.member("a"))
    async with honest_pool(nats_server, nats_auth, {}) as (_, agent, _conns):
        await superuser.publish(S.member("a"), huge)
        await superuser.flush()
        with anyio.fail_after(5):
            while agent.members_endpoint.stats.errors.get("invalid_field", 0) < 1:  # noqa: ASYNC110
                await anyio.sleep(0.02)
    with pytest.raises(Moe2Error) as refused:
        wire.decode(huge)
    assert refused.value.code == ErrorCode.INVALID_FIELD
    membership = Membership(missed=2)
    got_in = heartbeat("a")
    msgspec.structs.force_setattr(got_in, "interval_s", 1e9)  # as if it had passed the wire
    assert membership.seen(got_in, now=0.0)
    assert membership.admit("a") and list(membership.live(0.0)) == ["a"]
    bound = 2 * MAX_HEARTBEAT_INTERVAL_S
    assert list(membership.live(bound)) == ["a"]
    assert membership.live(bound + 1) == {}
    assert membership.expire(bound + 1) == ["a"]


async def test_forged_opens_and_closes_never_reach_an_expert(
    nats_server: NatsServer, nats_auth: AuthDir, superuser: NATS
) -> None:
    """Refused by the SERVER: a client may not publish to an expert's subjects (64 Opens that
    would fill it, a Close that would end a live session)."""
    script = Script()
    seen = await Watch().start(superuser, S.expert_inbox("a"))
    async with role(nats_server, nats_auth.auth("client"), "client") as attacker:
        for i in range(64):
            prompt = [wire.ChatMessage("user", "x")]
            await attacker.nc.publish(S.expert_open("a"), wire.encode(wire.Open(f"s{i}", prompt)))
        await attacker.violation("publish", S.expert_open("a"))
        await attacker.nc.publish(S.expert_close("a"), wire.encode(wire.Close("live")))
        await attacker.violation("publish", S.expert_close("a"))
    async with honest_pool(nats_server, nats_auth, {"a": script}) as (client, _, _conns):
        with anyio.fail_after(20):
            final = await client.ask("still served?", max_tokens=64).collect()
    assert final.text == "Hello from the bus."
    assert script.served == [final.session]  # only the honest session was opened
    opens = [m for m in map(wire.decode, filter(None, seen.got)) if isinstance(m, wire.Open)]
    assert [m.session for m in opens] == [final.session]  # the probe (empty) and the honest one


async def test_prompts_are_rate_limited_per_client(
    nats_server: NatsServer, nats_auth: AuthDir, superuser: NATS
) -> None:
    """Refused by MOE2: 64 prompts at once from one client; past its burst each is ``busy``
    (rate limited) while another client is answered as usual."""
    async with honest_pool(
        nats_server, nats_auth, {"a": Script(delay_s=0.05)}, prompt_burst=8, prompt_rate_per_s=1.0
    ) as (_, _agent, _conns):
        flooder = moe2.Client(superuser)
        codes: list[str] = []

        async def ask_one() -> None:
            try:
                await flooder.ask("flood", max_tokens=2, timeout=30).collect()
                codes.append("ok")
            except Moe2Error as exc:
                codes.append(str(exc.code) + (" rate" if "rate limited" in exc.message else ""))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(64):
                    tg.start_soon(ask_one)
            async with moe2.connect(
                nats_server.plain_url, auth=nats_auth.auth("client"), name="other"
            ) as other:
                final = await other.ask("am I served?", max_tokens=8).collect()
    assert codes.count("busy rate") >= 64 - 8 - 2  # the burst, and what refilled meanwhile
    assert codes.count("ok") >= 8
    assert final.experts == ["a"]


def test_a_client_is_its_inbox_prefix() -> None:
    assert client_of("_INBOX.UABC.x1y2") == "_INBOX.UABC"
    assert client_of("_INBOX.abcdefghijkl0123456789") == "_INBOX.abcdefghijkl"
    bucket = PromptRate(per_s=2.0, burst=2)
    bucket.take("c", 0.0)
    bucket.take("c", 0.0)
    with pytest.raises(Moe2Error, match=r"rate limited.*ask again in 0\.50 s") as refused:
        bucket.take("c", 0.0)
    assert refused.value.code == ErrorCode.BUSY
    bucket.take("other", 0.0)  # another client is not slowed
    bucket.take("c", 0.5)  # refilled


async def test_a_forged_final_cannot_be_put_into_a_clients_inbox(
    nats_server: NatsServer, nats_auth: AuthDir
) -> None:
    """Refused by the SERVER: only fusion agents may publish into client inboxes; an expert and
    another client may not (the answer the client sees is the fused one)."""
    inbox = client_inbox(nats_auth)
    fake = wire.Final(
        session="s", text="forged answer", finish_reason="eos",
        usage=wire.Usage(prompt_tokens=1, completion_tokens=1),
        timings=wire.Timings(0.0, 0.0, 0.0, 0.0, 0.0), experts=["a"], weights=[1.0],
        late={}, dropped=[],
    )  # fmt: skip
    async with honest_pool(nats_server, nats_auth, {"a": Script(delay_s=0.02)}) as (
        client,
        _,
        conns,
    ):
        answer = client.ask("Say hello", max_tokens=64)
        for who in ("expert-a", "client"):
            attacker = conns[who]
            await attacker.nc.publish(f"{inbox}.forged", wire.encode(fake))
            await attacker.violation("publish", f"{inbox}.forged")
        with anyio.fail_after(20):
            final = await answer.collect()
    assert final.text == "Hello from the bus."


async def test_an_expert_is_confined_to_its_own_subjects(
    nats_server: NatsServer, nats_auth: AuthDir
) -> None:
    """Refused by the SERVER: expert b may not read expert a's requests nor others' slices."""
    async with role(nats_server, nats_auth.auth("expert-b"), "expert-b") as b:
        await b.nc.subscribe(S.expert_inbox("a"))
        await b.violation("subscription", S.expert_inbox("a"))
        await b.nc.subscribe(S.session_slices("*"))
        await b.violation("subscription", S.session_slices("*"))


async def test_a_new_experts_credentials_work_after_a_reload(
    nats_server: NatsServer, nats_auth: AuthDir
) -> None:
    """`moe2 auth add-expert` writes a seed; the server reloads its users (SIGHUP)."""
    assert nats_auth.add_expert("late")
    with pytest.raises(Moe2Error, match="Authorization Violation"):
        await connect_nats(nats_server.plain_url, name="early", auth=nats_auth.auth("expert-late"))
    nats_server.reload()
    with anyio.fail_after(10):
        while True:
            try:
                conn = await connect_nats(
                    nats_server.plain_url, name="late", auth=nats_auth.auth("expert-late")
                )
                break
            except Moe2Error:
                await anyio.sleep(0.1)
    await conn.subscribe(S.expert_inbox("late"))
    await conn.flush()
    await close_nats(conn)
    assert (nats_auth.expert_file("late").stat().st_mode & 0o777) == 0o600


def start_expert(url: str, expert: str, auth: NatsAuth, log: Path) -> subprocess.Popen[bytes]:
    """`moe2 expert` (SmolLM2) as a process whose credentials come from MOE2_NATS_*."""
    env = {**os.environ, **auth.env(), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "moe2", "expert", "--id", expert, "--threads", "1"]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*command, "--nats", url], stdout=out, stderr=out, env=env, cwd=ROOT
        )


@pytest.mark.model
async def test_a_real_smollm2_expert_process_answers_with_its_own_credentials(
    nats_server: NatsServer, nats_auth: AuthDir, tmp_path: Path
) -> None:
    """`moe2 expert` as a process with MOE2_NATS_NKEY, the fusion agent and the client with
    theirs: an answer, and nobody refused."""
    log = tmp_path / "expert.log"
    proc = start_expert(nats_server.plain_url, "c", nats_auth.auth("expert-c"), log)
    try:
        async with honest_pool(nats_server, nats_auth, {}) as (client, agent, conns):
            await agent.wait_for_experts(1, limit_s=240)
            with anyio.fail_after(120):
                final = await client.ask("What is 2 + 2?", max_tokens=8).collect()
            await anyio.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text(errors="replace")
    assert final.experts == ["c"] and final.usage.completion_tokens > 0
    assert {who: c.errors for who, c in conns.items() if c.errors} == {}
    assert "permissions violation" not in text.lower(), text[-2000:]
    assert "nats_without_authentication" not in text


async def test_the_admin_role_watches_the_pool_and_publishes_nothing_else(
    nats_server: NatsServer, nats_auth: AuthDir
) -> None:
    """`moe2 status` with the admin's credentials sees experts, steps and the fusion agents'
    $SRV.INFO; the server refuses the admin a prompt (read-only but for $SRV requests)."""
    async with (
        honest_pool(nats_server, nats_auth, {"a": Script()}) as (client, _, _conns),
        role(nats_server, nats_auth.auth("admin"), "admin") as admin,
    ):
        watch = PoolWatch(admin.nc, "moe2", nats_server.plain_url)
        await watch.start()
        with anyio.fail_after(20):
            await client.ask("watched", max_tokens=8).collect()
            while not (watch.view.fusion and watch.view.tokens and watch.view.experts):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await admin.nc.publish(S.prompt, b"x")
        said = await admin.violation("publish", S.prompt)
    assert list(watch.view.experts) == ["a"]
    assert admin.errors == [said]  # nothing else was refused


def test_credentials_come_from_the_config_file_under_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`moe2 fusion --config F`: F's [nats] table, with MOE2_NATS_* (and --nats-*) over it."""
    for var in ("MOE2_NATS_NKEY", "MOE2_NATS_USER", "MOE2_NATS_PASSWORD", "MOE2_NATS_CA"):
        monkeypatch.delenv(var, raising=False)
    conf = tmp_path / "fusion.toml"
    conf.write_text('[fusion]\nstep_deadline_s = 1.5\n\n[nats]\nnkey = "keys/fusion.nk"\n')
    assert FusionConfig.load(conf).step_deadline_s == 1.5  # the [fusion] table as before
    assert NatsAuth.resolve(conf) == NatsAuth(nkey=tmp_path / "keys" / "fusion.nk")
    monkeypatch.setenv("MOE2_NATS_NKEY", "/elsewhere/fusion.nk")
    assert NatsAuth.resolve(conf).nkey == Path("/elsewhere/fusion.nk")
    conf.write_text('[nats]\nseed = "x"\n')
    with pytest.raises(Moe2Error, match=r"\[nats\] in .*not \['seed'\]") as refused:
        NatsAuth.resolve(conf)
    assert refused.value.code == ErrorCode.INVALID_FIELD


async def test_moe2_auth_add_expert_reloads_the_running_server(tmp_path: Path) -> None:
    """`moe2 auth init` writes the seeds; `moe2 auth add-expert` one more, and the set-up's
    running server (its pid file) reloads its users: the new expert gets in."""
    from typer.testing import CliRunner

    from moe2.cli import app

    auth = AuthDir(tmp_path / "auth")
    made = CliRunner().invoke(app, ["auth", "init", "--dir", str(auth.path), "--experts", "a"])
    assert made.exit_code == 0, made.output
    assert f"expert-a         MOE2_NATS_NKEY={auth.expert_file('a')}" in made.output
    with NatsServer(auth=auth) as server:
        added = CliRunner().invoke(app, ["auth", "add-expert", "b", "--dir", str(auth.path)])
        assert added.exit_code == 0, added.output
        assert "reloads its users" in added.output
        with anyio.fail_after(10):
            while True:
                try:
                    nc = await connect_nats(server.url, name="b", auth=auth.auth("expert-b"))
                    break
                except Moe2Error:
                    await anyio.sleep(0.1)
        await close_nats(nc)
    refused = CliRunner().invoke(app, ["auth", "add-expert", "a.b", "--dir", str(auth.path)])
    assert refused.exit_code == 2 and "expert id 'a.b'" in refused.output


async def test_gating_collection_runs_with_the_fusion_credentials(
    nats_server: NatsServer, nats_auth: AuthDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`moe2 gating collect` with fusion.nk (MOE2_NATS_NKEY) against experts on their own
    credentials: every Score request is answered, nobody is refused."""
    from moe2.agents.measure.collect import collect_live
    from moe2.gating.data import load_examples
    from tests.test_gating_collect import (
        ScoringExpert,
        ScoringScript,
        config,
        dataset_of,
        write_mmlu,
    )

    mmlu = write_mmlu(tmp_path / "mmlu")
    examples = load_examples(mmlu)
    monkeypatch.setenv("MOE2_NATS_NKEY", str(nats_auth.seed_file("fusion")))
    async with AsyncExitStack() as stack:
        experts = {}
        for expert in ("a", "b"):
            who = f"expert-{expert}"
            experts[who] = await stack.enter_async_context(
                role(nats_server, nats_auth.auth(who), who)
            )
        tg = await stack.enter_async_context(anyio.create_task_group())
        for who, conn in experts.items():
            expert = who.removeprefix("expert-")
            await tg.start(ScoringExpert(conn.nc, expert, ScoringScript(), "moe2").run)
        with anyio.fail_after(30), capture_logs() as logs:
            summary = await collect_live(
                nats_server.plain_url, examples, tmp_path / "out", dataset_of(mmlu, examples),
                config("moe2"),
            )  # fmt: skip
        tg.cancel_scope.cancel()
    assert (summary.collected, summary.failed) == (summary.pairs, 0)
    assert summary.pairs == 2 * len(examples)
    assert {who: c.errors for who, c in experts.items() if c.errors} == {}
    assert [e for e in logs if e["event"] == "nats_error"] == []  # the collector's own


def make_certificates(where: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=moe2 test CA")  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *extra)  # fmt: skip


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl to make certificates")
async def test_tls_with_a_ca_and_a_client_certificate(tmp_path: Path) -> None:
    """--nats-ca/--nats-cert/--nats-key (MOE2_NATS_CA, _CERT, _KEY): a server that verifies
    client certificates lets in the client that has one, and no other."""
    make_certificates(tmp_path)
    conf = tmp_path / "tls.conf"
    conf.write_text(
        f'tls {{ cert_file: "{tmp_path}/server.pem", key_file: "{tmp_path}/server.key", '
        f'ca_file: "{tmp_path}/ca.pem", verify: true }}\n'
    )
    env = {
        "MOE2_NATS_CA": str(tmp_path / "ca.pem"),
        "MOE2_NATS_CERT": str(tmp_path / "client.pem"),
        "MOE2_NATS_KEY": str(tmp_path / "client.key"),
    }
    with NatsServer(config=conf) as server:
        nc = await connect_nats(server.url, name="tls", auth=NatsAuth.from_env(env))
        assert nc.connected_url is not None
        await close_nats(nc)
        without_cert = NatsAuth(ca=tmp_path / "ca.pem")
        with pytest.raises(Moe2Error) as refused:
            await connect_nats(server.url, name="no-cert", auth=without_cert)
    assert refused.value.code == ErrorCode.UNREACHABLE
    with pytest.raises(Moe2Error, match="TLS files unusable") as bad:
        NatsAuth(ca=tmp_path / "missing.pem").tls_context()
    assert bad.value.code == ErrorCode.INVALID_FIELD


def test_credentials_are_never_written_into_a_directory_open_to_others(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(Moe2Error, match=r"open to others \(mode 755\)") as refused:
        AuthDir(shared).init(["a"])
    assert refused.value.code == ErrorCode.INVALID_FIELD
    assert list(shared.iterdir()) == []
    fresh = AuthDir(tmp_path / "new" / "auth")
    assert fresh.init(["a"]) == ["client", "fusion", "admin", "expert-a"]
    assert fresh.init(["a", "b"]) == ["expert-b"]  # existing seeds are kept
    assert fresh.path.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in fresh.path.glob("*.nk")} == {0o600}


async def test_named_clients_cannot_read_each_others_answers(
    nats_server: NatsServer, nats_auth: AuthDir
) -> None:
    """Refused by the SERVER: `moe2 auth add-client` users each read only their own inbox (the
    processes of the one shared `client` user could read each other's)."""
    assert nats_auth.add_client("alice") and nats_auth.add_client("bob")
    nats_server.reload()
    alice_inbox = nats_auth.auth("client-alice").inbox()
    assert alice_inbox is not None
    with anyio.fail_after(10):
        while True:
            try:
                async with role(nats_server, nats_auth.auth("client-bob"), "bob") as bob:
                    await bob.nc.subscribe(f"{alice_inbox}.>")
                    said = await bob.violation("subscription", f"{alice_inbox}.>")
                break
            except (nats.errors.Error, OSError):  # the reload not read yet
                await anyio.sleep(0.1)
    assert "permissions violation" in said
    alice_auth = nats_auth.auth("client-alice")
    async with (
        honest_pool(nats_server, nats_auth, {"a": Script()}) as (_, _agent, _conns),
        moe2.connect(nats_server.plain_url, auth=alice_auth, name="alice") as alice,
    ):
        final = await alice.ask("mine only", max_tokens=64).collect()
    assert final.text == "Hello from the bus."


def test_every_command_takes_the_credentials_after_its_name(
    nats_server: NatsServer, nats_auth: AuthDir
) -> None:
    """`moe2 status --nats-nkey admin.nk` gets in; the same without credentials is refused by
    the server, and says so."""
    base = [sys.executable, "-m", "moe2", "status", "--once", "--nats", nats_server.plain_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE2_NATS")}
    seen = subprocess.run(
        [*base, "--nats-nkey", str(nats_auth.seed_file("admin"))],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )  # fmt: skip
    assert seen.returncode == 0, seen.stderr
    assert "experts live" in seen.stdout
    assert "violation" not in seen.stderr.lower()
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert refused.returncode == 1
    assert "refused moe2-status: nats: 'Authorization Violation" in refused.stderr
