"""bench/run.py: the benchmark suite of issue 11, every row in one markdown table.

Each row comes from a bench script run as a subprocess with ``--json`` (``--quick`` too with
``--quick``): the script measures its baseline in the same run and writes its rows under
``suite_rows`` (``bench/suite.py``). A script that does not exist, fails, times out or writes no
rows gives its rows as "not run" with the reason: no row is dropped silently. The table goes to
stdout; each script's own report and a JSON of everything (rows, reasons, the load before and
after each script, the commands) go to ``--out`` (default ``bench/out``).

    python bench/run.py [--quick] [--only KEY[,KEY]] [--out DIR]

``make bench`` runs it; the whole suite is sized for about 15 minutes on a 2-core box.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import markdown_table
from suite import ROWS, SUITE_ROWS, verdict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GATE = ROOT / "deploy" / "pools" / "default" / "gate"  # the shipped gate and its embedder


@dataclass(frozen=True, slots=True)
class Script:
    """A bench script of the suite, the rows it gives, and how long it may take."""

    name: str  # a file in bench/
    keys: tuple[str, ...]  # the rows of ROWS it measures
    args: tuple[str, ...] = ()  # the full run's arguments (besides --json)
    timeout_s: float = 300.0
    quick_timeout_s: float = 120.0


SCRIPTS = (
    Script("bus_overhead.py", ("fused_step",), timeout_s=120, quick_timeout_s=60),
    Script("batching.py", ("sessions_64", "batching_16"), timeout_s=420),
    Script("backends.py", ("backend_step",), ("--steps", "24"), timeout_s=360, quick_timeout_s=240),
    Script(
        "two_experts.py",
        ("two_experts",),
        ("--tokens", "32", "--rounds", "1"),
        timeout_s=360,
        quick_timeout_s=180,
    ),
    Script("speculative.py", ("speculative",), ("--tokens", "32"), timeout_s=420),
    Script("conversation.py", ("conversation_turn2",), timeout_s=420),
    Script(
        "gate_latency.py",
        ("gating",),
        ("--artifact", str(GATE), "--threads", "1", "--prompts", "30", "--rounds", "1"),
        timeout_s=420,
    ),
    Script("load.py", ("load_256",), timeout_s=240, quick_timeout_s=150),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one script gave: its rows, or why it gave none."""

    script: str
    rows: list[dict[str, Any]]
    reason: str  # "" when it ran and gave rows
    command: list[str]
    took_s: float
    load_before: float
    load_after: float


def run_script(script: Script, quick: bool, out: Path) -> Outcome:
    path = HERE / script.name
    stem = path.stem
    result, log = out / f"{stem}.json", out / f"{stem}.log"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(path), "--json", str(result)]
    command += ["--quick", *script.args] if quick else list(script.args)
    timeout = script.quick_timeout_s if quick else script.timeout_s
    load = os.getloadavg()[0]
    started = time.monotonic()
    if not path.exists():
        return Outcome(
            script.name, [], f"bench/{script.name} does not exist yet", [], 0, load, load
        )
    print(f"· {script.name} (at most {timeout:.0f} s) ...", file=sys.stderr, flush=True)
    reason = ""
    with log.open("wb") as sink:
        # its own process group: on a timeout the script's helpers (nats-server, experts) go too
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            code = proc.wait(timeout)
            if code != 0:
                reason = f"exited with {code}: {_last_line(log)}"
        except subprocess.TimeoutExpired:
            reason = f"timed out after {timeout:.0f} s (log: {log})"
            _stop_group(proc)
    took = time.monotonic() - started
    rows: list[dict[str, Any]] = []
    if not reason:
        rows, reason = _rows(result)
    print(f"  {took:.0f} s{': ' + reason if reason else ''}", file=sys.stderr, flush=True)
    return Outcome(script.name, rows, reason, command, took, load, os.getloadavg()[0])


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """TERM the script's process group (its cleanup runs), then KILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _rows(result: Path) -> tuple[list[dict[str, Any]], str]:
    try:
        data = json.loads(result.read_text())
    except (OSError, ValueError) as exc:
        return [], f"no readable JSON ({exc})"
    rows = data.get(SUITE_ROWS) if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        return [], f"its JSON has no '{SUITE_ROWS}'"
    fields = ("key", "row", "baseline", "target", "measured", "passed")
    if not all(isinstance(r, dict) and all(f in r for f in fields) for r in rows):
        return [], f"a row of its '{SUITE_ROWS}' lacks one of {', '.join(fields)}"
    return rows, ""


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def table(outcomes: Sequence[Outcome], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Every row of ROWS asked for, in the table's order: the measured rows of its key, or one
    "not run" row with the reason."""
    by_key: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    reasons: dict[str, str] = {}
    for outcome in outcomes:
        for row in outcome.rows:
            by_key.setdefault(row["key"], []).append(row | {"result": verdict(row["passed"])})
        script = next(s for s in SCRIPTS if s.name == outcome.script)
        for key in script.keys:
            reasons[key] = outcome.reason or f"bench/{outcome.script} gave no row for it"
    rows: list[dict[str, Any]] = []
    for key in keys:
        label, baseline, target = ROWS[key]
        if by_key[key]:
            rows += by_key[key]
        else:
            reason = reasons.get(key, "no script measures it")
            rows.append(
                {"key": key, "row": label, "baseline": baseline, "target": target}
                | {"measured": f"not run: {reason}", "passed": None, "result": "not run"}
            )
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    header = ["row", "baseline (same run)", "target", "measured", "result"]
    cells = [
        [
            r["row"],
            r["baseline"],
            r["target"],
            r["measured"] + (f" ({r['note']})" if r.get("note") else ""),
            r["result"],
        ]
        for r in rows
    ]
    return markdown_table(header, [[_cell(c) for c in row] for row in cells])


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="each script's --quick run")
    p.add_argument(
        "--only",
        type=lambda s: [k for k in s.split(",") if k],
        default=list(ROWS),
        help=f"rows to run, comma-separated (default all: {','.join(ROWS)})",
    )
    p.add_argument("--out", type=Path, default=HERE / "out", help="logs and JSON (bench/out)")
    args = p.parse_args(argv)
    unknown = [k for k in args.only if k not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; the rows are {', '.join(ROWS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    outcomes = [
        run_script(s, args.quick, args.out) for s in SCRIPTS if set(s.keys) & set(args.only)
    ]
    rows = table(outcomes, args.only)
    took = time.monotonic() - started
    loads = [o.load_before for o in outcomes] + [o.load_after for o in outcomes]
    head = (
        f"bench/run.py{' --quick' if args.quick else ''}: {len(rows)} rows in {took / 60:.1f} min "
        f"on {os.cpu_count()} CPUs, load average {min(loads, default=0):.1f}–"
        f"{max(loads, default=0):.1f} while it ran"
    )
    print(f"{head}\n\n{render(rows)}")
    summary = {
        "command": " ".join(["python", *sys.argv]),
        "took_s": round(took, 1),
        "rows": rows,
        "scripts": [
            {
                "script": o.script,
                "command": o.command,
                "reason": o.reason,
                "took_s": round(o.took_s, 1),
                "load_before": o.load_before,
                "load_after": o.load_after,
            }
            for o in outcomes
        ],
    }
    (args.out / "suite.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"\n(each script's report and JSON: {args.out}; all rows: {args.out / 'suite.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
