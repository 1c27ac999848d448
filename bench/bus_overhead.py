"""bench/bus_overhead: what the fusion agent adds to the floor of one NATS round trip per token.

Both paths run against one real nats-server, in the same run, interleaved round by round (the order
alternates), so that a noisy machine hits both alike:

- raw: per step, publish a Step-sized message to each of 4 responders and gather their 4 replies
  (recorded wire.Slice bytes, same size and subjects as the experts'). Pure nats-py: the floor.
- fused: a client asks the real fusion agent (greedy, max_tokens = steps), whose 4 experts are
  replay experts answering from a synthetic trace (zero compute). A fused step is the agent's own
  step timing (``FusionSession.step_ms``): choose the token (decode 4 slices, fuse, sample),
  stream the chunk to the client, publish the next Step to 4 experts, gather their 4 slices.
  The client's inter-chunk times are measured too, as a cross-check.

The responders of both paths run in one helper process (this file, ``--serve``); the client, the
fusion agent and the raw gatherer run in this one.

    python bench/bus_overhead.py [--steps 200] [--rounds 20] [--experts 4] [--json out.json]
                                 [--quick]  (5 rounds)
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
from _common import (
    READY,
    Latency,
    exit_with_parent,
    helper_process,
    machine,
    markdown_table,
    quiet_logs,
)
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from suite import SUITE_ROWS, suite_row
from tqdm import tqdm

import moe2
import moe2.agents.fusion.agent as fusion_module
from moe2.agents.fusion.agent import FusionAgent
from moe2.agents.fusion.config import FusionConfig
from moe2.agents.fusion.session import FusionSession
from moe2.agents.traces.replay import serve_replay_experts
from moe2.agents.traces.synthetic import synthetic_trace
from moe2.runtime import wire
from moe2.runtime.connection import nats_connection
from moe2.runtime.server import NatsServer
from moe2.runtime.subjects import Subjects
from moe2.runtime.trace import load_trace

FUSED = Subjects("benchfused")  # the fusion agent and its replay experts
RAW = Subjects("benchraw")  # the raw gatherer and its responders
PROMPT = [wire.ChatMessage(role="user", content="How much does the bus cost per token?")]
TOP_K, VOCAB = 32, 49152
TARGET_RATIO, TARGET_P50_MS = 1.5, 1.0
ROUND_TIMEOUT_S = 60.0


# --- the helper process: replay experts and raw responders ------------------------------------


def recorded_slices(trace: Path, experts: Sequence[str]) -> dict[str, list[bytes]]:
    """Each expert's recorded decode-step slices, re-encoded with a session id of the length
    the fusion agent uses (32 hex digits), so the raw replies have the fused replies' size."""
    session = uuid.uuid4().hex
    found: dict[str, list[bytes]] = {e: [] for e in experts}
    for record in load_trace(trace)[1]:
        message = wire.decode(record.data)
        if isinstance(message, wire.Slice) and message.step > 0:
            found[message.expert].append(
                wire.encode(msgspec.structs.replace(message, session=session))
            )
    return found


async def serve_raw_responders(
    url: str,
    slices: dict[str, list[bytes]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """One connection per expert id; each Step is answered, on its reply subject, with the next
    recorded slice. No decoding, no lookup: the cheapest responder nats-py allows."""
    async with anyio.create_task_group() as tg:
        for expert, answers in slices.items():
            await tg.start(_raw_responder, url, expert, answers)
        task_status.started()


async def _raw_responder(
    url: str, expert: str, answers: list[bytes], *, task_status: TaskStatus[None]
) -> None:
    async with nats_connection(url, name=f"bench-raw-{expert}") as nc:
        turn = itertools.cycle(answers)

        async def answer(msg: Msg) -> None:
            await nc.publish(msg.reply, next(turn))

        await nc.subscribe(RAW.expert_step(expert), cb=answer)
        await nc.flush()
        task_status.started()
        await anyio.sleep_forever()


async def serve(url: str, trace: Path, experts: list[str]) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve_replay_experts, url, trace, prefix=FUSED.prefix))
        await tg.start(serve_raw_responders, url, recorded_slices(trace, experts))
        print(READY, flush=True)


# --- the two measured paths --------------------------------------------------------------------


class RawFanOut:
    """Per step: publish a Step to every responder, wait until all their replies are in."""

    def __init__(self, nc: NATS, experts: list[str]) -> None:
        self.nc, self.experts = nc, experts

    async def round(self, steps: int) -> list[float]:
        session = uuid.uuid4().hex
        state = _Gather(len(self.experts))
        sub = await self.nc.subscribe(RAW.session_slices(session), cb=state.arrived)
        await self.nc.flush()
        replies = [(RAW.expert_step(e), RAW.slice(session, e)) for e in self.experts]
        times: list[float] = []
        try:
            with anyio.fail_after(ROUND_TIMEOUT_S):
                for step in range(1, steps):
                    t0 = time.perf_counter()
                    data = wire.encode(wire.Step(session=session, step=step, token=VOCAB - step))
                    state.reset()
                    for subject, reply in replies:
                        await self.nc.publish(subject, data, reply=reply)
                    await state.done.wait()
                    times.append((time.perf_counter() - t0) * 1000)
        finally:
            await sub.unsubscribe()
        return times


@dataclass(slots=True)
class _Gather:
    want: int
    got: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)

    def reset(self) -> None:
        self.got, self.done = 0, anyio.Event()

    async def arrived(self, msg: Msg) -> None:
        self.got += 1
        if self.got == self.want:
            self.done.set()


class TimedSession(FusionSession):
    """The fusion agent's own session, keeping its per-step timings (Final only summarises them)."""

    finished: list[list[float]] = []  # noqa: RUF012  # one list per answer, shared on purpose

    async def _final(self, *args: Any, **kwargs: Any) -> None:
        TimedSession.finished.append(list(self.step_ms))  # before the client can see Final
        await super()._final(*args, **kwargs)


@contextmanager
def keeping_step_times() -> Iterator[None]:
    """Have the fusion agent run TimedSessions (it looks ``FusionSession`` up at each prompt)."""
    fusion_module.FusionSession = TimedSession  # type: ignore[attr-defined]  # not re-exported
    try:
        yield
    finally:
        fusion_module.FusionSession = FusionSession  # type: ignore[attr-defined]


@dataclass(slots=True)
class FusedAsk:
    client: moe2.Client
    steps: int
    expected: str

    async def round(self) -> tuple[list[float], list[float]]:
        """(the agent's step times, the client's inter-chunk times), in ms."""
        answer = self.client.ask(PROMPT, max_tokens=self.steps, timeout=ROUND_TIMEOUT_S)
        stamps: list[float] = []
        async for _ in answer:
            stamps.append(time.perf_counter())
        final = answer.final
        assert final is not None
        if final.text != self.expected or final.late or final.dropped:
            raise RuntimeError(f"the fused answer diverged from the trace: {final!r:.300}")
        gaps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
        [agent_ms] = TimedSession.finished  # exactly this answer's
        TimedSession.finished.clear()
        return agent_ms, gaps


# --- the run -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Samples:
    raw: list[float] = field(default_factory=list)
    fused: list[float] = field(default_factory=list)
    client: list[float] = field(default_factory=list)
    rounds: list[dict[str, float]] = field(default_factory=list)


async def measure(url: str, experts: list[str], steps: int, rounds: int, expected: str) -> Samples:
    samples = Samples()
    with keeping_step_times():
        async with (
            nats_connection(url, name="bench-fusion") as agent_nc,
            nats_connection(url, name="bench-raw-gather") as raw_nc,
            moe2.connect(url, prefix=FUSED.prefix, name="bench-client") as client,
            anyio.create_task_group() as tg,
        ):
            agent = FusionAgent(agent_nc, FusionConfig(prefix=FUSED.prefix, slice_k=TOP_K))
            await tg.start(agent.run)
            await agent.wait_for_experts(len(experts), 10)
            raw, fused = RawFanOut(raw_nc, experts), FusedAsk(client, steps, expected)
            await raw.round(steps)  # warm-up, not counted
            await fused.round()
            for r in tqdm(range(rounds), desc="raw + fused rounds", file=sys.stderr, leave=False):
                await _one_round(r, raw, fused, samples)
            tg.cancel_scope.cancel()
    return samples


async def _one_round(r: int, raw: RawFanOut, fused: FusedAsk, samples: Samples) -> None:
    """One raw round and one fused round; who goes first alternates."""
    summary: dict[str, float] = {"round": r}

    async def run_raw() -> None:
        times = await raw.round(fused.steps)
        samples.raw.extend(times)
        summary["raw_p50_ms"] = Latency.of(times).p50_ms

    async def run_fused() -> None:
        agent_ms, client_ms = await fused.round()
        samples.fused.extend(agent_ms)
        samples.client.extend(client_ms)
        summary["fused_p50_ms"] = Latency.of(agent_ms).p50_ms

    order: list[Callable[[], Awaitable[None]]] = [run_raw, run_fused]
    for run in order if r % 2 == 0 else order[::-1]:
        await run()
    samples.rounds.append(summary)


def report(samples: Samples, args: argparse.Namespace, took_s: float) -> dict[str, Any]:
    raw, fused, client = (Latency.of(s) for s in (samples.raw, samples.fused, samples.client))
    ratio50, ratio99 = fused.p50_ms / raw.p50_ms, fused.p99_ms / raw.p99_ms
    settings = {"steps": args.steps, "rounds": args.rounds, "experts": args.experts}
    return {
        "command": " ".join(["python", *sys.argv]),
        "settings": settings | {"top_k": TOP_K, "vocab": VOCAB},
        "machine": machine(),
        "took_s": round(took_s, 1),
        "raw": raw.as_dict(),
        "fused": fused.as_dict(),
        "fused_client_inter_chunk": client.as_dict(),
        "ratio_p50": ratio50,
        "ratio_p99": ratio99,
        "pass_ratio": ratio50 <= TARGET_RATIO,
        "pass_p50": fused.p50_ms <= TARGET_P50_MS,
        "rounds": samples.rounds,
        SUITE_ROWS: [
            suite_row(
                "fused_step",
                f"p50 {raw.p50_ms:.3f} ms",
                f"p50 {fused.p50_ms:.3f} ms = {ratio50:.2f}× (p99 {ratio99:.2f}×)",
                ratio50 <= TARGET_RATIO,
            )
        ],
    }


def render(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    head = (
        f"bench/bus_overhead: {s['experts']} experts, K={s['top_k']}, vocab {s['vocab']}, "
        f"{s['rounds']} rounds x {s['steps']} steps, raw/fused interleaved; "
        f"{m['cpus']} CPUs, load {m['loadavg'][0]}, Python {m['python']}, {m['nats_server']}; "
        f"{result['took_s']} s"
    )
    return f"{head}\n\n{_latency_table(result)}\n\n{_verdict_table(result)}"


def _latency_table(result: dict[str, Any]) -> str:
    n = result["settings"]["experts"]
    rows = [
        (f"raw fan-out/gather ({n} nats-py responders)", result["raw"]),
        (f"fused step ({n} replay experts; agent's step_ms)", result["fused"]),
        ("fused, client inter-chunk (cross-check)", result["fused_client_inter_chunk"]),
    ]
    cells = [
        (path, *(f"{x[k]:.3f}" for k in ("p50_ms", "p99_ms", "mean_ms")), x["samples"])
        for path, x in rows
    ]
    return markdown_table(["path", "p50 ms", "p99 ms", "mean ms", "samples"], cells)


def _verdict_table(result: dict[str, Any]) -> str:
    ratio50, ratio99, p50 = result["ratio_p50"], result["ratio_p99"], result["fused"]["p50_ms"]
    ratio_ok, p50_ok = _pass(result["pass_ratio"]), _pass(result["pass_p50"])
    return markdown_table(
        ["check", "measured", "target", "result"],
        [
            ("fused / raw, p50", f"{ratio50:.2f}x", f"<= {TARGET_RATIO}x", ratio_ok),
            ("fused / raw, p99", f"{ratio99:.2f}x", "(reported)", "-"),
            ("fused step p50", f"{p50:.3f} ms", f"<= {TARGET_P50_MS} ms", p50_ok),
        ],
    )


def _pass(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    experts = [f"x{i}" for i in range(args.experts)]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bus-overhead-") as tmp, NatsServer() as server:
        trace = Path(tmp) / "synthetic.moe2"
        chosen = synthetic_trace(
            trace,
            experts=experts,
            prompt_messages=PROMPT,
            steps=args.steps,
            top_k=TOP_K,
            vocab_size=VOCAB,
            prefix=FUSED.prefix,
        )
        expected = "".join(f" t{t}" for t in chosen[: args.steps])
        serving = [__file__, "--serve", server.url, str(trace), "--experts", str(args.experts)]
        with helper_process(serving):
            samples = anyio.run(measure, server.url, experts, args.steps, args.rounds, expected)
    return report(samples, args, time.monotonic() - started)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=200, help="tokens per fused answer (default 200)")
    p.add_argument("--rounds", type=int, default=20, help="raw + fused rounds (default 20)")
    p.add_argument("--experts", type=int, default=4, help="experts / responders (default 4)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="5 rounds (bench/run.py --quick)")
    p.add_argument("--serve", nargs=2, metavar=("URL", "TRACE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 5)
    if args.steps < 2 or args.rounds < 1 or args.experts < 1:
        p.error("need --steps >= 2, --rounds >= 1, --experts >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    quiet_logs()
    if args.serve:
        exit_with_parent()
        url, trace = args.serve
        anyio.run(serve, url, Path(trace), [f"x{i}" for i in range(args.experts)])
        return 0
    signal.signal(signal.SIGTERM, _terminated)  # so that the cleanup below runs on TERM too
    result = run_bench(args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not (result["pass_ratio"] and result["pass_p50"]):
        print("\nMISS: the fused step is over target (this is a report; exit status 0)")
    return 0


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
