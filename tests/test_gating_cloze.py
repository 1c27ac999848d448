"""Training on the options' discrimination (``TrainConfig.cloze_weight``): the torch option
scores equal ``gating.evaluate.cloze_scores``, a gate trained with the term picks the gold
option where the NLL-trained one cannot, at 0 training is exactly eq. 13's, and the CLI records
the weight. Fake embedder, synthetic pools: no model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe2.gating.dataset import GatingData, OptionScores
from moe2.gating.evaluate import cloze_choice, cloze_scores
from moe2.gating.model import TrainConfig, option_scores
from moe2.gating.train import Batch, OptionBatch, embed_all, fit, train_gating
from moe2.runtime.errors import Moe2Error
from tests.test_gating_cli import EXPERTS as CLI_EXPERTS
from tests.test_gating_cli import (  # noqa: F401  # the fixtures are used by name
    _keep_logging,
    gating,
    one_torch_thread,
    synthetic_examples,
    synthetic_store,
)
from tests.test_gating_train import FAST, ClusterEmbedder, synthetic


def tiny_options() -> list[OptionScores]:
    """Two examples of three and four options, options of 1-3 tokens over two experts, with
    lengths that are not the token counts (as bytes on a mixed pool)."""
    rng = np.random.default_rng(3)

    def lp(t: int) -> np.ndarray:
        return np.log(rng.uniform(0.01, 0.9, (2, t))).astype(np.float32)

    return [
        OptionScores([lp(1), lp(3), lp(2)], [4, 9, 7], answer=1),
        OptionScores([lp(2), lp(2), lp(1), lp(3)], [2, 2, 1, 3], answer=3),
    ]


def test_option_cross_entropy_is_the_softmax_over_cloze_scores() -> None:
    options, scale = tiny_options(), 2.5
    gates = np.array([[0.3, 0.7], [0.9, 0.1]])
    batch = OptionBatch.of(options, 2)
    log_gates = torch.log(torch.tensor(gates, dtype=torch.float32))
    scores = option_scores(log_gates, batch.logprobs, batch.units, batch.lengths)
    ce = batch.cross_entropy(log_gates, scale)
    for i, opts in enumerate(options):
        want = cloze_scores(opts.logprobs, gates[i], opts.lengths)
        assert scores[i, : len(want)].numpy() == pytest.approx(want, rel=1e-5)
        by_hand = np.log(np.exp(scale * want).sum()) - scale * want[opts.answer]
        assert float(ce[i]) == pytest.approx(by_hand, rel=1e-5)
    assert not bool(batch.present[0, 3])  # the first example's padded fourth option


def discriminating_pool(n: int = 400, seed: int = 0) -> GatingData:
    """Two experts, four one-unit options. "confident" gives every option about the same high
    likelihood (the gold -5, the wrong ones -5 ± 0.5); "discerning" gives the gold -6 and the
    wrong ones -10 on kind-0 prompts, and is no better than chance on kind-1 prompts. NLL
    alone prefers "confident" everywhere (it explains the gold text better); discrimination
    wants "discerning" on kind 0."""
    rng = np.random.default_rng(seed)
    texts, gold, options = [], [], []
    for i in range(n):
        kind, answer = i % 2, int(rng.integers(4))
        confident = -5.0 + rng.normal(0.0, 0.5, 4)
        confident[answer] = -5.0
        discerning = np.where(np.arange(4) == answer, -6.0, -10.0) if kind == 0 else (
            rng.uniform(-10.0, -6.0, 4)
        )  # fmt: skip
        lps = [np.array([[confident[o]], [discerning[o]]], np.float32) for o in range(4)]
        texts.append(f"c{kind}/{i}")
        gold.append(lps[answer])
        options.append(OptionScores(lps, [1, 1, 1, 1], answer))
    ids = [f"syn/{i}" for i in range(n)]
    return GatingData(["confident", "discerning"], ids, texts, gold, ["s"] * n, options)


def heldout_cloze_accuracy(data: GatingData, config: TrainConfig, out: Path) -> float:
    embedder = ClusterEmbedder()
    art = train_gating(data, embedder, config, out, progress=False)
    held = data.by_ids(art.heldout_ids)
    values = art.values(embedder.embed(held.texts))
    assert held.options is not None
    right = [
        cloze_choice(o.logprobs, w, o.lengths) == o.answer
        for o, w in zip(held.options, values, strict=True)
    ]
    return float(np.mean(right))


def test_discrimination_training_beats_nll_training_in_cloze_accuracy(tmp_path: Path) -> None:
    data = discriminating_pool()
    nll_only = heldout_cloze_accuracy(data, FAST, tmp_path / "nll")
    config = TrainConfig(**{**FAST.as_dict(), "cloze_weight": 10.0})
    discriminating = heldout_cloze_accuracy(data, config, tmp_path / "cloze")
    # kind 0 (half the prompts) goes from chance to right; kind 1 stays at chance
    print(f"held-out cloze accuracy: eq. 13 {nll_only:.3f}, with the term {discriminating:.3f}")
    assert nll_only < 0.3
    assert discriminating > nll_only + 0.25
    meta = json.loads((tmp_path / "cloze" / "gating.json").read_text())
    assert meta["config"]["cloze_weight"] == 10.0
    assert meta["data_hash"] == data.data_hash()


def test_at_weight_zero_training_is_exactly_eq13s() -> None:
    """The options in the batch change nothing at cloze_weight 0: the same weights, bit for bit,
    as training on the gold log-probabilities alone."""
    data = synthetic(90)
    x = embed_all(ClusterEmbedder(), data.texts, progress=False)
    options = [
        OptionScores([lp, lp - 1.0], [lp.shape[1]] * 2, answer=0) for lp in data.gold_logprobs
    ]
    with_options = GatingData(*(data.expert_ids, data.example_ids, data.texts),
                              data.gold_logprobs, data.subjects, options)  # fmt: skip
    train, val = np.arange(60), np.arange(60, 90)
    config = TrainConfig(**{**FAST.as_dict(), "max_epochs": 8})
    plain = fit(Batch.pick(data, x, train), Batch.pick(data, x, val), config, progress=False)
    same = fit(
        Batch.pick(with_options, x, train), Batch.pick(with_options, x, val), config, progress=False
    )
    pairs = zip(plain.model.state_dict().items(), same.model.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name
    assert plain.history == same.history
    weighted = TrainConfig(**{**config.as_dict(), "cloze_weight": 1.0})
    moved = fit(
        Batch.pick(with_options, x, train), Batch.pick(with_options, x, val), weighted,
        progress=False,
    )  # fmt: skip
    assert moved.history != plain.history  # the term does act when weighted


def test_options_travel_with_the_data_and_only_they_change_its_hash() -> None:
    data = discriminating_pool(12)
    without = GatingData(data.expert_ids, data.example_ids, data.texts, data.gold_logprobs,
                         data.subjects)  # fmt: skip
    assert without.data_hash() != data.data_hash()
    picked = data.by_ids(["syn/5", "syn/2"])
    assert picked.options == [data.options[5], data.options[2]]  # type: ignore[index]
    one = data.with_experts(["discerning"])
    assert one.options is not None and one.options[0].logprobs[0].shape == (1, 1)
    assert float(one.options[0].logprobs[1][0, 0]) == float(data.options[0].logprobs[1][1, 0])  # type: ignore[index]
    with pytest.raises(Moe2Error, match="options"):
        GatingData(*(data.expert_ids, data.example_ids, data.texts), data.gold_logprobs,
                   data.subjects, data.options[:3])  # type: ignore[index]  # fmt: skip


def test_old_configs_load_with_weight_zero_and_bad_weights_are_refused(tmp_path: Path) -> None:
    old = {k: v for k, v in TrainConfig().as_dict().items() if not k.startswith("cloze")}
    assert TrainConfig.from_dict(old).cloze_weight == 0.0
    with pytest.raises(ValueError, match="cloze_weight"):
        TrainConfig(cloze_weight=-1.0)
    with pytest.raises(Moe2Error, match="options=True"):
        train_gating(synthetic(30), ClusterEmbedder(), TrainConfig(cloze_weight=1.0),
                     tmp_path / "gate", progress=False)  # fmt: skip


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_takes_the_cloze_weight_and_records_it(tmp_path: Path) -> None:
    outputs = synthetic_store(tmp_path / "outputs", synthetic_examples(12), CLI_EXPERTS)
    gate, quick = tmp_path / "gate", ("--max-epochs", "5", "--no-progress")
    weights = ("--cloze-weight", "2", "--cloze-scale", "4")
    code, _, err = gating("train", "--outputs", str(outputs), "--out", str(gate), *quick, *weights)
    assert code == 0, err
    config = json.loads((gate / "gating.json").read_text())["config"]
    assert (config["cloze_weight"], config["cloze_scale"]) == (2.0, 4.0)
    code, _, err = gating(
        "crossval", "--outputs", str(outputs), "--folds", "2", "--max-epochs", "5",
        "--cloze-weight", "3", "--no-progress", "--out", str(tmp_path / "cv"),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "cv.json").read_text())["config"]["cloze_weight"] == 3.0
    code, _, err = gating("train", "--outputs", str(outputs), "--out", str(gate),
                          "--cloze-weight", "-1", "--no-progress")  # fmt: skip
    assert code == 1 and "cloze_weight must be >= 0" in err
