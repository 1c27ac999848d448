"""The LoRA adapters shipped in deploy/experts/adapters: whole, what their record says, and
trained on the committed clusters (no model load: these are file checks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moe2.agents.expert.adapters import RECORD, is_complete, resolve_adapter, weights_sha256
from moe2.agents.expert.config import ExpertConfig
from moe2.runtime.errors import ErrorCode, Moe2Error

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


@pytest.mark.parametrize("adapter", SHIPPED, ids=[p.name for p in SHIPPED])
def test_a_shipped_adapter_is_found_by_its_name_for_its_base_model(adapter: Path) -> None:
    base = json.loads((adapter / RECORD).read_text())["base_model"]
    assert resolve_adapter(adapter.name, base) == adapter.resolve()
    assert resolve_adapter(adapter, base) == adapter.resolve()  # a directory is taken as it is


def test_a_name_without_an_adapter_for_that_base_model_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(Moe2Error) as caught:
        resolve_adapter("cluster-0", "some-other-model")
    assert caught.value.code == ErrorCode.INVALID_FIELD
    assert "for some-other-model" in caught.value.message and "on SmolLM2" in caught.value.message
    with pytest.raises(Moe2Error, match="not a complete LoRA adapter"):
        resolve_adapter(tmp_path / "nothing-here", "SmolLM2-135M-Instruct")
    mine = tmp_path / "mine" / "cluster-0"
    shutil.copytree(SHIPPED[0], mine)
    record = json.loads((mine / RECORD).read_text())
    (mine / RECORD).write_text(json.dumps({**record, "base_model": "some-other-model"}))
    monkeypatch.setenv("MOE2_ADAPTERS", str(tmp_path / "mine"))
    assert resolve_adapter("cluster-0", "some-other-model") == mine.resolve()
    assert (
        ExpertConfig(expert_id="e", adapter=Path("cluster-1")).adapter
        == (ROOT / "adapters" / "cluster-1").resolve()
    )
