"""``moe2 select`` end to end: a real store and a trained gate, profile files, budgets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe2.cli import app
from tests.test_gating_cli import gating, synthetic_examples, synthetic_store

EXPERTS = ["anatomist", "novice", "philosopher"]
PROFILES = """
[applications.chat]
prompt_tokens = 64
answer_tokens = 16

[devices.fast]
compute_tflops = 80
bandwidth_gbps = 1000
power_w = 300

[devices.slow]
compute_tflops = 5
bandwidth_gbps = 200
power_w = 40

[models.big]
params_b = 7
bits = 4.8

[models.small]
params_b = 3
bits = 4.8

[experts.anatomist]
device = "slow"
model = "small"

[experts.philosopher]
device = "slow"
model = "small"

[experts.novice]
device = "fast"
model = "big"
"""
runner = CliRunner()
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T]\S+ \[", re.M)


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """CliRunner closes the stderr the command would log to; keep the session's logging."""
    monkeypatch.setattr("moe2.select_cli.configure_logging", lambda *a, **k: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("select")
    outputs = synthetic_store(root / "outputs", synthetic_examples(24), EXPERTS)
    gate = root / "gate"
    with pytest.MonkeyPatch.context() as mp:  # logging stays on the session's stderr
        mp.setattr("moe2.gating_cli.configure_logging", lambda *a, **k: None)
        code, _, err = gating(
            "train", "--outputs", str(outputs), "--out", str(gate), "--max-epochs", "15",
            "--batch", "8", "--grad-accum", "1", "--lr", "0.03", "--no-progress",
        )  # fmt: skip
    assert code == 0, err
    profiles = root / "profiles.toml"
    profiles.write_text(PROFILES)
    return outputs, gate, profiles


def select(trained: tuple[Path, Path, Path], *args: str) -> tuple[int, str, str]:
    outputs, gate, profiles = trained
    base = ["select", "--profiles", str(profiles), "--gate", str(gate), "--outputs", str(outputs)]
    result = runner.invoke(app, [*base, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    out = "".join(line for line in result.stdout.splitlines(True) if not LOG_LINE.match(line))
    return result.exit_code, out, result.stderr


def test_select_prints_the_chosen_subset_its_figures_and_the_runners_up(
    trained: tuple[Path, Path, Path],
) -> None:
    code, out, err = select(trained, "--method", "smo", "--method", "brute", "--energy", "10")
    assert code == 0, err
    smo_part, brute_part = out.split("brute_force: ")
    chosen = smo_part.splitlines()[0].removeprefix("smo/dm: ")
    assert chosen == brute_part.splitlines()[0]  # the same S as brute force
    assert "novice" not in chosen  # the 300 W box does not fit 10 J per answer
    assert "loss " in smo_part and "delay chat " in smo_part and " J" in smo_part
    assert "oracle calls of 2^3 = 8 subsets" in smo_part
    assert "runner-up 1: {" in smo_part


def test_select_json_matches_brute_force_and_respects_the_budgets(
    trained: tuple[Path, Path, Path],
) -> None:
    code, out, err = select(
        trained, "--json", "--method", "smo", "--method", "brute", "--method", "greedy",
        "--method", "random", "--tau", "chat=0.05", "--energy", "30",
    )  # fmt: skip
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(out)}
    assert set(rows) == {"smo/dm", "brute_force", "greedy", "random"}
    best = rows["brute_force"]["chosen"]
    assert rows["smo/dm"]["chosen"]["experts"] == best["experts"]
    for row in rows.values():
        chosen = row["chosen"]
        assert chosen["delay_s"]["chat"] <= 0.05 and chosen["energy_j"] <= 30
        assert chosen["loss"] >= best["loss"] - 1e-12


def test_infeasible_budgets_name_the_binding_constraint(trained: tuple[Path, Path, Path]) -> None:
    code, out, err = select(trained, "--energy", "0.001")
    assert code == 1 and out == ""
    assert err.startswith("error [infeasible]: no expert meets energy <= 0.001 J")
    code, _, err = select(trained, "--tau", "chat=0.0001")
    assert code == 1
    assert "error [infeasible]: no expert meets tau[chat] <= 0.0001 s" in err


def test_bad_limits_and_unknown_applications_are_refused(trained: tuple[Path, Path, Path]) -> None:
    code, _, err = select(trained, "--tau", "chat")
    assert code == 2 and "give APP=SECONDS" in err
    code, _, err = select(trained, "--tau", "video=1")
    assert code == 1 and "error [invalid_field]" in err and "video" in err
    code, _, err = select(trained, "--method", "magic")
    assert code == 2 and "unknown methods" in err


def test_experts_without_a_profile_are_left_out_with_a_note(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    outputs, gate, profiles = trained
    partial = tmp_path / "partial.toml"
    partial.write_text(profiles.read_text().split("[experts.novice]")[0])
    code, out, err = select((outputs, gate, partial))
    assert code == 0, err
    assert "note: left out, no profile: novice" in err
    assert "novice" not in out.splitlines()[0]
