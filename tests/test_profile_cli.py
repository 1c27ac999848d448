"""`moe2 profile` as a user runs it: a real nats-server, a live expert, the files it writes."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal
from typer.testing import CliRunner, Result

from moe2.profile_cli import app
from moe2.runtime.connection import connect_nats
from moe2.runtime.server import free_port
from tests.scripted import Script, ScriptedExpert


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command configures structlog to write to the stderr of the moment, which CliRunner
    closes after each call; in-process runs keep the test session's logging instead."""
    monkeypatch.setattr("moe2.profile_cli.configure_logging", lambda *a, **k: None)


def profile(url: str, *args: str) -> Result:
    return CliRunner().invoke(app, ["--url", url, "--no-progress", *args])


@contextmanager
def serving(url: str, make_agent: Callable[[Any], Any]) -> Iterator[None]:
    """An agent on the bus in a thread of its own while the CLI runs in this one."""
    with start_blocking_portal() as portal:
        nc = portal.call(partial(connect_nats, url, name="test-expert"))
        running, _ = portal.start_task(make_agent(nc).run)
        try:
            yield
        finally:
            running.cancel()
            portal.call(nc.close)  # no drain: messages the stopped agent never read are moot


def test_no_server_is_a_clear_error(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    result = profile(url, "--expert", "e1", "--out", str(tmp_path / "e1.toml"))
    assert result.exit_code == 1
    assert f"error [unreachable]: no NATS server reachable at {url}" in result.stderr
    assert not (tmp_path / "e1.toml").exists()


def test_an_expert_that_sends_no_heartbeat_is_a_clear_error(nats_url: str, tmp_path: Path) -> None:
    result = profile(nats_url, "--expert", "ghost", "--wait", "0.3", "--out", str(tmp_path / "g"))
    assert result.exit_code == 1
    assert "error [no_experts]: expert 'ghost' sent no heartbeat within 0.3 s" in result.stderr


def test_bad_lengths_are_refused(nats_url: str, tmp_path: Path) -> None:
    result = profile(nats_url, "--expert", "e1", "--lengths", "16,x", "--out", str(tmp_path / "e"))
    assert result.exit_code == 2
    assert "error [invalid_field]: --lengths takes comma-separated token counts" in result.stderr


def test_an_expert_error_reply_ends_the_profile_with_its_code(
    nats_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "busy.toml"
    refusing = Script(open_error="busy")
    with serving(nats_url, lambda nc: ScriptedExpert(nc, "busy1", refusing, prefix="pbusy")):
        result = profile(nats_url, "--prefix", "pbusy", "--expert", "busy1", "--out", str(out))
    assert result.exit_code == 1
    assert "error [busy]: expert busy1: scripted refusal" in result.stderr
    assert not out.exists()


def test_an_expert_that_counts_no_prompt_tokens_cannot_be_profiled(
    nats_url: str, tmp_path: Path
) -> None:
    with serving(nats_url, lambda nc: ScriptedExpert(nc, "s1", Script(), prefix="pzero")):
        result = profile(nats_url, "--prefix", "pzero", "--expert", "s1", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert "error [invalid_field]: expert 's1' reported 0 and 0 prompt tokens" in result.stderr


@pytest.mark.model
def test_a_live_smollm2_expert_is_profiled(nats_url: str, smollm2: Any, tmp_path: Path) -> None:
    from moe2.agents.expert.agent import ExpertAgent, ExpertConfig

    config = ExpertConfig(expert_id="tiny", prefix="pmodel", max_context=160)
    out, png = tmp_path / "profiles" / "tiny.toml", tmp_path / "tiny.png"
    with serving(nats_url, lambda nc: ExpertAgent(nc, smollm2, config)):
        result = profile(
            nats_url,
            *("--prefix", "pmodel", "--expert", "tiny", "--out", str(out), "--plot", str(png)),
            *("--lengths", "16,64,256", "--decode-steps", "2", "--repeats", "1"),
        )
    assert result.exit_code == 0, result.stderr
    said = result.stderr
    assert "energy source: declared" in said
    assert "prompt lengths above 150 tokens clipped to 150 (the expert's max_context is 160" in said
    assert "the shortest prompt this expert takes is about" in said
    expert = tomllib.loads(out.read_text())["experts"]["tiny"]
    assert (expert["model"], expert["energy_source"]) == ("SmolLM2-135M-Instruct", "declared")
    shortest, near_64, near_150 = expert["measured"]["prompt_tokens"]
    assert 16 < shortest < 64 and abs(near_64 - 64) <= 3 and abs(near_150 - 150) <= 3
    fit = expert["fit"]
    assert fit["prefill_per_token_s"] > 0 and fit["decode_base_s"] > 0
    assert fit["power_w"] == 15.0 and fit["transmission_s"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {out} (energy source: declared)" in said


def test_lengths_are_clipped_to_what_fits_the_context_and_prompts_scale_by_words() -> None:
    from moe2.agents.measure.profiler import PromptScale, clip_lengths

    assert clip_lengths([16, 64, 64, 2048, 4096], 1024, 8) == [16, 64, 1008]
    scale = PromptScale(overhead=30.0, per_word=1.25)
    assert (scale.words_for(16), scale.words_for(280), scale.shortest()) == (1, 200, 31)
