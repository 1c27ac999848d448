"""bench/conversation: turn 2 of a ~1,000-token conversation, warm against the same turn cold.

One row of issue 11's table: the real SmolLM2-135M-Instruct (transformers backend, one thread)
in real expert agents, one fusion agent and a client on a real nats-server. Each round starts a
new conversation: turn 1 (a ~1,000-token user message, with a conversation id), then turn 2
(turn 1's history, its answer and a short new question) asked twice: cold (no conversation id:
every expert prefills the whole history) and warm (the conversation id: the same experts, each
starting from the KV cache it kept of turn 1). The baseline is the cold turn of the same round.

Measured: the client's time to first token (from ``ask`` to the first chunk), medians over the
rounds; target: warm ≤ 0.25× cold. The expert's own figures say what was computed: prompt
tokens prefilled per turn, from ``moe2_expert_conversation_prompt_tokens_total``. The warm and
cold answers of each round must be the same text (greedy); a difference is reported.

    python bench/conversation.py [--experts 1] [--rounds 4] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from _common import machine, markdown_table, quiet_logs, run_and_report

import moe2
from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends import Backend, load_backend
from moe2.agents.expert.models import resolve_model
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.runtime.client import new_conversation
from moe2.runtime.connection import nats_connection
from moe2.runtime.server import NatsServer
from moe2.runtime.wire import ChatMessage

try:
    from suite import SUITE_ROWS, suite_row
except ModuleNotFoundError:  # bench/suite.py is bench/run.py's; the script runs without it
    SUITE_ROWS = "suite_rows"

    def suite_row(key: str, baseline: str, measured: str, passed: bool | None) -> dict[str, Any]:
        return {"key": key, "baseline": baseline, "measured": measured, "passed": passed}


PREFIX = "benchconv"
TARGET = 0.25
TIMEOUT_S = 300.0
QUESTION1 = "Which day had the longest walk? Answer in one sentence."
QUESTION2 = "And which animal did we see that day?"
COLOURS = ("green", "grey", "blue", "brown", "silver", "golden", "dark", "clear")
ANIMALS = ("herons", "otters", "deer", "foxes", "swans", "hares", "owls", "beavers")


def notes(day: int) -> str:
    """One day's line of the trip notes (deterministic, varied enough not to repeat)."""
    colour, animal = COLOURS[day % len(COLOURS)], ANIMALS[(day * 3) % len(ANIMALS)]
    km = 3 + (day * 7) % 11
    return (
        f"Day {day}: we walked {km} kilometres along the {colour} river, stopped at the "
        f"village of {chr(65 + day % 26)}{day}ton for lunch and saw {day % 5 + 2} {animal}."
    )


def first_turn(backend: Backend, tokens: int) -> list[ChatMessage]:
    """A user message of about ``tokens`` prompt tokens: trip notes, then a question."""
    lines: list[str] = []
    while True:
        lines.append(notes(len(lines) + 1))
        text = "My notes from the trip:\n" + "\n".join(lines) + "\n\n" + QUESTION1
        messages = [ChatMessage("user", text)]
        if len(backend.encode_chat(messages)) >= tokens:
            return messages


def second_turn(turn1: list[ChatMessage], answer: str) -> list[ChatMessage]:
    return [*turn1, ChatMessage("assistant", answer), ChatMessage("user", QUESTION2)]


class Pool:
    """Expert agents (one backend each) and one fusion agent under ``PREFIX``, and a client."""

    def __init__(self, client: moe2.Client, experts: list[ExpertAgent]) -> None:
        self.client, self.experts = client, experts

    async def ask(
        self, messages: list[ChatMessage], conversation: str | None, max_tokens: int
    ) -> tuple[float, str]:
        """The time to the first chunk (s) and the answer's text."""
        started = time.perf_counter()
        first: float | None = None
        answer = self.client.ask(
            messages, max_tokens=max_tokens, conversation=conversation, timeout=TIMEOUT_S
        )
        async for _ in answer:
            first = first if first is not None else time.perf_counter() - started
        assert answer.final is not None and first is not None
        return first, answer.final.text

    def prefilled(self) -> float:
        """Prompt tokens prefilled by the experts in conversation turns, so far (all experts)."""
        name = "moe2_expert_conversation_prompt_tokens_total"
        values = [
            e.metrics.registry.get_sample_value(name, {"kind": "prefilled"}) or 0.0
            for e in self.experts
        ]
        return sum(values)

    async def settled(self) -> None:
        """Every expert has closed its sessions (the Close follows the client's Final)."""
        with anyio.fail_after(10):
            while any(e.sessions for e in self.experts):  # noqa: ASYNC110  # no event to await
                await anyio.sleep(0.01)


@asynccontextmanager
async def pool(url: str, backends: list[Backend]) -> AsyncIterator[Pool]:
    async with (
        nats_connection(url, name="bench-fusion") as fusion_nc,
        moe2.connect(url, prefix=PREFIX, name="bench-client") as client,
        anyio.create_task_group() as tg,
    ):
        experts = []
        for i, backend in enumerate(backends):
            nc = await tg.start(_expert_connection, url, f"bench-e{i}")
            config = ExpertConfig(expert_id=f"e{i}", prefix=PREFIX, warmup=False, discovery=False)
            experts.append(ExpertAgent(nc, backend, config))
            await tg.start(experts[-1].run)
        config = FusionConfig(
            prefix=PREFIX, step_deadline_s=60, prefill_deadline_s=TIMEOUT_S, discovery=False
        )
        fusion = FusionAgent(fusion_nc, config)
        await tg.start(fusion.run)
        await fusion.wait_for_experts(len(backends), limit_s=60)
        yield Pool(client, experts)
        tg.cancel_scope.cancel()


async def _expert_connection(
    url: str, name: str, *, task_status: anyio.abc.TaskStatus[Any]
) -> None:
    """A connection of its own for an expert, open until the pool's task group ends."""
    async with nats_connection(url, name=name) as nc:
        task_status.started(nc)
        await anyio.sleep_forever()


async def measure(args: argparse.Namespace, url: str, backends: list[Backend]) -> dict[str, Any]:
    turn1 = first_turn(backends[0], args.tokens)
    rounds: list[dict[str, Any]] = []
    async with pool(url, backends) as bus:
        for _ in range(args.rounds):
            conversation = new_conversation()
            _, answer1 = await bus.ask(turn1, conversation, args.answer_tokens)
            await bus.settled()
            turn2 = second_turn(turn1, answer1)
            cold_s, cold_text = await bus.ask(turn2, None, args.answer_tokens)
            await bus.settled()
            middle = bus.prefilled()
            warm_s, warm_text = await bus.ask(turn2, conversation, args.answer_tokens)
            await bus.settled()
            rounds.append(
                {
                    "cold_ttft_s": cold_s,
                    "warm_ttft_s": warm_s,
                    "same_text": cold_text == warm_text,
                    "warm_prefilled_tokens": (bus.prefilled() - middle) / len(backends),
                    "turn2_prompt_tokens": len(backends[0].encode_chat(turn2)),
                }
            )
    return {"turn1_prompt_tokens": len(backends[0].encode_chat(turn1)), "rounds": rounds}


def summarise(measured: dict[str, Any], experts: int) -> dict[str, Any]:
    rounds = measured["rounds"]
    cold = statistics.median(r["cold_ttft_s"] for r in rounds)
    warm = statistics.median(r["warm_ttft_s"] for r in rounds)
    ratio = warm / cold
    same = all(r["same_text"] for r in rounds)
    prompt = rounds[0]["turn2_prompt_tokens"]
    prefilled = statistics.median(r["warm_prefilled_tokens"] for r in rounds)
    passed = ratio <= TARGET and same
    note = "" if same else "the warm answer differed from the cold one"
    row = suite_row(
        "conversation_turn2",
        f"cold: {cold * 1000:.0f} ms to first token ({prompt} prompt tokens prefilled)",
        f"warm: {warm * 1000:.0f} ms = {ratio:.3f}× ({prefilled:.0f} tokens prefilled"
        f" per expert{', ' + note if note else ''})",
        passed,
    )
    return {
        "experts": experts,
        "cold_ttft_ms": cold * 1000,
        "warm_ttft_ms": warm * 1000,
        "ratio": ratio,
        "target": TARGET,
        "passed": passed,
        "same_text": same,
        "turn2_prompt_tokens": prompt,
        "warm_prefilled_tokens": prefilled,
        SUITE_ROWS: [row],
        **measured,
    }


def render(result: dict[str, Any]) -> str:
    verdict = "PASS" if result["passed"] else "MISS"
    rows = [
        [
            f"turn 2 of a {result['turn2_prompt_tokens']}-token conversation, "
            f"{result['experts']} SmolLM2 expert(s)",
            f"{result['cold_ttft_ms']:.0f} ms",
            f"{result['warm_ttft_ms']:.0f} ms",
            f"{result['ratio']:.3f}×",
            f"≤ {TARGET}×",
            verdict,
        ]
    ]
    header = ["row", "cold (same turn, no id)", "warm", "ratio", "target", "verdict"]
    table = markdown_table(header, rows)
    details = markdown_table(
        ["round", "cold ms", "warm ms", "warm tokens prefilled / expert", "same text"],
        [
            [
                i + 1,
                f"{r['cold_ttft_s'] * 1000:.0f}",
                f"{r['warm_ttft_s'] * 1000:.0f}",
                f"{r['warm_prefilled_tokens']:.0f} of {r['turn2_prompt_tokens']}",
                r["same_text"],
            ]
            for i, r in enumerate(result["rounds"])
        ],
    )
    return f"{table}\n\n{details}\n\nmachine: {json.dumps(result['machine'])}"


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    source = resolve_model()
    backends = [  # one backend object per agent: two agents never share one
        load_backend("transformers", source, threads=args.threads) for _ in range(args.experts)
    ]
    with NatsServer() as server:
        measured = anyio.run(measure, args, server.url, backends)
    result = summarise(measured, args.experts)
    result["machine"] = machine()
    result["command"] = " ".join(["python", "bench/conversation.py", *args.argv])
    return result


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--experts", type=int, default=1, help="SmolLM2 expert agents (1)")
    p.add_argument("--tokens", type=int, default=1000, help="turn 1's prompt tokens (1000)")
    p.add_argument("--answer-tokens", type=int, default=12, help="tokens per answer (12)")
    p.add_argument("--rounds", type=int, default=4, help="conversations measured (4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per expert (1)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    quiet_logs()
    return run_and_report(args, run_bench, render)


if __name__ == "__main__":
    sys.exit(main())
