"""What an expert and a fusion agent export to Prometheus (docs/metrics.md lists every metric).

Each agent makes one of these with its own ``CollectorRegistry``. The hot path only increments
counters and observes histograms whose label children are bound once here; gauges of things the
agent already holds (sessions, queues, S) are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from moe2.runtime.decoding import Decoding
from moe2.runtime.metrics import LATENCY_BUCKETS
from moe2.selection.live import LiveSelection

FINISH_REASONS: Final = frozenset({"eos", "stop", "length"})
# why an expert's session ended: a fusion agent's Close reasons, then the expert's own
CLOSE_REASONS: Final = frozenset({"done", "dropped", "cancelled"})
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32)


class ExpertMetrics:
    """One expert's figures. ``sessions``, ``queued`` and ``waiting`` are read when scraped:
    open sessions, messages queued in their inboxes, model calls waiting for the model."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        energy_source: str,
        sessions: Callable[[], int],
        queued: Callable[[], int],
        waiting: Callable[[], int],
    ) -> None:
        self.registry = registry
        self.info = Info("moe2_expert", "What this expert serves.", registry=registry)
        self.opened = Counter(
            "moe2_expert_sessions_opened", "Sessions admitted (Open taken).", registry=registry
        )
        self.ended = Counter(
            "moe2_expert_sessions_ended",
            "Sessions ended, by reason: a fusion agent's Close (done, dropped, cancelled), "
            "idle, refused (the Open), failed, stopped (the agent stopped), other.",
            ["reason"],
            registry=registry,
        )
        tokens = Counter(
            "moe2_expert_tokens",
            "Tokens computed: prompt tokens prefilled, and decode steps.",
            ["phase"],
            registry=registry,
        )
        compute = Histogram(
            "moe2_expert_compute_seconds",
            "Compute time of one model call, prefill or decode step.",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        energy = Counter(
            "moe2_expert_energy_joules",
            "Energy of the sessions' model calls, by meter (energy_source) and phase.",
            ["energy_source", "phase"],
            registry=registry,
        )
        self.batch = Histogram(
            "moe2_expert_decode_batch_sessions",
            "Sessions per batched decode call (Backend.decode_batch): one observation a batch.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.slices = Counter(
            "moe2_expert_slices",
            "Slices published (every step of every session).",
            registry=registry,
        )
        self._tokens = {p: tokens.labels(p) for p in ("prefill", "decode")}
        self._compute = {p: compute.labels(p) for p in ("prefill", "decode")}
        self._energy = {p: energy.labels(energy_source, p) for p in ("prefill", "decode")}
        _gauge(registry, "moe2_expert_sessions_active", "Sessions open now.", sessions)
        _gauge(
            registry,
            "moe2_expert_inbox_messages",
            "Messages queued in the open sessions' inboxes (each holds at most 16).",
            queued,
        )
        _gauge(
            registry,
            "moe2_expert_model_waiting",
            "Model calls (sessions' steps and scores) waiting for the model.",
            waiting,
        )

    def computed(self, phase: str, tokens: int, compute_s: float, energy_j: float) -> None:
        """One model call of a session: ``phase`` prefill or decode."""
        self._tokens[phase].inc(tokens)
        self._compute[phase].observe(compute_s)
        self._energy[phase].inc(energy_j)

    def session_ended(self, reason: str) -> None:
        known = reason in CLOSE_REASONS or reason in {"idle", "refused", "failed", "stopped"}
        self.ended.labels(reason if known else "other").inc()


class FusionMetrics:
    """One fusion agent's figures. ``sessions``, ``live`` and ``selection`` are read when
    scraped: sessions in flight, live experts, and SMO's choice of S (None without SMO)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_sessions: int,
        sessions: Callable[[], int],
        live: Callable[[], int],
        selection: LiveSelection | None,
    ) -> None:
        self.registry = registry
        self.started = Counter(
            "moe2_fusion_sessions_started", "Sessions started (prompts taken).", registry=registry
        )
        self.done = Counter(
            "moe2_fusion_sessions_done",
            "Sessions ended, by finish reason: eos, stop, length, cancelled, or error.",
            ["finish_reason"],
            registry=registry,
        )
        self.failed = Counter(
            "moe2_fusion_sessions_failed",
            "Sessions that ended with an error, by its code.",
            ["code"],
            registry=registry,
        )
        tokens = Counter(
            "moe2_fusion_tokens",
            "Tokens of ended sessions: prompt and completion.",
            ["kind"],
            registry=registry,
        )
        self.step = Histogram(
            "moe2_fusion_step_seconds",
            "Decode step latency: token chosen to the next step's slices in (or its deadline).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "moe2_fusion_time_to_first_token_seconds",
            "Prompt taken to the first text sent to the client.",
            buckets=(*LATENCY_BUCKETS, 30, 60),
            registry=registry,
        )
        self.late = Counter(
            "moe2_fusion_late_slices",
            "Slices that missed their step deadline, by expert.",
            ["expert"],
            registry=registry,
        )
        self.dropped = Counter(
            "moe2_fusion_dropped_experts",
            "Experts dropped from a session for being late too often, by expert.",
            ["expert"],
            registry=registry,
        )
        self.chosen = Counter(
            "moe2_fusion_gate_choices",
            "Sessions the gate gave to each expert (its top-k of S).",
            ["expert"],
            registry=registry,
        )
        self.weight = Counter(
            "moe2_fusion_gate_weight",
            "Sum of the gate's weights per expert (divide by gate_choices for the mean).",
            ["expert"],
            registry=registry,
        )
        self._tokens = {k: tokens.labels(k) for k in ("prompt", "completion")}
        Gauge(
            "moe2_fusion_sessions_limit", "Sessions this agent runs at once.", registry=registry
        ).set(max_sessions)
        _gauge(registry, "moe2_fusion_sessions_active", "Sessions in flight now.", sessions)
        _gauge(registry, "moe2_fusion_members_live", "Experts heard from recently.", live)
        if selection is not None:
            registry.register(SelectionCollector(selection))

    def planned(self, experts: list[str], weights: list[float]) -> None:
        self.started.inc()
        for expert, weight in zip(experts, weights, strict=True):
            self.chosen.labels(expert).inc()
            self.weight.labels(expert).inc(weight)

    def session_ended(self, machine: Decoding | None, failure: str = "") -> None:
        """A session is over: ``machine`` ran it (None: it never started); ``failure``: the
        error code it ended with outside the machine."""
        outcome = failure or (machine.outcome if machine is not None else "cancelled")
        if outcome in FINISH_REASONS or outcome == "cancelled":
            self.done.labels(outcome).inc()
        else:
            self.done.labels("error").inc()
            self.failed.labels(outcome or "internal").inc()
        if machine is None:
            return
        self._tokens["prompt"].inc(machine.prompt_tokens)
        self._tokens["completion"].inc(len(machine.tokens))
        for ms in machine.step_ms:
            self.step.observe(ms / 1000)
        if machine.ttft > 0:
            self.ttft.observe(machine.ttft)
        for expert, n in machine.tracker.late.items():
            self.late.labels(expert).inc(n)
        for expert in machine.dropped:
            self.dropped.labels(expert).inc()


class SelectionCollector(Collector):
    """SMO's current S on this fusion agent and the budgets it was chosen under, read when
    scraped."""

    def __init__(self, selection: LiveSelection) -> None:
        self._selection = selection

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        choice, budgets = self._selection.choice, self._selection.budgets
        yield CounterMetricFamily(
            "moe2_fusion_selections",
            "Times SMO chose S (at start, and on each join, leave or drift), changed or not.",
            value=choice.version,
        )
        member = GaugeMetricFamily(
            "moe2_fusion_selection_member",
            "1 for each live expert in S, 0 for the others.",
            labels=["expert"],
        )
        for expert in sorted({*choice.live, *choice.experts}):
            member.add_metric([expert], 1.0 if expert in choice.experts else 0.0)
        yield member
        yield _by_application(
            "moe2_fusion_selection_delay_seconds",
            "Predicted answer delay of S per application (eq. 8).",
            choice.delay_s,
        )
        yield _by_application(
            "moe2_fusion_budget_delay_seconds",
            "Delay limit per application (eq. 9).",
            budgets.tau_s,
        )
        for name, doc, value in (
            (
                "moe2_fusion_selection_energy_joules",
                "Predicted energy per answer of S.",
                choice.energy_j,
            ),
            (
                "moe2_fusion_budget_energy_joules",
                "Energy budget per answer (eq. 12).",
                budgets.energy_j,
            ),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)


def _by_application(name: str, doc: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["application"])
    for application, seconds in sorted(values.items()):
        family.add_metric([application], seconds)
    return family


def _gauge(registry: CollectorRegistry, name: str, doc: str, read: Callable[[], int]) -> None:
    Gauge(name, doc, registry=registry).set_function(read)
