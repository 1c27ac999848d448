"""``moe2 experts finetune`` and ``moe2 expert --adapter``, on the real SmolLM2-135M-Instruct.

One tiny fine-tune for the module (8 examples of one cluster, 2 epochs of one step, 64 tokens):
its adapter says what it is, a second run resumes past it, the adapter moves the model's
next-token distribution, the training loss fell, and an expert started with it names it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest
import torch
from typer.testing import CliRunner

from moe2.agents.expert.adapters import RECORD, WEIGHTS, weights_sha256
from moe2.agents.expert.backends import load_backend
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.expert.lora import answer_text, encode_example, load_clusters
from moe2.agents.expert.models import resolve_model
from moe2.experts_cli import app
from moe2.gating.clusters import data_hash
from moe2.runtime import wire
from moe2.runtime.connection import connect_nats
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects
from tests.test_experts_cluster import arc_row

runner = CliRunner()
pytestmark = pytest.mark.model
ARGS = ["--clusters-only", "1", "--examples", "8", "--epochs", "2", "--seq-len", "64"]
ARGS += ["--batch", "8", "--lr", "1e-3", "--no-progress"]


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """CliRunner closes the stderr the command would configure structlog to write to."""
    monkeypatch.setattr("moe2.experts_cli.configure_logging", lambda *a, **k: None)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-made clusters.json: science questions in cluster 0, arithmetic in cluster 1."""
    root = tmp_path_factory.mktemp("clusters")
    data = root / "arc_easy" / "train.jsonl"
    data.parent.mkdir()
    rows = [(i, topic) for i in range(10) for topic in ("science", "math")]
    data.write_text("\n".join(arc_row(i, topic) for i, topic in rows) + "\n")
    assignment = {f"arc_easy/train/{t}-{i}": int(t == "math") for i, t in rows}
    record = {"data": [str(data)], "data_sha256": data_hash([data]), "k": 2}
    (root / "clusters.json").write_text(json.dumps({**record, "assignment": assignment}))
    return root


@pytest.fixture(scope="module")
def adapters(clusters: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapters")
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse patch is not on yet
        mp.setattr("moe2.experts_cli.configure_logging", lambda *a, **k: None)
        args = ["finetune", "--clusters", str(clusters), "--out", str(out), *ARGS]
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_the_adapter_records_what_it_is_and_a_second_run_resumes_past_it(
    adapters: Path, clusters: Path
) -> None:
    adapter = adapters / "cluster-1"
    record = json.loads((adapter / RECORD).read_text())
    assert record["base_model"] == "SmolLM2-135M-Instruct" and record["cluster"] == 1
    assert record["examples"] == 8 and all("math" in i for i in record["example_ids"])
    assert (
        record["data_sha256"] == json.loads((clusters / "clusters.json").read_text())["data_sha256"]
    )
    assert record["recipe"]["rank"] == 8 and record["recipe"]["seq_len"] == 64
    assert record["recipe"]["epochs"] == 2 and record["wall_s"] > 0
    assert "finetune" in record["command"] and record["weights_sha256"] == weights_sha256(adapter)
    assert not (adapters / "cluster-0").exists()  # --clusters-only 1
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(adapter / WEIGHTS).values()} == {torch.float16}
    again = runner.invoke(
        app, ["finetune", "--clusters", str(clusters), "--out", str(adapters), *ARGS]
    )
    assert again.exit_code == 0, again.output
    assert "cluster 1: complete adapter kept (resumed)" in again.output
    assert json.loads((adapter / RECORD).read_text()) == record


def test_training_lowered_the_loss_on_its_examples(adapters: Path) -> None:
    losses = json.loads((adapters / "cluster-1" / RECORD).read_text())["epoch_losses"]
    assert len(losses) == 2 and losses[-1] < losses[0] * 0.9, losses


def test_the_loss_is_on_the_answer_only_and_the_answer_fits(
    clusters: Path, smollm2: TransformersBackend
) -> None:
    ex = load_clusters(clusters).members(1)[0]
    tokenizer = smollm2._tokenizer
    encoded = encode_example(tokenizer, ex, seq_len=24)
    assert len(encoded.ids) == 24 and encoded.truncated  # the prompt lost its beginning
    answer = tokenizer.decode(encoded.ids[encoded.answer_start :])
    assert answer == answer_text(ex) + "<|im_end|>" == "A. A 0<|im_end|>"


def test_the_adapter_changes_the_next_token_distribution(
    adapters: Path, smollm2: TransformersBackend
) -> None:
    tuned = load_backend("transformers", resolve_model(adapter=adapters / "cluster-1"))
    ids = smollm2.encode_chat([wire.ChatMessage("user", "If 4x + 3 = 11, what is x?")])
    base, lora = smollm2.prefill("a", ids, 8), tuned.prefill("a", ids, 8)
    smollm2.release("a")
    assert tuned.info.tokenizer == smollm2.info.tokenizer  # still fused by id with the base
    assert tuned.info.model.startswith("SmolLM2-135M-Instruct+lora:cluster-1@")
    assert abs(float(base.logprobs[0]) - float(lora.logprobs[0])) > 1e-3


@pytest.mark.anyio
async def test_moe2_expert_with_the_adapter_names_it_in_its_heartbeat(
    adapters: Path, nats_url: str
) -> None:
    adapter = adapters / "cluster-1"
    nc = await connect_nats(nats_url, name="look")
    beats = await nc.subscribe(Subjects(DEFAULT_PREFIX).member("tuned"))
    await nc.flush()
    args = ["expert", "--id", "tuned", "--adapter", str(adapter), "--nats", nats_url]
    command = [sys.executable, "-m", "moe2", *args, "--no-warmup"]
    try:
        async with await anyio.open_process(command, stdout=None, stderr=None) as proc:
            try:
                beat = wire.decode((await beats.next_msg(timeout=60)).data)
            finally:
                proc.terminate()
    finally:
        await nc.close()
    assert isinstance(beat, wire.Heartbeat)
    assert beat.model == f"SmolLM2-135M-Instruct+lora:cluster-1@{weights_sha256(adapter)[:8]}"
    assert beat.quantisation == "Q4_1"  # the base's weights, the adapter merged into them


def test_data_changed_since_clustering_and_unknown_clusters_are_refused(
    clusters: Path, tmp_path: Path
) -> None:
    changed = tmp_path / "changed"
    changed.mkdir()
    record = json.loads((clusters / "clusters.json").read_text())
    (changed / "clusters.json").write_text(json.dumps({**record, "data_sha256": "0" * 16}))
    out = str(tmp_path / "out")
    result = runner.invoke(app, ["finetune", "--clusters", str(changed), "--out", out])
    assert result.exit_code != 0 and "has changed since it was clustered" in result.output
    gone = tmp_path / "gone"
    gone.mkdir()
    elsewhere = {**record, "data": [str(tmp_path / "nowhere" / "train.jsonl")]}
    (gone / "clusters.json").write_text(json.dumps(elsewhere))
    result = runner.invoke(app, ["finetune", "--clusters", str(gone), "--out", out])
    assert result.exit_code != 0 and "clustered from data that is not here" in result.output
    assert "nowhere/train.jsonl" in result.output
    result = runner.invoke(
        app, ["finetune", "--clusters", str(clusters), "--out", out, "--clusters-only", "2"]
    )
    assert result.exit_code != 0 and "clusters [2] are not in 0..1" in result.output
