"""``moe2 eval`` (selection/experiments.py): the paper's Fig. 3 on collected outputs. The maths on
cases worked out by hand, then the whole command on a synthetic store with a real gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moe2.gating.evaluate import ExampleScores, ScoreArrays
from moe2.selection.experiments import (
    Outcome,
    base_models,
    bootstrap_interval,
    majority_vote,
    per_example_mean,
    static_weights,
)
from tests.test_demo import ADAPTERS, MODEL_COSTS, MODEL_POOL
from tests.test_gating_cli import EXPERTS, gating, synthetic_examples, synthetic_store

log = np.log


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands configure structlog (cached loggers on the stderr of the moment); in-process
    runs must keep the test session's logging, or later tests' captured logs come back empty."""
    monkeypatch.setattr("moe2.gating_cli.configure_logging", lambda *a, **k: None)
    monkeypatch.setattr("moe2.eval_cli.configure_logging", lambda *a, **k: None)


def _example(answer: int, cloze: list[list[float]], letter: list[list[float]]) -> ExampleScores:
    """N experts, one token per option: ``cloze[o][n]`` is expert n's probability of option o."""
    return ExampleScores(
        answer=answer,
        letter=log(np.array(letter).T),
        cloze=[log(np.array([p]).T) for p in cloze],
        cloze_ids=[np.array([o]) for o in range(len(cloze))],
    )


def test_a_bootstrap_interval_holds_the_value_and_narrows_with_more_examples() -> None:
    few = Outcome(None, np.ones(20, dtype=np.int64), np.zeros(20), np.array([1.0, 0.0] * 10))
    many = Outcome(None, np.ones(2000, dtype=np.int64), np.zeros(2000), np.tile([1.0, 0.0], 1000))
    low, high = bootstrap_interval(few, "cloze")
    assert low < 0.5 < high and high - low > 0.3  # ±2.2 standard errors of 0.11
    low2, high2 = bootstrap_interval(many, "cloze")
    assert low2 < 0.5 < high2 and high2 - low2 < 0.05
    assert bootstrap_interval(few, "letter") == (0.0, 0.0)  # no spread, no width
    nll = Outcome(np.array([2.0, 4.0]), np.array([1, 3], dtype=np.int64), np.zeros(2), np.zeros(2))
    low3, high3 = bootstrap_interval(nll, "nll")
    assert low3 >= 4 / 3 - 1e-9 and high3 <= 2.0 + 1e-9  # ratios of sums between the two


def test_the_majority_vote_takes_the_plurality_and_breaks_a_tie_by_the_equal_weights_score() -> (
    None
):
    # three experts; option 1 is right. Experts 0 and 1 choose option 1, expert 2 option 0
    plurality = _example(1, [[0.2, 0.3, 0.9], [0.8, 0.7, 0.1]], [[0.2, 0.3, 0.9], [0.8, 0.7, 0.1]])
    # two experts split 1-1: the tie goes to the option with the larger equal-weights score
    tie = _example(0, [[0.9, 0.4], [0.1, 0.6]], [[0.9, 0.4], [0.1, 0.6]])
    arrays = ScoreArrays(["a", "b", "c"], ["x"], [plurality])
    vote = majority_vote(arrays)
    assert vote.cloze.tolist() == [1.0] and vote.letter.tolist() == [1.0] and vote.nll is None
    two = ScoreArrays(["a", "b"], ["y"], [tie])
    assert majority_vote(two).cloze.tolist() == [1.0]  # 0.65 for option 0 against 0.35


def test_static_weights_maximise_the_mixture_likelihood() -> None:
    # expert a gives the gold token 0.9 on three examples and 0.1 on one; b the other way round:
    # the likelihood 0.75 log(0.9 w + 0.1 (1-w)) + 0.25 log(0.1 w + 0.9 (1-w)) peaks at w = 13/16
    cases = [(0.9, 0.1)] * 3 + [(0.1, 0.9)]
    examples = [
        _example(0, [[pa, pb], [1 - pa, 1 - pb]], [[0.5, 0.5], [0.5, 0.5]]) for pa, pb in cases
    ]
    arrays = ScoreArrays(["a", "b"], [f"x{i}" for i in range(4)], examples)
    w = static_weights(arrays)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] == pytest.approx(13 / 16, abs=1e-4)


def test_per_example_mean_and_base_models() -> None:
    a = Outcome(np.array([1.0, 3.0]), np.ones(2, dtype=np.int64), np.array([1.0, 0.0]), np.ones(2))
    b = Outcome(np.array([3.0, 1.0]), np.ones(2, dtype=np.int64), np.array([0.0, 0.0]), np.zeros(2))
    avg = per_example_mean([a, b])
    assert avg.nll is not None and avg.nll.tolist() == [2.0, 2.0]
    assert avg.letter.tolist() == [0.5, 0.0] and avg.cloze.tolist() == [0.5, 0.5]
    arrays = ScoreArrays(["g", "s", "l"], [], [])
    models = {"g": "gemma-3", "s": "SmolLM2", "l": "SmolLM2+lora:cluster-0@12345678"}
    assert base_models(arrays, models) == ["g", "s"]


@pytest.fixture
def one_torch_thread() -> object:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def trained_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: object
) -> tuple[Path, Path]:
    """A pool file over the synthetic store of tests/test_gating_cli.py and a gate trained on
    it (the pool's costs: tests/test_demo.py); returns (pool file, store)."""
    outputs = synthetic_store(tmp_path / "outputs", synthetic_examples(40), EXPERTS)
    code, _, err = gating(
        "train", "--outputs", str(outputs), "--out", str(tmp_path / "gate"), "--max-epochs", "40",
        "--batch", "8", "--grad-accum", "1", "--lr", "0.03", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    pool = tmp_path / "pool.toml"
    pool.write_text(
        MODEL_POOL.format(gate=tmp_path / "gate", outputs=outputs, adapters=ADAPTERS) + MODEL_COSTS
    )
    return pool, outputs


def test_moe2_eval_writes_fig3_with_every_baseline_on_a_synthetic_pool(
    tmp_path: Path, trained_pool: tuple[Path, Path]
) -> None:
    """The anatomist knows anatomy, the philosopher philosophy, the novice neither: the gate
    routes: MoE² beats the novice and the vote in cloze accuracy and a static weighting in NLL."""
    from moe2.cli import app

    pool, _ = trained_pool
    sessions = recorded_sessions(tmp_path / "sessions")
    result = CliRunner().invoke(
        app,
        ["eval", "--pool", str(pool), "--out", str(tmp_path / "r"), "--sessions", str(sessions)],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = {r["method"].split(" (")[0]: r for r in report["rows"]}
    assert report["examples"].startswith("16 held out") and report["S"]
    for name in ("average expert", "majority voting: equal weights", "static weighting",
                 "majority voting: a vote of the experts' answers", "oracle"):  # fmt: skip
        assert any(m.startswith(name) for m in rows), name
    moe2 = next(r for m, r in rows.items() if m.startswith("MoE²"))
    assert moe2["cloze_accuracy"] == 1.0
    assert moe2["ci95"]["cloze"][0] <= 1.0 <= moe2["ci95"]["cloze"][1]
    vote = rows["majority voting: a vote of the experts' answers"]
    assert vote["nll_per_unit"] is None
    better = {
        (d["baseline"].split(" (")[0], d["metric"]) for d in report["differences"] if d["better"]
    }
    assert ("static weighting", "nll") in better  # routing per prompt beats one fixed weighting
    assert ("single agent: novice", "cloze") in better
    assert ("majority voting: a vote of the experts' answers", "cloze") in better
    assert (tmp_path / "r" / "fig3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the budget grid spans "only the thriftiest expert fits" to "all of them fit"
    grid = report["grid"]
    assert len(grid) == 16
    energies = sorted({c["energy_j"] for c in grid})
    assert energies[0] == pytest.approx(6.6, abs=0.1)  # one LoRA expert's answer (5 ms + 8 steps)
    assert energies[-1] == pytest.approx(49.2 + 2 * 6.6, abs=0.3)  # all three together
    tightest = [c for c in grid if c["energy_j"] == energies[0] and c["subset"]]
    assert tightest and all(len(c["subset"]) == 1 for c in tightest)
    loosest = max(grid, key=lambda c: (c["tau_s"], c["energy_j"]))
    assert loosest["subset"] and set(loosest["methods"]) == {
        "MoE²",
        "SMO + equal",
        "random + equal",
    }
    assert (tmp_path / "r" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## The budget grid (Tables II–IV)" in result.stdout
    assert set(report["by_source"]) == {"syn/anatomy", "syn/philosophy"}  # per data file
    assert "## By source" in result.stdout
    # Theorem 1 for every S the grid chose: one row each, the gap between the renormalised
    # full-set gate and a gate retrained on S; one expert alone has no gap
    chosen = {tuple(c["subset"]) for c in grid if c["subset"]}
    rows_t1 = {tuple(r["subset"]): r for r in report["theorem1"]}
    assert set(rows_t1) == chosen
    for subset, r in rows_t1.items():
        assert r["gap"] == pytest.approx(r["full_renormalised"] - r["retrained"])
        if len(subset) == 1:
            assert r["gap"] == pytest.approx(0.0, abs=1e-6)
    assert "| MoE² (gate, top-" in result.stdout
    # the cost side: each chosen S against its recorded sessions (tests/test_session_costs.py
    # works the figures out by hand); a row per cell, and the plot
    measured = {tuple(c["experts"]): c for c in report["costs"]}
    assert {tuple(sorted(s)) for s in chosen} <= set(measured)
    for subset in chosen:
        got = measured[tuple(sorted(subset))]
        assert got["sessions"] == 1 and got["tokens"] == 3
        assert got["measured_delay_s_per_token"] > got["measured_compute_s_per_token"] > 0
        assert got["delay_relative_error"] == pytest.approx(
            got["predicted_delay_s_per_token"] / got["measured_delay_s_per_token"] - 1
        )
    side = result.stdout.split("## The cost side: predicted against measured")[1]
    assert side.count("\n| 0.") + side.count("\n| 1.") >= len(grid)  # a row per cell
    assert "no recorded sessions" not in side
    assert (tmp_path / "r" / "costs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "the cost side" in report["seconds"]


def recorded_sessions(directory: Path) -> Path:
    """One hand-written trace per non-empty subset of the synthetic experts (one session of
    three steps each; the experts answer in 0.1-0.3 s)."""
    from itertools import combinations

    from moe2.selection.session_costs import trace_name
    from tests.test_session_costs import Box, session_records, write_trace

    directory.mkdir()
    boxes = {e: Box(0.05 * (i + 1), 0.002, 10.0, 0.08 * (i + 1), 0.1 * (i + 1))
             for i, e in enumerate(EXPERTS)}  # fmt: skip
    for n in range(1, len(EXPERTS) + 1):
        for subset in combinations(EXPERTS, n):
            chosen = {e: boxes[e] for e in subset}
            write_trace(
                directory / trace_name(subset), chosen, [session_records("s", chosen, 3, start=1)]
            )
    return directory


def test_moe2_eval_refuses_a_pool_without_its_gate(tmp_path: Path) -> None:
    from moe2.cli import app

    pool = tmp_path / "pool.toml"
    pool.write_text(
        MODEL_POOL.format(gate=tmp_path / "none", outputs=tmp_path / "none", adapters=ADAPTERS)
        + MODEL_COSTS
    )
    result = CliRunner().invoke(app, ["eval", "--pool", str(pool)])
    assert result.exit_code == 1 and "moe2 gating" in result.stderr


def test_moe2_eval_on_a_separate_test_store_of_the_same_experts(
    tmp_path: Path, trained_pool: tuple[Path, Path]
) -> None:
    """The use the held-back test splits need: a gate trained on one store, evaluated on every
    question of another collected from the same experts; other experts are refused."""
    from moe2.cli import app

    pool, outputs = trained_pool
    test = synthetic_store(tmp_path / "test", synthetic_examples(47)[40:], EXPERTS)
    runner = CliRunner()
    result = runner.invoke(
        app, ["eval", "--pool", str(pool), "--outputs", str(test), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # the 54 questions: anatomy 40-46 are new; philosophy 0-39 are also in the gate's store,
    # and those it trained on or chose S with are left out (its held-out ones stay)
    split = json.loads((tmp_path / "gate" / "gating.json").read_text())["split"]
    reused = {f"syn/philosophy/{i}" for i in range(40)}
    left = len(reused - set(split["heldout"]))  # every other one is a train or validation one
    assert 0 < left < 40
    assert report["examples"].startswith(
        f"{54 - left} of a separate store (evaluated; {left} left out: the gate trained on or "
        "chose S with them)"
    )
    assert report["gate trained on"] == str(outputs)
    anatomy = runner.invoke(
        app,
        ["eval", "--pool", str(pool), "--outputs", str(test), "--source", "syn/anatomy",
         "--out", str(tmp_path / "a")],
    )  # fmt: skip
    assert anatomy.exit_code == 0, anatomy.stderr
    only = json.loads((tmp_path / "a" / "report.json").read_text())
    assert only["examples"].startswith("7 of a separate store (evaluated, syn/anatomy only)")
    assert set(only["by_source"]) == {"syn/anatomy"}
    other = synthetic_store(tmp_path / "other", synthetic_examples(47)[40:], EXPERTS[:2])
    refused = runner.invoke(app, ["eval", "--pool", str(pool), "--outputs", str(other)])
    assert refused.exit_code == 1 and "same experts" in refused.stderr


@pytest.mark.model
def test_moe2_eval_gives_all_five_parts_on_the_shipped_pool(tmp_path: Path) -> None:
    """The shipped pool as a fresh clone has it: its real outputs, gate and recorded sessions,
    one data file's held-out questions; Fig. 3, the grid, the cost side for every S the grid
    chose, Theorem 1 and the timings."""
    from moe2.cli import app

    out = tmp_path / "r"
    args = ["eval", "--source", "arc_challenge/dev", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["by_source"]) == {"arc_challenge/dev"}
    assert (
        report["examples"].split(" ")[0].isdigit()
        and "arc_challenge/dev only" in (report["examples"])
    )
    methods = [r["method"] for r in report["rows"]]
    assert any(m.startswith("MoE²") for m in methods) and any(
        m.startswith("oracle") for m in methods
    )
    assert len(report["grid"]) == 16
    chosen = {tuple(sorted(c["subset"])) for c in report["grid"] if c["subset"]}
    measured = {tuple(c["experts"]): c for c in report["costs"]}
    assert chosen <= set(measured)  # the pool ships sessions for every S its grid chooses
    for subset in chosen:
        got = measured[subset]
        assert got["sessions"] == 8 and got["tokens"] >= 8  # the shipped eight sessions of S
        assert got["measured_delay_s_per_token"] > got["measured_compute_s_per_token"] > 0
        assert abs(got["delay_relative_error"]) < 1.0  # the model is within a factor of two
    assert {tuple(sorted(r["subset"])) for r in report["theorem1"]} == chosen
    for part in ("Fig. 3", "the budget grid", "the cost side", "Theorem 1"):
        assert part in report["seconds"]
    for png in ("fig3.png", "grid.png", "costs.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
