"""docs/protocol.md suffices: a Node.js client written from it alone gets the answers Python gets,
and the document names every message type and error code and shows the real bytes of a Slice."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import numpy as np
import pytest

import moe2
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats, flush_subscriptions
from moe2.runtime.errors import ErrorCode
from moe2.runtime.server import NatsServer
from moe2.runtime.subjects import FUSION_QUEUE, Subjects
from tests.scripted import Script, ScriptedExpert

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"
EXAMPLES = ROOT / "docs" / "examples"
ASK_JS = EXAMPLES / "ask.mjs"
NODE = shutil.which("node")
_prefixes = (f"js{i}" for i in itertools.count())


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


# --- the Node.js client against a real nats-server, fusion agent and scripted experts -------------


def js_ready() -> bool:
    modules = EXAMPLES / "node_modules"
    return (modules / "nats").is_dir() and (modules / "@msgpack" / "msgpack").is_dir()


def needs_node() -> str:
    if NODE is None:
        pytest.skip("node is not on PATH: install Node.js >= 18 to test docs/examples/ask.mjs")
    if not js_ready():
        pytest.skip("docs/examples/node_modules is absent: run `npm install` in docs/examples")
    return NODE


@asynccontextmanager
async def bus(url: str, scripts: dict[str, Script], **config: object) -> AsyncIterator[str]:
    """Scripted experts and one fusion agent under a fresh prefix; yields the prefix."""
    prefix = next(_prefixes)
    cfg = FusionConfig(prefix=prefix, **{"step_deadline_s": 1.0, **config})  # type: ignore[arg-type]
    nc = await connect_nats(url, name="test-protocol-doc")
    try:
        async with anyio.create_task_group() as tg:
            for expert, script in scripts.items():
                await tg.start(ScriptedExpert(nc, expert, script, prefix).run)
            agent = FusionAgent(nc, cfg)
            await tg.start(agent.run)
            if scripts:
                await agent.wait_for_experts(len(scripts), 5)
            yield prefix
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)


async def ask_js(
    node: str, url: str, prompt: str, *args: str
) -> subprocess.CompletedProcess[bytes]:
    """Run ask.mjs to its end while the agents keep running in this event loop."""
    return await anyio.run_process(
        [node, str(ASK_JS), url, prompt, *args], cwd=EXAMPLES, check=False
    )


def summary_of(done: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    lines = done.stderr.decode().strip().splitlines()
    assert lines, "ask.mjs wrote no summary line"
    summary = json.loads(lines[-1])
    assert isinstance(summary, dict)
    return summary


@pytest.mark.anyio
async def test_the_node_client_gets_the_answer_the_python_client_gets(nats_url: str) -> None:
    node = needs_node()
    scripts = {"a": Script(), "b": Script(), "c": Script(text="Grüße, 世界!".encode())}
    async with bus(nats_url, scripts) as prefix:
        with anyio.fail_after(30):
            async with moe2.connect(nats_url, prefix=prefix) as client:
                answer = client.ask("Say hello", max_tokens=40)
                py_chunks = [c.text async for c in answer]
            done = await ask_js(
                node, nats_url, "Say hello", "--prefix", prefix, "--max-tokens", "40"
            )
    assert answer.final is not None
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == "".join(py_chunks) + "\n"
    assert done.stdout.decode() == answer.final.text + "\n" == "Hello from the bus.\n"
    summary = summary_of(done)
    assert summary["text"] == answer.final.text
    assert summary["finish_reason"] == answer.final.finish_reason == "eos"
    assert summary["chunks"] == len(py_chunks) > 5  # streamed, not sent in one piece
    assert summary["experts"] == ["a", "b", "c"]
    assert summary["usage"] == {
        "prompt_tokens": answer.final.usage.prompt_tokens,
        "completion_tokens": answer.final.usage.completion_tokens,
    }
    assert summary["late"] == {} and summary["dropped"] == []


@pytest.mark.anyio
async def test_the_node_client_sends_every_prompt_field_as_python_does(nats_url: str) -> None:
    """Multi-byte text, max_tokens, stop strings, and seeded sampling give the same answers."""
    node = needs_node()
    cases: list[tuple[dict[str, object], list[str], str | None]] = [
        ({"max_tokens": 64}, [], "eos"),
        ({"max_tokens": 9}, ["--max-tokens", "9"], "length"),  # ends inside a character
        ({"stop": ["世"]}, ["--stop", "世"], "stop"),
        (
            {"temperature": 1.5, "top_p": 0.9, "seed": 7},
            ["--temperature", "1.5", "--top-p", "0.9", "--seed", "7"],
            None,
        ),
    ]
    async with bus(nats_url, {"a": Script(text="Grüße, 世界!".encode(), confidence=0.4)}) as prefix:
        for kwargs, args, finish in cases:
            with anyio.fail_after(30):
                async with moe2.connect(nats_url, prefix=prefix) as client:
                    final = await client.ask("x", **kwargs).collect()  # type: ignore[arg-type]
                done = await ask_js(node, nats_url, "x", "--prefix", prefix, *args)
            assert done.returncode == 0, (kwargs, done.stderr.decode())
            assert done.stdout.decode() == final.text + "\n", kwargs
            assert summary_of(done)["finish_reason"] == final.finish_reason, kwargs
            assert finish is None or final.finish_reason == finish, kwargs
            if finish == "eos":
                assert final.text == "Grüße, 世界!"


@pytest.mark.anyio
async def test_the_node_client_exits_non_zero_with_the_error_code(nats_url: str) -> None:
    node = needs_node()
    async with bus(nats_url, {}) as prefix:
        with anyio.fail_after(30):
            no_experts = await ask_js(node, nats_url, "x", "--prefix", prefix)
            bad_field = await ask_js(node, nats_url, "x", "--prefix", prefix, "--max-tokens", "0")
    with anyio.fail_after(30):
        no_agent = await ask_js(node, nats_url, "x", "--prefix", "nobody_listens")
    with NatsServer(max_payload=4096) as small, anyio.fail_after(30):
        too_big = await ask_js(node, small.url, "y" * 5000)
    for done, code in [
        (no_experts, ErrorCode.NO_EXPERTS),
        (bad_field, ErrorCode.INVALID_FIELD),
        (no_agent, ErrorCode.NO_FUSION_AGENT),
        (too_big, ErrorCode.PAYLOAD_TOO_LARGE),
    ]:
        assert done.returncode == 1, (code, done.stderr.decode())
        assert f"error [{code}]" in done.stderr.decode()
        assert done.stdout == b""


@pytest.mark.anyio
async def test_the_documented_permissions_suffice_and_refuse_a_forged_slice(
    tmp_path: Path,
) -> None:
    block = re.search(r"<!-- permissions -->\s*```text\n(.*?)```", doc_text(), re.S)
    assert block, "docs/protocol.md lost its <!-- permissions --> block"
    conf = tmp_path / "auth.conf"
    conf.write_text(block.group(1).replace('"..."', '"pw"'))
    with NatsServer(config=conf) as server:

        def url(user: str) -> str:
            return f"nats://{user}:pw@{server.host}:{server.port}"

        fusion = await connect_nats(url("fusion"), name="test-fusion")
        expert = await connect_nats(url("expert_a"), name="test-expert")
        try:
            async with anyio.create_task_group() as tg:
                # forge=True also publishes on ...slice.intruder, which the server must refuse
                await tg.start(ScriptedExpert(expert, "expert_a", Script(forge=True)).run)
                agent = FusionAgent(fusion, FusionConfig(step_deadline_s=1.0))
                await tg.start(agent.run)
                with anyio.fail_after(30):
                    await agent.wait_for_experts(1, 5)
                    probe = await fusion.subscribe("moe2.v1.session.probe.slice.*")
                    await flush_subscriptions(fusion)
                    await expert.publish("moe2.v1.session.probe.slice.expert_b", b"forged")
                    await expert.publish("moe2.v1.session.probe.slice.expert_a", b"own")
                    await expert.flush()
                    first = await probe.next_msg(timeout=5)
                    async with moe2.connect(url("client")) as client:
                        final = await client.ask("x", max_tokens=64).collect()
                    done = await ask_js(NODE, url("client"), "x") if NODE and js_ready() else None
                    forged_later = probe.pending_msgs
                tg.cancel_scope.cancel()
        finally:
            await close_nats(expert)
            await close_nats(fusion)
    # the forged slice went first; had the server let it through, it would have arrived first
    assert (first.subject, first.data) == ("moe2.v1.session.probe.slice.expert_a", b"own")
    assert forged_later == 0
    assert final.text == "Hello from the bus."
    if done is not None:
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode() == final.text + "\n"


# --- the document cannot silently fall behind the code --------------------------------------------


def test_the_doc_names_every_error_code_and_message_type() -> None:
    doc = doc_text()
    missing = [f"`{c.value}`" for c in ErrorCode if f"`{c.value}`" not in doc]
    missing += [f"`{t}`" for t in sorted(wire.KNOWN_TYPES) if f"`{t}`" not in doc]
    assert not missing, f"docs/protocol.md does not mention {missing}"


def test_the_doc_names_every_field_of_every_message() -> None:
    doc = doc_text()
    structs = [
        wire.Prompt, wire.Open, wire.Step, wire.Close, wire.Slice, wire.Heartbeat,
        wire.Chunk, wire.Final, wire.Error, wire.ChatMessage, wire.Usage, wire.Timings,
        wire.Score, wire.TargetScore, wire.Scored, wire.SubsetAnnouncement,
    ]  # fmt: skip
    missing = [
        f"{s.__name__}.{f.name}"
        for s in structs
        for f in msgspec.structs.fields(s)
        if f"`{f.name}`" not in doc
    ]
    assert not missing, f"docs/protocol.md does not mention {missing}"


def test_each_message_section_has_a_table_row_for_each_of_its_fields() -> None:
    """Stricter than a mention anywhere: ``### `moe2.v1.step` …`` lists every field of Step in its
    own table (a field added to the code must be added to its message's table)."""
    sections = re.split(r"^### ", doc_text(), flags=re.MULTILINE)
    tagged = [t for t in (wire.Prompt, wire.Open, wire.Step, wire.Close, wire.Cancel, wire.Slice,
                          wire.Heartbeat, wire.Chunk, wire.Final, wire.Score, wire.Scored,
                          wire.SubsetAnnouncement, wire.Error)]  # fmt: skip
    missing = []
    for struct in tagged:
        tag = struct.__struct_config__.tag
        (section,) = [s for s in sections if s.startswith(f"`{tag}`")]
        missing += [
            f"{tag}.{f.name}"
            for f in msgspec.structs.fields(struct)
            if f"| `{f.name}` |" not in section
        ]
    assert not missing, f"docs/protocol.md's message tables lack {missing}"


def test_the_doc_names_every_subject_as_the_code_builds_it() -> None:
    doc = doc_text()
    s = Subjects()
    subjects = [
        s.prompt,
        s.expert_open("<expert>"),
        s.expert_step("<expert>"),
        s.expert_close("<expert>"),
        s.expert_score("<expert>"),
        s.expert_inbox("<expert>"),
        s.slice("<session>", "<expert>"),
        s.session_slices("<session>"),
        s.member("<expert>"),
        s.members,
        FUSION_QUEUE,
    ]
    missing = [subject for subject in subjects if f"`{subject}`" not in doc]
    assert not missing, f"docs/protocol.md does not mention {missing}"


def example_slice() -> wire.Slice:
    """The Slice whose bytes docs/protocol.md shows (keep the two in step)."""
    return wire.make_slice(
        session="5f0c2a4e9b1d4c7a8e3f6b2d1a0c9e8f",
        expert="a",
        step=2,
        ids=np.array([101, 120, 121]),
        logprobs=np.log(np.array([0.6, 0.1, 0.1])),
        pieces=[b"e", b"x", b"y"],
        compute_s=0.001,
    )


def test_the_doc_shows_the_real_bytes_of_its_example_slice() -> None:
    block = re.search(r"<!-- slice-hex -->\s*```text\n(.*?)```", doc_text(), re.S)
    assert block, "docs/protocol.md lost its <!-- slice-hex --> block"
    shown = bytes.fromhex(
        "".join(
            re.sub(r"^[0-9a-f]{8}:", "", line.split("|")[0]) for line in block.group(1).splitlines()
        )
    )
    assert shown == wire.encode(example_slice())
    assert wire.decode(shown) == example_slice()
