"""``moe2 demo`` and its pool file: the shipped pool reads and its budgets bind; a bad pool file
is refused with a stable code; the binding budget is named; and (``model``) the demo on real
expert processes prints S, the binding budget, the gate's top-k with weights and the answers,
exits 0 and leaves no process behind."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from moe2.demo import binding_lines, demo_backend
from moe2.pool import DEFAULT_POOL, budget_report, load_pool
from moe2.runtime.errors import ErrorCode, Moe2Error
from tests.test_gating_cli import EXPERTS as GATING_EXPERTS
from tests.test_gating_cli import gating, synthetic_examples, synthetic_store

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "deploy" / "experts" / "adapters"
POOL_IDS = ["gemma", "lora-c0", "smollm2", *(f"lora-c{i}" for i in (4, 1, 5, 7, 2, 6, 3))]


# ---------------------------------------------------------------------------------------------
# The shipped pool.


def test_the_shipped_pool_has_both_families_the_adapters_and_a_profile_each() -> None:
    pool = load_pool(DEFAULT_POOL)
    assert [e.id for e in pool.experts] == POOL_IDS
    assert [e.id for e in pool.first(pool.demo_experts)] == [
        "gemma",
        "lora-c0",
        "smollm2",
        "lora-c4",
    ]
    assert {e.model for e in pool.experts} == {"smollm2-135m", "gemma3-270m"}
    for e in pool.experts:
        assert e.id in pool.profiles.experts and e.device and e.domain
        if e.id.startswith("lora-c"):
            assert e.adapter == ADAPTERS / f"cluster-{e.id.removeprefix('lora-c')}"
            assert e.model == "smollm2-135m"
        else:
            assert e.adapter is None
    assert pool.gate == DEFAULT_POOL.parent / "gate"
    assert pool.outputs == DEFAULT_POOL.parent / "outputs"


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="make demo installs [onnx]"
)
def test_the_demo_serves_plain_models_on_onnx_int8_and_lora_experts_on_transformers() -> None:
    pool = load_pool(DEFAULT_POOL)
    backends = {e.id: demo_backend(e) for e in pool.first(pool.demo_experts)}
    assert backends == {
        "gemma": "onnx-int8",
        "lora-c0": "transformers",  # only transformers merges an adapter
        "smollm2": "onnx-int8",
        "lora-c4": "transformers",
    }


def test_the_shipped_budgets_bind_on_the_demo_experts_but_each_expert_fits_alone() -> None:
    pool = load_pool(DEFAULT_POOL)
    ids = [e.id for e in pool.first(pool.demo_experts)]
    budgets = pool.budgets()
    for e in ids:
        alone = budget_report(pool.profiles, budgets, [e], [e])
        assert all(value <= limit for _, value, limit in alone.used), (e, alone.used)
    together = budget_report(pool.profiles, budgets, ids, ids)
    assert [name for name, value, limit in together.used if value > limit] == ["energy"]


# ---------------------------------------------------------------------------------------------
# Bad pool files.

GOOD = """
[pool]
energy_j = 20.0

[applications.chat]
prompt_tokens = 16
answer_tokens = 8

[devices.box]
compute_tflops = 1
bandwidth_gbps = 10
power_w = 5

[models.smollm2-135m]
params_b = 0.1345
bits = 5

[experts.a]
model = "smollm2-135m"
device = "box"
"""


def write_pool(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pool.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[pool\n", "cannot read it"),
        (GOOD + "[extra]\n", "unknown sections ['extra']"),
        (GOOD.replace("energy_j", "energy"), "[pool]: unknown keys ['energy']"),
        (GOOD + 'colour = "red"\n', "[experts.a]: unknown keys ['colour']"),
        (GOOD.replace('model = "smollm2-135m"\ndevice', "device"), "[experts.a] needs model"),
        (GOOD + 'adapter = "../nowhere"\n', "no LoRA adapter at"),
        (GOOD + "adapter = 1\n", "adapter must be a directory or a name"),
        (GOOD.replace('device = "box"', 'device = "toaster"'), "'toaster' names nothing defined"),
        (GOOD.replace("[experts.a]", "[experts]").replace("model =", "m ="), "[experts.m]"),
        (GOOD.replace("energy_j = 20.0", "demo_experts = 0"), "demo_experts must be an integer"),
        (GOOD.replace("energy_j = 20.0", "energy_j = -1"), "energy_j must be a number > 0"),
        (GOOD.split("[experts.a]")[0], "it defines no [experts.<id>]"),
        (
            GOOD.replace("[applications.chat]", "[applications.x]\n[applications.chat]"),
            "[applications.x]:",
        ),
    ],
)
def test_a_bad_pool_file_is_refused_with_invalid_field(
    tmp_path: Path, text: str, says: str
) -> None:
    path = write_pool(tmp_path, text)
    with pytest.raises(Moe2Error) as caught:
        load_pool(path)
    assert caught.value.code == ErrorCode.INVALID_FIELD
    assert str(path) in caught.value.message and says in caught.value.message


def test_an_adapter_is_a_directory_relative_to_the_pool_file_or_a_shipped_name(
    tmp_path: Path,
) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "adapter_config.json").write_text("{}")
    by_path = load_pool(write_pool(tmp_path, GOOD + 'adapter = "mine"\n'))
    assert by_path.experts[0].adapter == tmp_path / "mine"
    by_name = load_pool(write_pool(tmp_path, GOOD + 'adapter = "cluster-1"\n')).experts[0]
    assert by_name.adapter == Path("cluster-1")
    assert by_name.command("nats://x:1")[-6:-4] == ["--adapter", "cluster-1"]


def test_unknown_delay_limits_and_too_many_experts_are_refused(tmp_path: Path) -> None:
    pool = load_pool(write_pool(tmp_path, GOOD))
    with pytest.raises(Moe2Error, match=r"unknown applications \['code'\]"):
        pool.budgets({"code": 1.0})
    with pytest.raises(Moe2Error, match="asked for 2 experts; the pool has 1"):
        pool.first(2)


def test_a_pool_without_its_gate_and_outputs_names_the_commands_that_build_them(
    tmp_path: Path,
) -> None:
    path = write_pool(tmp_path, GOOD)
    with pytest.raises(Moe2Error) as caught:
        load_pool(path).check_artifacts()
    assert caught.value.code == ErrorCode.INVALID_FIELD
    message = caught.value.message
    assert "moe2 gating collect" in message and f"--out {tmp_path / 'outputs'}" in message
    assert (
        f"moe2 gating train --outputs {tmp_path / 'outputs'} --out {tmp_path / 'gate'}" in message
    )

    done = subprocess.run(
        [sys.executable, "-m", "moe2", "demo", "--pool", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert (
        done.stderr.startswith("error [invalid_field]: pool ")
        and "moe2 gating train" in done.stderr
    )
    assert "nats-server" not in done.stderr  # refused before anything started


# ---------------------------------------------------------------------------------------------
# The binding budget.


def fitted(expert: str, decode_s: float, power_w: float, prefill_per_token_s: float = 0.0) -> str:
    """An expert costed by a ``[experts.<id>.fit]`` table: a fixed time per step."""
    return (
        f"[experts.{expert}.fit]\nprefill_base_s = 0.005\n"
        f"prefill_per_token_s = {prefill_per_token_s}\n"
        f"decode_base_s = {decode_s}\ndecode_per_context_token_s = 0.0\n"
        f"power_w = {power_w}\n"
    )


BUDGETED = "[applications.chat]\nprompt_tokens = 16\nanswer_tokens = 8\ntau_s = 0.5\n" + "".join(
    f'[experts.{e}]\nmodel = "m"\n' + fitted(e, decode_s, power_w)
    for e, decode_s, power_w in (("fast", 0.1, 10.0), ("thrifty", 0.2, 1.0), ("slow", 0.8, 1.0))
)  # per answer (5 ms prefill, 7 decodes): fast 7.05 J, thrifty 1.405 J, slow 5.605 J;
# mean per token 0.088, 0.176 and 0.701 s


def report_for(tmp_path: Path, energy_j: float | None, chosen: Sequence[str]) -> list[str]:
    pool = load_pool(write_pool(tmp_path, BUDGETED))
    budgets = pool.budgets(energy_j=energy_j)
    return binding_lines(budget_report(pool.profiles, budgets, ["fast", "thrifty", "slow"], chosen))


def test_the_binding_budget_names_the_expert_it_keeps_out_and_what_it_would_need(
    tmp_path: Path,
) -> None:
    assert report_for(tmp_path, 8.0, ["fast"]) == [
        "binding: energy — adding thrifty would need 8.5 J > 8.0 J (and 1 more)",
        "binding: tau[chat] — adding slow would need 0.701 s > 0.500 s",
    ]
    assert report_for(tmp_path, 12.0, ["fast", "thrifty"]) == [
        "binding: tau[chat] — adding slow would need 0.701 s > 0.500 s",
        "binding: energy — adding slow would need 14.1 J > 12.0 J",
    ]
    assert report_for(tmp_path, None, ["thrifty"]) == [
        "binding: tau[chat] — adding slow would need 0.701 s > 0.500 s",
        "left out by the loss: fast (would fit the budgets)",
    ]


def test_no_budget_binds_when_everything_fits(tmp_path: Path) -> None:
    pool = load_pool(write_pool(tmp_path, BUDGETED))
    budgets = pool.budgets({"chat": 1.0})
    everyone = ["fast", "thrifty", "slow"]
    report = budget_report(pool.profiles, budgets, everyone, everyone)
    assert binding_lines(report) == ["binding: none — every live expert fits and is in S"]
    assert [name for name, _, _ in report.used] == ["tau[chat]", "energy"]
    assert report.used[0][1] == pytest.approx(5.605 / 8)  # the slowest expert's mean step
    assert report.used[1][1] == pytest.approx(7.05 + 1.405 + 5.605)  # energy adds up
    some = budget_report(pool.profiles, budgets, everyone, ["slow"])
    assert binding_lines(some) == [
        "binding: none — every expert left out would fit",
        "left out by the loss: fast, thrifty (would fit the budgets)",
    ]


# ---------------------------------------------------------------------------------------------
# The demo on real expert processes, with a gate trained on a synthetic store.

MODEL_POOL = """
[pool]
gate = "{gate}"
outputs = "{outputs}"
demo_experts = 3
experts_per_prompt = 1
energy_j = 58.0

[applications.chat]
prompt_tokens = 64
answer_tokens = 64
tau_s = 1.0

[experts.novice]
model = "smollm2-135m"
domain = "general"
device = "big-box"

[experts.anatomist]
model = "smollm2-135m"
adapter = "{adapters}/cluster-5"
domain = "human biology"
device = "small-box"

[experts.philosopher]
model = "smollm2-135m"
adapter = "{adapters}/cluster-7"
domain = "verbal reasoning"
device = "small-box"
"""
MODEL_COSTS = (  # per answer: novice 49.2 J, each LoRA expert 6.6 J: novice fits with one
    fitted("novice", 0.05, 15.0, 0.002)
    + fitted("anatomist", 0.05, 2.0, 0.002)
    + fitted("philosopher", 0.05, 2.0, 0.002)
)


@pytest.fixture(scope="module")
def model_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The synthetic pool of tests/test_gating_cli.py (the anatomist knows anatomy, the
    philosopher philosophy, the novice neither) with a gate trained on it, served by SmolLM2
    experts (two of them with adapters)."""
    import torch

    root = tmp_path_factory.mktemp("demo")
    outputs = synthetic_store(root / "outputs", synthetic_examples(24), GATING_EXPERTS)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:  # logging stays on the session's stderr
        mp.setattr("moe2.gating_cli.configure_logging", lambda *a, **k: None)
        code, _, err = gating(
            "train", "--outputs", str(outputs), "--out", str(root / "gate"), "--max-epochs",
            "15", "--batch", "8", "--grad-accum", "1", "--lr", "0.03", "--no-progress",
        )  # fmt: skip
    assert code == 0, err
    torch.set_num_threads(threads)
    text = MODEL_POOL.format(gate=root / "gate", outputs=outputs, adapters=ADAPTERS)
    yield write_pool(root, text + MODEL_COSTS)


def processes_naming(url: str) -> list[str]:
    """Command lines of the live processes that mention ``url`` (the demo's experts)."""
    port = url.rsplit(":", 1)[1]
    out = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if url in cmdline or f"--port {port}" in cmdline or f"-p {port}" in cmdline:
            out.append(cmdline)
    return out


@pytest.mark.model
@pytest.mark.timeout(900)
def test_the_demo_prints_s_the_binding_budget_the_gates_choice_and_answers(
    model_pool: Path,
) -> None:
    questions = [
        "In anatomy, what is true of the heart?",
        "In philosophy, what is true of Kant?",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "moe2", "demo", *questions, "--pool", str(model_pool),
         "--max-tokens", "8"],
        capture_output=True, text=True, timeout=840, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    err, out = done.stderr, done.stdout
    print(err, out)
    assert done.returncode == 0, err
    url = re.search(r"nats-server on (nats://\S+)", err)
    assert url is not None
    assert "· SMO chose S = {anatomist, philosopher} of the 3 live experts" in err
    assert "binding: energy — adding novice would need" in err
    assert re.findall(r"top-1 of S for this prompt: (\S+) (\d\.\d\d)", err) == [
        ("anatomist", "1.00"),
        ("philosopher", "1.00"),
    ]
    answers = [a for a in out.split("\n\n") if a.strip()]
    assert len(answers) == 2 and all(a.strip() for a in answers)
    summaries = re.findall(r"── (\d+) tokens .* experts used: (\S+) ", err)
    assert [e for _, e in summaries] == ["anatomist", "philosopher"]
    assert all(1 <= int(n) <= 8 for n, _ in summaries)
    assert err.rstrip().endswith("· shut down: fusion agent, experts and nats-server stopped")
    assert processes_naming(url.group(1)) == []


def test_an_expert_that_cannot_start_stops_the_demo_with_its_own_error(model_pool: Path) -> None:
    broken = model_pool.with_name("broken.toml")
    text = model_pool.read_text()
    broken.write_text(
        text.replace('model = "smollm2-135m"\ndomain', 'model = "gone.gguf"\ndomain', 1)
    )
    done = subprocess.run(
        [sys.executable, "-m", "moe2", "demo", "--pool", str(broken), "--experts", "1"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "error [invalid_field]: expert novice: model 'gone.gguf' is neither" in done.stderr
    url = re.search(r"nats-server on (nats://\S+)", done.stderr)
    assert url is not None and processes_naming(url.group(1)) == []
