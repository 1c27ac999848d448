"""The LoRA adapters shipped in deploy/experts/adapters (SmolLM2-135M-Instruct) and
deploy/experts/adapters-gemma (Gemma-3-270M): whole, what their record says, trained on the
committed clusters, and found by name for the model they were trained on (file checks, no model
load). The tests marked ``model`` load Gemma-3-270M with each Gemma adapter merged in: it names
itself in the expert's heartbeat, and it moves the model, towards its own cluster's answers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from moe2.agents.expert.adapters import RECORD, is_complete, resolve_adapter, weights_sha256
from moe2.agents.expert.backends import load_backend
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.expert.config import ExpertConfig
from moe2.agents.expert.lora import encode_example
from moe2.agents.expert.models import resolve_model
from moe2.gating.clusters import data_hash
from moe2.gating.data import McExample, load_examples
from moe2.runtime import wire
from moe2.runtime.errors import ErrorCode, Moe2Error
from tests.test_gemma import gemma_expert

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "deploy" / "experts"
GEMMA_ADAPTERS = ROOT / "adapters-gemma"
# The fine-tuning data: ../shared/data beside the checkout (as clusters.json names it), or wherever
# MOE2_DATA says (a clone elsewhere, as CI makes).
SHARED = Path(os.environ.get("MOE2_DATA") or REPO.parent / "shared" / "data")
GEMMA_SHIPPED = sorted(p for p in GEMMA_ADAPTERS.glob("cluster-*") if p.is_dir())
SHIPPED = sorted(p for p in (ROOT / "adapters").glob("cluster-*") if p.is_dir()) + GEMMA_SHIPPED
GEMMA, GEMMA_NAME = "gemma3-270m", "gemma-3-270m-q4_k_m"


def test_at_least_one_adapter_ships() -> None:
    assert SHIPPED, "deploy/experts/adapters holds no adapter"
    assert [p.name for p in GEMMA_SHIPPED] == ["cluster-0", "cluster-4"]


@pytest.mark.parametrize("adapter", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
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


@pytest.mark.parametrize("adapter", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
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


def test_the_gemma_adapters_have_the_smollm2_recipe_on_the_gemma_base() -> None:
    for adapter in GEMMA_SHIPPED:
        record = json.loads((adapter / RECORD).read_text())
        smollm2 = json.loads((ROOT / "adapters" / adapter.name / RECORD).read_text())
        assert record["base_model"] == GEMMA_NAME and smollm2["base_model"] != GEMMA_NAME
        assert record["recipe"] == smollm2["recipe"] and record["examples"] == 256
        assert record["target_modules"] == smollm2["target_modules"]
        assert record["example_ids"] == smollm2["example_ids"]  # the same seeded examples
        assert record["epoch_losses"][-1] < record["epoch_losses"][0]


def test_one_name_finds_the_adapter_trained_on_the_model_asked_for() -> None:
    def served(model: str, name: str) -> Path | None:
        return ExpertConfig(expert_id="e", model=model, adapter=Path(name)).adapter

    assert served(GEMMA, "cluster-0") == (GEMMA_ADAPTERS / "cluster-0").resolve()
    assert served("smollm2-135m", "cluster-0") == (ROOT / "adapters" / "cluster-0").resolve()
    assert served(GEMMA, "cluster-4") == (GEMMA_ADAPTERS / "cluster-4").resolve()
    with pytest.raises(Moe2Error) as caught:  # no Gemma adapter of cluster 1 ships
        served(GEMMA, "cluster-1")
    assert caught.value.code == ErrorCode.INVALID_FIELD
    assert f"no adapter named 'cluster-1' for {GEMMA_NAME}" in caught.value.message
    assert "(on SmolLM2-135M-Instruct)" in caught.value.message


# --- the Gemma adapters loaded: the base model, and each adapter merged into another load ---


@pytest.fixture(scope="module")
def gemma_base() -> TransformersBackend:
    backend = load_backend("transformers", resolve_model(GEMMA))
    assert isinstance(backend, TransformersBackend)
    return backend


@pytest.fixture(scope="module", params=GEMMA_SHIPPED, ids=[p.name for p in GEMMA_SHIPPED])
def gemma_tuned(request: pytest.FixtureRequest) -> TransformersBackend:
    backend = load_backend("transformers", resolve_model(GEMMA, adapter=request.param))
    assert isinstance(backend, TransformersBackend)
    return backend


def answer_logprobs(backend: TransformersBackend, examples: list[McExample]) -> list[np.ndarray]:
    """Each example's answer in the training format ("B. text<eos>"), scored after its prompt."""
    scored = []
    for ex in examples:
        encoded = encode_example(backend._tokenizer, ex, seq_len=128)
        prompt, answer = encoded.ids[: encoded.answer_start], encoded.ids[encoded.answer_start :]
        scored.append(backend.score(prompt, [answer], top_k=0)[0].logprobs)
    return scored


def training_examples() -> dict[str, McExample]:
    """The clustered fine-tuning examples by id, read from ``SHARED``; the test skips without
    them, and fails if they are not the data the adapters were trained on."""
    clustering = json.loads((ROOT / "clusters.json").read_text())
    files = [SHARED / Path(p).relative_to("../shared/data") for p in clustering["data"]]
    if not all(f.is_file() for f in files):
        pytest.skip(f"the fine-tuning data is not at {SHARED} (set MOE2_DATA)")
    assert data_hash(files) == clustering["data_sha256"], "not the data the adapters saw"
    return {ex.id: ex for f in files for ex in load_examples(f)}


@pytest.mark.model
def test_a_gemma_adapter_changes_the_model_towards_its_own_clusters_answers(
    gemma_base: TransformersBackend,
    gemma_tuned: TransformersBackend,
) -> None:
    name = gemma_tuned.info.model.split("+lora:")[1].split("@")[0]
    record = json.loads((GEMMA_ADAPTERS / name / RECORD).read_text())
    examples = [training_examples()[i] for i in record["example_ids"][:3]]  # its own data
    base, tuned = answer_logprobs(gemma_base, examples), answer_logprobs(gemma_tuned, examples)
    assert np.abs(base[0] - tuned[0]).max() > 1e-2  # the same prompt, other log-probs
    nll_base = -sum(float(b.sum()) for b in base) / sum(len(b) for b in base)
    nll_tuned = -sum(float(t.sum()) for t in tuned) / sum(len(t) for t in tuned)
    assert nll_tuned < 0.8 * nll_base, (nll_base, nll_tuned)


@pytest.mark.anyio
@pytest.mark.model
async def test_a_gemma_adapter_expert_names_base_adapter_and_quantisation(
    gemma_tuned: TransformersBackend, gemma_base: TransformersBackend, nats_url: str
) -> None:
    name = gemma_tuned.info.model.split("+lora:")[1].split("@")[0]
    adapter = GEMMA_ADAPTERS / name
    config = ExpertConfig(
        expert_id="glora", model=GEMMA, adapter=Path(name), warmup=False, energy_source="declared"
    )
    assert config.adapter == adapter.resolve()
    async with gemma_expert(gemma_tuned, nats_url, config) as beat:
        pass
    assert isinstance(beat, wire.Heartbeat)
    assert beat.model == f"{GEMMA_NAME}+lora:{name}@{weights_sha256(adapter)[:8]}"
    assert beat.quantisation == "Q4_K_M"  # the base file's, the adapter merged into it
    assert beat.tokenizer == gemma_base.info.tokenizer  # fused by token id with the base
