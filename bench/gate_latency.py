"""bench/gate_latency: what gating adds per prompt in the fusion agent (embed + gate), against the
embedder alone, sentence-transformers' own ``encode``, the MLP alone and the uniform gate.

All paths run in one process on the same prompts, interleaved prompt by prompt (the order rotates),
per embedder and torch thread count, so that a noisy machine hits every path alike. Prompts are a
seeded sample of MMLU val questions (../shared/data) in two shapes: the letter format (question and
options, the longer) and the cloze format (the question alone); without the data, built-in
questions. The gate is a trained artifact (``--artifact``, its own embedder) or a randomly
initialised Table VI network over N = 4 experts (the weights do not change the arithmetic).

    python bench/gate_latency.py [--artifact DIR] [--embedders NAME,NAME] [--prompts 60]
                                 [--rounds 2] [--threads 2,1] [--json out.json] [--quick]

In the suite (``bench/run.py``) a row per prompt set, at the first thread count: embed + gate
against the embedder's raw forward (``forward``: its tokenizer and the model's forward under
``torch.inference_mode``, nothing else), p50 at most 1.15x and at most 15 ms. ``--quick``: the
first embedder, the first thread count, 20 prompts, one round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import Latency, machine, markdown_table, quiet_logs
from suite import SUITE_ROWS, suite_row

from moe2.gating import UniformGate
from moe2.gating.artifact import GatingArtifact, LearnedGate, prompt_text
from moe2.gating.data import cloze_messages, letter_messages, load_examples
from moe2.gating.embed import SentenceEmbedder, load_embedder
from moe2.gating.model import GatingMLP
from moe2.runtime.wire import ChatMessage

TARGET_MS = 15.0
TARGET_RATIO = 1.15  # embed + gate against the embedder's raw forward, p50
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu" / "val"
EXPERTS = ["e0", "e1", "e2", "e3"]
EMBEDDERS = ["all-MiniLM-L6-v2", "all-MiniLM-L6-v2+int8"]
FALLBACK = [
    "Which planet is closest to the Sun?",
    "What is the derivative of x^2 with respect to x?",
    "Who wrote the novel Pride and Prejudice, and in which century was it published?",
    "A company's revenue rose from $2 million to $3 million. By what percentage did it grow?",
]
PATHS = {  # short column name: what it measures
    "uniform": "uniform gate (the floor)",
    "mlp": "gating MLP alone, one embedding",
    "forward": "the embedder's raw forward: tokenizer + model forward, inference mode",
    "embed": "embedder alone (moe2 embed)",
    "encode": "sentence-transformers encode(), for comparison",
    "gate": "embed + gate (LearnedGate.gate)",
}

Conversation = list[ChatMessage]
Run = Callable[[Conversation], object]


def prompt_sets(count: int) -> dict[str, list[Conversation]]:
    """{name: conversations}: MMLU val letter and cloze prompts, or the built-in questions."""
    if not SHARED.is_dir():
        cycled = [FALLBACK[i % len(FALLBACK)] for i in range(count)]
        return {"built-in": [[ChatMessage("user", q)] for q in cycled]}
    examples = load_examples(SHARED)
    picked = np.random.default_rng(0).choice(len(examples), size=min(count, len(examples)))
    sample = [examples[i] for i in sorted(picked.tolist())]
    return {
        "letter": [letter_messages(ex) for ex in sample],
        "cloze": [cloze_messages(ex) for ex in sample],
    }


def gate_artifact(path: Path | None, embedder: SentenceEmbedder) -> GatingArtifact:
    if path is not None:
        return GatingArtifact.load(path, embedder=embedder.name)
    torch.manual_seed(0)
    return GatingArtifact(GatingMLP(embedder.dim, len(EXPERTS)), EXPERTS, embedder.name)


def runs(embedder: SentenceEmbedder, artifact: GatingArtifact) -> dict[str, Run]:
    learned, uniform = LearnedGate(artifact, embedder), UniformGate()
    experts = artifact.expert_ids
    one = embedder.embed(["a fixed prompt"])

    model = embedder.model
    preprocess = getattr(model, "preprocess", None) or model.tokenize

    def encode(m: Conversation) -> object:
        return model.encode([m[-1].content], batch_size=1, show_progress_bar=False)

    def forward(m: Conversation) -> object:
        with torch.inference_mode():
            return model(preprocess([prompt_text(m)]))["sentence_embedding"]

    return {
        "uniform": lambda m: uniform.gate(m, experts),
        "mlp": lambda m: artifact.values(one),
        "forward": forward,
        "embed": lambda m: embedder.embed([m[-1].content]),
        "encode": encode,
        "gate": lambda m: learned.gate(m, experts),
    }


def measure(
    paths: dict[str, Run], conversations: list[Conversation], rounds: int
) -> dict[str, list[float]]:
    names = list(paths)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i, messages in enumerate(conversations):
            shift = (r + i) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                paths[name](messages)
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def bench_embedder(
    embedder: SentenceEmbedder, args: argparse.Namespace, sets: dict[str, list[Conversation]]
) -> list[dict[str, Any]]:
    paths = runs(embedder, gate_artifact(args.artifact, embedder))
    rows = []
    for kind, conversations in sets.items():
        tokens = int(np.median([embedder.count_tokens(m[-1].content) for m in conversations]))
        for threads in args.threads:
            torch.set_num_threads(threads)
            measure(paths, conversations[:10], 1)  # warm-up
            latency = {
                k: Latency.of(ms) for k, ms in measure(paths, conversations, args.rounds).items()
            }
            rows.append(
                {
                    "embedder": embedder.name,
                    "prompts": kind,
                    "tokens_p50": tokens,
                    "threads": threads,
                }
                | {k: v.as_dict() for k, v in latency.items()}
            )
    return rows


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    names = [GatingArtifact.load(args.artifact).embedder] if args.artifact else args.embedders
    sets = prompt_sets(args.prompts)
    rows = [row for name in names for row in bench_embedder(load_embedder(name), args, sets)]
    return {
        "artifact": str(args.artifact) if args.artifact else "random Table VI network, N = 4",
        "paths": PATHS,
        "rows": rows,
        "machine": machine(),
        SUITE_ROWS: [_suite_row(r) for r in rows if r["threads"] == args.threads[0]],
    }


def _suite_row(row: dict[str, Any]) -> dict[str, Any]:
    gate, forward = row["gate"]["p50_ms"], row["forward"]["p50_ms"]
    ratio = gate / forward
    return suite_row(
        "gating",
        f"{row['embedder']} raw forward: p50 {forward:.2f} ms",
        f"p50 {gate:.2f} ms = {ratio:.2f}×",
        ratio <= TARGET_RATIO and gate <= TARGET_MS,
        row=f"gating: embed + MLP per prompt ({row['prompts']} prompts, "
        f"{row['tokens_p50']} tokens p50, {row['threads']} thread(s))",
    )


def print_report(report: dict[str, Any]) -> None:
    header = ["embedder", "prompts", "tokens p50", "threads"]
    header += [f"{k} p50 ms" for k in PATHS] + ["gate p99 ms"]
    table = [
        [r["embedder"], r["prompts"], r["tokens_p50"], r["threads"]]
        + [f"{r[k]['p50_ms']:.3f}" for k in PATHS]
        + [f"{r['gate']['p99_ms']:.1f}"]
        for r in report["rows"]
    ]
    print(markdown_table(header, table))
    print()
    print("; ".join(f"{k}: {what}" for k, what in PATHS.items()))
    print()
    checks = [_check(r) for r in report["rows"]]
    print(markdown_table(["check: embed + gate p50", "measured", "target", "result"], checks))
    print()
    ratios = [_ratio_check(r) for r in report["rows"]]
    print(markdown_table(["check: embed + gate / raw forward", "p50", "target", "result"], ratios))
    print()
    m = report["machine"]
    print(f"gate: {report['artifact']}; {m['cpus']} CPUs, loadavg {m['loadavg']} at the end")


def _check(row: dict[str, Any]) -> list[str]:
    p50 = row["gate"]["p50_ms"]
    verdict = "PASS" if p50 <= TARGET_MS else "**MISS**"
    what = f"{row['embedder']}, {row['prompts']}, {row['threads']} thread(s)"
    return [what, f"{p50:.2f} ms", f"<= {TARGET_MS:g} ms", verdict]


def _ratio_check(row: dict[str, Any]) -> list[str]:
    ratio = row["gate"]["p50_ms"] / row["forward"]["p50_ms"]
    verdict = "PASS" if ratio <= TARGET_RATIO else "**MISS**"
    what = f"{row['embedder']}, {row['prompts']}, {row['threads']} thread(s)"
    return [what, f"{ratio:.2f}×", f"<= {TARGET_RATIO:g}×", verdict]


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--artifact", type=Path, help="a trained gating artifact (default: random, N=4)")
    p.add_argument(
        "--embedders",
        type=lambda s: s.split(","),
        default=EMBEDDERS,
        help=f"embedders to compare without --artifact (default {','.join(EMBEDDERS)})",
    )
    p.add_argument("--prompts", type=int, default=60, help="prompts per set (default 60)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the prompts (default 2)")
    p.add_argument(
        "--threads",
        type=lambda s: [int(t) for t in s.split(",")],
        default=[torch.get_num_threads(), 1],
        help="torch thread counts to measure, comma-separated (default: torch's default, then 1)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="one embedder and thread count, 20 prompts")
    args = p.parse_args(argv)
    if args.quick:
        args.embedders, args.threads = args.embedders[:1], args.threads[:1]
        args.prompts, args.rounds = min(args.prompts, 20), 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    quiet_logs()
    report = run_bench(args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
