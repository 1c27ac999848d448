"""An expert's measured cost profile: raw samples in, the paper's eq. 4 fit and its TOML out.

Pure: no bus, no clock. ``agents/measure/profiler.py`` measures the samples on a live expert;
this module turns them into per-length points, fits

    prefill(L) = prefill_base_s + prefill_per_token_s * L
    decode(L)  = decode_base_s + decode_per_context_token_s * L

(L: prompt tokens; least squares with both coefficients kept >= 0), ``power_w`` = measured joules /
measured compute seconds and ``transmission_s`` = the median per-step round trip minus compute,
and writes the ``[experts.<id>]`` TOML the selection's profile loader reads.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


@dataclass(frozen=True, slots=True)
class StepSample:
    """One step of one profiling session: step 0 is the prefill, steps >= 1 decode one token."""

    session: str
    prompt_tokens: int
    step: int
    compute_s: float  # the slice's compute_s
    energy_j: float  # the slice's energy_j
    wall_s: float  # from publishing Open/Step to receiving the slice


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    """One prompt length, the median over its sessions of each session's prefill and mean
    per-token decode (a session disturbed by another process on the box does not count)."""

    prompt_tokens: int
    prefill_s: float
    prefill_j: float
    decode_s: float
    decode_j: float


MEASURED = ("prefill_s", "prefill_j", "decode_s", "decode_j")  # the measured arrays after lengths


class Line(NamedTuple):
    """``base + slope * x``."""

    base: float
    slope: float

    def at(self, x: float) -> float:
        return self.base + self.slope * x


@dataclass(frozen=True, slots=True)
class ProfileFit:
    prefill: Line  # seconds, against prompt tokens
    decode: Line  # seconds per token, against prompt (context) tokens
    power_w: float
    transmission_s: float


@dataclass(frozen=True, slots=True)
class ExpertProfile:
    """Everything the TOML holds: who was measured, on what, by which meter, and the results."""

    expert: str
    model: str
    backend: str
    device: str
    energy_source: str
    host: str
    measured_at: str  # UTC, ISO 8601
    fit: ProfileFit
    points: tuple[ProfilePoint, ...]


def summarise(samples: Iterable[StepSample]) -> list[ProfilePoint]:
    """One point per measured prompt length, shortest first."""
    sessions: dict[int, dict[str, list[StepSample]]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        sessions[sample.prompt_tokens][sample.session].append(sample)
    return [_point(length, list(sessions[length].values())) for length in sorted(sessions)]


def _point(length: int, sessions: Sequence[Sequence[StepSample]]) -> ProfilePoint:
    each = np.array([_session_figures(steps) for steps in sessions])
    prefill_s, prefill_j, decode_s, decode_j = np.median(each, axis=0).tolist()
    return ProfilePoint(length, prefill_s, prefill_j, decode_s, decode_j)


def _session_figures(steps: Sequence[StepSample]) -> tuple[float, float, float, float]:
    """Prefill seconds and joules, and the mean seconds and joules of its decode steps."""
    prefill = next(s for s in steps if s.step == 0)
    decodes = [s for s in steps if s.step > 0]
    mean = statistics.fmean
    return (
        prefill.compute_s,
        prefill.energy_j,
        mean(s.compute_s for s in decodes) if decodes else 0.0,
        mean(s.energy_j for s in decodes) if decodes else 0.0,
    )


def fit_line(x: Sequence[float], y: Sequence[float]) -> Line:
    """Least squares ``y = base + slope * x`` with ``base, slope >= 0`` (exact for two unknowns).

    Needs at least two distinct x. When the unconstrained fit has a negative coefficient, the
    optimum lies on a boundary: the better of ``slope = 0`` and ``base = 0`` is returned.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(set(xs.tolist())) < 2:
        raise ValueError("a line needs points at two or more distinct x")
    design = np.column_stack([np.ones_like(xs), xs])
    (base, slope), *_ = np.linalg.lstsq(design, ys, rcond=None)
    if base >= 0 and slope >= 0:
        return Line(float(base), float(slope))
    flat = Line(max(0.0, float(ys.mean())), 0.0)
    through_zero = Line(0.0, max(0.0, float(xs @ ys / (xs @ xs))))
    return min((flat, through_zero), key=lambda line: _squared_error(line, xs, ys))


def _squared_error(line: Line, xs: np.ndarray, ys: np.ndarray) -> float:
    return float(((line.base + line.slope * xs - ys) ** 2).sum())


def fit_profile(samples: Sequence[StepSample]) -> tuple[ProfileFit, list[ProfilePoint]]:
    """Eq. 4 fitted to the per-length points; power and transmission from every sample."""
    points = summarise(samples)
    lengths = [p.prompt_tokens for p in points]
    compute_s = sum(s.compute_s for s in samples)
    fit = ProfileFit(
        prefill=fit_line(lengths, [p.prefill_s for p in points]),
        decode=fit_line(lengths, [p.decode_s for p in points]),
        power_w=sum(s.energy_j for s in samples) / compute_s if compute_s > 0 else 0.0,
        transmission_s=max(0.0, statistics.median(s.wall_s - s.compute_s for s in samples)),
    )
    return fit, points


# --- TOML ----------------------------------------------------------------------------------------


def profile_toml(profile: ExpertProfile) -> str:
    """The profile in the one TOML shape the selection's loader reads (units in key suffixes)."""
    p, fit = profile, profile.fit
    return "\n".join(
        [
            f"# measured by `moe2 profile` on {p.host} at {p.measured_at}; "
            f"energy source: {p.energy_source}",
            f"[experts.{p.expert}]",
            f"model = {_string(p.model)}",
            f"backend = {_string(p.backend)}",
            f"device = {_string(p.device)}",
            f"energy_source = {_string(p.energy_source)}"
            "  # nvml | rapl | declared: which meter produced the joules",
            "",
            f"[experts.{p.expert}.fit]",
            f"prefill_base_s = {_float(fit.prefill.base)}",
            f"prefill_per_token_s = {_float(fit.prefill.slope)}",
            f"decode_base_s = {_float(fit.decode.base)}",
            f"decode_per_context_token_s = {_float(fit.decode.slope)}",
            f"power_w = {_float(fit.power_w)}",
            f"transmission_s = {_float(fit.transmission_s)}"
            "  # median per-step round trip minus compute",
            "",
            f"[experts.{p.expert}.measured]  # the raw points, for plots and re-fits",
            f"prompt_tokens = [{', '.join(str(x.prompt_tokens) for x in p.points)}]",
            *(_floats(name, p.points) for name in MEASURED),
            "",
        ]
    )


def _string(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(value, ensure_ascii=False)


def _float(value: float) -> str:
    """Six significant digits, always written as a TOML float (``15.0``, ``2.1e-06``)."""
    if not math.isfinite(value):
        raise ValueError(f"a profile value must be finite, got {value}")
    return repr(float(f"{value:.6g}"))


def _floats(name: str, points: Sequence[ProfilePoint]) -> str:
    values = ", ".join(_float(getattr(point, name)) for point in points)
    return f"{name} = [{values}]"


# --- the plot (the paper's Fig. 5) --------------------------------------------------------------


def plot_profile(profile: ExpertProfile, path: Path) -> None:
    """Prefill delay, per-token decode delay and energy against prompt length (log2), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    prefill, decode, energy = fig.subplots(1, 3)
    lengths = np.array([p.prompt_tokens for p in profile.points], dtype=np.float64)
    line_x = np.geomspace(lengths.min(), lengths.max(), 64)
    fit = profile.fit
    _panel(prefill, lengths, [p.prefill_s for p in profile.points], line_x, fit.prefill, 1.0)
    prefill.set(ylabel="prefill delay (s)", title="prefill")
    _panel(decode, lengths, [p.decode_s * 1e3 for p in profile.points], line_x, fit.decode, 1e3)
    decode.set(ylabel="decode delay per token (ms)", title="decode")
    _energy_panel(energy, profile, lengths, line_x)
    fig.suptitle(
        f"{profile.expert}: {profile.model} on {profile.device} ({profile.backend}) · "
        f"energy source: {profile.energy_source}"
    )
    fig.tight_layout()
    fig.savefig(path)


def _panel(ax: Any, xs: Any, ys: Sequence[float], line_x: Any, line: Line, scale: float) -> None:
    ax.plot(xs, ys, "o", label="measured")
    ax.plot(line_x, scale * (line.base + line.slope * line_x), "-", label="eq. 4 fit")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="prompt length (tokens)")
    ax.grid(alpha=0.3)
    ax.legend()


def _energy_panel(ax: Any, profile: ExpertProfile, xs: Any, line_x: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    source, fit = profile.energy_source, profile.fit
    ax.plot(xs, [p.prefill_j for p in profile.points], "o", label=f"prefill ({source})")
    ax.plot(xs, [p.decode_j for p in profile.points], "s", label=f"decode, per token ({source})")
    for line, what in ((fit.prefill, "prefill"), (fit.decode, "decode")):
        joules = fit.power_w * (line.base + line.slope * line_x)
        ax.plot(line_x, joules, "-", label=f"{what} fit \u00d7 {fit.power_w:.3g} W")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.set(xlabel="prompt length (tokens)", ylabel="energy (J)", title=f"energy ({source})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
