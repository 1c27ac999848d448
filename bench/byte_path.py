"""bench/byte_path: what fusing by bytes (experts of different tokenizers) costs per step, against
fusing by id, measured in the same run on the same slices.

Two sides of a step, each timed path against path, interleaved step by step:

- fusion agent: choose the next token from N real top-32 slices. By id: ``fusion.fuse`` and the
  sampler (what a one-tokenizer session does). By bytes: ``byte_fusion.fuse_bytes`` and the
  sampler on the same slices (forced, as ``fusion_path = "bytes"`` does), and, if the built-in
  Gemma-3 is installed, on a SmolLM2 + Gemma-3 pool, which has no id path to compare with.
- expert (SmolLM2): append the chosen token and decode. By id: ``Backend.decode``. By bytes: the
  answer re-tokenised (``AnswerTokenizer``) and ``Backend.rewrite``, with the same text cut at
  the token boundaries (nothing to roll back) and cut every 3 bytes (a foreign tokenizer's cut:
  roll-backs and half characters).

The slices are the real models' own greedy continuations of a few prompts (no bus: bus costs are
bench/bus_overhead's).

    python bench/byte_path.py [--steps 96] [--expert-steps 64] [--repeats 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from _common import Latency, machine, markdown_table, quiet_logs

from moe2.agents.expert.answer_tokens import AnswerTokenizer
from moe2.agents.expert.backends import Backend, load_backend
from moe2.agents.expert.models import BUILTIN_MODELS, resolve_model
from moe2.runtime.byte_fusion import PieceSlice, Vocabulary, fuse_bytes
from moe2.runtime.fusion import ExpertSlice, fuse
from moe2.runtime.sampling import SamplingParams, TokenSampler
from moe2.runtime.wire import ChatMessage

TOP_K = 32
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Name three colours of the rainbow.",
]
GREEDY = TokenSampler(SamplingParams())


@dataclass(frozen=True, slots=True)
class StepSlice:
    """One expert's slice at one step, in both forms the two paths read."""

    ids: ExpertSlice
    pieces: PieceSlice


def slices_of(backend: Backend, prompt: str, steps: int) -> list[StepSlice]:
    """The backend's top-K at each step of its own greedy answer to ``prompt``."""
    info, table = backend.info, backend.token_bytes
    vocab = Vocabulary(info.tokenizer, info.vocab_size, frozenset(info.eos_ids))
    top = backend.prefill("bench", backend.encode_chat([ChatMessage("user", prompt)]), TOP_K)
    out = []
    for _ in range(steps):
        probs = np.exp(top.logprobs.astype(np.float64))
        rest = max(0.0, 1.0 - float(probs.sum()))
        pieces = [table[int(i)] for i in top.ids]
        out.append(
            StepSlice(
                ExpertSlice(top.ids, top.logprobs, rest),
                PieceSlice(top.ids, probs, rest, pieces, vocab),
            )
        )
        token = next((int(i) for i in top.ids if int(i) not in info.eos_ids), int(top.ids[0]))
        top = backend.decode("bench", token, TOP_K)
    backend.release("bench")
    return out


def by_id(step: Sequence[StepSlice], weights: list[float], vocab_size: int) -> None:
    GREEDY.choose_index(fuse([s.ids for s in step], weights, vocab_size))


def by_bytes(step: Sequence[StepSlice], weights: list[float]) -> None:
    GREEDY.choose_index(fuse_bytes([s.pieces for s in step], weights))


def timed(call: Callable[[], object], repeats: int) -> float:
    """Milliseconds per call, the best of ``repeats`` (one call can be far below a timer tick)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        call()
        best = min(best, time.perf_counter_ns() - start)
    return best / 1e6


def fusion_rows(pools: dict[str, list[list[StepSlice]]], vocab: int, repeats: int) -> list[Any]:
    rows: list[Any] = []
    for name, steps in pools.items():
        w = [1.0] * len(steps[0])
        mixed = len({s.pieces.vocabulary.tokenizer for s in steps[0]}) > 1
        ids_ms, bytes_ms = [], []
        for step in steps:
            if not mixed:
                ids_ms.append(timed(partial(by_id, step, w, vocab), repeats))
            bytes_ms.append(timed(partial(by_bytes, step, w), repeats))
        if ids_ms:
            rows.append(("fusion", name, "by id", Latency.of(ids_ms)))
        rows.append(("fusion", name, "by bytes", Latency.of(bytes_ms)))
    return rows


def expert_rows(backend: Backend, steps: int) -> list[Any]:
    """Three sessions of one answer, stepped in turn (so load hits all alike): by id, by bytes
    cut at the token boundaries, by bytes cut every 3 bytes."""
    tokens = AnswerTokenizer(backend.encode, backend.token_bytes)
    prompt = backend.encode_chat([ChatMessage("user", PROMPTS[1])])
    top, answer = backend.prefill("plan", prompt, TOP_K), []
    for _ in range(steps):  # the answer every session follows
        answer.append(int(top.ids[0]))
        top = backend.decode("plan", answer[-1], TOP_K)
    backend.release("plan")
    text = tokens.bytes_of(answer)
    cuts = {
        "by bytes, token cut": [backend.token_bytes[t] for t in answer],
        "by bytes, 3-byte cut": [text[i : i + 3] for i in range(0, len(text), 3)],
    }
    ms: dict[str, list[float]] = {"by id": [], **{name: [] for name in cuts}}
    done = dict.fromkeys(cuts, b"")
    for name in ms:
        backend.prefill(name, prompt, TOP_K)
    for i in range(steps):
        start = time.perf_counter_ns()
        backend.decode("by id", answer[i], TOP_K)
        ms["by id"].append((time.perf_counter_ns() - start) / 1e6)
        for name, cut in cuts.items():
            if i < len(cut):
                start = time.perf_counter_ns()
                done[name] += cut[i]
                backend.rewrite(name, [*prompt, *tokens.ids(done[name])], TOP_K)
                ms[name].append((time.perf_counter_ns() - start) / 1e6)
    for name in ms:
        backend.release(name)
    return [("expert", backend.info.model, path, Latency.of(v)) for path, v in ms.items()]


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    smol = load_backend("transformers", resolve_model(), threads=args.threads)
    smol_steps = [slices_of(smol, p, args.steps) for p in PROMPTS]
    pools = {
        "2 x SmolLM2": [list(s) for s in zip(*smol_steps[:2], strict=True)],
        "4 x SmolLM2": [list(s) for s in zip(*smol_steps, strict=True)],
    }
    if "gemma3-270m" in BUILTIN_MODELS:
        gemma = load_backend("transformers", resolve_model("gemma3-270m"), threads=args.threads)
        gemma_steps = slices_of(gemma, PROMPTS[0], args.steps)
        pools["SmolLM2 + Gemma-3"] = [list(s) for s in zip(smol_steps[0], gemma_steps, strict=True)]
    rows = fusion_rows(pools, smol.info.vocab_size, args.repeats)
    rows += expert_rows(smol, args.expert_steps)
    return {"rows": rows, "machine": machine(), "args": vars(args)}


def render(result: dict[str, Any]) -> str:
    header = ["side", "pool / model", "path", "p50 ms", "p99 ms", "mean ms", "samples"]
    rows = [
        [side, name, path, f"{x.p50_ms:.3f}", f"{x.p99_ms:.3f}", f"{x.mean_ms:.3f}", x.samples]
        for side, name, path, x in result["rows"]
    ]
    lines = [markdown_table(header, rows), "", "| compared | p50 ratio (bytes / id) |"]
    lines.append("| --- | --- |")
    by = {(side, name, path): x for side, name, path, x in result["rows"]}
    for side, name, path, x in result["rows"]:
        base = by.get((side, name, "by id"))
        if path != "by id" and base is not None:
            lines.append(f"| {side}, {name}, {path} | {x.p50_ms / base.p50_ms:.2f}x |")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=96, help="steps per answer")
    p.add_argument("--expert-steps", type=int, default=64, help="steps of the expert side")
    p.add_argument("--repeats", type=int, default=30, help="timings per fusion step (the best)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (moe2 expert: 1)")
    p.add_argument("--json", default=None, help="save the summary here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_logs()
    args = parse(argv)
    result = run_bench(args)
    print(render(result))
    print(json.dumps(result["machine"]))
    if args.json:
        rows = [[s, n, p, x.as_dict()] for s, n, p, x in result["rows"]]
        with open(args.json, "w") as f:
            json.dump({**result, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
