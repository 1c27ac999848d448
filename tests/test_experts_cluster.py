"""``moe2 experts cluster``: K-means of the fine-tuning prompts, its report and its plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe2.experts_cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """CliRunner closes the stderr the command would configure structlog to write to."""
    monkeypatch.setattr("moe2.experts_cli.configure_logging", lambda *a, **k: None)


def arc_row(i: int, topic: str) -> str:
    questions = {
        "science": f"Which gas do plants take in from the air to make food? (variant {i})",
        "math": f"If {i}x + 3 = {2 * i + 3}, what is the value of x?",
    }
    row = {
        "id": f"{topic}-{i}",
        "question": {
            "stem": questions[topic],
            "choices": [{"label": label, "text": f"{label} {i}"} for label in "ABCD"],
        },
        "answerKey": "A",
    }
    return json.dumps(row)


@pytest.fixture
def two_domains(tmp_path: Path) -> Path:
    path = tmp_path / "arc_easy" / "train.jsonl"
    path.parent.mkdir()
    lines = [arc_row(i, topic) for i in range(12) for topic in ("science", "math")]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_domains_make_two_clusters_with_a_report_and_a_plot(
    two_domains: Path, tmp_path: Path
) -> None:
    out = tmp_path / "clusters"
    args = ["cluster", "--data", str(two_domains), "--out", str(out), "--k", "2", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "clusters.json").read_text())
    assert sorted(c["size"] for c in report["clusters"]) == [12, 12]
    by_cluster: dict[int, set[str]] = {}
    for example, cluster in report["assignment"].items():
        by_cluster.setdefault(cluster, set()).add(example.split("/")[-1].split("-")[0])
    assert sorted(map(sorted, by_cluster.values())) == [["math"], ["science"]]
    assert len(report["data_sha256"]) == 16 and report["embedder"] == "all-MiniLM-L6-v2"
    assert (out / "clusters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cluster | size | sources | subjects | terms |" in result.stdout
    again = tmp_path / "again"
    args[args.index(str(out))] = str(again)
    assert runner.invoke(app, args).exit_code == 0
    assert json.loads((again / "clusters.json").read_text())["assignment"] == report["assignment"]


def test_mmlu_is_never_fine_tuning_data(tmp_path: Path) -> None:
    mmlu = tmp_path / "mmlu" / "val"
    mmlu.mkdir(parents=True)
    (mmlu / "anatomy_val.csv").write_text("What is a bone?,a,b,c,d,A\n")
    result = runner.invoke(app, ["cluster", "--data", str(mmlu), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "error [invalid_field]" in result.stderr and "MMLU is for the gating" in result.stderr


def test_more_clusters_than_examples_is_refused(two_domains: Path, tmp_path: Path) -> None:
    args = ["cluster", "--data", str(two_domains), "--out", str(tmp_path / "o"), "--k", "99"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 1 and "k must be in 1..24" in result.stderr
