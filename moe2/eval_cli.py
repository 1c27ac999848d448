"""``moe2 eval``: the paper's experiments on a pool, from its collected outputs (Fig. 3 analog).

Mounted by moe2/cli.py. Heavy imports happen inside the command.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from moe2.gating_cli import user_errors
from moe2.pool import DEFAULT_POOL
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.logs import configure_logging


def evaluate(
    pool: Annotated[
        Path, typer.Option(help="The pool file: its profiles, budgets and k (deploy/pools/).")
    ] = DEFAULT_POOL,
    outputs: Annotated[
        Path | None, typer.Option(help="A store (moe2 gating collect); default: the pool's.")
    ] = None,
    gate: Annotated[
        Path | None, typer.Option(help="A gating artifact trained on it; default: the pool's.")
    ] = None,
    train_outputs: Annotated[
        Path | None,
        typer.Option(
            help="The store the gate was trained on, when --outputs is another (a test split "
            "collected from the same experts); default: the pool's outputs."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Directory for report.md, report.json, fig3.png.")
    ] = Path("moe2-eval"),
    source: Annotated[
        str,
        typer.Option(
            help="Evaluate only the examples of one data file, by id prefix: mmlu/val, "
            "arc_challenge/dev, arc_easy/test."
        ),
    ] = "",
    sessions: Annotated[
        Path | None,
        typer.Option(
            help="Recorded sessions of the chosen subsets, one trace per S (the cost side); "
            "default: the pool's sessions/."
        ),
    ] = None,
    record_sessions: Annotated[
        int,
        typer.Option(
            help="First record this many real sessions of each S the grid chose (starts the "
            "experts of S as processes, one S at a time) into --sessions; 0: read only.",
        ),
    ] = 0,
    seeds: Annotated[int, typer.Option(help="Seeds of the random-subset baseline.")] = 10,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    threads: Annotated[int, typer.Option(help="torch threads (the embedder).")] = 1,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    """MoE² against single agents, majority voting, SMO and random subsets with equal weights,
    a static weighting and the oracle, with 95% bootstrap intervals (the paper's Fig. 3); the
    budget grid (Tables II–IV); the cost model against recorded sessions; Theorem 1."""
    configure_logging(log_level)
    import torch

    torch.set_num_threads(threads)
    from moe2.pool import load_pool, shown
    from moe2.selection.experiments import PoolCosts, SessionsPlan, run_fig3

    with user_errors():
        if seeds < 1:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"--seeds must be at least 1, got {seeds}")
        if record_sessions < 0:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD, f"--record-sessions must be >= 0, got {record_sessions}"
            )
        loaded = load_pool(pool)
        if outputs is None or gate is None:
            loaded.check_artifacts()
        # paths under the working directory are reported relative to it (shipped reports)
        store = shown(outputs or loaded.outputs)
        artifact = shown(gate or loaded.gate)
        for what, path in (("outputs", store), ("gate", artifact)):
            if not path.exists():
                raise Moe2Error(ErrorCode.INVALID_FIELD, f"{what} {path} does not exist")
        # the pool's gate was trained on the pool's outputs; a gate given alone, on --outputs
        trained_on = train_outputs or (loaded.outputs if gate is None else None)
        trained_on = None if trained_on is None else shown(trained_on)
        pool_name = str(shown(pool))
        costs = PoolCosts(loaded.profiles, loaded.budgets(), loaded.experts_per_prompt, pool_name)
        plan = SessionsPlan(shown(sessions or loaded.sessions), count=record_sessions)
        if record_sessions:
            from moe2.cost_sessions import record_subsets

            answer_tokens = max(a.answer_tokens for a in loaded.profiles.applications.values())
            record = partial(record_subsets, loaded, max_tokens=answer_tokens, progress=progress)
            plan = replace(plan, record=record)
        text, _ = run_fig3(
            store,
            artifact,
            costs,
            out,
            train_outputs=trained_on,
            seeds=seeds,
            progress=progress,
            sessions=plan,
            source=source,
        )
    typer.echo(text)
    typer.echo(f"saved {out}/report.md, report.json and its figures", err=True)
