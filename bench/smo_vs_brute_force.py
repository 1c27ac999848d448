"""bench/smo_vs_brute_force: Algorithm 2 (SMO) against enumerating every subset, N = 8..24.

On ``synthetic_problem(n, seed)`` instances (random specialist pools on the paper's testbed
costs, budgets drawn between the cheapest expert and the whole pool), each solver gets a fresh
instance, so that no oracle cache is shared:

- SMO (``smo``, the default difference-of-monotone bound, ε = --eps): wall time, oracle calls
  (losses evaluated), bound evaluations (no loss computed), boxes examined;
- brute force: wall time and oracle calls (every feasible subset is evaluated once);
- whether SMO's loss is within ε of brute force's (the ε-optimum), and greedy's and a random
  maximal subset's losses, for context.

The target: N = 24 solved to the ε-optimum in <= 2 s with oracle calls <= 1 % of 2^N.

    python bench/smo_vs_brute_force.py [--sizes 8 12 16 20 24] [--seeds 3] [--eps 1e-4]
        [--no-brute-above N] [--plot docs/img/smo-vs-brute-force.png] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import machine, markdown_table

from moe2.selection.problem import Infeasible, Problem
from moe2.selection.smo import brute_force, greedy, random_subset, smo
from moe2.selection.synthetic import synthetic_problem

TARGET_N = 24
TARGET_WALL_S = 2.0
TARGET_CALL_SHARE = 0.01


@dataclass(frozen=True, slots=True)
class Run:
    n: int
    seed: int
    smo_wall_s: float
    smo_calls: int
    smo_bounds: int
    smo_boxes: int
    smo_loss: float
    brute_wall_s: float | None  # None: brute force skipped (--no-brute-above)
    brute_calls: int | None
    brute_loss: float | None
    greedy_loss: float
    random_loss: float

    @property
    def call_share(self) -> float:
        return self.smo_calls / float(1 << self.n)

    def within(self, eps: float) -> bool | None:
        return None if self.brute_loss is None else self.smo_loss <= self.brute_loss + eps


def instances(n: int, count: int) -> Iterator[int]:
    """The first ``count`` seeds whose budgets leave some subset feasible."""
    found, seed = 0, 0
    while found < count:
        try:
            synthetic_problem(n, seed).check_feasible()
        except Infeasible:
            seed += 1
            continue
        yield seed
        found += 1
        seed += 1


def fresh(n: int, seed: int) -> Problem:
    return synthetic_problem(n, seed)


def measure(n: int, seed: int, eps: float, brute: bool) -> Run:
    found = smo(fresh(n, seed), eps=eps)
    best = brute_force(fresh(n, seed)) if brute else None
    return Run(
        n=n,
        seed=seed,
        smo_wall_s=found.wall_s,
        smo_calls=found.oracle_calls,
        smo_bounds=found.bounds,
        smo_boxes=found.boxes,
        smo_loss=found.loss,
        brute_wall_s=None if best is None else best.wall_s,
        brute_calls=None if best is None else best.oracle_calls,
        brute_loss=None if best is None else best.loss,
        greedy_loss=greedy(fresh(n, seed)).loss,
        random_loss=random_subset(fresh(n, seed), seed=seed).loss,
    )


def row(run: Run, eps: float) -> list[object]:
    within = run.within(eps)
    brute = run.brute_wall_s is not None and run.brute_loss is not None
    return [
        run.n,
        run.seed,
        f"{run.smo_wall_s * 1e3:.1f}",
        run.smo_calls,
        f"{100 * run.call_share:.4f}",
        run.smo_bounds,
        run.smo_boxes,
        f"{run.brute_wall_s:.2f}" if brute else "skipped",
        run.brute_calls if brute else "-",
        f"{run.smo_loss:.5f}",
        "-" if within is None else ("yes" if within else "**no**"),
        f"{run.greedy_loss - run.smo_loss:+.4f}",
        f"{run.random_loss - run.smo_loss:+.4f}",
    ]


HEADER = [
    "N",
    "seed",
    "SMO ms",
    "SMO oracle calls",
    "% of 2^N",
    "SMO bounds",
    "boxes",
    "brute s",
    "brute calls",
    "SMO loss",
    "ε-opt",
    "greedy − SMO",
    "random − SMO",
]


def verdict(runs: Sequence[Run], eps: float) -> list[str]:
    """PASS/MISS lines for the target at N = 24."""
    at = [r for r in runs if r.n == TARGET_N]
    if not at:
        return [f"MISS  target not measured: add {TARGET_N} to --sizes"]
    wall = max(r.smo_wall_s for r in at)
    share = max(r.call_share for r in at)
    checked = [r.within(eps) for r in at]
    optimal = (
        "unverified (brute force skipped)"
        if None in checked
        else f"{sum(bool(c) for c in checked)}/{len(at)} instances"
    )
    lines = [
        _line(
            wall <= TARGET_WALL_S, f"N = {TARGET_N} SMO wall, worst of {len(at)}", f"{wall:.3f} s"
        ),
        _line(share <= TARGET_CALL_SHARE, "oracle calls / 2^N, worst", f"{100 * share:.4f} %"),
        _line(all(c is True for c in checked), f"ε-optimum (ε = {eps:g})", optimal),
    ]
    ok = all(line.startswith("PASS") for line in lines)
    target = f"N = {TARGET_N} to the ε-optimum in <= {TARGET_WALL_S:g} s, calls <= 1 % of 2^N"
    return [*lines, _line(ok, "target", target)]


def _line(ok: bool, what: str, measured: str) -> str:
    return f"{'PASS' if ok else 'MISS'}  {what}: {measured}"


def plot(runs: Sequence[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.n for r in runs})

    def median(n: int, value: str) -> float:
        values = [getattr(r, value) for r in runs if r.n == n and getattr(r, value) is not None]
        return statistics.median(values) if values else float("nan")

    fig, (wall, calls) = plt.subplots(1, 2, figsize=(10, 4))
    wall.plot(sizes, [median(n, "smo_wall_s") for n in sizes], "o-", label="SMO")
    wall.plot(sizes, [median(n, "brute_wall_s") for n in sizes], "s--", label="brute force")
    wall.set(xlabel="experts N", ylabel="wall time, s (median)", yscale="log")
    calls.plot(sizes, [median(n, "smo_calls") for n in sizes], "o-", label="SMO")
    brute = "brute force (the feasible S)"
    calls.plot(sizes, [median(n, "brute_calls") for n in sizes], "s--", label=brute)
    calls.plot(sizes, [2.0**n for n in sizes], ":", color="grey", label="2^N")
    calls.plot(sizes, [0.01 * 2.0**n for n in sizes], ":", color="red", label="1 % of 2^N")
    calls.set(xlabel="experts N", ylabel="oracle calls (median)", yscale="log")
    for ax in (wall, calls):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("SMO (Algorithm 2, dm bound) vs brute force, synthetic_problem instances")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 12, 16, 20, 24], help="pool sizes")
    p.add_argument("--seeds", type=int, default=3, help="solvable instances per size (default 3)")
    p.add_argument("--eps", type=float, default=1e-4, help="SMO's ε, nats per token (1e-4)")
    p.add_argument(
        "--no-brute-above", type=int, metavar="N", help="skip brute force for sizes above N"
    )
    p.add_argument("--plot", type=Path, help="also draw wall time and oracle calls vs N (PNG)")
    p.add_argument("--json", type=Path, help="also write the runs here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    runs: list[Run] = []
    for n in args.sizes:
        brute = args.no_brute_above is None or n <= args.no_brute_above
        runs.extend(measure(n, seed, args.eps, brute) for seed in instances(n, args.seeds))
    print(markdown_table(HEADER, [row(r, args.eps) for r in runs]))
    print()
    for line in verdict(runs, args.eps):
        print(line)
    took = time.perf_counter() - started
    print(f"\n{len(runs)} instances in {took:.0f} s; machine: {json.dumps(machine())}")
    if args.plot:
        plot(runs, args.plot)
    if args.json:
        report: dict[str, Any] = {"eps": args.eps, "runs": [asdict(r) for r in runs]}
        args.json.write_text(json.dumps(report | {"machine": machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
