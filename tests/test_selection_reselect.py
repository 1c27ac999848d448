"""LiveSelection as pure bookkeeping: joins, leaves, drift, unknown experts, infeasible budgets."""

from __future__ import annotations

import numpy as np
import pytest

from moe2.runtime import wire
from moe2.selection.costs import Application, Budgets, ComputeFit, ExpertCost
from moe2.selection.live import MIN_SAMPLES, LiveSelection
from moe2.selection.profiles import Profiles
from tests.test_selection_live import owners_oracle

FIT = ComputeFit(0.01, 1e-4, 0.02, 0.0, power_w=10.0)
CHAT = Application("chat", 32, 16)


def heartbeat(
    expert: str, decode_s: float = 0.0, prefill_s_per_token: float = 0.0
) -> wire.Heartbeat:
    device = wire.DeviceProfile(
        name="d", power_w=0.0, decode_s=decode_s, prefill_s_per_token=prefill_s_per_token,
        max_context=64,
    )  # fmt: skip
    return wire.Heartbeat(
        expert=expert, model="m", tokenizer="t", backend="b", vocab_size=8, eos_ids=[0],
        device=device,
    )  # fmt: skip


def selection(profiled: list[str], budgets: Budgets | None = None) -> LiveSelection:
    profiles = Profiles({e: ExpertCost(e, FIT) for e in profiled}, {"chat": CHAT})
    return LiveSelection(owners_oracle(["a", "b", "c"]), profiles, budgets or Budgets())


def decode_slice(expert: str, step: int, compute_s: float, energy_j: float = 0.0) -> wire.Slice:
    return wire.make_slice(
        session="s", expert=expert, step=step, ids=np.array([1]), logprobs=np.array([0.0]),
        pieces=[b"x"], compute_s=compute_s, energy_j=energy_j,
    )  # fmt: skip


def test_a_join_and_a_leave_each_make_the_choice_stale() -> None:
    live = selection(["a", "b", "c"])
    live.update_members({"a": heartbeat("a"), "b": heartbeat("b")})
    assert live.stale == "joined a, b"
    assert live.solve().experts == ["a", "b"]
    assert live.stale is None
    live.update_members({"b": heartbeat("b"), "c": heartbeat("c")})
    assert live.stale == "joined c; left a"
    choice = live.solve()
    assert (choice.experts, choice.version, choice.live) == (["b", "c"], 2, ["b", "c"])
    assert live.select(["b"]) == ["b"]  # an expert gone since the solve is not offered


def test_experts_unknown_to_the_gate_or_without_a_cost_are_left_out() -> None:
    live = selection(["a"])
    live.update_members(
        {"a": heartbeat("a"), "b": heartbeat("b"), "z": heartbeat("z", decode_s=0.05)}
    )
    choice = live.solve()
    assert choice.experts == ["a"]
    assert "unknown to the gating" in choice.left_out["z"]
    assert choice.left_out["b"] == "no profile and no measured cost yet"


def test_an_unprofiled_expert_is_costed_from_its_heartbeat() -> None:
    live = selection(["a"], Budgets(tau_s={"chat": 0.5}))
    live.update_members(
        {"a": heartbeat("a"), "b": heartbeat("b", decode_s=2.0, prefill_s_per_token=0.01)}
    )
    choice = live.solve()
    assert choice.experts == ["a"]  # b's measured 2 s per token breaks the 0.5 s limit
    assert choice.left_out == {}


def test_heartbeat_costs_are_followed_when_they_move_or_first_appear() -> None:
    live = selection(["a"], Budgets(tau_s={"chat": 0.5}))
    live.update_members(
        {"a": heartbeat("a"), "b": heartbeat("b", decode_s=2.0), "c": heartbeat("c")}
    )
    first = live.solve()
    assert first.experts == ["a"]  # b measured 2 s per token (a busy box), c nothing yet
    assert first.left_out == {"c": "no profile and no measured cost yet"}
    live.update_members(
        {"a": heartbeat("a"), "b": heartbeat("b", decode_s=2.1), "c": heartbeat("c")}
    )
    assert live.stale is None  # within the 25 % drift
    live.update_members(
        {
            "a": heartbeat("a"),
            "b": heartbeat("b", decode_s=0.05),
            "c": heartbeat("c", decode_s=0.04),
        }
    )
    assert live.stale == "drift b heartbeat x0.03; measured c"
    assert live.solve().experts == ["a", "b", "c"]


def test_a_heartbeat_cost_scaled_by_slices_is_not_called_a_heartbeat_drift() -> None:
    live = selection([], Budgets(tau_s={"chat": 5.0}))
    members = {e: heartbeat(e, decode_s=0.02) for e in "abc"}
    live.update_members(members)
    live.solve()
    for step in range(1, MIN_SAMPLES + 1):
        live.observe(decode_slice("a", step, 0.04))  # twice what a's heartbeat announces
    assert live.stale == "drift a time x2.00"
    live.solve()  # a is now costed at twice its announced 0.02 s ...
    live.update_members(members)  # ... and its heartbeat, unchanged, is no new drift
    assert live.stale is None


def test_a_drifting_expert_is_reselected_with_its_measured_cost() -> None:
    live = selection(["a", "b", "c"], Budgets(tau_s={"chat": 0.1}))
    live.update_members({e: heartbeat(e) for e in "abc"})
    first = live.solve()
    assert first.experts == ["a", "b", "c"]
    for step in range(1, MIN_SAMPLES):
        live.observe(decode_slice("c", step, 0.2))  # 10x the modelled 0.02 s
    assert live.stale is None  # too few samples to call it
    live.observe(decode_slice("c", MIN_SAMPLES, 0.2))
    assert live.stale is not None and live.stale.startswith("drift c time x")
    again = live.solve()
    assert again.experts == ["a", "b"]  # c no longer meets the 0.1 s delay limit
    live.observe(decode_slice("c", MIN_SAMPLES + 1, 0.2))
    assert live.stale is None  # the drift was taken into account; no new one


def test_a_measured_power_above_the_profile_raises_the_predicted_energy() -> None:
    live = selection(["a", "b", "c"])
    live.update_members({e: heartbeat(e) for e in "abc"})
    before = live.solve()
    for step in range(1, MIN_SAMPLES + 1):  # on time, but drawing 30 W where 10 W were declared
        live.observe(decode_slice("a", step, 0.02, energy_j=0.02 * 30.0))
    assert live.stale == "drift a power x3.00"
    after = live.solve()
    assert after.experts == before.experts == ["a", "b", "c"]
    assert after.energy_j is not None and before.energy_j is not None
    assert after.energy_j == pytest.approx(before.energy_j * 5 / 3)  # a: 10 -> 30 W of 30 W


def test_infeasible_budgets_give_an_error_that_names_the_constraint() -> None:
    live = selection(["a", "b", "c"], Budgets(energy_j=0.001))
    live.update_members({e: heartbeat(e) for e in "abc"})
    choice = live.solve()
    assert choice.experts == []
    assert choice.error is not None and choice.error.startswith(
        "[infeasible] no expert meets energy"
    )
    assert live.select(["a", "b", "c"]) == []


def test_unknown_applications_in_the_budgets_are_refused() -> None:
    live = selection(["a"], Budgets(tau_s={"video": 1.0}))
    live.update_members({"a": heartbeat("a")})
    choice = live.solve()
    assert choice.error is not None and "video" in choice.error


@pytest.mark.parametrize("compute_s", [0.0, float("nan"), -1.0])
def test_nonsense_compute_times_do_not_move_the_estimate(compute_s: float) -> None:
    live = selection(["a"])
    live.update_members({"a": heartbeat("a")})
    live.solve()
    for step in range(1, 3 * MIN_SAMPLES):
        live.observe(decode_slice("a", step, compute_s))
    assert live.stale is None
