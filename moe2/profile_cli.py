"""``moe2 profile``: measure one live expert over the bus, write its cost profile (TOML, PNG).

moe2/cli.py mounts ``profile`` as a command; ``app`` serves it alone (for tests and scripts).
Everything it says goes to stderr, and every energy figure names the meter that produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final

import typer

from moe2.cli_support import fail, run_async
from moe2.runtime.logs import configure_logging
from moe2.selection.profiling import ExpertProfile

app = typer.Typer(pretty_exceptions_enable=False)
DEFAULT_LENGTHS: Final = "16,32,64,128,256,512,1024,2048"
_DECLARED: Final = "declared, i.e. the expert's declared power_w times measured compute time"


@app.command()
def profile(
    expert: Annotated[str, typer.Option("--expert", help="The id of the expert to measure.")],
    out: Annotated[Path, typer.Option("--out", help="The profile TOML to write.")],
    nats_url: Annotated[
        str, typer.Option("--nats", "--url", help="NATS server URL.", envvar="MOE2_NATS")
    ] = "nats://127.0.0.1:4222",
    lengths: Annotated[
        str, typer.Option(help="Prompt lengths in tokens, comma-separated.")
    ] = DEFAULT_LENGTHS,
    decode_steps: Annotated[int, typer.Option(help="Decode steps after each prefill.")] = 8,
    repeats: Annotated[int, typer.Option(help="Sessions per prompt length.")] = 3,
    plot: Annotated[Path | None, typer.Option(help="Also draw the profile to this PNG.")] = None,
    prefix: Annotated[str, typer.Option(help="Subject prefix shared by every agent.")] = "moe2",
    wait: Annotated[float, typer.Option(help="Seconds to wait for its heartbeat.")] = 10.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Measure a live expert's prefill, decode, energy and transmission against prompt length,
    fit the paper's eq. 4 and write the profile the selection reads."""
    configure_logging("warning")
    from moe2.agents.measure.profiler import ProfilerConfig, profile_expert

    try:
        config = ProfilerConfig(
            expert=expert,
            lengths=_parse_lengths(lengths),
            decode_steps=decode_steps,
            repeats=repeats,
            prefix=prefix,
            wait_s=wait,
            progress=progress,
        )
    except ValueError as exc:
        fail("invalid_field", str(exc), status=2)
    measured = run_async(lambda: profile_expert(nats_url, config, _note))
    if measured is None:
        raise typer.Exit(130)  # interrupted: nothing written
    _write(measured, out, plot)


def _parse_lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--lengths takes comma-separated token counts, got {text!r}") from None


def _note(text: str) -> None:
    typer.echo(f"· {text}", err=True)


def _write(measured: ExpertProfile, out: Path, plot: Path | None) -> None:
    from moe2.selection.profiling import plot_profile, profile_toml

    for line in summary_lines(measured):
        _note(line)
    source = measured.energy_source
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_toml(measured))
    _note(f"wrote {out} (energy source: {source})")
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_profile(measured, plot)
        _note(f"wrote {plot} (energy source: {source})")


def summary_lines(measured: ExpertProfile) -> list[str]:
    """The fitted figures, each energy figure with the meter that produced it."""
    fit, source = measured.fit, _source(measured)
    longest = measured.points[-1].prompt_tokens
    return [
        f"prefill: {fit.prefill.base * 1e3:.2f} ms + {fit.prefill.slope * 1e3:.4f} ms/token "
        f"({fit.prefill.at(longest):.3f} s at {longest} tokens)",
        f"decode: {fit.decode.base * 1e3:.2f} ms + {fit.decode.slope * 1e6:.3f} µs per context "
        f"token, per token ({fit.decode.at(longest) * 1e3:.1f} ms at {longest} tokens)",
        f"transmission: {fit.transmission_s * 1e3:.2f} ms per step (round trip minus compute)",
        f"power: {fit.power_w:.2f} W; prefill of {longest} tokens "
        f"{measured.points[-1].prefill_j:.2f} J; decode {measured.points[0].decode_j:.3f} J/token "
        f"at {measured.points[0].prompt_tokens} tokens (energy source: {source})",
    ]


def _source(measured: ExpertProfile) -> str:
    return _DECLARED if measured.energy_source == "declared" else measured.energy_source


if __name__ == "__main__":  # python -m moe2.profile_cli, until the moe2 command mounts it
    app()
