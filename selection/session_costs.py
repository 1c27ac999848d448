"""The cost side of ``moe2 eval``: SMO's predicted delay and energy of S against real sessions.

A trace of sessions that the experts of one subset S answered (``moe2 eval --record-sessions``
records them with real expert processes; any ``moe2 record`` trace will do) says, per session
and step, what each expert of S spent: its slice's ``compute_s`` and ``energy_j``, and the time
from the request (``Open`` or ``Step``) to its slice on the bus. Per session:

- **measured delay** per token: per step, the slowest expert of S, request to slice (eq. 7's
  compute plus transmission); its compute alone is kept too;
- **measured energy** per answer: every slice's joules, summed over S and steps (eq. 10);
- **predicted**, the paper's cost model (eq. 4, 7, 8, 10) for this session's own prompt and
  answer lengths (each expert's prompt in its own tokens), priced with the costs each expert
  announced in its last heartbeat before the session opened: what a fusion agent's SMO uses
  for an expert with no profile file (``selection.live.heartbeat_cost``). No gating delay and no
  link term: both sides are the experts' part only.

Pure: a trace file in, figures out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from moe2.runtime import wire
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects
from moe2.runtime.trace import read_trace
from moe2.selection.costs import Application, answer_steps
from moe2.selection.live import heartbeat_cost


@dataclass(frozen=True, slots=True)
class SessionCost:
    """One recorded session of S: what it cost, and what the cost model said it would."""

    session: str
    experts: tuple[str, ...]
    tokens: int  # steps that every expert of S answered
    prompt_tokens: Mapping[str, int]  # per expert, in its own tokenizer
    delay_s: float  # summed over steps: the slowest expert's request-to-slice time
    compute_s: float  # summed over steps: the slowest expert's compute
    energy_j: float  # summed over S and steps
    predicted_delay_s: float  # summed over steps: the model's slowest expert
    predicted_energy_j: float
    energy_sources: tuple[str, ...]  # the heartbeats' meters, one per expert

    @property
    def delay_per_token_s(self) -> float:
        return self.delay_s / self.tokens

    @property
    def predicted_per_token_s(self) -> float:
        return self.predicted_delay_s / self.tokens


@dataclass(frozen=True, slots=True)
class SubsetCost:
    """Every recorded session of one S, summed: predicted against measured."""

    experts: tuple[str, ...]
    sessions: list[SessionCost] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.sessions)

    def per_token(self, what: str) -> float:
        """``delay_s``, ``compute_s`` or ``predicted_delay_s`` per answer token, over sessions."""
        return sum(float(getattr(s, what)) for s in self.sessions) / max(self.tokens, 1)

    def per_answer(self, what: str) -> float:
        """``energy_j`` or ``predicted_energy_j`` per answer."""
        return sum(float(getattr(s, what)) for s in self.sessions) / max(len(self.sessions), 1)

    @property
    def delay_error(self) -> float:
        """(predicted − measured) / measured, seconds per token."""
        return relative_error(self.per_token("predicted_delay_s"), self.per_token("delay_s"))

    @property
    def energy_error(self) -> float:
        return relative_error(self.per_answer("predicted_energy_j"), self.per_answer("energy_j"))

    def session_errors(self) -> tuple[float, float]:
        """The median over sessions of |relative error|: delay per token, energy per answer."""
        delay = [
            abs(relative_error(s.predicted_per_token_s, s.delay_per_token_s)) for s in self.sessions
        ]
        energy = [abs(relative_error(s.predicted_energy_j, s.energy_j)) for s in self.sessions]
        return float(np.median(delay)), float(np.median(energy))

    @property
    def meters(self) -> list[str]:
        """The energy meters behind the measured joules (``declared``: power × compute time)."""
        return sorted({src for s in self.sessions for src in s.energy_sources})

    def as_dict(self) -> dict[str, object]:
        delay_med, energy_med = self.session_errors()
        return {
            "experts": list(self.experts),
            "sessions": len(self.sessions),
            "tokens": self.tokens,
            "predicted_delay_s_per_token": self.per_token("predicted_delay_s"),
            "measured_delay_s_per_token": self.per_token("delay_s"),
            "measured_compute_s_per_token": self.per_token("compute_s"),
            "delay_relative_error": self.delay_error,
            "delay_median_abs_session_error": delay_med,
            "predicted_energy_j_per_answer": self.per_answer("predicted_energy_j"),
            "measured_energy_j_per_answer": self.per_answer("energy_j"),
            "energy_relative_error": self.energy_error,
            "energy_median_abs_session_error": energy_med,
            "energy_sources": self.meters,
        }


def relative_error(predicted: float, measured: float) -> float:
    if measured <= 0:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "a measured cost of 0 has no relative error")
    return (predicted - measured) / measured


def predicted_costs(
    beats: Mapping[str, wire.Heartbeat], prompt_tokens: Mapping[str, int], tokens: int
) -> tuple[float, float]:
    """Eq. 7–8 and 10 for one answer of ``tokens`` tokens, summed over its steps: the slowest
    expert's compute per step, and every expert's energy, from their heartbeats' costs."""
    _, weights = answer_steps(Application("session", 1, tokens))
    per_step = []
    energy = 0.0
    for expert, hb in beats.items():
        cost = heartbeat_cost(hb)
        if cost is None:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"expert {expert}'s heartbeat announces no measured costs (decode_s = 0): "
                "record sessions from experts that warm up (the default)",
            )
        app = Application("session", max(prompt_tokens[expert], 1), tokens)
        per_step.append(cost.step_compute_s(app))
        energy += cost.energy_j(app, k=0)  # eq. 10-11; a heartbeat's cost has no radio power
    slowest = np.max(np.stack(per_step), axis=0)
    return float(slowest @ weights), energy


class _Session:
    """What the trace says about one session while it is read."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], float] = {}  # (expert, step) -> t
        self.slices: dict[int, dict[str, tuple[float, wire.Slice]]] = {}  # step -> expert ->
        self.beats: dict[str, wire.Heartbeat] = {}  # the last heartbeat before each Open


def read_sessions(path: Path, *, prefix: str = DEFAULT_PREFIX) -> list[SessionCost]:
    """Every session of the trace that at least one expert answered, in the order opened."""
    subjects = Subjects(prefix)
    expert_root = f"{subjects.root}.expert."
    latest: dict[str, wire.Heartbeat] = {}
    sessions: dict[str, _Session] = {}
    _, records = read_trace(path)
    for record in records:
        try:
            message = wire.decode(record.data)
        except Moe2Error:
            continue  # not a moe2 message (another subject of a full recording)
        if isinstance(message, wire.Heartbeat):
            latest[message.expert] = message
        elif isinstance(message, wire.Open | wire.Step) and record.subject.startswith(expert_root):
            expert = record.subject[len(expert_root) :].rsplit(".", 1)[0]
            session = sessions.setdefault(message.session, _Session())
            step = 0 if isinstance(message, wire.Open) else message.step
            session.requests[(expert, step)] = record.t
            if isinstance(message, wire.Open) and expert in latest:
                session.beats[expert] = latest[expert]
        elif isinstance(message, wire.Slice) and message.session in sessions:
            steps = sessions[message.session].slices.setdefault(message.step, {})
            steps[message.expert] = (record.t, message)
    return [cost for sid, s in sessions.items() if (cost := _session_cost(sid, s)) is not None]


def _session_cost(sid: str, session: _Session) -> SessionCost | None:
    experts = tuple(sorted(session.beats))
    if not experts or 0 not in session.slices:
        return None
    delay = compute = energy = 0.0
    tokens = 0
    for step in sorted(session.slices):
        answered = session.slices[step]
        if any(e not in answered or (e, step) not in session.requests for e in experts):
            break  # an expert was dropped or the session ended: count whole steps only
        delay += max(answered[e][0] - session.requests[(e, step)] for e in experts)
        compute += max(answered[e][1].compute_s for e in experts)
        energy += sum(answered[e][1].energy_j for e in experts)
        tokens += 1
    if tokens == 0:
        return None
    prompt = {e: session.slices[0][e][1].prompt_tokens for e in experts}
    predicted_s, predicted_j = predicted_costs(session.beats, prompt, tokens)
    return SessionCost(
        session=sid,
        experts=experts,
        tokens=tokens,
        prompt_tokens=prompt,
        delay_s=delay,
        compute_s=compute,
        energy_j=energy,
        predicted_delay_s=predicted_s,
        predicted_energy_j=predicted_j,
        energy_sources=tuple(session.beats[e].energy_source for e in experts),
    )


def subset_costs(paths: Iterable[Path]) -> dict[tuple[str, ...], SubsetCost]:
    """Every session of the traces, grouped by the set of experts that answered it."""
    out: dict[tuple[str, ...], SubsetCost] = {}
    for path in paths:
        for s in read_sessions(path):
            out.setdefault(s.experts, SubsetCost(s.experts)).sessions.append(s)
    return out


def trace_name(subset: Sequence[str]) -> str:
    """The file a subset's sessions are recorded into: its experts, sorted, joined by ``+``."""
    return "+".join(sorted(subset)) + ".trace"


# ---------------------------------------------------------------------------------------------
# The report: per cell of the budget grid, and a plot.


class GridCell(Protocol):
    """What the cost side reads of a budget-grid cell (``selection.experiments.Cell``)."""

    @property
    def tau(self) -> float: ...
    @property
    def energy(self) -> float: ...
    @property
    def subset(self) -> list[str]: ...
    @property
    def delay_s(self) -> float: ...
    @property
    def energy_j(self) -> float: ...


def cost_side_markdown(
    cells: Sequence[GridCell], costs: Mapping[tuple[str, ...], SubsetCost]
) -> str:
    """One row per cell: the pool's modelled figures for its S, this box's prediction from the
    experts' heartbeats, the sessions' measurements and the relative errors."""
    out = [
        "| τ (s/token) | E (J/answer) | S | pool's model: s/token, J/answer | predicted here: "
        "s/token | measured: s/token (compute) | error | predicted here: J/answer | measured: "
        "J/answer | error | sessions (tokens) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        if not c.subset:
            out.append(f"| {c.tau:.3f} | {c.energy:.1f} | nothing fits | | | | | | | | |")
            continue
        s = "{" + ", ".join(c.subset) + "}"
        pool = f"{c.delay_s:.3f}, {c.energy_j:.1f}"
        got = costs.get(tuple(sorted(c.subset)))
        if got is None or not got.sessions:
            out.append(
                f"| {c.tau:.3f} | {c.energy:.1f} | {s} | {pool} | no recorded sessions |"
                " | | | | | |"
            )
            continue
        out.append(
            f"| {c.tau:.3f} | {c.energy:.1f} | {s} | {pool} "
            f"| {got.per_token('predicted_delay_s'):.4f} | {got.per_token('delay_s'):.4f} "
            f"({got.per_token('compute_s'):.4f}) | {got.delay_error:+.1%} "
            f"| {got.per_answer('predicted_energy_j'):.1f} | {got.per_answer('energy_j'):.1f} "
            f"| {got.energy_error:+.1%} | {len(got.sessions)} ({got.tokens}) |"
        )
    chosen = [tuple(sorted(c.subset)) for c in cells if c.subset]
    summary = [
        "",
        "Per S, the median over its sessions of |relative error| (each session predicted for its "
        "own prompt and answer lengths):",
        "",
        "| S | sessions | delay per token | energy per answer | energy meters |",
        "|---|---:|---:|---:|---|",
    ]
    for subset in dict.fromkeys(chosen):
        got = costs.get(subset)
        if got is None or not got.sessions:
            continue
        delay, energy = got.session_errors()
        meters = ", ".join(got.meters)
        summary.append(
            f"| {{{', '.join(subset)}}} | {len(got.sessions)} | {delay:.1%} | {energy:.1%} "
            f"| {meters} |"
        )
    return "\n".join(out + summary) + "\n"


def plot_costs(costs: Mapping[tuple[str, ...], SubsetCost], path: Path) -> None:
    """Predicted against measured, one point per session, one colour per S."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    panels = (
        ("delay per token (s)", "delay_per_token_s", "predicted_per_token_s"),
        ("energy per answer (J)", "energy_j", "predicted_energy_j"),
    )
    for i, (label, measured, predicted) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        points: list[float] = []
        for subset, got in costs.items():
            xs = [float(getattr(s, measured)) for s in got.sessions]
            ys = [float(getattr(s, predicted)) for s in got.sessions]
            ax.scatter(xs, ys, s=18, label="{" + ", ".join(subset) + "}")
            points += xs + ys
        if points:
            lo, hi = min(points) * 0.9, max(points) * 1.1
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, linestyle="--", label="y = x")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.legend(fontsize=7)
    fig.suptitle("The cost side: the cost model (eq. 4–10) against recorded sessions of each S")
    fig.tight_layout()
    fig.savefig(path)
