"""Synthetic instances of problem (19) for tests and benchmarks.

A pool of N domain specialists: each example comes from one of D domains, each expert is good
at a few of them (its gold-token probabilities are higher there), the gating values favour the
experts that are good at the example's domain (a trained gating does the same), and every
expert runs on a box drawn from the paper's testbed mix (RTX 4090, Jetson AGX Orin) or a CPU,
with a 7B, 3B or 1B model. Budgets are drawn between the cheapest single expert and the whole
pool, so that some instances are tight and some loose.
"""

from __future__ import annotations

import numpy as np

from moe2.selection.costs import (
    Application,
    Budgets,
    Constraints,
    CostTable,
    Device,
    ExpertCost,
    Link,
    ModelSpec,
    spec_fit,
)
from moe2.selection.oracle import LossOracle, masks_of
from moe2.selection.problem import Problem

DEVICES = (
    Device("rtx4090", compute_tflops=82.6, bandwidth_gbps=1008, power_w=320, overhead_ms=4),
    Device("agx-orin", compute_tflops=5.3, bandwidth_gbps=204.8, power_w=40, overhead_ms=8),
    Device("cpu", compute_tflops=0.4, bandwidth_gbps=40, power_w=35, overhead_ms=6),
)
MODELS = (
    ModelSpec("7b-q4", params_b=7.0, bits=4.8, kv_kib_per_token=512),
    ModelSpec("3b-q4", params_b=3.0, bits=4.8, kv_kib_per_token=288),
    ModelSpec("1b-q4", params_b=1.2, bits=4.8, kv_kib_per_token=128),
)
APPLICATIONS = (Application("chat", 128, 64, share=0.7), Application("code", 512, 128, share=0.3))


def specialist_oracle(
    n: int, rng: np.random.Generator, *, examples: int = 24, domains: int | None = None
) -> LossOracle:
    """Gold-token log-probabilities and gating values of N specialists (see the module doc)."""
    d = domains or max(2, n // 2)
    skill = rng.normal(0.0, 1.0, size=(n, d)) + 2.0 * (rng.random((n, d)) < 2.0 / d)
    domain = rng.integers(0, d, size=examples)
    gates = np.exp(1.5 * skill[:, domain].T + rng.normal(0, 0.3, size=(examples, n)))
    gates /= gates.sum(axis=1, keepdims=True)
    gold = []
    for e in range(examples):
        tokens = int(rng.integers(2, 9))
        logit = skill[:, domain[e]][:, None] + rng.normal(0, 1.0, size=(n, tokens)) - 1.0
        gold.append(-np.logaddexp(0.0, -logit))  # log sigmoid: a probability in (0, 1)
    return LossOracle([f"e{i:02d}" for i in range(n)], gates, gold)


def testbed_costs(n: int, rng: np.random.Generator) -> list[ExpertCost]:
    """N experts on random boxes of the testbed mix, each behind a LAN or Wi-Fi link."""
    out = []
    for i in range(n):
        device = DEVICES[int(rng.integers(0, len(DEVICES)))]
        model = MODELS[int(rng.integers(0, len(MODELS)))]
        link = Link("lan", latency_ms=float(rng.uniform(0.2, 2.0)), rate_mbps=1000.0)
        if rng.random() < 0.4:
            link = Link("wifi", latency_ms=float(rng.uniform(2, 10)), bandwidth_mhz=20, snr_db=20)
        out.append(ExpertCost(f"e{i:02d}", spec_fit(device, model), link))
    return out


def random_budgets(table: CostTable, rng: np.random.Generator) -> Budgets:
    """Limits between the cheapest single expert's figure and the whole pool's."""
    n = table.size
    singles = np.eye(n, dtype=bool)
    everyone = np.ones((1, n), dtype=bool)
    lo_d, hi_d = table.delay_s(singles).min(axis=0), table.delay_s(everyone)[0]
    lo_e, hi_e = float(table.energy_j(singles).min()), float(table.energy_j(everyone)[0])
    tau = {
        a.name: float(lo + rng.uniform(0.0, 1.0) * (hi - lo))
        for a, lo, hi in zip(table.applications, lo_d, hi_d, strict=True)
    }
    return Budgets(tau, lo_e + float(rng.uniform(0.0, 0.8)) * (hi_e - lo_e))


def synthetic_problem(n: int, seed: int, *, examples: int = 24) -> Problem:
    """A random instance: specialists, testbed costs, and budgets that leave some S feasible."""
    rng = np.random.default_rng(seed)
    oracle = specialist_oracle(n, rng, examples=examples)
    table = CostTable(testbed_costs(n, rng), APPLICATIONS, gating_s=0.007)
    return Problem(oracle.expert_ids, oracle, Constraints(table, random_budgets(table, rng)))


def all_losses(oracle: LossOracle) -> np.ndarray:
    """Every subset's loss, index = bitmask (for exhaustive checks; 2^N of them)."""
    return oracle.evaluate(masks_of(list(range(1 << oracle.size)), oracle.size))
