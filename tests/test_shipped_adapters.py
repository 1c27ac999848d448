"""The LoRA adapters shipped in deploy/experts/adapters: whole, what their record says, and
trained on the committed clusters (no model load: these are file checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe2.agents.expert.adapters import RECORD, is_complete, weights_sha256

ROOT = Path(__file__).resolve().parents[1] / "deploy" / "experts"
SHIPPED = sorted(p for p in (ROOT / "adapters").glob("cluster-*") if p.is_dir())


def test_at_least_one_adapter_ships() -> None:
    assert SHIPPED, "deploy/experts/adapters holds no adapter"


@pytest.mark.parametrize("adapter", SHIPPED, ids=[p.name for p in SHIPPED])
def test_a_shipped_adapter_is_whole_and_its_record_is_true(adapter: Path) -> None:
    assert is_complete(adapter)
    record = json.loads((adapter / RECORD).read_text())
    clusters = json.loads((ROOT / "clusters.json").read_text())
    assert record["weights_sha256"] == weights_sha256(adapter)  # the weights are the recorded ones
    assert record["data_sha256"] == clusters["data_sha256"]
    assert adapter.name == f"cluster-{record['cluster']}"
    members = {i for i, c in clusters["assignment"].items() if c == record["cluster"]}
    assert set(record["example_ids"]) <= members  # trained on its own cluster only
    assert record["command"].startswith("moe2 experts finetune --clusters deploy/experts")
    assert (adapter / "adapter_model.safetensors").stat().st_size < 4_000_000  # fp16, small
