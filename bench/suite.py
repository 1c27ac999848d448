"""The rows of the benchmark suite (``bench/run.py``): what each bench script puts in its JSON.

A script of the suite takes ``--json PATH`` (and ``--quick``, a shorter run) and writes, among
whatever else it reports, ``"suite_rows"``: one entry per row of issue 11's table that it
measured, each a baseline measured in the same run, a target and the measured figure with its
verdict. ``bench/run.py`` runs every script as a subprocess and prints all rows as one table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SUITE_ROWS = "suite_rows"  # the key of the rows in a script's JSON

# Every row of the suite, in the table's order: key -> (row, measured against, target).
ROWS: dict[str, tuple[str, str, str]] = {
    "fused_step": (
        "fused step, 4 replay experts",
        "raw nats-py fan-out/gather",
        "p50 ≤ 1.5×",
    ),
    "sessions_64": (
        "64 concurrent sessions, replay experts at 20 ms per batch",
        "1 session",
        "aggregate tokens/s ≥ 32×",
    ),
    "batching_16": (
        "expert batching, real SmolLM2, 16 sessions",
        "1 session",
        "aggregate tokens/s ≥ 5×",
    ),
    "backend_step": (
        "backend step cost, each backend",
        "the raw library's own decode loop on the same model",
        "≤ 1.2×",
    ),
    "two_experts": (
        "two real experts fused, one core each",
        "one expert alone on one core",
        "tokens/s ≥ 0.85×; time to first token + ≤ 25 ms p50",
    ),
    "speculative": (
        "speculative vs plain fusion, greedy, real experts",
        "plain fusion",
        "identical text; ≥ 1.5× tokens/s; < 1 round trip per token",
    ),
    "conversation_turn2": (
        "turn 2 of a 1,000-token conversation",
        "the same turn cold",
        "time to first token ≤ 0.25×",
    ),
    "gating": (
        "gating: embed + MLP per prompt",
        "the embedder's raw forward",
        "p50 ≤ 1.15×; ≤ 15 ms",
    ),
    "load_256": (
        "256 concurrent sessions for 60 s, replay experts, 2 fusion agents, each its own process",
        "every process's RSS after a warm-up under the same load",
        "started = completed; RSS growth < 10 % for every process",
    ),
}


@dataclass(frozen=True, slots=True)
class SuiteRow:
    """One measured row. ``key`` names the table's row (``ROWS``); a key may have several rows
    (one per backend), told apart by ``row``. ``passed`` None: reported without a verdict."""

    key: str
    row: str
    baseline: str  # the baseline and its figure, measured in the same run
    target: str
    measured: str  # the measured figure, with its ratio to the baseline
    passed: bool | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def suite_row(
    key: str, baseline: str, measured: str, passed: bool | None, *, row: str = "", note: str = ""
) -> dict[str, Any]:
    """A row of ``ROWS[key]`` as a script's JSON carries it (``row`` overrides the label)."""
    label, _, target = ROWS[key]
    return SuiteRow(key, row or label, baseline, target, measured, passed, note).as_dict()


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else "PASS" if passed else "**MISS**"
