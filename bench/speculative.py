"""bench/speculative: speculative fusion against plain step-by-step fusion, greedy, real experts.

Three ``moe2 expert`` processes serve SmolLM2-135M-Instruct, one torch thread each: the base
model and two shipped LoRA adapters (``cluster-0``, ``cluster-1``), so they disagree now and
then. One fusion agent (equal weights) runs in this process; every question is asked twice in a
row, the order alternating, plain (``speculate = 0``) and speculative (``--speculate`` draft
tokens a round), the agent's config switched between the two (a session reads it when it
starts). Greedy: the two texts must be identical.

Two pools, one after the other: all three experts on transformers (the same speed: the drafter
is one of equals), and, where llama-cpp-python is installed, the base expert on llama.cpp (its
Q4_1 kernels decode SmolLM2 about 6x faster than transformers here), whose prefill is the
fastest per token and so drafts: the case speculation is for, a fast expert drafting for slow
ones.

Per answer, on the client: decode tokens/s (tokens after the first over the time from the
first chunk to the last), and round trips, counted on the bus: the Open, then every distinct
wave of Steps the agent sent for the session (a Step sent to several experts at once is one
round trip; a speculative round is two: the draft, then its verification). Targets (issue 11):
identical text, at least 1.5x the plain tokens/s, fewer than one round trip per token.

    python bench/speculative.py [--speculate 4] [--tokens 40] [--rounds 1] [--json out.json]
                                [--base-backends transformers,llamacpp] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
from _common import machine, markdown_table, quiet_logs
from suite import SUITE_ROWS, suite_row

import moe2
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime import wire
from moe2.runtime.connection import nats_connection
from moe2.runtime.errors import Moe2Error
from moe2.runtime.lifecycle import stop_processes
from moe2.runtime.server import NatsServer
from moe2.runtime.subjects import Subjects

PREFIX = "benchspec"
EXPERTS = {"base": None, "c0": "cluster-0", "c1": "cluster-1"}  # expert -> its LoRA adapter
QUESTIONS = (
    "Why is the sky blue?",
    "Explain how a bicycle stays upright.",
    "Write a short story about a lighthouse keeper.",
)
TARGET_RATE, TARGET_TRIPS = 1.5, 1.0
START_TIMEOUT_S = 300.0
MODES = ("plain", "speculative")
BASE_BACKENDS = (
    ("transformers", "llamacpp") if importlib.util.find_spec("llama_cpp") else ("transformers",)
)


@dataclass(slots=True)
class Answers:
    """Per mode: decode seconds and tokens after the first, round trips, texts."""

    decode_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODES, 0.0))
    decoded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))
    trips: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))
    texts: dict[str, list[str]] = field(default_factory=lambda: {m: [] for m in MODES})


@contextmanager
def experts(url: str, logs: Path, base_backend: str) -> Iterator[None]:
    """The three ``moe2 expert`` processes (the base model on ``base_backend``, the adapters
    on transformers); stopped on the way out."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for expert, adapter in EXPERTS.items():
            command = [sys.executable, "-m", "moe2", "expert", "--id", expert, "--nats", url]
            command += ["--prefix", PREFIX, "--threads", "1", "--log-level", "warning"]
            command += ["--adapter", adapter] if adapter else ["--backend", base_backend]
            with (logs / f"{expert}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
                )
        yield
    finally:
        stop_processes(procs)


class StepWaves:
    """Counts, per session, the distinct waves of Steps a fusion agent sends."""

    def __init__(self) -> None:
        self.waves: dict[str, set[tuple[int, int, tuple[int, ...]]]] = defaultdict(set)

    async def on_step(self, msg: Any) -> None:
        try:
            step = wire.decode(msg.data)
        except Moe2Error:  # not a Step (the membership's liveness probes, say): not counted
            return
        if isinstance(step, wire.Step):
            self.waves[step.session].add((step.step, step.propose, tuple(step.draft)))


async def ask(client: moe2.Client, question: str, tokens: int) -> tuple[float, wire.Final]:
    """(decode seconds: first chunk to last, the Final) of one greedy answer."""
    first = last = 0.0
    answer = client.ask(question, max_tokens=tokens, timeout=300)
    async for _ in answer:
        last = time.perf_counter()
        first = first or last
    assert answer.final is not None, "a finished stream has its final message"
    return last - first, answer.final


async def measure(url: str, args: argparse.Namespace) -> Answers:
    answers, waves = Answers(), StepWaves()
    plain = FusionConfig(prefix=PREFIX, step_deadline_s=60.0, prefill_deadline_s=180.0)
    configs = {"plain": plain, "speculative": replace(plain, speculate=args.speculate)}
    async with (
        nats_connection(url, name="bench-speculative") as nc,
        moe2.connect(url, prefix=PREFIX, name="bench-speculative-client") as client,
        anyio.create_task_group() as tg,
    ):
        await nc.subscribe(Subjects(PREFIX).expert_step("*"), cb=waves.on_step)
        agent = FusionAgent(nc, plain)
        await tg.start(agent.run)
        await agent.wait_for_experts(len(EXPERTS), START_TIMEOUT_S)
        await ask(client, QUESTIONS[0], 4)  # warm-up, not counted
        for r in range(args.rounds):
            for i, question in enumerate(args.questions):
                for mode in MODES if (r + i) % 2 == 0 else MODES[::-1]:
                    agent.config = configs[mode]  # read by each session as it starts
                    decode_s, final = await ask(client, question, args.tokens)
                    await nc.flush()  # every Step of the session has been counted
                    n = final.usage.completion_tokens
                    answers.decode_s[mode] += decode_s
                    answers.decoded[mode] += n - 1
                    answers.tokens[mode] += n
                    answers.trips[mode] += 1 + len(waves.waves.pop(final.session, ()))
                    answers.texts[mode].append(final.text)
        tg.cancel_scope.cancel()
    return answers


def pool_result(answers: Answers, base_backend: str, took_s: float) -> dict[str, Any]:
    """One pool's figures and its suite row."""
    rate = {m: answers.decoded[m] / max(answers.decode_s[m], 1e-9) for m in MODES}
    trips = {m: answers.trips[m] / max(answers.tokens[m], 1) for m in MODES}
    ratio = rate["speculative"] / rate["plain"]
    same = answers.texts["plain"] == answers.texts["speculative"]
    passed = same and ratio >= TARGET_RATE and trips["speculative"] < TARGET_TRIPS
    baseline = f"plain: {rate['plain']:.2f} tok/s, {trips['plain']:.2f} round trips/token"
    measured = (
        f"{rate['speculative']:.2f} tok/s = {ratio:.2f}×; "
        f"{trips['speculative']:.2f} round trips/token; text {'identical' if same else 'DIFFERS'}"
    )
    row = f"speculative vs plain fusion, greedy, real experts (base on {base_backend})"
    return {
        "base_backend": base_backend,
        "took_s": round(took_s, 1),
        "tokens_per_s": rate,
        "round_trips_per_token": trips,
        "tokens": answers.tokens,
        "rate_ratio": ratio,
        "same_text": same,
        "row": suite_row("speculative", baseline, measured, passed, row=row),
    }


def report(pools: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": " ".join(["python", *sys.argv]),
        "settings": {
            "speculate": args.speculate,
            "tokens": args.tokens,
            "questions": len(args.questions),
            "rounds": args.rounds,
            "experts": EXPERTS,
        },
        "machine": machine(),
        "pools": pools,
        SUITE_ROWS: [p["row"] for p in pools],
    }


def render(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    head = (
        f"bench/speculative: 3 SmolLM2-135M experts (base, cluster-0, cluster-1; the adapters "
        f"on transformers), draft of {s['speculate']}, {s['questions']} questions x "
        f"{s['rounds']} round(s), {s['tokens']} tokens; {m['cpus']} CPUs, load {m['loadavg'][0]}"
    )
    rows = [
        (
            pool["base_backend"],
            mode,
            f"{pool['tokens_per_s'][mode]:.2f}",
            f"{pool['round_trips_per_token'][mode]:.2f}",
            pool["tokens"][mode],
        )
        for pool in result["pools"]
        for mode in MODES
    ]
    header = ["base expert on", "mode", "decode tokens/s", "round trips/token", "tokens"]
    checks = markdown_table(
        ["row", "measured against", "measured", "target", "result"],
        [
            (r["row"], r["baseline"], r["measured"], r["target"], verdict(r["passed"]))
            for r in result[SUITE_ROWS]
        ],
    )
    return f"{head}\n\n{markdown_table(header, rows)}\n\n{checks}"


def verdict(passed: bool) -> str:
    return "PASS" if passed else "**MISS**"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--speculate", type=int, default=4, help="draft tokens a round (default 4)")
    p.add_argument("--tokens", type=int, default=40, help="tokens per answer (default 40)")
    p.add_argument("--rounds", type=int, default=1, help="passes over the questions (default 1)")
    p.add_argument(
        "--base-backends",
        default=",".join(BASE_BACKENDS),
        help="one pool per backend of the base expert, comma-separated (default: transformers, "
        "and llamacpp where llama-cpp-python is installed: a fast drafter in a mixed pool)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="two questions, 24 tokens")
    args = p.parse_args(argv)
    args.questions = QUESTIONS
    if args.quick:
        args.tokens, args.questions = min(args.tokens, 24), QUESTIONS[:2]
    args.base_backends = [b for b in args.base_backends.split(",") if b]
    if args.tokens < 2 or args.rounds < 1 or args.speculate < 1:
        p.error("need --tokens >= 2, --rounds >= 1 and --speculate >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    quiet_logs()
    pools = []
    for base_backend in args.base_backends:
        started = time.monotonic()
        with (
            tempfile.TemporaryDirectory(prefix="speculative-") as logs,
            NatsServer() as server,
            experts(server.url, Path(logs), base_backend),
        ):
            answers = anyio.run(measure, server.url, args)
        pools.append(pool_result(answers, base_backend, time.monotonic() - started))
    result = report(pools, args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
