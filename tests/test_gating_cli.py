"""``moe2 gating …`` as a user runs it: exit codes, messages, files; collection as a process
killed part way and resumed; pool -> store -> train -> eval on a synthetic pool."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import numpy as np
import pytest
from typer.testing import CliRunner

from moe2.agents.traces.synthetic import synthetic_trace
from moe2.gating.data import McExample, cloze_targets
from moe2.gating.pools import MMLU_GROUPS, MMLU_SUBCATEGORIES
from moe2.gating.store import DatasetSpec, ExpertIdentity, OutputStore, ScoreRecord, StoreMeta
from moe2.gating_cli import app
from moe2.runtime import wire
from moe2.runtime.contexts import load_context
from moe2.runtime.server import free_port
from moe2.runtime.wire import ChatMessage
from tests.test_gating_collect import (
    ScoringScript,
    Tally,
    raw_record_keys,
    scoring_experts,
    write_mmlu,
    write_mmlu_dev,
)

runner = CliRunner()


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands configure structlog to write to the stderr of the moment, which CliRunner
    closes after each call; in-process runs keep the test session's logging instead."""
    monkeypatch.setattr("moe2.gating_cli.configure_logging", lambda *a, **k: None)


def gating(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def spawn(*args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "moe2", "gating", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_every_gating_command_has_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "moe2", "gating", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    for command in ("pool", "collect", "train", "eval", "theorem1"):
        assert command in done.stdout


# ---------------------------------------------------------------------------------------------
# pool


def test_pool_writes_one_context_per_group_and_prints_the_expert_commands(
    tmp_path: Path,
) -> None:
    dev = write_mmlu_dev(tmp_path / "mmlu")
    code, out, err = gating("pool", "--mmlu", str(dev), "--out", str(tmp_path / "pool"))
    assert code == 0, err
    for group in ("stem", "humanities", "social_sciences", "other"):
        path = tmp_path / "pool" / f"{group}.json"
        assert f"moe2 expert --id {group} --context {path} --nats nats://127.0.0.1:4222 &" in out
        raw = json.loads((tmp_path / "pool" / f"{group}.json").read_text())
        assert set(raw) == {"name", "messages"} and raw["name"] == group
        ctx = load_context(tmp_path / "pool" / f"{group}.json")  # what `moe2 expert` reads
        roles = [m.role for m in ctx.messages]
        assert roles == ["system"] + ["user", "assistant"] * 5
        assert all(m.content in "ABCDE" and len(m.content) == 1 for m in ctx.messages[2::2])
    manifest = json.loads((tmp_path / "pool" / "pool.json").read_text())
    shots = manifest["experts"]["stem"]["shots"]
    assert len({s.split("/")[2] for s in shots}) == 5  # five different subjects
    groups = {s.split("/")[2]: g for g, e in manifest["experts"].items() for s in e["shots"]}
    assert all(MMLU_SUBCATEGORIES[s] in MMLU_GROUPS[g][0] for s, g in groups.items())

    again = tmp_path / "again"
    gating("pool", "--mmlu", str(dev), "--out", str(again))
    assert (again / "stem.json").read_bytes() == (tmp_path / "pool" / "stem.json").read_bytes()
    other = tmp_path / "seed1"
    gating("pool", "--mmlu", str(dev), "--out", str(other), "--seed", "1")
    assert json.loads((other / "pool.json").read_text())["experts"] != manifest["experts"]


def test_pool_refuses_a_missing_directory_and_data_without_mmlu(tmp_path: Path) -> None:
    code, _, err = gating("pool", "--mmlu", str(tmp_path / "nope"), "--out", str(tmp_path / "p"))
    assert code == 1 and "error [invalid_field]: MMLU directory" in err and "does not exist" in err
    small = write_mmlu(tmp_path / "m", "dev")  # two subjects only
    code, _, err = gating("pool", "--mmlu", str(small), "--out", str(tmp_path / "p"))
    assert code == 1 and "subjects here; 5 are needed" in err


# ---------------------------------------------------------------------------------------------
# collect


def test_collect_refuses_bad_input_with_a_clear_message(nats_url: str, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    code, _, err = gating("collect", "--data", str(tmp_path / "nope"), "--out", out)
    assert code == 1 and "error [invalid_field]: data" in err and "does not exist" in err
    mmlu = write_mmlu(tmp_path / "mmlu")
    unreachable = f"nats://127.0.0.1:{free_port()}"
    collect = [sys.executable, "-m", "moe2", "gating", "collect", "--data", str(mmlu)]
    done = subprocess.run(
        [*collect, "--out", out, "--nats", unreachable],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"error [unreachable]: no NATS server reachable at {unreachable}" in done.stderr
    done = subprocess.run(
        [*collect, "--out", out, "--nats", nats_url, "--wait", "0.5", "--prefix", "empty"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "error [no_experts]: no expert heartbeat on empty.v1.members.*" in done.stderr
    assert "wait longer (--wait 300)" in done.stderr  # experts may still be loading
    code, _, err = gating("collect", "--data", str(mmlu), "--out", out, "--concurrency", "0")
    assert code == 1 and "concurrency >= 1" in err


def test_from_trace_without_score_requests_is_a_clear_error(tmp_path: Path) -> None:
    trace = tmp_path / "t.moe2"
    synthetic_trace(trace, experts=["a"], prompt_messages=[ChatMessage("user", "hi")], steps=2)
    mmlu = write_mmlu(tmp_path / "mmlu")
    code, _, err = gating(
        "collect", "--data", str(mmlu), "--out", str(tmp_path / "o"), "--from-trace", str(trace)
    )
    assert code == 1 and "holds no answered Score request for these examples" in err


async def _wait_exit(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    with anyio.fail_after(30):
        _, err = await anyio.to_thread.run_sync(proc.communicate)
    return proc.returncode, err.decode()


@pytest.mark.anyio
async def test_collect_killed_then_interrupted_then_resumed_collects_each_pair_once(
    nats_url: str, tmp_path: Path
) -> None:
    mmlu, out = write_mmlu(tmp_path / "mmlu"), tmp_path / "out"
    tally = Tally(goal=6)
    scripts = {e: ScoringScript(delay_s=0.02, tally=tally) for e in ("a", "b")}
    args = ["collect", "--data", str(mmlu), "--out", str(out), "--nats", nats_url]
    args += ["--experts", "a,b", "--concurrency", "1", "--no-progress", "--top-k", "2"]
    async with scoring_experts(nats_url, scripts) as (prefix, _):
        killed = spawn(*args, "--prefix", prefix)
        await tally.reached.wait()
        killed.send_signal(signal.SIGKILL)
        assert (await _wait_exit(killed))[0] == -signal.SIGKILL
        after_kill = raw_record_keys(out)
        assert 0 < len(after_kill) < 12

        tally.goal, tally.reached = tally.count + 6, anyio.Event()
        interrupted = spawn(*args, "--prefix", prefix)
        await tally.reached.wait()
        interrupted.send_signal(signal.SIGINT)
        code, err = await _wait_exit(interrupted)
        assert code == 130, err
        assert "interrupted: the pairs collected so far are in" in err
        after_interrupt = raw_record_keys(out)
        assert len(after_kill) < len(after_interrupt) < 12

        resumed = spawn(*args, "--prefix", prefix)
        code, err = await _wait_exit(resumed)
    assert code == 0, err
    assert f"{12 - len(after_interrupt)} pairs collected now, {len(after_interrupt)} before" in err
    keys = raw_record_keys(out)
    assert len(keys) == len(set(keys)) == 12
    assert keys[: len(after_interrupt)] == after_interrupt
    assert len(OutputStore(out).complete_examples()) == 6


# ---------------------------------------------------------------------------------------------
# train, eval, theorem1 on a synthetic pool: expert "anatomist" knows anatomy, "philosopher"
# knows philosophy, "novice" knows neither.


EXPERTS = ("anatomist", "novice", "philosopher")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """The commands set one torch thread in-process: give the test session its own back."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def synthetic_examples(per_subject: int) -> list[McExample]:
    topics = {
        "anatomy": ["heart", "femur", "lung", "kidney", "skull", "liver", "tendon", "spine"],
        "philosophy": ["Plato", "Kant", "Hume", "ethics", "logic", "Mill", "Sartre", "virtue"],
    }
    out = []
    for subject, words in topics.items():
        for i in range(per_subject):
            w = words[i % len(words)]
            question = f"In {subject}, what is true of the {w} (case {i})?"
            options = (f"{w} one", f"{w} two", f"{w} three", f"{w} four")
            out.append(McExample(f"syn/{subject}/{i}", "mmlu", subject, question, options, i % 4))
    return out


def _target(text: str, lp: float, top_k: int = 2) -> wire.TargetScore:
    ids = np.frombuffer(text.encode()[:3], dtype=np.uint8).astype("<u4")
    lps = np.full(ids.size, lp, dtype="<f4")
    top_ids = np.stack([ids, (ids + 1) % 256], axis=1).astype("<u4")
    top_lps = np.stack([lps, lps - 1], axis=1).astype("<f4")
    return wire.TargetScore(ids.tobytes(), lps.tobytes(), top_ids.tobytes(), top_lps.tobytes())


def synthetic_record(ex: McExample, expert: str) -> ScoreRecord:
    knows = expert.startswith(ex.subject[:4])
    gold_lp, other_lp = (-0.1, -3.0) if knows else (-1.5, -1.4)
    lps = [gold_lp if i == ex.answer else other_lp for i in range(len(ex.options))]
    letter = [_target(letter, lp) for letter, lp in zip("ABCD", lps, strict=True)]
    cloze = [_target(text, lp) for text, lp in zip(cloze_targets(ex), lps, strict=True)]
    return ScoreRecord(
        example=ex.id,
        expert=expert,
        letter=wire.Scored(expert=expert, prompt_tokens=10, targets=letter),
        cloze=wire.Scored(expert=expert, prompt_tokens=10, targets=cloze),
    )


def synthetic_store(directory: Path, examples: Sequence[McExample], experts: Sequence[str]) -> Path:
    meta = StoreMeta(
        experts=[ExpertIdentity(id=e, model=f"syn/{e}", tokenizer="bytes", vocab_size=256)
                 for e in experts],
        dataset=DatasetSpec(path="synthetic", examples=len(examples)),
        top_k=2,
        source="synthetic",
    )  # fmt: skip
    with OutputStore.create(directory, meta, examples) as store:
        for ex in examples:
            for e in experts:
                store.append(synthetic_record(ex, e))
    return directory


@pytest.mark.usefixtures("one_torch_thread")
def test_train_then_eval_routes_to_the_expert_that_knows(tmp_path: Path) -> None:
    outputs = synthetic_store(tmp_path / "outputs", synthetic_examples(24), EXPERTS)
    gate = tmp_path / "gate"
    code, _, err = gating(
        "train", "--outputs", str(outputs), "--out", str(gate), "--max-epochs", "15",
        "--batch", "8", "--grad-accum", "1", "--lr", "0.03", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert (gate / "model.safetensors").exists() and (gate / "gating.json").exists()

    code, out, err = gating("eval", "--outputs", str(outputs), "--gate", str(gate))
    assert code == 0, err
    report = json.loads((outputs / "eval-heldout.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert report["examples"] == 10  # 20 % of 48
    assert report["pool"].startswith("anatomist (syn/anatomist)")
    assert rows["MoE² gating (all)"]["nll_per_token"] < rows["equal weights"]["nll_per_token"]
    assert rows["MoE² top-1"]["cloze_accuracy"] == 1.0
    assert rows["oracle (per example)"]["nll_per_token"] <= rows["best single"]["nll_per_token"]
    assert rows["MoE² top-3"]["nll_per_token"] == pytest.approx(
        rows["MoE² gating (all)"]["nll_per_token"]
    )
    assert "| MoE² top-1 |" in out and (outputs / "eval-heldout.md").read_text().strip() in out

    code, _, err = gating(
        "eval", "--outputs", str(outputs), "--gate", str(gate), "--split", "all",
        "--out", str(tmp_path / "reports" / "all"),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "reports" / "all.json").read_text())["examples"] == 48

    code, out, err = gating("theorem1", "--outputs", str(outputs), "--subsets", "2",
                            "--max-epochs", "5", "--no-progress")  # fmt: skip
    assert code == 0, err
    table = out[out.index("| subset | size | full_renormalised | retrained | gap |") :]
    assert len(table.strip().splitlines()) == 4  # header, rule, two subsets


@pytest.mark.usefixtures("one_torch_thread")
def test_eval_refuses_a_gate_for_other_experts_and_missing_inputs(tmp_path: Path) -> None:
    examples = synthetic_examples(6)
    outputs = synthetic_store(tmp_path / "outputs", examples, EXPERTS)
    gate = tmp_path / "gate"
    code, _, err = gating(
        "train", "--outputs", str(outputs), "--out", str(gate), "--max-epochs", "2", "--no-progress"
    )
    assert code == 0, err
    two = synthetic_store(tmp_path / "two", examples, EXPERTS[:2])
    code, _, err = gating("eval", "--outputs", str(two), "--gate", str(gate))
    assert code == 1 and "was trained for experts ['anatomist', 'novice', 'philosopher']" in err
    other = synthetic_store(tmp_path / "other", synthetic_examples(7)[5:], EXPERTS)
    code, _, err = gating("eval", "--outputs", str(other), "--gate", str(gate))
    assert code == 1 and "the gate was trained on another collection" in err
    code, _, err = gating("eval", "--outputs", str(tmp_path / "none"), "--gate", str(gate))
    assert code == 1 and "outputs" in err and "does not exist" in err
    code, _, err = gating("eval", "--outputs", str(tmp_path), "--gate", str(gate))
    assert code == 1 and "is not a gating output store" in err
    code, _, err = gating("eval", "--outputs", str(outputs), "--gate", str(tmp_path / "no"))
    assert code == 1 and "gate" in err and "does not exist" in err
    code, _, err = gating("eval", "--outputs", str(outputs), "--gate", str(gate), "--split", "x")
    assert code == 1 and "--split is heldout or all" in err
    code, _, err = gating("train", "--outputs", str(outputs), "--out", str(gate), "--lr", "-1")
    assert code == 1 and "training configuration: lr must be > 0" in err


@pytest.mark.usefixtures("one_torch_thread")
def test_eval_reports_intervals_against_the_baselines(tmp_path: Path) -> None:
    outputs = synthetic_store(tmp_path / "outputs", synthetic_examples(24), EXPERTS)
    code, _, err = gating(
        "train", "--outputs", str(outputs), "--out", str(tmp_path / "gate"),
        "--max-epochs", "15", "--batch", "8", "--grad-accum", "1", "--lr", "0.03",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = gating("eval", "--outputs", str(outputs), "--gate", str(tmp_path / "gate"))
    assert code == 0, err
    report = json.loads((outputs / "eval-heldout.json").read_text())
    diffs = {(d["method"], d["baseline"], d["metric"]): d for d in report["differences"]}
    top1 = diffs[("MoE² top-1", "equal weights", "nll")]
    assert top1["value"] < 0 and top1["ci95"][0] <= top1["value"] <= top1["ci95"][1]
    assert top1["better"] is (top1["ci95"][1] < 0)
    assert "95% paired bootstrap" in out and "| MoE² top-1 | equal weights |" in out


def test_experts_compare_shows_each_expert_per_domain_against_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe2.experts_cli import app as experts_app

    monkeypatch.setattr("moe2.experts_cli.configure_logging", lambda *a, **k: None)
    outputs = synthetic_store(tmp_path / "outputs", synthetic_examples(12), EXPERTS)
    ids = ",".join(EXPERTS)
    result = runner.invoke(
        experts_app, ["compare", "--outputs", str(outputs), "--experts", ids,
                      "--out", str(tmp_path / "table")]
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    table = json.loads((tmp_path / "table.json").read_text())
    anatomy = table["domains"]["MMLU anatomy: other"]
    assert anatomy[EXPERTS[0]]["examples"] == 12
    best = min(anatomy, key=lambda e: anatomy[e]["nll"])
    assert best.startswith("anat") and anatomy[best]["cloze"] == 1.0
    assert table["base"] == EXPERTS[0] and set(table["against_base"]) == set(EXPERTS[1:])
    assert "| all | 24 |" in result.stdout
    bad = runner.invoke(experts_app, ["compare", "--outputs", str(outputs), "--experts", "x,y"])
    assert bad.exit_code == 1 and "not in" in bad.stderr


@pytest.mark.usefixtures("one_torch_thread")
def test_crossval_judges_every_example_by_a_gate_that_never_saw_it(tmp_path: Path) -> None:
    outputs = synthetic_store(tmp_path / "outputs", synthetic_examples(15), EXPERTS)
    code, out, err = gating(
        "crossval", "--outputs", str(outputs), "--folds", "3", "--max-epochs", "30",
        "--experts", "anatomist,philosopher", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((outputs / "crossval-3.json").read_text())
    assert report["examples"] == 30 and "3-fold cross-fitting" in report["split"]
    assert report["pool"].startswith("anatomist (syn/anatomist), philosopher")
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["MoE² top-1"]["cloze_accuracy"] == 1.0  # routes each subject to its expert
    diffs = {(d["method"], d["baseline"], d["metric"]): d for d in report["differences"]}
    assert diffs[("MoE² gating (all)", "equal weights", "nll")]["better"]
    assert "| single: novice |" not in out
    bad, _, err = gating("crossval", "--outputs", str(outputs), "--folds", "1")
    assert bad == 1 and "--folds" in err


def test_fold_indices_partition_the_examples() -> None:
    from moe2.gating.crossfit import fold_indices

    folds = fold_indices(11, 3, seed=4)
    assert sorted(int(i) for f in folds for i in f) == list(range(11))
    assert sorted(len(f) for f in folds) == [3, 4, 4]


# ---------------------------------------------------------------------------------------------
# eval --split all on another store: the models behind the expert ids are checked too


LORA = "SmolLM2-135M-Instruct+lora:cluster-0@b96c4cd9"


def _trained_gate(outputs: Path, gate: Path, *args: str) -> Path:
    code, _, err = gating(
        "train", "--outputs", str(outputs), "--out", str(gate), "--no-progress", *args
    )
    assert code == 0, err
    return gate


def _serving(store: Path, **models: str) -> Path:
    """Edit the store's meta.json as if expert ``id`` had served ``models[id]``."""
    meta = json.loads((store / "meta.json").read_text())
    for expert in meta["experts"]:
        expert["model"] = models.get(expert["id"], expert["model"])
    (store / "meta.json").write_text(json.dumps(meta))
    return store


def _later_examples(per_subject: int, start: int) -> list[McExample]:
    """Examples ``start..per_subject-1`` of each subject: none of them in a store of ``start``."""
    return [ex for ex in synthetic_examples(per_subject) if int(ex.id.rsplit("/", 1)[1]) >= start]


@pytest.mark.usefixtures("one_torch_thread")
def test_eval_all_on_another_store_checks_the_models_behind_the_expert_ids(
    tmp_path: Path,
) -> None:
    outputs = _serving(
        synthetic_store(tmp_path / "outputs", synthetic_examples(8), EXPERTS), anatomist=LORA
    )
    gate = _trained_gate(outputs, tmp_path / "gate", "--max-epochs", "2")
    assert json.loads((gate / "gating.json").read_text())["experts"] == [
        {"id": "anatomist", "model": LORA, "tokenizer": "bytes"},
        {"id": "novice", "model": "syn/novice", "tokenizer": "bytes"},
        {"id": "philosopher", "model": "syn/philosopher", "tokenizer": "bytes"},
    ]

    test = _serving(
        synthetic_store(tmp_path / "test", _later_examples(12, 8), EXPERTS), anatomist=LORA
    )
    report = tmp_path / "reports" / "test"
    code, _, err = gating(
        "eval", "--outputs", str(test), "--gate", str(gate), "--split", "all", "--out", str(report)
    )
    assert code == 0, err
    assert json.loads(report.with_suffix(".json").read_text())["examples"] == 8

    retrained = LORA.replace("b96c4cd9", "12345678")
    other = _serving(
        synthetic_store(tmp_path / "other", _later_examples(12, 8), EXPERTS),
        anatomist=retrained,
        philosopher="syn/philosopher+ctx:humanities@0badc0de",
    )
    code, _, err = gating("eval", "--outputs", str(other), "--gate", str(gate), "--split", "all")
    assert code == 1 and "error [invalid_field]" in err
    message = " ".join(err.split())  # the terminal may wrap it
    assert (
        f"expert anatomist: the gate was trained on {LORA}, this store holds {retrained}" in message
    )
    assert (
        "expert philosopher: the gate was trained on syn/philosopher, this store holds "
        "syn/philosopher+ctx:humanities@0badc0de" in message
    )
    assert "expert novice" not in message and not (other / "eval-all.json").exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_eval_refuses_a_store_whose_expert_has_another_tokenizer(tmp_path: Path) -> None:
    outputs = synthetic_store(tmp_path / "outputs", synthetic_examples(6), EXPERTS)
    gate = _trained_gate(
        outputs, tmp_path / "gate", "--max-epochs", "1", "--experts", "philosopher,anatomist"
    )
    recorded = json.loads((gate / "gating.json").read_text())["experts"]
    assert [e["id"] for e in recorded] == ["philosopher", "anatomist"]  # --experts only
    two = synthetic_store(tmp_path / "two", synthetic_examples(6), ["philosopher", "anatomist"])
    code, _, err = gating("eval", "--outputs", str(two), "--gate", str(gate))
    assert code == 0, err
    meta = json.loads((two / "meta.json").read_text())
    meta["experts"][1]["tokenizer"] = "other-bytes"
    (two / "meta.json").write_text(json.dumps(meta))
    code, _, err = gating("eval", "--outputs", str(two), "--gate", str(gate))
    assert code == 1
    assert (
        "expert anatomist: the gate was trained on syn/anatomist (tokenizer bytes), "
        "this store holds syn/anatomist (tokenizer other-bytes)" in " ".join(err.split())
    )


@pytest.mark.usefixtures("one_torch_thread")
def test_a_gate_that_records_no_models_still_evaluates_with_a_warning(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    outputs = synthetic_store(tmp_path / "outputs", synthetic_examples(6), EXPERTS)
    gate = _trained_gate(outputs, tmp_path / "gate", "--max-epochs", "1")
    metadata = json.loads((gate / "gating.json").read_text())
    del metadata["experts"]  # as gating.json was written before the models were recorded
    (gate / "gating.json").write_text(json.dumps(metadata))
    other = _serving(
        synthetic_store(tmp_path / "other", _later_examples(9, 6), EXPERTS), anatomist=LORA
    )
    with capture_logs() as logs:
        code, _, err = gating(
            "eval", "--outputs", str(other), "--gate", str(gate), "--split", "all",
            "--out", str(tmp_path / "report"),
        )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "report.json").read_text())["examples"] == 6
    unchecked = [e for e in logs if e["event"] == "gating_experts_unchecked"]
    assert len(unchecked) == 1 and unchecked[0]["log_level"] == "warning"
    assert unchecked[0]["gate"] == str(gate) and "only the expert ids" in unchecked[0]["why"]
