"""bench/backends: what one decode step costs on each installed backend, against transformers.

Every installed backend (transformers, ONNX Runtime float32 and dynamic int8, llama.cpp) serves
SmolLM2-135M-Instruct with one thread. The backends take turns step by step (one decode each,
then the next step), so a noisy machine slows them alike; the ratio to transformers' time in the
same run is the figure to read. Each backend decodes its own greedy chain (top-32 slices, as an
expert serves them); a prefill of each prompt is timed too, per prompt token. Beside each backend,
its library driven directly (``raw_decode``: one token in, the argmax out, no sessions, no
top-k) is timed at the same steps: the backend's own overhead is the ratio to it.

    python bench/backends.py [--steps 64] [--threads 1] [--json out.json] [--quick]

In the suite (``bench/run.py``) each backend is a row: its decode step against its raw library
loop, target at most 1.2x at p50. ``--quick``: 16 steps per prompt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from typing import Any

from _common import Latency, machine, markdown_table, quiet_logs
from raw_decode import RawLoop, raw_loop
from suite import SUITE_ROWS, suite_row

from moe2.agents.expert.backends import Backend, load_backend
from moe2.agents.expert.models import resolve_model
from moe2.runtime.wire import ChatMessage

TOP_K = 32
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Name three colours of the rainbow.",
]
LIBRARIES = {"transformers": "torch", "onnx": "onnxruntime", "onnx-int8": "onnxruntime"}
LIBRARIES["llamacpp"] = "llama_cpp"
TARGET_RAW = 1.2  # a backend's decode step against its library's own loop, p50
RAW_LOOPS = {
    "transformers": "the model's forward with its past_key_values, argmax",
    "onnx": "an onnxruntime session on the exported graph, argmax",
    "onnx-int8": "an onnxruntime session on the int8 graph, argmax",
    "llamacpp": "llama_cpp.Llama.eval and the last logits, argmax",
}


def installed() -> list[str]:
    return [name for name, lib in LIBRARIES.items() if importlib.util.find_spec(lib) is not None]


def measure(
    backends: dict[str, Backend], raws: dict[str, RawLoop], steps: int
) -> dict[str, dict[str, list[float]]]:
    """Per backend: decode and prefill-per-token times (ms), and its raw library loop's decode
    times; the backends and the loops taking turns at every step."""
    kinds = ("decode", "prefill", "raw")
    ms: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in backends}
    for question in PROMPTS:
        prompt = next(iter(backends.values())).encode_chat([ChatMessage("user", question)])
        last: dict[str, int] = {}
        raw_last = {name: raw.start(prompt) for name, raw in raws.items()}
        for name, backend in backends.items():
            start = time.perf_counter()
            last[name] = int(backend.prefill("bench", prompt, TOP_K).ids[0])
            ms[name]["prefill"].append((time.perf_counter() - start) * 1e3 / len(prompt))
        for _ in range(steps):
            for name, backend in backends.items():
                start = time.perf_counter()
                last[name] = int(backend.decode("bench", last[name], TOP_K).ids[0])
                ms[name]["decode"].append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                raw_last[name] = raws[name].step(raw_last[name])
                ms[name]["raw"].append((time.perf_counter() - start) * 1e3)
        for backend in backends.values():
            backend.release("bench")
    return ms


def report(backends: dict[str, Backend], ms: dict[str, dict[str, list[float]]]) -> str:
    base = Latency.of(ms["transformers"]["decode"]).p50_ms
    base_prefill = Latency.of(ms["transformers"]["prefill"]).p50_ms
    header = [
        "backend",
        "quantisation",
        "decode p50 ms",
        "decode mean ms",
        "× transformers (p50)",
        "raw library loop p50 ms",
        "× raw loop (p50)",
        "prefill ms/token p50",
        "× transformers",
    ]
    rows = []
    for name, backend in backends.items():
        decode, prefill = Latency.of(ms[name]["decode"]), Latency.of(ms[name]["prefill"])
        raw = Latency.of(ms[name]["raw"])
        rows.append(
            [
                name,
                backend.info.quantisation,
                f"{decode.p50_ms:.1f}",
                f"{decode.mean_ms:.1f}",
                f"{decode.p50_ms / base:.2f}",
                f"{raw.p50_ms:.1f}",
                f"{decode.p50_ms / raw.p50_ms:.2f}",
                f"{prefill.p50_ms:.2f}",
                f"{prefill.p50_ms / base_prefill:.2f}",
            ]
        )
    return markdown_table(header, rows)


def suite_rows(
    backends: dict[str, Backend], ms: dict[str, dict[str, list[float]]]
) -> list[dict[str, Any]]:
    """One row per backend: its decode step against its raw library loop (p50)."""
    rows = []
    for name, backend in backends.items():
        decode, raw = Latency.of(ms[name]["decode"]), Latency.of(ms[name]["raw"])
        ratio = decode.p50_ms / raw.p50_ms
        rows.append(
            suite_row(
                "backend_step",
                f"{RAW_LOOPS[name]}: p50 {raw.p50_ms:.1f} ms",
                f"p50 {decode.p50_ms:.1f} ms = {ratio:.2f}×",
                ratio <= TARGET_RAW,
                row=f"backend step cost: {name} ({backend.info.quantisation})",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps per prompt")
    parser.add_argument("--threads", type=int, default=1, help="threads per backend")
    parser.add_argument("--json", help="also write the samples and the machine here")
    parser.add_argument("--quick", action="store_true", help="16 steps per prompt")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 16)
    quiet_logs()
    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # transformers, every step
    source = resolve_model()
    names = installed()
    if "transformers" not in names:
        print("transformers (torch) is not installed: nothing to compare with", file=sys.stderr)
        return 1
    backends = {name: load_backend(name, source, threads=args.threads) for name in names}
    raws = {name: raw_loop(name, source, args.threads) for name in names}
    ms = measure(backends, raws, args.steps)
    print(report(backends, ms))
    print(f"\n{args.steps} steps x {len(PROMPTS)} prompts, {args.threads} thread(s); {machine()}")
    if args.json:
        out: dict[str, Any] = {"samples_ms": ms, "machine": machine(), "args": vars(args)}
        out[SUITE_ROWS] = suite_rows(backends, ms)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
