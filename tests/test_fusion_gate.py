"""The fusion agent weighs experts with a trained gating artifact (Algorithm 3, eq. 28)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch

import moe2
from moe2.agents.fusion.agent import FusionAgent, load_gate
from moe2.agents.fusion.config import FusionConfig
from moe2.gating import UniformGate
from moe2.gating.artifact import GatingArtifact, LearnedGate, prompt_text
from moe2.gating.model import GatingMLP
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.mixture import top_k_weights
from moe2.runtime.wire import ChatMessage
from tests.scripted import Script, ScriptedExpert
from tests.test_gating_model import FakeEmbedder

EXPERTS = ["a", "b", "c"]


def favouring_b(dim: int, embedder: str) -> GatingArtifact:
    """A gating network whose output leans to b, then c, then a, for every prompt."""
    torch.manual_seed(0)
    model = GatingMLP(dim, len(EXPERTS))
    with torch.no_grad():
        model.out.weight.mul_(0.01)
        model.out.bias.copy_(torch.tensor([0.0, 2.0, 1.0]))
    return GatingArtifact(model, EXPERTS, embedder)


@pytest.mark.anyio
async def test_the_fusion_agent_uses_the_learned_gating_values(nats_url: str) -> None:
    embedder = FakeEmbedder()
    art = favouring_b(embedder.dim, embedder.name)
    question = "Which expert knows?"
    values = art.values(embedder.embed([prompt_text([ChatMessage("user", question)])]))[0]
    expected = top_k_weights(values, 2)
    scripts = {e: Script(text=f"{e}{e}{e}".encode()) for e in [*EXPERTS, "unknown"]}
    nc = await connect_nats(nats_url, name="test-gate")
    try:
        async with anyio.create_task_group() as tg, moe2.connect(nats_url, prefix="g") as client:
            for expert, script in scripts.items():
                await tg.start(ScriptedExpert(nc, expert, script, "g").run)
            config = FusionConfig(prefix="g", experts_per_prompt=2)
            agent = FusionAgent(nc, config, gate=LearnedGate(art, embedder))
            await tg.start(agent.run)
            await agent.wait_for_experts(4, limit_s=5)
            with anyio.fail_after(10):
                final = await client.ask(question, max_tokens=3).collect()
            tg.cancel_scope.cancel()
    finally:
        await close_nats(nc)
    assert final.experts == ["b", "c"]  # top-2 by gating value; the unknown expert is left out
    assert final.weights == pytest.approx([expected[1], expected[2]])
    assert final.text == "bbb"
    assert scripts["unknown"].served == [] and scripts["a"].served == []


def test_load_gate_reads_an_artifact_with_its_real_embedder(tmp_path: Path) -> None:
    favouring_b(384, "all-MiniLM-L6-v2").save(tmp_path / "gate")
    gate = load_gate(str(tmp_path / "gate"))
    a, b, c, unknown = gate.gate([ChatMessage("user", "What is an atom?")], ["a", "b", "c", "zzz"])
    assert b > c > a > 0 and unknown == 0.0
    assert a + b + c == pytest.approx(1.0, abs=1e-5)
    assert isinstance(load_gate(None), UniformGate)
