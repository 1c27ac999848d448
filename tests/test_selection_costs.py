"""Cost models (eq. 4–12): spec sheets to seconds, Shannon's rate, a subset's delay and energy,
checked against hand-computed figures and naive per-step loops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.selection.costs import (
    DECODE_POINTS,
    Application,
    Budgets,
    ComputeFit,
    Constraints,
    CostTable,
    Device,
    ExpertCost,
    Link,
    ModelSpec,
    answer_steps,
    slice_bytes,
    spec_fit,
)

RTX_4090 = Device("rtx4090", compute_tflops=82.6, bandwidth_gbps=1008, power_w=320, overhead_ms=4)
LLM_7B_Q4 = ModelSpec("7b-q4", params_b=7.0, bits=4.8, kv_kib_per_token=512)
SLICE_K = 8


def test_spec_fit_of_a_7b_q4_model_on_an_rtx_4090() -> None:
    # per token: 2 * 7e9 FLOPs / 82.6e12 FLOP/s = 1.6949e-4 s
    # weights:   7e9 * 4.8 / 8 = 4.2e9 bytes / 1.008e12 B/s = 4.1667e-3 s
    # KV cache:  512 KiB = 524288 bytes / 1.008e12 B/s = 5.2013e-7 s per context token
    fit = spec_fit(RTX_4090, LLM_7B_Q4)
    # prefill(128) = 128 * 1.6949e-4 + (4.2e9 + 128 * 524288) / 1.008e12 + 4e-3
    assert fit.prefill_s(128) == pytest.approx(0.0299282, rel=1e-5)
    # decode(200) = 1.6949e-4 + (4.2e9 + 200 * 524288) / 1.008e12 + 4e-3: about 118 tokens/s
    assert float(fit.decode_s(np.array([200.0]))[0]) == pytest.approx(0.00844018, rel=1e-5)
    assert fit.decode_per_context_token_s == pytest.approx(5.2013e-7, rel=1e-4)
    assert fit.power_w == 320


def test_shannon_rate_of_a_20_mhz_channel_at_20_db() -> None:
    link = Link("wifi", latency_ms=3.0, bandwidth_mhz=20, snr_db=20)
    # W log2(1 + SNR) = 20e6 * log2(101) = 133.16 Mbit/s
    assert link.rate_bps() == pytest.approx(133.164e6, rel=1e-5)
    # eq. 5: 544 bytes = 4352 bits / 133.16 Mbit/s, plus the 3 ms latency
    assert link.transmit_s(544) == pytest.approx(3e-3 + 3.2682e-5, rel=1e-4)


def test_a_given_rate_wins_over_shannon_and_no_rate_costs_only_the_latency() -> None:
    given_rate = Link(latency_ms=1.0, rate_mbps=8.0, bandwidth_mhz=20, snr_db=20)
    assert given_rate.transmit_s(1000) == pytest.approx(1e-3 + 8000 / 8e6)
    assert Link(latency_ms=2.5).transmit_s(10**9) == pytest.approx(2.5e-3)


@settings(max_examples=80, deadline=None)
@given(prompt=st.integers(1, 4000), answer=st.integers(1, 2000))
def test_answer_steps_stand_for_every_token_and_sum_context_exactly(
    prompt: int, answer: int
) -> None:
    context, weights = answer_steps(Application("app", prompt, answer))
    assert weights.sum() == pytest.approx(answer)
    assert context[0] == prompt and weights[0] == 1.0  # the prefill
    # every decode step t = 1..answer-1 runs at context prompt + t; the points sum them exactly
    decode_context = sum(prompt + t for t in range(1, answer))
    assert float(context[1:] @ weights[1:]) == pytest.approx(decode_context, rel=1e-12, abs=1e-9)
    if answer <= DECODE_POINTS + 1:
        assert context.tolist() == [prompt + t for t in range(answer)]
        assert weights.tolist() == [1.0] * answer
    else:
        assert len(context) == DECODE_POINTS + 1


@dataclass
class Pool:
    costs: list[ExpertCost]
    applications: list[Application]
    gating_s: float

    def table(self) -> CostTable:
        return CostTable(self.costs, self.applications, gating_s=self.gating_s, slice_k=SLICE_K)

    def step_compute_s(self, expert: int, app: Application, t: int) -> float:
        """Eq. 4 at step t of the answer: the prefill, then one decode per token."""
        fit = self.costs[expert].compute
        if t == 0:
            return fit.prefill_s(app.prompt_tokens)
        return fit.decode_base_s + fit.decode_per_context_token_s * (app.prompt_tokens + t)

    def step_delay_s(self, expert: int, app: Application, t: int) -> float:
        """Eq. 7's per-expert term at step t: compute plus sending the slice."""
        sending = self.costs[expert].link.transmit_s(slice_bytes(SLICE_K))
        return self.step_compute_s(expert, app, t) + sending

    def naive_delay_s(self, mask: list[bool], app: Application) -> float:
        """Eq. 8 by a loop over every token of the answer."""
        chosen = [i for i, bit in enumerate(mask) if bit]
        steps = [
            max(self.step_delay_s(i, app, t) for i in chosen) for t in range(app.answer_tokens)
        ]
        return sum(steps) / app.answer_tokens + self.gating_s

    def naive_energy_j(self, mask: list[bool]) -> float:
        """Eq. 10–12 by loops: per application, per chosen expert, per token."""
        total_share = sum(a.share for a in self.applications)
        energy = 0.0
        for app in self.applications:
            for i in (i for i, bit in enumerate(mask) if bit):
                cost = self.costs[i]
                compute = sum(self.step_compute_s(i, app, t) for t in range(app.answer_tokens))
                sending = cost.link.transmit_s(slice_bytes(SLICE_K)) * app.answer_tokens
                per_answer = cost.compute.power_w * compute + cost.link.tx_power_w * sending
                energy += app.share / total_share * per_answer
        return energy


seconds = st.floats(0.0, 0.05, allow_nan=False)


@st.composite
def compute_fits(draw: st.DrawFn) -> ComputeFit:
    return ComputeFit(
        prefill_base_s=draw(seconds),
        prefill_per_token_s=draw(st.floats(0.0, 1e-3)),
        decode_base_s=draw(seconds),
        decode_per_context_token_s=draw(st.sampled_from([0.0, 1e-7, 1e-5, 1e-4])),
        power_w=draw(st.floats(1.0, 500.0)),
    )


@st.composite
def links(draw: st.DrawFn) -> Link:
    if draw(st.booleans()):
        return Link("lan", latency_ms=draw(st.floats(0.0, 5.0)), rate_mbps=1000.0)
    return Link(
        "wifi",
        latency_ms=draw(st.floats(0.0, 10.0)),
        bandwidth_mhz=draw(st.floats(1.0, 40.0)),
        snr_db=draw(st.floats(0.0, 30.0)),
        tx_power_w=draw(st.floats(0.0, 2.0)),
    )


@st.composite
def pools(draw: st.DrawFn, *, max_answer: int = 300) -> Pool:
    n = draw(st.integers(1, 5))
    costs = [ExpertCost(f"e{i}", draw(compute_fits()), draw(links())) for i in range(n)]
    apps = [
        Application(
            f"app{m}",
            prompt_tokens=draw(st.integers(1, 600)),
            answer_tokens=draw(st.integers(1, max_answer)),
            share=draw(st.floats(0.1, 1.0)),
        )
        for m in range(draw(st.integers(1, 2)))
    ]
    return Pool(costs, apps, gating_s=draw(st.floats(0.0, 0.05)))


def non_empty_mask(data: st.DataObject, n: int) -> list[bool]:
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask[data.draw(st.integers(0, n - 1))] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(pool=pools(max_answer=DECODE_POINTS + 1), data=st.data())
def test_subset_delay_of_short_answers_equals_the_per_step_loop(
    pool: Pool, data: st.DataObject
) -> None:
    mask = non_empty_mask(data, len(pool.costs))
    got = pool.table().delay_s(np.array([mask]))[0]
    want = [pool.naive_delay_s(mask, app) for app in pool.applications]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@settings(max_examples=60, deadline=None)
@given(pool=pools(), data=st.data())
def test_subset_delay_of_long_answers_is_the_loop_within_the_binning_error(
    pool: Pool, data: st.DataObject
) -> None:
    mask = non_empty_mask(data, len(pool.costs))
    got = pool.table().delay_s(np.array([mask]))[0]
    slopes = [
        c.compute.decode_per_context_token_s for c, b in zip(pool.costs, mask, strict=True) if b
    ]
    for app, delay in zip(pool.applications, got, strict=True):
        want = pool.naive_delay_s(mask, app)
        # the max over S of lines is convex; a bin of width w evaluated at its midpoint is off
        # by at most (steepest - flattest slope) * w / 4, per step
        width = (app.answer_tokens - 1) / DECODE_POINTS
        slack = (max(slopes) - min(slopes)) * width / 4
        assert abs(delay - want) <= slack + 1e-12
        if sum(mask) == 1:  # one expert: every bin is a line, exact
            assert delay == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_the_empty_subset_costs_the_gating_delay_and_no_energy() -> None:
    pool = Pool([ExpertCost("e0", spec_fit(RTX_4090, LLM_7B_Q4))], [Application("a", 8, 4)], 0.02)
    table = pool.table()
    empty = np.zeros((1, 1), dtype=bool)
    assert table.delay_s(empty).tolist() == [[0.02]]
    assert table.energy_j(empty).tolist() == [0.0]


@settings(max_examples=60, deadline=None)
@given(pool=pools(), data=st.data())
def test_energy_is_the_loop_reference_and_additive_over_the_subset(
    pool: Pool, data: st.DataObject
) -> None:
    mask = non_empty_mask(data, len(pool.costs))
    table = pool.table()
    energy = float(table.energy_j(np.array([mask]))[0])
    assert energy == pytest.approx(pool.naive_energy_j(mask), rel=1e-9)
    singles = table.energy_j(np.eye(len(mask), dtype=bool))
    assert energy == pytest.approx(float(singles[np.array(mask)].sum()), rel=1e-12)


@settings(max_examples=80, deadline=None)
@given(pool=pools(), data=st.data())
def test_delay_and_energy_never_fall_when_an_expert_joins(pool: Pool, data: st.DataObject) -> None:
    n = len(pool.costs)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    grown = mask.copy()
    grown[data.draw(st.integers(0, n - 1))] = True
    table = pool.table()
    assert (table.delay_s(grown) >= table.delay_s(mask)).all()
    assert (table.energy_j(grown) >= table.energy_j(mask)).all()


@settings(max_examples=60, deadline=None)
@given(pool=pools(), data=st.data())
def test_feasible_is_exactly_no_violations(pool: Pool, data: st.DataObject) -> None:
    table = pool.table()
    n = table.size
    masks = np.array([[bool(s >> i & 1) for i in range(n)] for s in range(1, 1 << n)])
    delays, energies = table.delay_s(masks), table.energy_j(masks)
    pick = st.sampled_from(range(len(masks)))
    tau = {a.name: float(delays[data.draw(pick), m]) for m, a in enumerate(table.applications)}
    constraints = Constraints(table, Budgets(tau, float(energies[data.draw(pick)])))
    feasible = constraints.feasible(masks)
    for mask, ok in zip(masks, feasible, strict=True):
        broken = constraints.violations(mask)
        assert ok == (not broken)
        assert {name for name, _, _ in broken} <= {*(f"tau[{a}]" for a in tau), "energy"}
        assert all(value > limit for _, value, limit in broken)


def test_violations_name_the_constraint_with_its_value_and_limit() -> None:
    fit = ComputeFit(0.01, 0.0, 0.02, 0.0, power_w=100.0)
    table = CostTable([ExpertCost("e0", fit)], [Application("chat", 4, 3)])
    constraints = Constraints(table, Budgets({"chat": 0.01}, energy_j=1.0))
    # delay: (0.01 + 2 * 0.02) / 3 s; energy: 100 W * 0.05 s
    broken = constraints.violations(np.array([True]))
    assert [(name, limit) for name, _, limit in broken] == [("tau[chat]", 0.01), ("energy", 1.0)]
    assert [value for _, value, _ in broken] == pytest.approx([0.05 / 3, 5.0])
    assert constraints.feasible(np.array([True])).tolist() == [False]


def test_an_application_default_tau_applies_unless_the_budgets_override_it() -> None:
    fit = ComputeFit(0.01, 0.0, 0.02, 0.0, power_w=100.0)  # delay 0.05 / 3 s
    table = CostTable([ExpertCost("e0", fit)], [Application("chat", 4, 3, tau_s=0.01)])
    assert Constraints(table, Budgets()).feasible(np.array([True])).tolist() == [False]
    assert Constraints(table, Budgets({"chat": 1.0})).feasible(np.array([True])).tolist() == [True]


def test_budgets_for_an_unknown_application_are_an_error() -> None:
    table = CostTable([], [Application("chat", 4, 3)])
    with pytest.raises(ValueError, match=r"unknown applications \['chta'\]; known: \['chat'\]"):
        Constraints(table, Budgets({"chta": 1.0}))


def test_an_application_needs_tokens_and_a_positive_share() -> None:
    with pytest.raises(ValueError, match="chat: prompt and answer need >= 1 token"):
        Application("chat", 0, 3)
    with pytest.raises(ValueError, match="share must be positive"):
        Application("chat", 4, 3, share=0.0)
    assert math.isinf(Link().rate_bps())


def test_sub_keeps_the_costs_of_the_experts_kept() -> None:
    costs = [ExpertCost(f"e{i}", spec_fit(RTX_4090, LLM_7B_Q4).scaled(1 + i)) for i in range(3)]
    table = CostTable(costs, [Application("chat", 64, 16)])
    sub = table.sub(["e2", "e0"])
    assert sub.expert_ids == ["e2", "e0"]
    full = table.delay_s(np.array([[True, False, False], [False, False, True]]))
    np.testing.assert_allclose(sub.delay_s(np.array([[False, True], [True, False]])), full)
    np.testing.assert_allclose(sub.energy, table.energy[[2, 0]])
