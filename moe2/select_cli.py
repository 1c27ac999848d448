"""``moe2 select``: choose the subset S of experts (problem 19) offline, from profiles, a gating
artifact and the outputs it was trained on."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Annotated

import anyio
import typer

from moe2.cli_support import fail
from moe2.runtime import wire
from moe2.runtime.errors import Moe2Error
from moe2.runtime.logs import configure_logging
from moe2.selection.problem import Candidate, Solution

_HEARD_BUFFER = 64  # announcements waiting for the printer

METHODS = ("smo", "brute", "greedy", "random")


def parse_limits(values: list[str]) -> dict[str, float]:
    """``["chat=1.0", "code=2.5"]`` → ``{"chat": 1.0, "code": 2.5}`` (seconds)."""
    out: dict[str, float] = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not sep or not name or not seconds > 0:
            raise typer.BadParameter(f"{item!r}: give APP=SECONDS, e.g. chat=1.0")
        out[name] = seconds
    return out


def select(
    profiles: Annotated[
        list[Path], typer.Option("--profiles", help="Profile TOML files (repeat to merge).")
    ],
    gate: Annotated[Path, typer.Option(help="A gating artifact (moe2 gating train).")],
    outputs: Annotated[Path, typer.Option(help="The store the gate was trained on.")],
    tau: Annotated[
        list[str] | None,
        typer.Option(help="Delay limit APP=SECONDS per application (eq. 9); repeatable."),
    ] = None,
    energy: Annotated[
        float | None, typer.Option(help="Energy budget per answer, joules (eq. 12).")
    ] = None,
    method: Annotated[
        list[str] | None, typer.Option(help=f"Solver(s) to run: {', '.join(METHODS)}.")
    ] = None,
    eps: Annotated[float, typer.Option(help="SMO's ε, nats per token.")] = 1e-4,
    split: Annotated[str, typer.Option(help="heldout (the gate's) or all.")] = "heldout",
    runners_up: Annotated[int, typer.Option(help="How many runners-up to print.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    """Print the chosen S, its predicted delay, energy and loss, and the runners-up."""
    configure_logging(log_level)
    from moe2.selection.live import build_problem
    from moe2.selection.profiles import load_profiles
    from moe2.selection.smo import brute_force, greedy, random_subset, smo
    from moe2.selection.sources import oracle_from_outputs

    chosen = method or ["smo"]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; choose from {list(METHODS)}")
    limits = parse_limits(tau or [])
    try:
        oracle = oracle_from_outputs(outputs, gate, split)
        problem, notes = build_problem(
            load_profiles(profiles), oracle, limits, energy, runners_up + 1
        )
        solvers = {
            "smo": lambda: smo(problem, eps=eps, keep=runners_up + 1),
            "brute": lambda: brute_force(problem, keep=runners_up + 1),
            "greedy": lambda: greedy(problem, keep=runners_up + 1),
            "random": lambda: random_subset(problem, seed=0),
        }
        results = []
        for name in chosen:
            problem.oracle.reset_counts()  # each solver pays for its own oracle calls
            results.append(solvers[name]())
    except Moe2Error as exc:
        fail(exc.code, exc.message)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    if as_json:
        typer.echo(json.dumps([solution_dict(r) for r in results], indent=2))
        return
    for result in results:
        typer.echo(solution_text(result, problem.size))


def solution_text(result: Solution, pool: int) -> str:
    """What an operator reads: the chosen S, its figures, the runners-up, and the effort."""
    lines = [f"{result.method}: S = {{{', '.join(result.experts)}}}", _figures(result.chosen)]
    effort = f"  {result.oracle_calls} oracle calls of 2^{pool} = {2**pool} subsets"
    if result.boxes:
        effort += f", {_count(result.boxes, 'box', 'boxes')}, {_count(result.bounds, 'bound')}"
    lines.append(f"{effort}, {result.wall_s * 1e3:.1f} ms")
    if result.monotone_violations:
        lines.append(
            f"  the loss fell {result.monotone_violations} times when an expert was removed "
            f"(up to {result.max_violation:.4f} nats/token): Theorem 2 does not hold here"
        )
    for i, other in enumerate(result.runners_up, 1):
        lines.append(f"  runner-up {i}: {{{', '.join(other.experts)}}}")
        lines.append("  " + _figures(other))
    return "\n".join(lines)


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _figures(c: Candidate) -> str:
    delays = ", ".join(f"{app} {seconds:.3f} s" for app, seconds in c.delay_s.items())
    return f"  loss {c.loss:.4f} nats/token, delay {delays}, energy {c.energy_j:.2f} J"


def solution_dict(result: Solution) -> dict[str, object]:
    return {
        "method": result.method,
        "chosen": vars(result.chosen),
        "runners_up": [vars(c) for c in result.runners_up],
        "oracle_calls": result.oracle_calls,
        "boxes": result.boxes,
        "bounds": result.bounds,
        "wall_s": result.wall_s,
        "monotone_violations": result.monotone_violations,
    }


def watch(
    nats_url: Annotated[
        str, typer.Option("--nats", help="NATS server URL.", envvar="MOE2_NATS")
    ] = "nats://127.0.0.1:4222",
    prefix: Annotated[str, typer.Option(help="Subject prefix.")] = "moe2",
    once: Annotated[bool, typer.Option(help="Print the next announcement and exit.")] = False,
    timeout: Annotated[float, typer.Option(help="With --once: seconds to wait.")] = 15.0,
) -> None:
    """Print the subsets S the fusion agents choose, as they announce them."""
    from moe2.cli_support import run_async

    async def main() -> None:
        printed: dict[str, int] = {}  # agent -> the last version printed (agents repeat it)
        async for message in announcements(nats_url, prefix, timeout if once else None):
            if printed.get(message.agent) == message.version:
                continue
            printed[message.agent] = message.version
            stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
            typer.echo(f"{stamp} {announcement_text(message)}")
            if once:
                return

    run_async(main)


async def announcements(
    url: str, prefix: str, wait_s: float | None
) -> AsyncIterator[wire.SubsetAnnouncement]:
    """The ``SubsetAnnouncement`` messages on ``<prefix>.v1.selection``, as they arrive
    (anything else there is answered or logged by the endpoint and skipped)."""
    from moe2.runtime.connection import close_nats, connect_nats
    from moe2.runtime.endpoint import Endpoint, Request
    from moe2.runtime.errors import ErrorCode
    from moe2.runtime.subjects import Subjects

    send, heard = anyio.create_memory_object_stream[wire.SubsetAnnouncement](_HEARD_BUFFER)

    async def on_announcement(request: Request[wire.SubsetAnnouncement]) -> None:
        try:
            send.send_nowait(request.message)
        except anyio.WouldBlock:  # a printer this far behind: keep the older announcements
            raise Moe2Error(ErrorCode.BUSY, "the watcher is behind; announcement dropped") from None

    nc = await connect_nats(url, name="moe2-selection-watch")
    try:
        watch = Endpoint(
            nc, "selection", Subjects(prefix).selection, wire.SubsetAnnouncement, on_announcement
        )
        await watch.subscribe()
        while True:
            with anyio.move_on_after(wait_s if wait_s is not None else math.inf) as waited:
                message = await heard.receive()
            if waited.cancelled_caught:
                raise Moe2Error(
                    ErrorCode.TIMEOUT, f"no fusion agent announced a selection in {wait_s:g} s"
                )
            yield message
    finally:
        send.close()
        heard.close()
        await close_nats(nc)


def announcement_text(m: wire.SubsetAnnouncement) -> str:
    head = f"{m.agent} v{m.version} ({m.reason}): S = {{{', '.join(m.experts)}}}"
    if m.error:
        return f"{head}  error {m.error}"
    delays = ", ".join(f"{a} {s:.3f} s" for a, s in m.delay_s.items())
    loss = "-" if m.loss is None else f"{m.loss:.4f}"
    energy = "-" if m.energy_j is None else f"{m.energy_j:.2f} J"
    left = "".join(f"\n  left out {e}: {why}" for e, why in m.left_out.items())
    return f"{head}  loss {loss}, delay {delays}, energy {energy}, live {m.live}{left}"
