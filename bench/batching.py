"""bench/batching: continuous batching in the expert, aggregate tokens/s against one session.

Two rows of issue 11's table, each against one session measured in the same run (1 session,
then N, then 1, then N...: a noisy machine hits both alike):

- ``batching_16``: the real SmolLM2-135M-Instruct (transformers backend, one thread) in a real
  expert agent on a real nats-server; N sessions (default 16, different prompts) step greedily at
  once, each driven by its own client loop as a fusion agent drives it (Open, then a Step on the
  best id as soon as the slice is in). Target: aggregate tokens/s ≥ 5× one session's. Beside it,
  the ceiling: the same backend's ``decode_batch`` of N sessions against a batch of one, called
  directly (no bus, no scheduler, no prefills).
- ``sessions_64``: 64 concurrent answers through the real fusion agent, whose 2 experts are
  replay experts (a synthetic trace; no model) that take 20 ms per batch (``per_batch``: the
  answers waiting when a batch starts go out together 20 ms later). Target: aggregate tokens/s
  ≥ 32× one answer's. The replay experts run in a helper process (this file, ``--serve``).

Tokens counted are the answer's tokens (slice 0 included), over the wall time from the first Open
to the last slice: prefills count against the batched runs.

    python bench/batching.py [--sessions 16] [--steps 48] [--rounds 2] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
from _common import (
    exit_with_parent,
    helper_process,
    machine,
    markdown_table,
    quiet_logs,
    run_and_report,
    serve_replay,
)

import moe2
from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends import Backend, DecodeRequest, load_backend
from moe2.agents.expert.models import resolve_model
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.agents.traces.synthetic import synthetic_trace
from moe2.runtime import wire
from moe2.runtime.connection import nats_connection
from moe2.runtime.server import NatsServer
from moe2.runtime.subjects import Subjects

try:
    from suite import SUITE_ROWS, suite_row
except ModuleNotFoundError:  # bench/suite.py is bench/run.py's; the script runs without it
    SUITE_ROWS = "suite_rows"

    def suite_row(key: str, baseline: str, measured: str, passed: bool | None) -> dict[str, Any]:
        return {"key": key, "baseline": baseline, "measured": measured, "passed": passed}


EXPERT = Subjects("benchbatch")  # the SmolLM2 expert and its client loops
REPLAY = Subjects("benchreplay")  # the fusion agent and its replay experts
QUESTIONS = (
    "Name three colours of the sea.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "What do bees make?",
    "Describe a cat in one sentence.",
)
REPLAY_PROMPT = [wire.ChatMessage("user", "How fast do many sessions go?")]
REPLAY_EXPERTS = ["r0", "r1"]
TOP_K = 32
TARGET_EXPERT, TARGET_REPLAY = 5.0, 32.0
TIMEOUT_S = 300.0
_T = TypeVar("_T")


# --- the real expert ------------------------------------------------------------------------


def questions(n: int) -> list[list[wire.ChatMessage]]:
    return [[wire.ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])] for i in range(n)]


def decode_ceiling(backend: Backend, sessions: int, steps: int) -> dict[str, float]:
    """tokens/s of ``decode_batch`` over ``sessions`` sessions and over one, called directly."""
    rates = {}
    for n in (1, sessions, 1, sessions):
        tokens = []
        for i, messages in enumerate(questions(n)):
            top = backend.prefill(f"ceiling{i}", backend.encode_chat(messages), TOP_K)
            tokens.append(int(top.ids[0]))
        started = time.perf_counter()
        for _ in range(steps):
            requests = [DecodeRequest(f"ceiling{i}", t, TOP_K) for i, t in enumerate(tokens)]
            tokens = [int(top.ids[0]) for top in backend.decode_batch(requests)]
        took = time.perf_counter() - started
        for i in range(n):
            backend.release(f"ceiling{i}")
        rates.setdefault(f"{n}", 0.0)
        rates[f"{n}"] += n * steps / took / 2  # the mean of the two runs
    return rates


async def greedy_session(
    nc: Any, session: str, messages: list[wire.ChatMessage], n: int
) -> list[float]:
    """A fusion agent's loop for one session on the expert: Open, Step on the best id; when
    each of its ``n`` slices came in (``time.perf_counter``)."""
    sub = await nc.subscribe(EXPERT.slice(session, "bench"))
    await nc.flush()
    opened = wire.Open(session=session, messages=messages, top_k=TOP_K)
    await nc.publish(EXPERT.expert_open("bench"), wire.encode(opened))
    arrived = []
    for step in range(n):
        message = wire.decode((await sub.next_msg(timeout=TIMEOUT_S)).data)
        arrived.append(time.perf_counter())
        if not isinstance(message, wire.Slice) or message.step != step:
            raise RuntimeError(f"session {session} step {step}: {message!r:.200}")
        if step + 1 < n:
            token = int(message.ids_array()[0])
            step_ = wire.Step(session=session, step=step + 1, token=token)
            await nc.publish(EXPERT.expert_step("bench"), wire.encode(step_))
    await nc.publish(EXPERT.expert_close("bench"), wire.encode(wire.Close(session=session)))
    await sub.unsubscribe()
    return arrived


async def concurrently(n: int, one: Callable[[int], Awaitable[_T]]) -> tuple[list[_T], float]:
    """Run ``one(i)`` for i < n at once: (their results, seconds)."""
    got: list[_T] = []

    async def run(i: int) -> None:
        got.append(await one(i))

    started = time.perf_counter()
    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(run, i)
    return got, time.perf_counter() - started


def steady_rate(sessions: list[list[float]]) -> tuple[int, float]:
    """Slices that came in while every session was decoding (after the last one's slice 0,
    until the first one's last slice), and that window's seconds."""
    start, end = max(s[0] for s in sessions), min(s[-1] for s in sessions)
    return sum(1 for s in sessions for t in s if start < t <= end), end - start


async def expert_rates(
    backend: Backend, url: str, sessions: int, steps: int, rounds: int, gather_s: float
) -> dict[str, Any]:
    """Aggregate tokens/s of 1 and ``sessions`` concurrent sessions on one expert, alternating."""
    config = ExpertConfig(
        expert_id="bench",
        prefix=EXPERT.prefix,
        warmup=False,
        energy_source="declared",
        max_batch=sessions,
        max_sessions=max(32, sessions),
        batch_gather_s=gather_s,
    )
    keys = ("one", "many", "one_steady", "many_steady", "batches", "prefill_share")
    keys += ("prefill_batch",)
    totals = {key: [0.0, 0.0] for key in keys}
    prefill_calls = counted_prefills(backend)
    async with (
        nats_connection(url, name="bench-expert") as agent_nc,
        nats_connection(url, name="bench-sessions") as nc,
        anyio.create_task_group() as tg,
    ):
        agent = ExpertAgent(agent_nc, backend, config)
        await tg.start(agent.run)
        for r in range(rounds):
            for n in (1, sessions):
                prompts = questions(n)

                def one(i: int, run: str = f"{r}-{n}", prompts: Any = prompts) -> Awaitable[int]:
                    return greedy_session(nc, f"s{run}-{i}", prompts[i], steps)

                before = _batches(agent)
                prefill_calls.clear()
                arrivals, took = await concurrently(n, one)
                key = "one" if n == 1 else "many"
                _add(totals[key], sum(len(a) for a in arrivals), took)
                _add(totals[f"{key}_steady"], *steady_rate(arrivals))
                if n > 1:
                    after = _batches(agent)
                    _add(totals["batches"], after[0] - before[0], after[1] - before[1])
                    _add(totals["prefill_share"], after[2] - before[2], took)
                    _add(totals["prefill_batch"], n, len(prefill_calls))
        tg.cancel_scope.cancel()
    rates = {key: tokens / seconds for key, (tokens, seconds) in totals.items()}
    rates["mean_batch"] = rates.pop("batches")  # sessions per batch in the N-session runs
    return rates


def counted_prefills(backend: Backend) -> list[int]:
    """Wrap ``backend``'s ``prefill`` and ``prefill_batch``: the list returned gets the number of
    sessions of every prefill call (a prefill alone is 1)."""
    calls: list[int] = []
    alone, batched = backend.prefill, getattr(backend, "prefill_batch", None)

    def prefill(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return alone(*args, **kwargs)

    def prefill_batch(requests: Sequence[Any]) -> Any:
        calls.append(len(requests))
        return batched(requests) if batched is not None else None

    setattr(backend, "prefill", prefill)  # noqa: B010  # an instance's method, for this run
    if batched is not None:
        setattr(backend, "prefill_batch", prefill_batch)  # noqa: B010
    return calls


def _batches(agent: ExpertAgent) -> tuple[float, float, float]:
    """The expert's /metrics so far: sessions in batches, batches, prefill compute seconds."""
    registry = agent.metrics.registry
    names = ("decode_batch_sessions_sum", "decode_batch_sessions_count", "compute_seconds_sum")
    labels: list[dict[str, str]] = [{}, {}, {"phase": "prefill"}]
    a, b, c = (
        registry.get_sample_value(f"moe2_expert_{name}", label) or 0.0
        for name, label in zip(names, labels, strict=True)
    )
    return a, b, c


def _add(total: list[float], count: float, seconds: float) -> None:
    total[0] += count
    total[1] += seconds


# --- replay experts at 20 ms per batch, through the fusion agent ----------------------------------


async def replay_rates(
    url: str, sessions: int, steps: int, rounds: int, expected: str
) -> dict[str, float]:
    totals = {1: [0, 0.0], sessions: [0, 0.0]}
    async with (
        nats_connection(url, name="bench-fusion") as agent_nc,
        moe2.connect(url, prefix=REPLAY.prefix, name="bench-client") as client,
        anyio.create_task_group() as tg,
    ):
        config = FusionConfig(
            prefix=REPLAY.prefix,
            slice_k=TOP_K,
            max_sessions=max(64, sessions),
            prompt_rate_per_s=0,  # one client asks them all
        )
        agent = FusionAgent(agent_nc, config)
        await tg.start(agent.run)
        await agent.wait_for_experts(len(REPLAY_EXPERTS), 10)

        async def answer(i: int) -> int:
            final = await client.ask(REPLAY_PROMPT, max_tokens=steps, timeout=TIMEOUT_S).collect()
            if final.text != expected:
                raise RuntimeError(f"the fused answer diverged from the trace: {final!r:.300}")
            return steps

        await answer(0)  # warm-up, not counted
        for _ in range(rounds):
            for n in (1, sessions):
                answers, took = await concurrently(n, answer)
                totals[n][0] += sum(answers)
                totals[n][1] += took
        tg.cancel_scope.cancel()
    return {"one": totals[1][0] / totals[1][1], "many": totals[sessions][0] / totals[sessions][1]}


def replay_row(args: argparse.Namespace, url: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        trace = Path(tmp) / "synthetic.moe2"
        chosen = synthetic_trace(
            trace,
            experts=REPLAY_EXPERTS,
            prompt_messages=REPLAY_PROMPT,
            steps=args.replay_steps,
            top_k=TOP_K,
            prefix=REPLAY.prefix,
        )
        expected = "".join(f" t{t}" for t in chosen[: args.replay_steps])
        serving = [__file__, "--serve", url, str(trace), "--batch-ms", str(args.batch_ms)]
        with helper_process(serving):
            return anyio.run(
                replay_rates, url, args.replay_sessions, args.replay_steps, args.rounds, expected
            )


# --- the run -------------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # transformers, every step
    backend = load_backend("transformers", resolve_model(), threads=args.threads)
    ceiling = decode_ceiling(backend, args.sessions, args.ceiling_steps)
    with NatsServer() as server:
        expert = anyio.run(
            expert_rates,
            backend,
            server.url,
            args.sessions,
            args.steps,
            args.rounds,
            args.gather_ms / 1000,
        )
        replay = replay_row(args, server.url)
    return report(args, ceiling, expert, replay, time.monotonic() - started)


def report(
    args: argparse.Namespace,
    ceiling: dict[str, float],
    expert: dict[str, Any],
    replay: dict[str, float],
    took_s: float,
) -> dict[str, Any]:
    n, m = args.sessions, args.replay_sessions
    raw_ratio = ceiling[str(n)] / ceiling["1"]
    expert_ratio, replay_ratio = expert["many"] / expert["one"], replay["many"] / replay["one"]
    steady_ratio = expert["many_steady"] / expert["one_steady"]
    rows = [
        (
            f"SmolLM2 expert on the bus, {n} sessions, whole answers (prefills included)",
            f"{expert['one']:.1f}",
            f"{expert['many']:.1f}",
            f"{expert_ratio:.2f}×",
            f"≥ {TARGET_EXPERT:g}×",
            _verdict(expert_ratio >= TARGET_EXPERT),
        ),
        (
            f"SmolLM2 expert on the bus, {n} sessions, while all {n} decode",
            f"{expert['one_steady']:.1f}",
            f"{expert['many_steady']:.1f}",
            f"{steady_ratio:.2f}×",
            f"≥ {TARGET_EXPERT:g}×",
            _verdict(steady_ratio >= TARGET_EXPERT),
        ),
        (
            f"SmolLM2 decode_batch of {n}, called directly (ceiling)",
            f"{ceiling['1']:.1f}",
            f"{ceiling[str(n)]:.1f}",
            f"{raw_ratio:.2f}×",
            "(reported)",
            "-",
        ),
        (
            f"{m} answers via the fusion agent, 2 replay experts at {args.batch_ms:g} ms a batch",
            f"{replay['one']:.1f}",
            f"{replay['many']:.1f}",
            f"{replay_ratio:.2f}×",
            f"≥ {TARGET_REPLAY:g}×",
            _verdict(replay_ratio >= TARGET_REPLAY),
        ),
    ]
    return {
        "command": " ".join(["python", *sys.argv]),
        "settings": vars(args) | {"top_k": TOP_K},
        "machine": machine(),
        "took_s": round(took_s, 1),
        "ceiling_tokens_per_s": ceiling,
        "expert_tokens_per_s": expert,
        "replay_tokens_per_s": replay,
        "table": rows,
        SUITE_ROWS: [
            suite_row(
                "batching_16",
                f"1 session {expert['one']:.1f} tok/s",
                f"{n} sessions {expert['many']:.1f} tok/s = {expert_ratio:.2f}× whole answers, "
                f"{steady_ratio:.2f}× while all decode (decode_batch ceiling {raw_ratio:.2f}×; "
                f"mean batch {expert['mean_batch']:.1f}; prefill calls of "
                f"{expert['prefill_batch']:.1f} sessions)",
                expert_ratio >= TARGET_EXPERT,
            ),
            suite_row(
                "sessions_64",
                f"1 session {replay['one']:.1f} tok/s",
                f"{m} sessions {replay['many']:.1f} tok/s = {replay_ratio:.2f}×",
                replay_ratio >= TARGET_REPLAY,
            ),
        ],
    }


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


def render(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    head = (
        f"bench/batching: {s['steps']} tokens per SmolLM2 session, {s['replay_steps']} per "
        f"replayed answer, {s['rounds']} rounds (1 session and N alternating), "
        f"{s['threads']} torch thread(s); N sessions on the expert: mean decode batch "
        f"{result['expert_tokens_per_s']['mean_batch']:.1f}, prefills "
        f"{result['expert_tokens_per_s']['prefill_share']:.0%} of the wall time in calls of "
        f"{result['expert_tokens_per_s']['prefill_batch']:.1f} sessions on average; "
        f"{m['cpus']} CPUs, load {m['loadavg'][0]}, Python {m['python']}; {result['took_s']} s"
    )
    header = ["row", "1 session tok/s", "N sessions tok/s", "ratio", "target", "result"]
    return f"{head}\n\n{markdown_table(header, result['table'])}"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sessions", type=int, default=16, help="SmolLM2 sessions at once (16)")
    p.add_argument("--steps", type=int, default=48, help="tokens per SmolLM2 session (48)")
    p.add_argument("--ceiling-steps", type=int, default=16, help="decode_batch calls timed (16)")
    p.add_argument("--replay-sessions", type=int, default=64, help="replayed answers at once (64)")
    p.add_argument("--replay-steps", type=int, default=40, help="tokens per replayed answer (40)")
    p.add_argument("--batch-ms", type=float, default=20.0, help="replay experts' batch (20 ms)")
    p.add_argument(
        "--gather-ms", type=float, default=5.0, help="the SmolLM2 expert's --batch-gather-ms (5)"
    )
    p.add_argument("--rounds", type=int, default=2, help="1-session and N-session runs each (2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="1 round, shorter answers")
    p.add_argument("--serve", nargs=2, metavar=("URL", "TRACE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.replay_steps = (
            1,
            min(args.steps, 32),
            min(args.replay_steps, 30),
        )
    if min(args.sessions, args.steps, args.replay_sessions, args.replay_steps, args.rounds) < 1:
        p.error("every count must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    quiet_logs()
    if args.serve:
        exit_with_parent()
        url, trace = args.serve
        anyio.run(serve_replay, url, Path(trace), args.batch_ms / 1000, REPLAY.prefix)
        return 0
    return run_and_report(args, run_bench, render)


if __name__ == "__main__":
    sys.exit(main())
