"""Fine-tune one LoRA adapter per cluster of the fine-tuning prompts (MoE² Sec. V-A, Table V).

Each example becomes one chat turn: the letter prompt (``gating.data.letter_messages``, the
question and its lettered options) and, as the assistant's answer, the correct letter and its
option's text (``"B. carbon dioxide"``) ended by the end-of-turn token. The answer starts with the
letter, so the letter scoring reads what was trained, and goes on with the text, which the cloze
scoring reads. The loss is on the answer's tokens only. A prompt longer than ``seq_len`` minus the
answer loses its beginning (a passage's start), never the options or the answer.

Seeded throughout: which examples (``random.Random``), their order, LoRA's initial weights and
dropout (``torch.manual_seed``). Adapters are written per cluster when it is done; a cluster whose
adapter is complete is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import torch

from moe2.agents.expert.adapters import CONFIG, RECORD, WEIGHTS, is_complete, weights_sha256
from moe2.agents.expert.backends.base import plain_chat_text
from moe2.gating.clusters import data_hash
from moe2.gating.data import LETTERS, McExample, letter_messages, load_examples
from moe2.runtime.errors import ErrorCode, Moe2Error

TARGET_MODULES: Final = ("q_proj", "k_proj", "v_proj", "o_proj")
IGNORE: Final = -100  # the label that the loss skips: prompt and padding positions


@dataclass(frozen=True, slots=True)
class Recipe:
    """How each adapter is trained. Defaults: the paper's Table V scaled to a 2-core CPU."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    epochs: int = 2
    seq_len: int = 128
    batch: int = 8
    lr: float = 2e-4
    examples: int = 256  # per cluster, at most
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Encoded:
    ids: list[int]
    answer_start: int  # ids[answer_start:] is the answer, the only positions with a loss
    truncated: bool


@dataclass(frozen=True, slots=True)
class ClusterData:
    """The clustering a run reads: each example's cluster, and the examples themselves."""

    path: Path  # clusters.json
    record: dict[str, Any]
    examples: dict[str, McExample]

    def members(self, cluster: int) -> list[McExample]:
        ids = [i for i, c in self.record["assignment"].items() if c == cluster]
        return [self.examples[i] for i in ids]


def load_clusters(directory: Path) -> ClusterData:
    """``clusters.json`` and its data, refused if the data changed since it was clustered."""
    path = directory / "clusters.json"
    if not path.is_file():
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"no {path}: run moe2 experts cluster first")
    record = json.loads(path.read_text())
    files = [Path(p) for p in record["data"]]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"{path} was clustered from data that is not here: {', '.join(missing[:3])}"
            f"{' …' if len(missing) > 3 else ''} (paths relative to where `moe2 experts cluster` "
            "ran; run from the repository root with the data at ../shared/data)",
        )
    if data_hash(files) != record["data_sha256"]:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"the data in {path} has changed since it was clustered "
            f"(SHA-256 {data_hash(files)}, clustered {record['data_sha256']}): cluster again",
        )
    examples = {ex.id: ex for f in files for ex in load_examples(f)}
    return ClusterData(path, record, examples)


def answer_text(ex: McExample) -> str:
    return f"{LETTERS[ex.answer]}. {ex.options[ex.answer]}"


def prompt_ids(tokenizer: Any, ex: McExample) -> list[int]:
    """The letter prompt as the served expert encodes it (its chat template, or plain text)."""
    messages = letter_messages(ex)
    if tokenizer.chat_template is None:
        return [int(i) for i in tokenizer.encode(plain_chat_text(messages))]
    chat = [{"role": m.role, "content": m.content} for m in messages]
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(i) for i in ids]


def encode_example(tokenizer: Any, ex: McExample, seq_len: int) -> Encoded:
    text = tokenizer.encode(answer_text(ex), add_special_tokens=False)
    answer = [*(int(i) for i in text[: seq_len - 1]), int(tokenizer.eos_token_id)]
    prompt = prompt_ids(tokenizer, ex)
    room = seq_len - len(answer)
    kept = prompt[len(prompt) - room :] if len(prompt) > room else prompt
    return Encoded(kept + answer, len(kept), len(kept) < len(prompt))


def batch_tensors(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (``IGNORE`` outside the answers)."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, e.answer_start : len(e.ids)] = torch.tensor(e.ids[e.answer_start :])
        mask[row, : len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def choose_examples(members: Sequence[McExample], recipe: Recipe, cluster: int) -> list[McExample]:
    rng = random.Random(f"{recipe.seed}/{cluster}")
    return rng.sample(list(members), min(recipe.examples, len(members)))


def epoch_batches(
    encoded: Sequence[Encoded], recipe: Recipe, cluster: int, epoch: int
) -> Iterator[list[Encoded]]:
    order = list(encoded)
    random.Random(f"{recipe.seed}/{cluster}/{epoch}").shuffle(order)
    for start in range(0, len(order), recipe.batch):
        yield order[start : start + recipe.batch]


@dataclass(frozen=True, slots=True)
class Trained:
    model: Any  # the peft model
    step_losses: list[float]
    epoch_losses: list[float]  # mean step loss per epoch
    train_s: float


Progress = Callable[[int, str], Any]  # (total steps, description) -> a tqdm-like bar


def train_adapter(
    base: Any,
    tokenizer: Any,
    encoded: Sequence[Encoded],
    recipe: Recipe,
    cluster: int,
    progress: Progress,
) -> Trained:
    """A LoRA adapter on a copy of ``base`` (left untouched), trained with AdamW."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(recipe.seed * 1000 + cluster)
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(TARGET_MODULES),
        lora_dropout=recipe.dropout,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=recipe.lr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps_per_epoch = -(-len(encoded) // recipe.batch)
    bar = progress(steps_per_epoch * recipe.epochs, f"cluster {cluster}")
    step_losses: list[float] = []
    epoch_losses: list[float] = []
    started = time.perf_counter()
    with bar:
        for epoch in range(recipe.epochs):
            for items in epoch_batches(encoded, recipe, cluster, epoch):
                loss = model(**batch_tensors(items, int(pad))).loss
                loss.backward()
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
                step_losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{step_losses[-1]:.3f}", epoch=epoch)
            epoch_losses.append(sum(step_losses[-steps_per_epoch:]) / steps_per_epoch)
    model.eval()
    return Trained(model, step_losses, epoch_losses, time.perf_counter() - started)


def save_adapter(trained: Trained, directory: Path, record: dict[str, Any]) -> None:
    """Weights in fp16, peft's config, then the record; renamed into place when whole."""
    from safetensors.torch import load_file, save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():  # an interrupted run's leftovers
        shutil.rmtree(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        trained.model.save_pretrained(tmp, save_embedding_layers=False)
        weights = {k: v.half() for k, v in load_file(tmp / WEIGHTS).items()}
        save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
        assert (tmp / CONFIG).is_file()
        record = {**record, "weights_sha256": weights_sha256(tmp)}
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the adapter from other users
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def adapter_dir(out: Path, cluster: int) -> Path:
    return out / f"cluster-{cluster}"


def finetune_cluster(
    base: Any,
    tokenizer: Any,
    data: ClusterData,
    cluster: int,
    recipe: Recipe,
    meta: dict[str, Any],
    out: Path,
    progress: Progress,
) -> dict[str, Any] | None:
    """Train and save one cluster's adapter; None if it is already complete (resumed)."""
    target = adapter_dir(out, cluster)
    if is_complete(target):
        return None
    chosen = choose_examples(data.members(cluster), recipe, cluster)
    if not chosen:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"cluster {cluster} has no examples")
    started = time.perf_counter()
    encoded = [encode_example(tokenizer, ex, recipe.seq_len) for ex in chosen]
    trained = train_adapter(base, tokenizer, encoded, recipe, cluster, progress)
    record = {
        **meta,
        "cluster": cluster,
        "data_sha256": data.record["data_sha256"],
        "clusters": str(data.path),
        "recipe": asdict(recipe),
        "target_modules": list(TARGET_MODULES),
        "format": "letter prompt; answer: the correct letter, '. ', its option text, end of turn",
        "examples": len(chosen),
        "example_ids": [ex.id for ex in chosen],
        "truncated": sum(e.truncated for e in encoded),
        "step_losses": [round(x, 5) for x in trained.step_losses],
        "epoch_losses": [round(x, 5) for x in trained.epoch_losses],
        "examples_per_s": round(len(chosen) * recipe.epochs / trained.train_s, 3),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    save_adapter(trained, target, record)
    return record
