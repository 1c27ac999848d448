"""Algorithm 1 on synthetic experts with a known best expert per cluster, the artifact it writes,
gradient accumulation, early stopping, and the Theorem 1 check. A fake embedder: no model."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from moe2.gating.artifact import ExpertModel, GatingArtifact
from moe2.gating.dataset import GatingData, split_indices, split_three
from moe2.gating.model import GatingMLP, TrainConfig, mixture_nll_from_logits
from moe2.gating.theorem import random_subsets, theorem1_check
from moe2.gating.train import Batch, accumulation_weights, embed_all, fit, train_gating
from moe2.runtime.errors import Moe2Error

EXPERTS = ["e0", "e1", "e2"]
FAST = TrainConfig(
    lr=1e-2, grad_accum=2, max_epochs=60, early_stop_patience=15, plateau_patience=10, seed=0
)


@dataclass
class ClusterEmbedder:
    """Texts "c<k>/<i>" become cluster k's centre plus noise, on the unit sphere."""

    name: str = "cluster-embedder"
    dim: int = 16

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        centres = np.random.default_rng(42).standard_normal((len(EXPERTS), self.dim))
        rows = [
            3.0 * centres[int(t[1])]
            + np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim)
            for t in texts
        ]
        x = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic(n: int = 300, seed: int = 0) -> GatingData:
    """Expert k gives the gold tokens probability ~0.8 on cluster k and ~0.05 elsewhere."""
    rng = np.random.default_rng(seed)
    texts, lps = [], []
    for i in range(n):
        k, t = i % len(EXPERTS), 1 + i % 4
        p = np.where(np.arange(len(EXPERTS))[:, None] == k, 0.8, 0.05) * rng.uniform(
            0.8, 1.0, (3, t)
        )
        texts.append(f"c{k}/{i}")
        lps.append(np.log(p).astype(np.float32))
    ids = [f"synthetic/{i}" for i in range(n)]
    return GatingData(EXPERTS, ids, texts, lps, [t[:2] for t in texts])


def test_gating_learns_to_route_each_cluster_to_its_expert(tmp_path: Path) -> None:
    data, embedder = synthetic(), ClusterEmbedder()
    art = train_gating(data, embedder, FAST, tmp_path / "gate", progress=False)
    held = data.by_ids(art.heldout_ids)
    values = art.values(embedder.embed(held.texts))
    clusters = np.array([int(t[1]) for t in held.texts])
    right = values[np.arange(len(held)), clusters]
    assert (values.argmax(axis=1) == clusters).mean() >= 0.95
    assert right.mean() > 0.8
    metrics = art.metadata["metrics"]
    assert metrics["heldout_loss"] < 0.5 * metrics["heldout_uniform_loss"]


def test_train_gating_writes_the_artifact_the_curves_and_the_split(tmp_path: Path) -> None:
    data, out = synthetic(100), tmp_path / "gate"
    config = TrainConfig(max_epochs=5, seed=7)
    art = train_gating(data, ClusterEmbedder(), config, out, progress=False)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "gating.json", "curves.png"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "gating.json").read_text())
    assert meta["expert_ids"] == EXPERTS
    assert meta["embedder"] == {"name": "cluster-embedder", "dim": 16}
    assert meta["data_hash"] == data.data_hash()
    assert TrainConfig.from_dict(meta["config"]) == config
    _, held = split_indices(len(data), 7, 0.2)
    assert meta["split"]["heldout"] == [data.example_ids[i] for i in held]
    # three disjoint sets: the held-out examples neither train the gate nor stop its training
    heldout, validation = set(meta["split"]["heldout"]), set(meta["split"]["validation"])
    assert len(heldout) == len(validation) == 20 and not heldout & validation
    assert meta["split"]["n_train"] == 60
    assert len(meta["history"]) == meta["metrics"]["epochs"] == 5
    loaded = GatingArtifact.load(out, expert_ids=EXPERTS, embedder="cluster-embedder")
    x = ClusterEmbedder().embed(data.texts[:5])
    assert np.array_equal(loaded.values(x), art.values(x))


@pytest.mark.parametrize("n", [3, 10, 101])
def test_three_splits_are_disjoint_cover_everything_and_keep_the_two_way_held_out(n: int) -> None:
    train, val, held = split_three(n, 3, 0.2, 0.2)
    assert sorted([*train, *val, *held]) == list(range(n))
    assert min(len(train), len(val), len(held)) >= 1
    assert held.tolist() == split_indices(n, 3, 0.2)[1].tolist()


def test_embed_all_batches_by_length_and_keeps_the_order() -> None:
    texts = [f"c{i % 3}/{'x' * (37 * i % 11)}{i}" for i in range(150)]
    embedder = ClusterEmbedder()
    assert np.array_equal(embed_all(embedder, texts, progress=False), embedder.embed(texts))


def test_one_pass_over_a_group_is_gradient_accumulation() -> None:
    """Weighted losses over 20 examples in one backward pass = accumulating the mean loss of
    batches of 8, 8 and 4, divided by the 3 batches."""
    torch.manual_seed(0)
    model = GatingMLP(6, 3, hidden=5, dropout=0.0)
    x, lp = torch.randn(20, 6), torch.log_softmax(torch.randn(20, 3, 2), dim=1)
    mask = torch.ones(20, 2, dtype=torch.bool)
    model.zero_grad()
    (mixture_nll_from_logits(model(x), lp, mask) * accumulation_weights(20, 8)).sum().backward()
    one_pass = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    for s in (slice(0, 8), slice(8, 16), slice(16, 20)):
        (mixture_nll_from_logits(model(x[s]), lp[s], mask[s]).mean() / 3).backward()
    stepwise = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one_pass, stepwise, strict=True))


def test_early_stopping_keeps_the_best_epochs_weights() -> None:
    data, embedder = synthetic(120), ClusterEmbedder()
    train_idx, held_idx = split_indices(len(data), 0, 0.2)
    x = embed_all(embedder, data.texts, progress=False)
    train = Batch.of(x[train_idx], [data.gold_logprobs[i] for i in train_idx], 3)
    held = Batch.of(x[held_idx], [data.gold_logprobs[i] for i in held_idx], 3)
    config = TrainConfig(lr=5e-2, max_epochs=200, early_stop_patience=5, plateau_patience=100)
    result = fit(train, held, config, progress=False)
    vals = [h["val"] for h in result.history]
    assert len(vals) < 200 and len(vals) == result.best_epoch + 1 + 5
    assert result.best_epoch == int(np.argmin(vals))
    with torch.inference_mode():
        restored = mixture_nll_from_logits(result.model(held.x), held.logprobs, held.mask).mean()
    assert float(restored) == pytest.approx(min(vals), rel=1e-5)


def test_training_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    data, embedder = synthetic(60), ClusterEmbedder()
    config = TrainConfig(max_epochs=3, seed=5)
    a = train_gating(data, embedder, config, tmp_path / "a", progress=False)
    b = train_gating(data, embedder, config, tmp_path / "b", progress=False)
    x = embedder.embed(data.texts)
    assert np.array_equal(a.values(x), b.values(x))


def test_random_subsets_are_proper_distinct_and_seeded() -> None:
    experts = [f"x{i}" for i in range(6)]
    subsets = random_subsets(experts, 10, seed=1)
    assert len(subsets) == 10 and len({tuple(s) for s in subsets}) == 10
    assert all(1 <= len(s) < 6 and set(s) <= set(experts) for s in subsets)
    assert subsets == random_subsets(experts, 10, seed=1)
    assert len(random_subsets(EXPERTS, 10, seed=0)) == 6  # every proper subset of 3


def test_theorem1_check_reports_a_gap_per_subset() -> None:
    data = synthetic(150)
    config = TrainConfig(lr=1e-2, grad_accum=2, max_epochs=30, early_stop_patience=10)
    rows = theorem1_check(data, ClusterEmbedder(), config, subsets=[["e0"], ["e0", "e2"]], seed=0)
    assert [r["subset"] for r in rows] == [["e0"], ["e0", "e2"]]
    single, pair = rows
    assert single["gap"] == pytest.approx(0.0, abs=1e-5)  # one expert: weight 1 either way
    assert abs(pair["gap"]) < 0.1 * pair["retrained"]
    assert pair["full_renormalised"] > 0 and pair["gap"] == pytest.approx(
        pair["full_renormalised"] - pair["retrained"]
    )
    assert "| e0, e2 | 2 |" in rows.markdown()


# --- what served each expert: recorded at training, checked where the gate is used ------------

SERVED = {
    "e0": ExpertModel("SmolLM2-135M-Instruct+lora:cluster-0@b96c4cd9", "smollm2@1111"),
    "e1": ExpertModel("SmolLM2-135M-Instruct+ctx:stem@0a0a0a0a", "smollm2@1111"),
    "e2": ExpertModel("gemma-3-270m-it", "gemma3@2222"),
    "unused": ExpertModel("not-in-the-data", "x"),
}


def test_train_gating_records_what_served_each_expert(tmp_path: Path) -> None:
    config = TrainConfig(max_epochs=2, seed=1)
    data = synthetic(60).with_experts(["e2", "e0"])
    train_gating(data, ClusterEmbedder(), config, tmp_path / "g", progress=False, identities=SERVED)
    meta = json.loads((tmp_path / "g" / "gating.json").read_text())
    assert meta["experts"] == [  # those of the data only, in its expert order
        {"id": "e2", "model": "gemma-3-270m-it", "tokenizer": "gemma3@2222"},
        {"id": "e0", "model": SERVED["e0"].model, "tokenizer": "smollm2@1111"},
    ]
    loaded = GatingArtifact.load(tmp_path / "g", expert_ids=["e2", "e0"])
    assert loaded.experts == {"e2": SERVED["e2"], "e0": SERVED["e0"]}
    assert loaded.mismatches({"e0": SERVED["e0"], "e2": SERVED["e2"]}) == []
    changed = ExpertModel("SmolLM2-135M-Instruct+lora:cluster-0@12345678", "smollm2@1111")
    assert loaded.mismatches({"e0": changed, "e2": SERVED["e2"]}) == [("e0", SERVED["e0"], changed)]
    retokenised = ExpertModel("gemma-3-270m-it", "gemma3@3333")
    assert [e for e, _, _ in loaded.mismatches({"e2": retokenised})] == ["e2"]
    assert retokenised.describe(SERVED["e2"]) == "gemma-3-270m-it (tokenizer gemma3@3333)"
    assert changed.describe(SERVED["e0"]) == changed.model  # the model string says it all
    assert not loaded.mismatches({"e2": ExpertModel("gemma-3-270m-it")})  # no tokenizer known

    train_gating(synthetic(60), ClusterEmbedder(), config, tmp_path / "old", progress=False)
    old = GatingArtifact.load(tmp_path / "old", expert_ids=EXPERTS)
    assert "experts" not in old.metadata and old.experts == {}
    assert old.mismatches({"e0": changed}) == []  # nothing recorded: nothing to compare


def test_train_gating_refuses_an_expert_without_a_recorded_model_before_training(
    tmp_path: Path,
) -> None:
    partial = {"e0": SERVED["e0"], "e1": SERVED["e1"]}
    with pytest.raises(Moe2Error, match=r"no model recorded for experts \['e2'\]"):
        train_gating(synthetic(30), ClusterEmbedder(), FAST, tmp_path / "g", identities=partial)
    assert not (tmp_path / "g").exists()


def test_malformed_recorded_experts_are_refused_on_load(tmp_path: Path) -> None:
    config = TrainConfig(max_epochs=1)
    train_gating(synthetic(30), ClusterEmbedder(), config, tmp_path, progress=False)
    meta = json.loads((tmp_path / "gating.json").read_text())
    meta["experts"] = [{"id": "e0", "model": "m"}]  # e1 and e2 missing
    (tmp_path / "gating.json").write_text(json.dumps(meta))
    with pytest.raises(Moe2Error, match="incomplete or malformed"):
        GatingArtifact.load(tmp_path)


def test_the_fusion_agent_warns_once_when_a_live_expert_serves_another_model(
    tmp_path: Path,
) -> None:
    from unittest.mock import MagicMock

    from structlog.testing import capture_logs

    from moe2.agents.fusion.agent import FusionAgent
    from moe2.gating.artifact import LearnedGate
    from moe2.runtime.endpoint import Request
    from moe2.runtime.wire import Heartbeat

    config = TrainConfig(max_epochs=1)
    art = train_gating(
        synthetic(30), ClusterEmbedder(), config, tmp_path, progress=False, identities=SERVED
    )
    agent = FusionAgent(MagicMock(), gate=LearnedGate(art, ClusterEmbedder()))

    def beat(expert: str, model: ExpertModel) -> Request[Heartbeat]:
        hb = Heartbeat(expert, model.model, model.tokenizer, "transformers", 10, [0])
        return Request("moe2.v1.members." + expert, "", hb)

    restarted = ExpertModel("SmolLM2-135M-Instruct+lora:cluster-0@12345678", "smollm2@1111")
    with capture_logs() as logs:
        for _ in range(3):
            asyncio.run(agent._on_heartbeat(beat("e0", restarted)))
            asyncio.run(agent._on_heartbeat(beat("e1", SERVED["e1"])))
    warned = [e for e in logs if e["event"] == "gating_expert_changed"]
    assert warned == [
        {
            "event": "gating_expert_changed",
            "log_level": "warning",
            "expert": "e0",
            "trained_on": SERVED["e0"].model,
            "serving": restarted.model,
        }
    ]
    assert sorted(agent.membership.live(time.monotonic())) == ["e0", "e1"]  # not refused
