"""``moe2 experts …``: build domain experts from the fine-tuning data (MoE² Sec. V-A, App. A).

Mounted by moe2/cli.py. Heavy imports (torch, sentence-transformers, scikit-learn) happen inside
the commands.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moe2.gating_cli import user_errors
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.logs import configure_logging

if TYPE_CHECKING:
    from moe2.agents.expert.lora import Recipe
    from moe2.gating.clusters import ClusterSummary

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)

# ARC-Easy and ARC-Challenge train, and AGIEval's English MC files: sat-en-without-passage is
# left out, it repeats sat-en's questions without their passages.
FINE_TUNING_FILES = (
    "arc/arc_easy/train.jsonl",
    "arc/arc_challenge/train.jsonl",
    "agieval/aqua-rat.jsonl",
    "agieval/lsat-ar.jsonl",
    "agieval/lsat-lr.jsonl",
    "agieval/lsat-rc.jsonl",
    "agieval/sat-en.jsonl",
    "agieval/sat-math.jsonl",
)
EMBED_BATCH = 64


@app.callback()
def experts() -> None:
    """Domain experts: cluster the fine-tuning data, fine-tune one LoRA expert per cluster."""


def default_data() -> list[Path]:
    """The fine-tuning files under ``$MOE2_DATA`` (or ``../shared/data``)."""
    root = Path(os.environ.get("MOE2_DATA", "../shared/data"))
    return [root / f for f in FINE_TUNING_FILES]


@app.command()
def cluster(
    out: Annotated[Path, typer.Option("--out", help="Directory for the report and the plot.")],
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            help="ARC/AGIEval .jsonl files or directories (repeat). Default: ARC-Easy and "
            "ARC-Challenge train and AGIEval under $MOE2_DATA (../shared/data).",
        ),
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Clusters: one expert each.")] = 8,
    seed: Annotated[int, typer.Option(help="K-means and projection seed.")] = 0,
    embedder: Annotated[str, typer.Option(help="The gating's embedder.")] = "all-MiniLM-L6-v2",
    progress: Annotated[bool, typer.Option(help="Progress bar while embedding.")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    """Cluster the fine-tuning prompts by embedding (K-means), report and draw the clusters."""
    configure_logging(log_level)
    with user_errors():
        paths = list(data or default_data())
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"no such data: {', '.join(missing)}")
        started = time.perf_counter()
        summaries, files = _cluster(paths, out, k, seed, embedder, progress)
        took = time.perf_counter() - started
    from moe2.gating.clusters import report_table

    typer.echo(report_table(summaries))
    typer.echo(f"wrote {', '.join(str(f) for f in files)} in {took:.1f} s")


def _cluster(
    paths: list[Path], out: Path, k: int, seed: int, embedder_name: str, progress: bool
) -> tuple[list[ClusterSummary], list[Path]]:
    import numpy as np
    from tqdm import tqdm

    from moe2.gating.clusters import (
        cluster_examples,
        data_hash,
        describe,
        plot_clusters,
        project_2d,
        refuse_mmlu,
        write_report,
    )
    from moe2.gating.data import embed_text, load_examples
    from moe2.gating.embed import load_embedder

    examples = [ex for p in paths for ex in load_examples(p)]
    refuse_mmlu(examples)
    embedder = load_embedder(embedder_name)
    texts = [embed_text(ex) for ex in examples]
    batches = range(0, len(texts), EMBED_BATCH)
    chunks = [
        embedder.embed(texts[i : i + EMBED_BATCH])
        for i in tqdm(batches, desc="embed", unit="batch", disable=not progress)
    ]
    embeddings = np.concatenate(chunks)
    clustering = cluster_examples(examples, embeddings, k, seed)
    summaries = describe(examples, clustering)
    meta = {
        "embedder": embedder.name,
        "data": [str(p) for p in paths],
        "data_sha256": data_hash(paths),
        "examples": len(examples),
    }
    json_path, md_path = write_report(out, clustering, summaries, meta)
    png = out / "clusters.png"
    plot_clusters(project_2d(embeddings, seed), clustering, summaries, png)
    return list(summaries), [json_path, md_path, png]


@app.command()
def finetune(
    clusters: Annotated[
        Path, typer.Option("--clusters", help="The directory with clusters.json (experts cluster).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Adapters directory: cluster-<i>/ each.")],
    model: Annotated[str, typer.Option(help="Base model: built-in name, .gguf or HF dir.")] = (
        "smollm2-135m"
    ),
    clusters_only: Annotated[
        str | None, typer.Option("--clusters-only", help="Comma-separated clusters, e.g. 0,3.")
    ] = None,
    examples: Annotated[int, typer.Option(help="Examples per cluster, at most.")] = 256,
    epochs: Annotated[int, typer.Option(help="Passes over each cluster's examples.")] = 2,
    rank: Annotated[int, typer.Option(help="LoRA rank r (alpha = 2r).")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per example, prompt and answer.")] = 128,
    batch: Annotated[int, typer.Option(help="Examples per optimiser step.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-4,
    seed: Annotated[int, typer.Option(help="Examples, order, LoRA init and dropout.")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads; 0: torch's default.")] = 0,
    progress: Annotated[bool, typer.Option(help="A progress bar per cluster.")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    """One LoRA adapter per cluster on the base model (resumable: complete adapters are kept)."""
    import shlex

    configure_logging(log_level)
    with user_errors():
        from moe2.agents.expert.lora import Recipe

        recipe = Recipe(
            rank=rank, alpha=2 * rank, epochs=epochs, seq_len=seq_len, batch=batch, lr=lr,
            examples=examples, seed=seed,
        )  # fmt: skip
        only = ["--clusters-only", clusters_only] if clusters_only else []
        command = shlex.join(
            [
                *("moe2", "experts", "finetune", "--clusters", str(clusters), "--out", str(out)),
                *("--model", model, *only, "--examples", str(examples), "--epochs", str(epochs)),
                *("--rank", str(rank), "--seq-len", str(seq_len), "--batch", str(batch)),
                *("--lr", f"{lr:g}", "--seed", str(seed)),
            ]
        )  # what reproduces the adapters, however this was invoked
        _finetune(clusters, out, model, clusters_only, recipe, threads, progress, command)


def _finetune(
    clusters: Path,
    out: Path,
    model: str,
    only: str | None,
    recipe: Recipe,
    threads: int,
    progress: bool,
    command: str,
) -> None:
    import torch
    from tqdm import tqdm

    from moe2.agents.expert.backends.transformers_backend import load_model_and_tokenizer
    from moe2.agents.expert.lora import finetune_cluster, load_clusters
    from moe2.agents.expert.models import resolve_model

    if threads:
        torch.set_num_threads(threads)
    data = load_clusters(clusters)
    chosen = _cluster_list(only, int(data.record["k"]))
    source = resolve_model(model)
    base, tokenizer = load_model_and_tokenizer(source)
    meta = {"base_model": source.name, "base_path": str(source.path), "command": command}

    def bar(total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="step", disable=not progress)

    for cluster in chosen:
        record = finetune_cluster(base, tokenizer, data, cluster, recipe, meta, out, bar)
        if record is None:
            typer.echo(f"cluster {cluster}: complete adapter kept (resumed)")
        else:
            typer.echo(
                f"cluster {cluster}: {record['examples']} examples, loss "
                f"{record['epoch_losses'][0]:.3f} -> {record['epoch_losses'][-1]:.3f}, "
                f"{record['examples_per_s']:.2f} examples/s, {record['wall_s']:.0f} s"
            )


def _cluster_list(only: str | None, k: int) -> list[int]:
    if only is None:
        return list(range(k))
    try:
        chosen = [int(x) for x in only.split(",") if x.strip()]
    except ValueError:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"--clusters-only {only!r}: not numbers") from None
    bad = [c for c in chosen if not 0 <= c < k]
    if bad:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"clusters {bad} are not in 0..{k - 1}")
    return chosen


@app.command()
def compare(
    outputs: Annotated[
        list[Path],
        typer.Option("--outputs", help="A store from `moe2 gating collect` (repeat to join)."),
    ],
    experts: Annotated[str, typer.Option(help="Comma-separated expert ids, base first.")],
    out: Annotated[Path | None, typer.Option(help="Also write the tables: path stem.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    """Do the experts differ? Each one's NLL and cloze accuracy per domain, against the base."""
    configure_logging(log_level)
    import json

    from moe2.gating.domains import domain_table, markdown
    from moe2.gating.evaluate import ScoreArrays
    from moe2.gating.store import OutputStore

    ids = [e.strip() for e in experts.split(",") if e.strip()]
    with user_errors():
        if len(ids) < 2:
            raise Moe2Error(ErrorCode.INVALID_FIELD, "--experts needs a base and one more")
        parts, examples = [], []
        for path in outputs:
            if not path.exists():
                raise Moe2Error(ErrorCode.INVALID_FIELD, f"outputs {path} does not exist")
            store = OutputStore(path)
            arrays = store.score_arrays(experts=ids)
            parts.append(arrays)
            examples += [store.example(i) for i in arrays.example_ids]
        units = {a.unit for a in parts}
        if len(units) != 1:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"the stores count in {sorted(units)}")
        joined = ScoreArrays(
            expert_ids=ids,
            example_ids=[i for a in parts for i in a.example_ids],
            examples=[x for a in parts for x in a.examples],
            unit=units.pop(),
        )
        if len(set(joined.example_ids)) != len(joined.example_ids):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "the stores share examples")
        table = domain_table(joined, examples, base=ids[0])
    text = markdown(table)
    typer.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(table.as_dict(), indent=2) + "\n")
