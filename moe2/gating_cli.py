"""``moe2 gating …``: build a pool, collect expert outputs, train and evaluate the gating network.

Mounted by moe2/cli.py. Heavy imports (torch, sentence-transformers) happen inside the commands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from moe2.cli_support import fail, run_async
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.logs import configure_logging

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
T = TypeVar("T")

NatsUrl = Annotated[str, typer.Option("--nats", help="NATS server URL.", envvar="MOE2_NATS")]
Outputs = Annotated[Path, typer.Option("--outputs", help="A store from `moe2 gating collect`.")]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning or error.")]
ClozeWeight = Annotated[
    float,
    typer.Option(
        help="Weight of the options' discrimination in the loss (docs/gating.md §4): eq. 13 + "
        "this x cross-entropy over the options' length-normalised fused scores; 0: eq. 13 alone."
    ),
]
ClozeScale = Annotated[
    float, typer.Option(help="Scale of the option scores in that cross-entropy (1/temperature).")
]
Threads = Annotated[
    int | None,
    typer.Option(help="torch threads (a small MLP trains fastest on one; 0: torch's default)."),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """A Moe2Error is a one-line message and exit status 1, as everywhere in moe2."""
    try:
        yield
    except Moe2Error as exc:
        fail(exc.code, exc.message)


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"{what} {path} does not exist")
    return path


# ---------------------------------------------------------------------------------------------
# pool


@app.command()
def pool(
    mmlu: Annotated[Path, typer.Option("--mmlu", help="MMLU dev/ (CSV, no header).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the context files.")],
    seed: Annotated[int, typer.Option(help="Seed of the worked-example choice.")] = 0,
    shots: Annotated[int, typer.Option(help="Worked examples per expert.")] = 5,
    nats_url: Annotated[
        str, typer.Option("--nats", help="The bus the printed expert commands join.")
    ] = "nats://127.0.0.1:4222",
) -> None:
    """Write one few-shot context per MMLU group (stem, humanities, social_sciences, other)."""
    from moe2.gating.data import load_examples
    from moe2.gating.pools import build_pool, write_pool

    with user_errors():
        examples = load_examples(_existing(mmlu, "MMLU directory"))
        built = build_pool(examples, seed=seed, shots=shots)
        paths = write_pool(built, out, source=str(mmlu), seed=seed)
    typer.echo(f"wrote {len(paths)} expert contexts and {out / 'pool.json'}; start the experts:")
    for group, path in zip(built, paths, strict=True):
        typer.echo(f"moe2 expert --id {group} --context {path} --nats {nats_url} &")


# ---------------------------------------------------------------------------------------------
# collect


@app.command()
def collect(
    data: Annotated[
        list[Path],
        typer.Option("--data", help="MMLU-layout dir, ARC/AGIEval .jsonl; may be repeated."),
    ],
    out: Annotated[Path, typer.Option("--out", help="The output store (created or resumed).")],
    nats_url: NatsUrl = "nats://127.0.0.1:4222",
    experts: Annotated[
        str | None, typer.Option(help="Comma-separated expert ids (default: all live).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="A seeded sample of N examples from each --data.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample.")] = 0,
    top_k: Annotated[int, typer.Option(help="Top-k kept at every target token.")] = 8,
    concurrency: Annotated[int, typer.Option(help="Requests in flight per expert.")] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds per Score request.")] = 120.0,
    retries: Annotated[int, typer.Option(help="More tries per request.")] = 2,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the experts.")] = 60.0,
    from_trace: Annotated[
        Path | None, typer.Option("--from-trace", help="Build from a `moe2 record` trace.")
    ] = None,
    prefix: Annotated[str, typer.Option(help="Subject prefix.")] = "moe2",
    reuse: Annotated[
        list[Path] | None,
        typer.Option(
            help="An earlier store: copy its answers to the same questions by the same "
            "experts instead of asking again (repeat for more)."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    log_level: LogLevel = "info",
) -> None:
    """Ask every live expert to score every example (letter and cloze formats); resumable."""
    configure_logging(log_level)
    from moe2.agents.measure.collect import (
        CollectConfig,
        choose_examples,
        collect_live,
        store_from_trace,
    )
    from moe2.gating.data import load_examples
    from moe2.gating.store import DatasetSpec, examples_digest

    wanted = tuple(e.strip() for e in experts.split(",") if e.strip()) if experts else None
    with user_errors():
        examples = interleaved(
            [choose_examples(load_examples(_existing(src, "data")), limit, seed) for src in data]
        )
        if not examples:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD, f"{', '.join(map(str, data))} hold no examples"
            )
        if len({ex.id for ex in examples}) != len(examples):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "the --data sources share example ids")
        dataset = DatasetSpec(
            path=" + ".join(str(source) for source in data),
            limit=limit,
            seed=seed,
            examples=len(examples),
            digest=examples_digest(examples),
        )
        if from_trace is not None:
            _existing(from_trace, "trace")
            summary = store_from_trace(
                from_trace, examples, out, dataset, experts=wanted, prefix=prefix
            )
            typer.echo(_summary_line(summary), err=True)
            return
        try:
            config = CollectConfig(
                experts=wanted,
                top_k=top_k,
                concurrency=concurrency,
                timeout_s=timeout,
                retries=retries,
                wait_s=wait,
                prefix=prefix,
                progress=progress,
                reuse=tuple(_existing(p, "reused store") for p in reuse or ()),
            )
        except ValueError as exc:
            raise Moe2Error(ErrorCode.INVALID_FIELD, str(exc)) from None
    result = run_async(lambda: collect_live(nats_url, examples, out, dataset, config))
    if result is None:
        typer.echo(
            f"interrupted: the pairs collected so far are in {out}; "
            "run the same command again to resume",
            err=True,
        )
        raise typer.Exit(130)
    typer.echo(_summary_line(result), err=True)


def interleaved(sources: list[list[T]]) -> list[T]:
    """Round robin over the sources, so that a collection stopped early has some of each."""
    return [
        group[i]
        for i in range(max(map(len, sources), default=0))
        for group in sources
        if i < len(group)
    ]


def _summary_line(s: Any) -> str:
    left = s.pairs - s.done_before - s.collected
    return (
        f"{s.directory}: {s.collected} pairs collected now, {s.done_before} before, "
        f"{s.failed} refused by an expert, {left} still to collect, of {s.pairs} "
        f"({s.seconds:.1f} s)"
    )


# ---------------------------------------------------------------------------------------------
# train, theorem1


@app.command()
def train(
    outputs: Outputs,
    out: Annotated[Path, typer.Option("--out", help="Directory for the gating artifact.")],
    embedder: Annotated[str, typer.Option(help="Sentence embedder (name or dir).")] = (
        "all-MiniLM-L6-v2"
    ),
    hidden: Annotated[int, typer.Option(help="Hidden units per layer.")] = 128,
    layers: Annotated[int, typer.Option(help="Hidden layers.")] = 2,
    dropout: Annotated[float, typer.Option(help="Dropout.")] = 0.1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-2,
    batch: Annotated[int, typer.Option(help="Examples per batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimiser step.")] = 8,
    clip: Annotated[float, typer.Option(help="Gradient norm clip.")] = 1.0,
    plateau_factor: Annotated[float, typer.Option(help="ReduceLROnPlateau factor.")] = 0.8,
    plateau_patience: Annotated[int, typer.Option(help="ReduceLROnPlateau patience.")] = 50,
    max_epochs: Annotated[int | None, typer.Option(help="Epochs at most.")] = None,
    early_stop_patience: Annotated[
        int | None, typer.Option(help="Epochs without a better validation loss.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split and the training.")] = 0,
    holdout: Annotated[
        float, typer.Option(help="Share of examples held out for evaluation only.")
    ] = 0.2,
    validation: Annotated[
        float, typer.Option(help="Share of examples for early stopping (not evaluation).")
    ] = 0.2,
    experts: Annotated[
        str | None, typer.Option(help="Comma-separated expert ids (default: the store's).")
    ] = None,
    cloze_weight: ClozeWeight = 0.0,
    cloze_scale: ClozeScale = 1.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    threads: Threads = 1,
    log_level: LogLevel = "info",
) -> None:
    """Train the gating MLP (eq. 13, Table VI) on a store; writes the artifact to --out."""
    configure_logging(log_level)
    _torch_threads(threads)
    from moe2.gating.artifact import ExpertModel
    from moe2.gating.embed import load_embedder
    from moe2.gating.store import OutputStore
    from moe2.gating.train import TrainConfig, train_gating

    given = {
        "hidden": hidden,
        "layers": layers,
        "dropout": dropout,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch": batch,
        "grad_accum": grad_accum,
        "clip": clip,
        "plateau_factor": plateau_factor,
        "plateau_patience": plateau_patience,
        "max_epochs": max_epochs,
        "early_stop_patience": early_stop_patience,
        "seed": seed,
        "holdout": holdout,
        "validation": validation,
        "cloze_weight": cloze_weight,
        "cloze_scale": cloze_scale,
    }
    with user_errors():
        store = OutputStore(_existing(outputs, "outputs"))
        data = store.to_gating_data(options=cloze_weight > 0)
        if experts:
            data = data.with_experts(_ids(experts))
        config = _config(TrainConfig, {k: v for k, v in given.items() if v is not None})
        served = {e.id: ExpertModel(e.model, e.tokenizer) for e in store.meta.experts}
        artifact = train_gating(
            data, load_embedder(embedder), config, out, progress=progress, identities=served
        )
    typer.echo(f"gating artifact in {out}: {_metrics_line(artifact.metadata)}", err=True)


def _ids(experts: str) -> list[str]:
    return [e.strip() for e in experts.split(",") if e.strip()]


def _torch_threads(threads: int | None) -> None:
    """Thread contention costs a small MLP far more than it gains (seconds per epoch, measured
    on a busy 2-core box, against milliseconds on one thread)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _config(cls: Callable[..., T], values: dict[str, Any]) -> T:
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"training configuration: {exc}") from None


def _metrics_line(metadata: dict[str, Any]) -> str:
    metrics = metadata.get("metrics", {})
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )


@app.command()
def theorem1(
    outputs: Outputs,
    subsets: Annotated[int, typer.Option(help="Random subsets S to try.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the subsets.")] = 0,
    max_epochs: Annotated[int | None, typer.Option(help="Epochs at most per training.")] = None,
    embedder: Annotated[str, typer.Option(help="Sentence embedder (name or dir).")] = (
        "all-MiniLM-L6-v2"
    ),
    out: Annotated[
        Path | None, typer.Option(help="Also save the table: path stem (.md and .json).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    threads: Threads = 1,
    log_level: LogLevel = "warning",
) -> None:
    """Theorem 1: held-out loss of the full-set gating renormalised on S vs one retrained on S."""
    configure_logging(log_level)
    _torch_threads(threads)
    import json

    from moe2.gating.embed import load_embedder
    from moe2.gating.model import TrainConfig
    from moe2.gating.store import OutputStore
    from moe2.gating.theorem import QUICK, theorem1_check

    with user_errors():
        data = OutputStore(_existing(outputs, "outputs")).to_gating_data()
        changes = {} if max_epochs is None else {"max_epochs": max_epochs}
        config = _config(TrainConfig, {**QUICK.as_dict(), **changes})
        table = theorem1_check(
            data, load_embedder(embedder), config, subsets=subsets, seed=seed, progress=progress
        )
    typer.echo(table.markdown())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table.markdown() + "\n")
        out.with_suffix(".json").write_text(json.dumps(list(table), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# eval


@app.command(name="eval")
def evaluate(
    outputs: Outputs,
    gate: Annotated[Path, typer.Option("--gate", help="A gating artifact directory.")],
    split: Annotated[
        str, typer.Option(help="heldout: the gate's held-out ids; all: every example.")
    ] = "heldout",
    out: Annotated[
        Path | None, typer.Option(help="Report path stem (.md and .json are written).")
    ] = None,
    log_level: LogLevel = "warning",
) -> None:
    """Per-token NLL and letter / cloze accuracy of every weighting, on held-out examples."""
    configure_logging(log_level)
    from moe2.gating.evaluate import run_evaluation

    with user_errors():
        if split not in ("heldout", "all"):
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"--split is heldout or all, not {split!r}")
        stem = out or _existing(outputs, "outputs") / f"eval-{split}"
        table = run_evaluation(_existing(outputs, "outputs"), _existing(gate, "gate"), split, stem)
    typer.echo(table)
    typer.echo(f"saved {stem.with_suffix('.md')} and {stem.with_suffix('.json')}", err=True)


@app.command()
def crossval(
    outputs: Outputs,
    folds: Annotated[int, typer.Option(help="Folds: K gates, each judged on its own fold.")] = 5,
    experts: Annotated[
        str | None, typer.Option(help="Comma-separated expert ids (default: the store's).")
    ] = None,
    embedder: Annotated[str, typer.Option(help="Sentence embedder (name or dir).")] = (
        "all-MiniLM-L6-v2"
    ),
    max_epochs: Annotated[int | None, typer.Option(help="Epochs at most per gate.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the folds and the training.")] = 0,
    cloze_weight: ClozeWeight = 0.0,
    cloze_scale: ClozeScale = 1.0,
    out: Annotated[
        Path | None, typer.Option(help="Report path stem (.md and .json are written).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    threads: Threads = 1,
    log_level: LogLevel = "warning",
) -> None:
    """Cross-fitted evaluation: every example judged by a gate trained without it (K folds)."""
    configure_logging(log_level)
    _torch_threads(threads)
    from moe2.gating.crossfit import run_crossfit
    from moe2.gating.embed import load_embedder
    from moe2.gating.model import TrainConfig

    with user_errors():
        if folds < 2:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"--folds must be 2 or more, got {folds}")
        changes: dict[str, Any] = {
            "seed": seed,
            "cloze_weight": cloze_weight,
            "cloze_scale": cloze_scale,
        }
        if max_epochs is not None:
            changes["max_epochs"] = max_epochs
        config = _config(TrainConfig, changes)
        stem = out or _existing(outputs, "outputs") / f"crossval-{folds}"
        text, _ = run_crossfit(
            _existing(outputs, "outputs"),
            load_embedder(embedder),
            config,
            folds,
            stem,
            experts=_ids(experts) if experts else None,
            progress=progress,
        )
    typer.echo(text)
    typer.echo(f"saved {stem.with_suffix('.md')} and {stem.with_suffix('.json')}", err=True)
