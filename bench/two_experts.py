"""bench/two_experts: two real experts fused, one core each, against one expert alone on one core.

Two ``moe2 expert`` processes serve SmolLM2-135M-Instruct (``--backend``, default transformers,
one thread each), pinned with ``taskset`` to core 0 and core 1; a fusion agent (equal weights)
runs in this process. Every question is asked twice in a row, the order alternating: with
``experts = 1`` (the agent takes the first expert only: one expert alone on its core, through
the same agent and bus) and with ``experts = 2`` (both fused, each on its own core). Greedy: the
two experts are the same model, so the fused text must equal the single one.

Per answer, on the client: time to first token (ask to first chunk) and decode tokens/s (tokens
after the first over the time from the first chunk to the last). Targets (issue 11): fused
tokens/s at least 0.85x the single expert's, and a time to first token at most 25 ms above it
(p50s).

    python bench/two_experts.py [--backend transformers] [--tokens 48] [--rounds 2]
                                [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from _common import Latency, machine, markdown_table, quiet_logs
from suite import SUITE_ROWS, suite_row, verdict

import moe2
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime.connection import nats_connection
from moe2.runtime.lifecycle import stop_processes
from moe2.runtime.server import NatsServer

PREFIX = "benchtwo"
EXPERTS = ("a", "b")  # a on core 0, b on core 1
QUESTIONS = (
    "Why is the sky blue?",
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "What should I pack for a week of hiking?",
)
TARGET_RATE, TARGET_TTFT_MS = 0.85, 25.0
START_TIMEOUT_S = 300.0


@dataclass(slots=True)
class Answers:
    """Per mode ("single", "fused"): time to first token (ms), decode tokens/s, texts."""

    ttft_ms: dict[str, list[float]] = field(default_factory=lambda: {"single": [], "fused": []})
    rate: dict[str, list[float]] = field(default_factory=lambda: {"single": [], "fused": []})
    texts: dict[str, list[str]] = field(default_factory=lambda: {"single": [], "fused": []})


@contextmanager
def pinned_experts(url: str, backend: str, logs: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One ``moe2 expert`` per core (``taskset -c i`` where it exists); stopped on the way out."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    cores = os.cpu_count() or 1
    try:
        for core, expert in enumerate(EXPERTS):
            command = [sys.executable, "-m", "moe2", "expert", "--id", expert, "--nats", url]
            command += ["--prefix", PREFIX, "--backend", backend, "--threads", "1"]
            if shutil.which("taskset") and cores > core:
                command = ["taskset", "-c", str(core), *command]
            with (logs / f"{expert}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
                )
        yield procs
    finally:
        stop_processes(procs)


async def ask(
    client: moe2.Client, question: str, experts: int, tokens: int
) -> tuple[float, float, str]:
    """(time to first token in ms, decode tokens/s, text) of one greedy answer."""
    start = time.perf_counter()
    first = last = 0.0
    answer = client.ask(question, max_tokens=tokens, experts=experts, timeout=120)
    async for _ in answer:
        last = time.perf_counter()
        first = first or last
    final = answer.final
    assert final is not None, "a finished stream has its final message"
    n = final.usage.completion_tokens
    rate = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return (first - start) * 1e3, rate, final.text


async def measure(url: str, args: argparse.Namespace) -> Answers:
    answers = Answers()
    config = FusionConfig(prefix=PREFIX, step_deadline_s=30.0, prefill_deadline_s=120.0)
    async with (
        nats_connection(url, name="bench-two-experts") as nc,
        moe2.connect(url, prefix=PREFIX, name="bench-two-client") as client,
        anyio.create_task_group() as tg,
    ):
        agent = FusionAgent(nc, config)
        await tg.start(agent.run)
        await agent.wait_for_experts(len(EXPERTS), START_TIMEOUT_S)
        await ask(client, QUESTIONS[0], 2, 4)  # warm-up: both experts, not counted
        modes = [("single", 1), ("fused", 2)]
        for r in range(args.rounds):
            for i, question in enumerate(args.questions):
                for mode, experts in modes if (r + i) % 2 == 0 else modes[::-1]:
                    ttft, rate, text = await ask(client, question, experts, args.tokens)
                    answers.ttft_ms[mode].append(ttft)
                    answers.rate[mode].append(rate)
                    answers.texts[mode].append(text)
        tg.cancel_scope.cancel()
    return answers


def report(answers: Answers, args: argparse.Namespace, took_s: float) -> dict[str, Any]:
    ttft = {m: Latency.of(v) for m, v in answers.ttft_ms.items()}
    rate = {m: Latency.of(v) for m, v in answers.rate.items()}  # "ms" fields hold tokens/s here
    ratio = rate["fused"].p50_ms / rate["single"].p50_ms
    added = ttft["fused"].p50_ms - ttft["single"].p50_ms
    same = answers.texts["single"] == answers.texts["fused"]
    passed = ratio >= TARGET_RATE and added <= TARGET_TTFT_MS
    baseline = (
        f"one expert, one core: {rate['single'].p50_ms:.1f} tok/s, "
        f"TTFT p50 {ttft['single'].p50_ms:.0f} ms"
    )
    measured = (
        f"{rate['fused'].p50_ms:.1f} tok/s = {ratio:.2f}×; TTFT p50 "
        f"{ttft['fused'].p50_ms:.0f} ms ({added:+.0f} ms)"
    )
    note = "" if same else "the fused greedy text differs from the single expert's"
    return {
        "command": " ".join(["python", *sys.argv]),
        "settings": {"backend": args.backend, "tokens": args.tokens, "rounds": args.rounds},
        "machine": machine(),
        "took_s": round(took_s, 1),
        "ttft_ms": {m: x.as_dict() for m, x in ttft.items()},
        "tokens_per_s": {m: x.as_dict() for m, x in rate.items()},
        "rate_ratio_p50": ratio,
        "ttft_added_p50_ms": added,
        "same_text": same,
        SUITE_ROWS: [
            suite_row(
                "two_experts",
                baseline,
                measured,
                passed,
                row=f"two real experts fused, one core each ({args.backend})",
                note=note,
            )
        ],
    }


def render(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    head = (
        f"bench/two_experts: SmolLM2-135M on {s['backend']}, {s['tokens']} tokens, "
        f"{s['rounds']} round(s); {m['cpus']} CPUs, load {m['loadavg'][0]}; {result['took_s']} s"
    )
    rows = [
        (
            mode,
            f"{result['tokens_per_s'][mode]['p50_ms']:.1f}",
            f"{result['ttft_ms'][mode]['p50_ms']:.0f}",
            f"{result['ttft_ms'][mode]['p99_ms']:.0f}",
            result["ttft_ms"][mode]["samples"],
        )
        for mode in ("single", "fused")
    ]
    table = markdown_table(["mode", "tokens/s p50", "TTFT p50 ms", "TTFT p99 ms", "answers"], rows)
    row = result[SUITE_ROWS][0]
    checks = markdown_table(
        ["check", "measured", "target", "result"],
        [("fused vs single", row["measured"], row["target"], verdict(row["passed"]))],
    )
    same = "identical" if result["same_text"] else "DIFFERENT"
    return f"{head}\n\n{table}\n\n{checks}\n\ngreedy texts, fused vs single: {same}"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backend", default="transformers", help="the experts' backend")
    p.add_argument("--tokens", type=int, default=48, help="tokens per answer (default 48)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the questions (default 2)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="one round of two questions, 24 tokens")
    args = p.parse_args(argv)
    args.questions = QUESTIONS
    if args.quick:
        args.rounds, args.tokens, args.questions = 1, min(args.tokens, 24), QUESTIONS[:2]
    if args.tokens < 2 or args.rounds < 1:
        p.error("need --tokens >= 2 and --rounds >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    quiet_logs()
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="two-experts-") as logs,
        NatsServer() as server,
        pinned_experts(server.url, args.backend, Path(logs)),
    ):
        answers = anyio.run(measure, server.url, args)
    result = report(answers, args, time.monotonic() - started)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
