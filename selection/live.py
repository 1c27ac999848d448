"""Re-selection on a live bus, as pure bookkeeping: which experts are up, what each costs now,
and the S that SMO chose for them. The fusion agent feeds it heartbeats and slices, and runs
:meth:`LiveSelection.solve` (in a worker thread) whenever :attr:`LiveSelection.stale` says so.

An expert is costed from its profile (``moe2 profile`` or spec sheets) when one names it, else
from what its heartbeat measures (``decode_s``, ``prefill_s_per_token``, ``power_w``). The
fusion agent's running estimate of each expert's decode time, from the ``compute_s`` of its
slices, scales that cost when it drifts more than ``drift`` (relative) from the one in use.
Experts the gating artifact does not know are left out until it is retrained.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import structlog

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import Heartbeat, Slice
from moe2.selection.costs import (
    Application,
    Budgets,
    ComputeFit,
    Constraints,
    CostTable,
    ExpertCost,
    Link,
)
from moe2.selection.oracle import LossOracle
from moe2.selection.problem import Problem, Solution
from moe2.selection.profiles import Profiles
from moe2.selection.smo import smo

log = structlog.get_logger("moe2.selection")

EWMA = 0.2  # weight of a new measurement in the running estimates
MIN_SAMPLES = 8  # decode slices before a drift can be called


def build_problem(
    profiles: Profiles,
    oracle: LossOracle,
    tau_s: Mapping[str, float],
    energy_j: float | None,
    keep: int = 4,
    *,
    costs: Mapping[str, ExpertCost] | None = None,
) -> tuple[Problem, list[str]]:
    """Problem (19) over the experts that both the gate and a cost know; notes on the rest."""
    known = costs if costs is not None else profiles.experts
    pool = [e for e in oracle.expert_ids if e in known]
    unprofiled = [e for e in oracle.expert_ids if e not in known]
    ungated = [e for e in known if e not in pool]
    notes = [f"left out, no profile: {', '.join(unprofiled)}"] if unprofiled else []
    if ungated:
        notes.append(f"left out, unknown to the gating artifact: {', '.join(ungated)}")
    if not pool:
        raise Moe2Error(ErrorCode.NO_EXPERTS, "no expert is both profiled and known to the gate")
    table = CostTable(
        [known[e] for e in pool], list(profiles.applications.values()), gating_s=profiles.gating_s
    )
    try:
        constraints = Constraints(table, Budgets(dict(tau_s), energy_j))
    except ValueError as exc:
        raise Moe2Error(ErrorCode.INVALID_FIELD, str(exc)) from None
    return Problem(pool, oracle.restricted(pool), constraints), notes


DEFAULT_APPLICATION = Application("chat", prompt_tokens=128, answer_tokens=64)


def default_profiles() -> Profiles:
    """No profile files: every expert is costed from its heartbeat, for one chat application."""
    return Profiles(experts={}, applications={"chat": DEFAULT_APPLICATION})


def heartbeat_cost(hb: Heartbeat) -> ExpertCost | None:
    """What an expert's own measurements say it costs (None before it has measured any)."""
    device = hb.device
    if device is None or device.decode_s <= 0:
        return None
    decode = device.decode_s
    fit = ComputeFit(
        prefill_base_s=0.0,
        prefill_per_token_s=device.prefill_s_per_token or decode / 8,
        decode_base_s=decode,
        decode_per_context_token_s=0.0,
        power_w=device.power_w,
        energy_source=hb.energy_source,
    )
    return ExpertCost(hb.expert, fit, Link(), source="heartbeat")


@dataclass
class Ratio:
    """A running (EWMA) estimate of measured / modelled, and the value the current S used."""

    value: float = 1.0
    samples: int = 0
    in_use: float = 1.0

    def observe(self, measured: float, modelled: float) -> None:
        if not (modelled > 0 and measured > 0 and math.isfinite(measured)):
            return
        r = measured / modelled
        self.value = r if self.samples == 0 else (1 - EWMA) * self.value + EWMA * r
        self.samples += 1

    def drifted(self, threshold: float) -> bool:
        return self.samples >= MIN_SAMPLES and abs(self.value / self.in_use - 1) > threshold


@dataclass
class RunningCost:
    """The fusion agent's estimates of one expert's decode time and power, from its slices,
    relative to its cost model."""

    time: Ratio = field(default_factory=Ratio)
    power: Ratio = field(default_factory=Ratio)

    def observe(self, s: Slice, model: ComputeFit) -> None:
        self.time.observe(s.compute_s, model.decode_base_s)
        if s.energy_j > 0:
            self.power.observe(s.energy_j / s.compute_s, model.power_w)

    def drift(self, threshold: float) -> str | None:
        """What drifted, for the log and the Solution's reason; None if nothing did."""
        if self.time.drifted(threshold):
            return f"time x{self.time.value:.2f}"
        if self.power.drifted(threshold):
            return f"power x{self.power.value:.2f}"
        return None

    def adopt(self) -> None:
        self.time.in_use, self.power.in_use = self.time.value, self.power.value


@dataclass
class Choice:
    """What the fusion agent publishes after each solve."""

    version: int
    reason: str
    live: list[str]
    experts: list[str]
    loss: float | None = None
    delay_s: dict[str, float] = field(default_factory=dict)
    energy_j: float | None = None
    left_out: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    oracle_calls: int = 0
    solve_s: float = 0.0


class LiveSelection:
    """Membership in, S out (thread-safe: solve runs in a worker thread)."""

    def __init__(
        self,
        oracle: LossOracle,
        profiles: Profiles,
        budgets: Budgets,
        *,
        eps: float = 1e-4,
        drift: float = 0.25,
    ) -> None:
        self.oracle = oracle
        self.profiles = profiles
        self.budgets = budgets
        self.eps = eps
        self.drift = drift
        self.members: dict[str, Heartbeat] = {}
        self.running: dict[str, RunningCost] = {}
        self.choice = Choice(version=0, reason="start", live=[], experts=[])
        # each costed expert's model when S was last chosen, before the running ratios
        self._models: dict[str, ExpertCost] = {}
        self._uncosted: set[str] = set()  # live, known to the gate, but no cost yet
        self.stale_reason: str | None = "start"
        self._lock = threading.Lock()

    # --- inputs --------------------------------------------------------------------------------

    def update_members(self, live: Mapping[str, Heartbeat]) -> None:
        """The live experts now; a join or a leave makes the choice stale."""
        with self._lock:
            joined = sorted(set(live) - set(self.members))
            left = sorted(set(self.members) - set(live))
            self.members = dict(live)
            for e in left:
                self.running.pop(e, None)
            changes = [
                f"{verb} {', '.join(ids)}"
                for verb, ids in (("joined", joined), ("left", left))
                if ids
            ]
            changes += self._cost_news(live)
            if changes:
                self._mark("; ".join(changes))

    def _cost_news(self, live: Mapping[str, Heartbeat]) -> list[str]:
        """Experts costed from their heartbeats whose announced decode time moved by more than
        ``drift`` since S was chosen (an idle expert measures itself again), and experts that
        had no cost and now announce one."""
        out = []
        for e, model in self._models.items():
            if model.source != "heartbeat":
                continue
            now, used = _announced_decode_s(live.get(e)), model.compute.decode_base_s
            if now > 0 and abs(now / used - 1) > self.drift:
                out.append(f"drift {e} heartbeat x{now / used:.2f}")
        out += [f"measured {e}" for e in self._uncosted if _announced_decode_s(live.get(e)) > 0]
        return out

    def observe(self, s: Slice) -> None:
        """A slice's measured compute time and energy update its expert's running estimates."""
        if s.step == 0 or not s.compute_s > 0:
            return
        with self._lock:
            model = self._models.get(s.expert)
            if model is None:  # not costed when S was chosen: not in any session's S either
                return
            running = self.running.setdefault(s.expert, RunningCost())
            running.observe(s, model.compute)
            drift = running.drift(self.drift)
            if drift is not None:
                self._mark(f"drift {s.expert} {drift}")

    def _mark(self, reason: str) -> None:
        self.stale_reason = reason
        log.info("selection_stale", reason=reason)

    @property
    def stale(self) -> str | None:
        return self.stale_reason

    # --- outputs -------------------------------------------------------------------------------

    def select(self, live: Sequence[str]) -> list[str]:
        """The SubsetSelector hook: the chosen S, less any expert gone since it was chosen."""
        up = set(live)
        return [e for e in self.choice.experts if e in up]

    def solve(self) -> Choice:
        """Run SMO on the live experts with their current costs; never raises."""
        with self._lock:
            reason, self.stale_reason = self.stale_reason or "refresh", None
            members = dict(self.members)
            costs, left_out = self._costs(members)
            for running in self.running.values():
                running.adopt()
        choice = self._solve(reason, sorted(members), costs, left_out)
        self.choice = choice
        log.info(
            "selection_chosen",
            version=choice.version,
            reason=reason,
            experts=choice.experts,
            left_out=choice.left_out,
            error=choice.error,
        )
        return choice

    def _solve(
        self, reason: str, live: list[str], costs: dict[str, ExpertCost], left_out: dict[str, str]
    ) -> Choice:
        version = self.choice.version + 1
        base = Choice(version=version, reason=reason, live=live, experts=[], left_out=left_out)
        if not costs:
            base.error = "no live expert is both costed and known to the gating"
            return base
        try:
            problem, _ = build_problem(
                self.profiles, self.oracle, self.budgets.tau_s, self.budgets.energy_j, costs=costs
            )
            result = smo(problem, eps=self.eps, keep=1)
        except Moe2Error as exc:
            base.error = f"[{exc.code}] {exc.message}"
            return base
        return _choice(base, result)

    def _costs(
        self, members: Mapping[str, Heartbeat]
    ) -> tuple[dict[str, ExpertCost], dict[str, str]]:
        costs: dict[str, ExpertCost] = {}
        left_out: dict[str, str] = {}
        known = set(self.oracle.expert_ids)
        self._models = {}
        for e in sorted(members):
            cost = self._model_cost(e)
            if e not in known:
                left_out[e] = "unknown to the gating artifact; retrain it to include this expert"
            elif cost is None:
                left_out[e] = "no profile and no measured cost yet"
            else:
                self._models[e] = cost
                costs[e] = _scaled(cost, self.running.get(e))
        self._uncosted = {e for e, why in left_out.items() if why.startswith("no profile")}
        return costs, left_out

    def _model_cost(self, expert: str) -> ExpertCost | None:
        if expert in self.profiles.experts:
            return self.profiles.experts[expert]
        hb = self.members.get(expert)
        return heartbeat_cost(hb) if hb is not None else None


def _scaled(cost: ExpertCost, running: RunningCost | None) -> ExpertCost:
    """The cost model with the measured time and power ratios applied."""
    if running is None or (running.time.value == 1.0 and running.power.value == 1.0):
        return cost
    compute = cost.compute.scaled(running.time.value)
    compute = replace(compute, power_w=compute.power_w * running.power.value)
    return ExpertCost(cost.expert, compute, cost.link, cost.source)


def _choice(base: Choice, result: Solution) -> Choice:
    base.experts = result.experts
    base.loss = result.loss
    base.delay_s = result.chosen.delay_s
    base.energy_j = result.chosen.energy_j
    base.oracle_calls = result.oracle_calls
    base.solve_s = result.wall_s
    return base


def _announced_decode_s(hb: Heartbeat | None) -> float:
    device = hb.device if hb is not None else None
    return device.decode_s if device is not None else 0.0


def as_wire_fields(choice: Choice) -> dict[str, Any]:
    """The fields of the wire message that announces a choice (all but ``agent``)."""
    return asdict(choice)
