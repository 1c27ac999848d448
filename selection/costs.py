"""The paper's cost models (eq. 4–12) as pure functions of arrays.

Per expert n, eq. 4 gives the compute time of a forward pass: FLOPs / compute capability, plus
the bytes it moves / memory bandwidth, plus a constant overhead. For a prompt of L tokens:

    prefill(L)  = L·F/C + (W + L·kv)/B + c       (every prompt token's FLOPs; weights read once)
    decode(L)   =   F/C + (W + L·kv)/B + c       (one token; weights and the KV cache read)

with F = 2·params FLOPs per token, W the weight bytes and kv the KV-cache bytes per context
token. Both are linear in L, so an expert's compute is a :class:`ComputeFit` whether it comes
from spec sheets or from ``moe2 profile`` measurements. Eq. 5–6: sending a slice takes the link's
latency plus its bytes over the link rate (given, or Shannon's W·log2(1 + SNR)).

For a subset S and an application m (a typical prompt length and answer length):

- step delay (eq. 7): the slowest expert of S at that step, compute plus transmission;
- answer delay (eq. 8): the mean step delay over the answer's tokens, plus the gating delay;
  the limit of eq. 9 is one ``tau_s`` per application;
- energy (eq. 10–12): the sum over S of each expert's compute energy (power × compute time)
  and transmission energy, averaged over the applications by their shares.

All three grow with S (max and sum over S), which is what makes problem (19) a monotonic one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Masks = npt.NDArray[np.bool_]

SLICE_HEADER_BYTES = 170  # type tag, ids of session and expert, scalars (docs/protocol.md §13)
SLICE_BYTES_PER_ID = 14  # uint32 id + float32 logprob + msgpack framing of a ~4-byte piece


@dataclass(frozen=True, slots=True)
class ComputeFit:
    """Eq. 4 as two lines in the context length L (seconds), and the power that prices them."""

    prefill_base_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_context_token_s: float
    power_w: float
    energy_source: str = "declared"

    def prefill_s(self, prompt_tokens: float) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * prompt_tokens

    def decode_s(self, context_tokens: F64) -> F64:
        return self.decode_base_s + self.decode_per_context_token_s * context_tokens

    def scaled(self, factor: float) -> ComputeFit:
        """Every delay times ``factor`` (a measured drift), the power unchanged."""
        return ComputeFit(
            self.prefill_base_s * factor,
            self.prefill_per_token_s * factor,
            self.decode_base_s * factor,
            self.decode_per_context_token_s * factor,
            self.power_w,
            self.energy_source,
        )


@dataclass(frozen=True, slots=True)
class Device:
    """A box as its spec sheet describes it."""

    name: str
    compute_tflops: float  # effective dense FLOP/s for this precision, in 10^12
    bandwidth_gbps: float  # memory bandwidth, GB/s
    power_w: float  # drawn while computing
    overhead_ms: float = 0.0  # per forward pass: kernel launches, sampling, framework
    energy_source: str = "declared"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model as deployed: its size and the bits each weight takes (quantisation included)."""

    name: str
    params_b: float  # parameters, in 10^9
    bits: float = 16.0  # effective bits per weight, scales included (Q4_K_M ≈ 4.8)
    kv_kib_per_token: float = 0.0  # KV-cache bytes per context token, KiB

    @property
    def flops_per_token(self) -> float:
        return 2.0 * self.params_b * 1e9

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * self.bits / 8.0


def spec_fit(device: Device, model: ModelSpec) -> ComputeFit:
    """Eq. 4 from spec sheets, written as the two lines of :class:`ComputeFit`."""
    flops_s = model.flops_per_token / (device.compute_tflops * 1e12)
    bandwidth = device.bandwidth_gbps * 1e9
    weights_s = model.weight_bytes / bandwidth
    kv_s = model.kv_kib_per_token * 1024.0 / bandwidth
    overhead_s = device.overhead_ms / 1e3
    return ComputeFit(
        prefill_base_s=weights_s + overhead_s,
        prefill_per_token_s=flops_s + kv_s,
        decode_base_s=flops_s + weights_s + overhead_s,
        decode_per_context_token_s=kv_s,
        power_w=device.power_w,
        energy_source=device.energy_source,
    )


@dataclass(frozen=True, slots=True)
class Link:
    """Eq. 5–6: the path from an expert to the fusion agent."""

    name: str = "loopback"
    latency_ms: float = 0.0
    rate_mbps: float | None = None  # a measured or nominal rate; else Shannon's, from the next two
    bandwidth_mhz: float | None = None
    snr_db: float | None = None
    tx_power_w: float = 0.0  # radio power while sending (eq. 11)

    def rate_bps(self) -> float:
        """Bits per second: the given rate, else W·log2(1 + SNR) (eq. 6), else unlimited."""
        if self.rate_mbps is not None:
            return self.rate_mbps * 1e6
        if self.bandwidth_mhz is not None and self.snr_db is not None:
            return self.bandwidth_mhz * 1e6 * math.log2(1.0 + 10.0 ** (self.snr_db / 10.0))
        return math.inf

    def transmit_s(self, nbytes: float) -> float:
        """Eq. 5: latency plus size over rate."""
        return self.latency_ms / 1e3 + 8.0 * nbytes / self.rate_bps()


def slice_bytes(k: int) -> int:
    """The size of one top-K slice on the wire (docs/protocol.md), near enough for eq. 5."""
    return SLICE_HEADER_BYTES + SLICE_BYTES_PER_ID * k


@dataclass(frozen=True, slots=True)
class Application:
    """A kind of request: its typical prompt and answer lengths, and its share of the traffic."""

    name: str
    prompt_tokens: int
    answer_tokens: int
    share: float = 1.0  # weight in the expected energy (eq. 12); normalised over applications
    tau_s: float | None = None  # the default delay limit τ_max,m (eq. 9)

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.answer_tokens < 1:
            raise ValueError(f"application {self.name}: prompt and answer need >= 1 token")
        if not self.share > 0:
            raise ValueError(f"application {self.name}: share must be positive")


DECODE_POINTS = 8  # decode steps beyond this are averaged over this many equal bins


def answer_steps(app: Application) -> tuple[F64, F64]:
    """The context length at the answer's steps, and how many steps each point stands for.

    Point 0 is the prefill. Decode step t runs at context ``prompt + t``; a long answer's decode
    steps are grouped into :data:`DECODE_POINTS` equal bins, each evaluated at its midpoint
    (exact for each expert's linear eq. 4, and within the KV term's slope for the max over S).
    """
    decodes = app.answer_tokens - 1
    if decodes <= DECODE_POINTS:
        t = np.arange(0, decodes + 1, dtype=np.float64)
        return app.prompt_tokens + t, np.ones(decodes + 1)
    edges = np.linspace(1, app.answer_tokens, DECODE_POINTS + 1)
    mid = (edges[:-1] + edges[1:] - 1) / 2
    return (
        app.prompt_tokens + np.concatenate([[0.0], mid]),
        np.concatenate([[1.0], np.diff(edges)]),
    )


@dataclass(frozen=True, slots=True)
class ExpertCost:
    """What one expert costs: its compute (eq. 4) and its link (eq. 5–6)."""

    expert: str
    compute: ComputeFit
    link: Link = field(default_factory=Link)
    source: str = "spec"  # spec | measured | heartbeat: where ``compute`` came from

    def step_compute_s(self, app: Application) -> F64:
        """Compute time at each of :func:`answer_steps`' points: the prefill, then decodes."""
        context, _ = answer_steps(app)
        steps = self.compute.decode_s(context)
        steps[0] = self.compute.prefill_s(app.prompt_tokens)
        return steps

    def step_delays(self, app: Application, k: int) -> F64:
        """Eq. 7's per-expert term: compute plus sending the slice, at each step."""
        return self.step_compute_s(app) + self.link.transmit_s(slice_bytes(k))

    def energy_j(self, app: Application, k: int) -> float:
        """Eq. 10–11: compute energy plus transmission energy over one answer."""
        _, weights = answer_steps(app)
        compute = self.compute.power_w * float(self.step_compute_s(app) @ weights)
        sending = self.link.tx_power_w * self.link.transmit_s(slice_bytes(k)) * app.answer_tokens
        return compute + sending


class CostTable:
    """Delay and energy of any subset S of ``experts``, many subsets at a time.

    A subset is a row of a boolean mask matrix over the expert axis (``experts`` order).
    """

    def __init__(
        self,
        experts: Sequence[ExpertCost],
        applications: Sequence[Application],
        *,
        gating_s: float = 0.0,
        slice_k: int = 32,
    ) -> None:
        if not applications:
            raise ValueError("at least one application is needed")
        self.expert_ids = [e.expert for e in experts]
        self.applications = list(applications)
        self.gating_s = gating_s
        # per application: (T_m, N) step delays; per expert: expected energy per answer
        self.delays = [_columns([e.step_delays(a, slice_k) for e in experts]) for a in applications]
        self.step_weights = [answer_steps(a)[1] / a.answer_tokens for a in applications]
        shares = np.array([a.share for a in applications]) / sum(a.share for a in applications)
        energy = np.array([[e.energy_j(a, slice_k) for e in experts] for a in applications])
        self.energy = (shares @ energy) if experts else np.zeros(0)

    @property
    def size(self) -> int:
        return len(self.expert_ids)

    def delay_s(self, masks: Masks) -> F64:
        """(B, M): eq. 8 for each subset and application (gating delay alone for S = ∅)."""
        masks = np.atleast_2d(masks)
        out = np.empty((masks.shape[0], len(self.applications)))
        for m, (steps, weights) in enumerate(zip(self.delays, self.step_weights, strict=True)):
            per_step = np.where(masks[:, None, :], steps[None, :, :], 0.0).max(axis=2)
            out[:, m] = per_step @ weights + self.gating_s
        return out

    def energy_j(self, masks: Masks) -> F64:
        """(B,): eq. 10–12, the expected energy of an answer."""
        return np.atleast_2d(masks).astype(np.float64) @ self.energy

    def sub(self, keep: Sequence[str]) -> CostTable:
        """The same costs over the experts ``keep`` only, in that order."""
        index = [self.expert_ids.index(e) for e in keep]
        table = object.__new__(CostTable)
        table.expert_ids = list(keep)
        table.applications = self.applications
        table.gating_s = self.gating_s
        table.delays = [d[:, index] for d in self.delays]
        table.step_weights = self.step_weights
        table.energy = self.energy[index]
        return table


def _columns(rows: list[F64]) -> F64:
    return np.stack(rows, axis=1) if rows else np.zeros((1, 0))


@dataclass(frozen=True, slots=True)
class Budgets:
    """Problem (19)'s constraints: a delay limit per application (eq. 9), an energy limit."""

    tau_s: Mapping[str, float] = field(default_factory=dict)
    energy_j: float | None = None

    def check(self, table: CostTable) -> None:
        names = {a.name for a in table.applications}
        unknown = sorted(set(self.tau_s) - names)
        if unknown:
            known = sorted(names)
            raise ValueError(f"delay limits for unknown applications {unknown}; known: {known}")

    def limits(self, table: CostTable) -> tuple[F64, float]:
        """The delay limit of each of ``table``'s applications (inf where none), and energy's."""
        tau = np.array([self.tau_s.get(a.name, _default_tau(a)) for a in table.applications])
        return tau, math.inf if self.energy_j is None else self.energy_j


def _default_tau(app: Application) -> float:
    return math.inf if app.tau_s is None else app.tau_s


class Constraints:
    """Feasibility of subsets under ``budgets``, and which constraint binds."""

    def __init__(self, table: CostTable, budgets: Budgets) -> None:
        budgets.check(table)
        self.table = table
        self.budgets = budgets
        self.tau, self.energy = budgets.limits(table)

    def feasible(self, masks: Masks) -> npt.NDArray[np.bool_]:
        masks = np.atleast_2d(masks)
        ok = (self.table.delay_s(masks) <= self.tau + 1e-12).all(axis=1)
        return ok & (self.table.energy_j(masks) <= self.energy + 1e-12)

    def violations(self, mask: npt.NDArray[np.bool_]) -> list[tuple[str, float, float]]:
        """(constraint, value, limit) for each constraint ``mask`` breaks."""
        delays = self.table.delay_s(mask)[0]
        out = [
            (f"tau[{a.name}]", float(d), float(t))
            for a, d, t in zip(self.table.applications, delays, self.tau, strict=True)
            if d > t + 1e-12
        ]
        energy = float(self.table.energy_j(mask)[0])
        if energy > self.energy + 1e-12:
            out.append(("energy", energy, self.energy))
        return out
