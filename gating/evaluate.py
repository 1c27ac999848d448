"""Offline evaluation of expert weightings on collected outputs: pure functions of arrays.

For E examples and N experts, a weighting is an (E, N) array of non-negative weights, each row
summing to one. Every metric fuses the experts per token as ``log sum_n w_n f_n(y_t)`` (eq. 3,
``moe2.runtime.mixture.fused_log_likelihood``):

- NLL per token of the gold answer text under the cloze prompt (the training loss, eq. 13);
- letter accuracy: argmax over options of ``sum_n w_n P_n(letter)``;
- cloze accuracy: argmax over options of the mean, over the option's tokens, of the fused
  log-probability (length-normalised log-likelihood of the option's text);

A pool whose experts use different tokenizers has no common token axis: there each option is one
unit per expert, the log-probability of its whole text (the sum over that expert's own tokens),
fused at the sequence level ``log sum_n w_n P_n(text)``, and lengths are counted in UTF-8 bytes of
the text (``ScoreArrays.unit`` is "byte"): NLL per byte, and cloze accuracy normalised per byte
(as lm-evaluation-harness's ``acc_norm``).
- fused top-1 token accuracy: how often the gold token is the argmax of the fused top-k
  distribution (``moe2.runtime.fusion.fuse``, what the fusion agent would pick greedily),
  teacher-forced on the gold answer; only when the collection kept top-k.

The per-example oracle takes, for each example and each metric, the best single expert on
that example: the lowest NLL, correct if any expert is correct, the most token hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import structlog

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.fusion import ExpertSlice, fuse
from moe2.runtime.mixture import (
    fused_log_likelihood,
    renormalise_on_subset,
    rest_mass,
    top_k_weights,
)

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class ExampleScores:
    """One example's collected log-probabilities, the expert axis first (N experts)."""

    answer: int
    letter: npt.NDArray[np.floating]  # (N, O): log P_n(letter of option o), summed over its tokens
    cloze: Sequence[npt.NDArray[np.floating]]  # per option o: (N, T_o) per-token log-probs
    cloze_ids: Sequence[npt.NDArray[np.integer]]  # per option o: (T_o,) token ids
    top_ids: npt.NDArray[np.integer] | None = None  # (N, T_gold, k) top-k at each gold position
    top_logprobs: npt.NDArray[np.floating] | None = None  # (N, T_gold, k)
    lengths: Sequence[int] | None = None  # per option, its length in units; None: T_o tokens

    @property
    def gold(self) -> npt.NDArray[np.floating]:
        """(N, T): the gold option's per-token log-probabilities (the gating target)."""
        return self.cloze[self.answer]

    def length(self, option: int) -> int:
        """Option ``option``'s length in this example's unit (tokens, or bytes when mixed)."""
        return int(self.cloze[option].shape[1] if self.lengths is None else self.lengths[option])


@dataclass(frozen=True, slots=True)
class ScoreArrays:
    """What evaluation reads: per example the scores of every expert, in ``expert_ids`` order."""

    expert_ids: list[str]
    example_ids: list[str]
    examples: list[ExampleScores]
    vocab_size: int = 0  # for top-k fusion; 0 when unknown (no token accuracy then)
    unit: str = "token"  # what NLL and cloze lengths count: "token", or "byte" (mixed pool)

    def __post_init__(self) -> None:
        if len(self.example_ids) != len(self.examples):
            raise ValueError("one id per example")

    @property
    def has_top_k(self) -> bool:
        return self.vocab_size > 0 and all(
            e.top_ids is not None and e.top_ids.shape[-1] > 0 for e in self.examples
        )


@dataclass(frozen=True, slots=True)
class PerExample:
    """Per-example outcomes of one weighting (length E each)."""

    nll: F64  # summed NLL of the gold answer
    tokens: npt.NDArray[np.int64]  # its length in units (tokens, or bytes in a mixed pool)
    letter_ok: Bools
    cloze_ok: Bools
    token_hits: npt.NDArray[np.int64]  # gold tokens that are the fused top-1 (0 without top-k)


@dataclass(frozen=True, slots=True)
class MethodResult:
    """Aggregates of one weighting over the evaluated examples."""

    method: str
    nll_per_token: float
    letter_accuracy: float
    cloze_accuracy: float
    token_accuracy: float | None  # None when the collection kept no top-k
    detail: dict[str, str]  # e.g. which expert is the best single one for each metric

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "nll_per_token": self.nll_per_token,
            "letter_accuracy": self.letter_accuracy,
            "cloze_accuracy": self.cloze_accuracy,
            "token_accuracy": self.token_accuracy,
            "detail": self.detail,
        }


# ---------------------------------------------------------------------------------------------
# Fusion per token.


def letter_scores(letter: npt.ArrayLike, weights: npt.ArrayLike) -> F64:
    """Per option, the fused probability of its letter ``sum_n w_n P_n(letter)``."""
    p = np.exp(np.asarray(letter, dtype=np.float64))
    return np.asarray(np.asarray(weights, dtype=np.float64) @ p, dtype=np.float64)


def letter_choice(letter: npt.ArrayLike, weights: npt.ArrayLike) -> int:
    """The option with the largest fused probability of its letter."""
    return int(np.argmax(letter_scores(letter, weights)))


def cloze_scores(
    cloze: Sequence[npt.ArrayLike],
    weights: npt.ArrayLike,
    lengths: Sequence[int] | None = None,
) -> F64:
    """Per option, the length-normalised fused log-likelihood of its text: per token (the mean
    over its T_o positions), or per ``lengths[o]`` units when given."""
    sums = [float(fused_log_likelihood(lp, weights).sum()) for lp in cloze]
    units = [np.asarray(lp).shape[-1] for lp in cloze] if lengths is None else list(lengths)
    return np.array([s / max(u, 1) for s, u in zip(sums, units, strict=True)])


def cloze_choice(
    cloze: Sequence[npt.ArrayLike],
    weights: npt.ArrayLike,
    lengths: Sequence[int] | None = None,
) -> int:
    """The option with the largest length-normalised fused log-likelihood of its text."""
    return int(np.argmax(cloze_scores(cloze, weights, lengths)))


def fused_top1(
    top_ids: npt.NDArray[np.integer],
    top_logprobs: npt.NDArray[np.floating],
    weights: npt.ArrayLike,
    vocab_size: int,
) -> npt.NDArray[np.int64]:
    """The fused argmax token at each position from (N, T, k) top-k slices: (T,)."""
    w = np.asarray(weights, dtype=np.float64)
    used = np.flatnonzero(w > 0)
    out = np.empty(top_ids.shape[1], dtype=np.int64)
    for t in range(top_ids.shape[1]):
        slices = [_slice(top_ids[n, t], top_logprobs[n, t]) for n in used]
        fused = fuse(slices, w[used].tolist(), vocab_size)
        out[t] = int(fused.ids[int(np.argmax(fused.probs))])
    return out


def _slice(ids: npt.NDArray[np.integer], logprobs: npt.NDArray[np.floating]) -> ExpertSlice:
    lp = np.asarray(logprobs, dtype=np.float32)
    rest = rest_mass(np.exp(lp.astype(np.float64)))
    return ExpertSlice(ids=np.asarray(ids, dtype=np.uint32), logprobs=lp, rest=rest)


# ---------------------------------------------------------------------------------------------
# Weightings.


def one_hot(n_examples: int, n_experts: int, expert: int) -> F64:
    w = np.zeros((n_examples, n_experts), dtype=np.float64)
    w[:, expert] = 1.0
    return w


def equal_weights(n_examples: int, n_experts: int) -> F64:
    return np.full((n_examples, n_experts), 1.0 / n_experts, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Metrics.


def per_example(arrays: ScoreArrays, weights: npt.ArrayLike) -> PerExample:
    """The outcomes of one (E, N) weighting on every example."""
    w = np.asarray(weights, dtype=np.float64)
    e = len(arrays.examples)
    nll, tokens = np.zeros(e), np.zeros(e, dtype=np.int64)
    letter_ok, cloze_ok = np.zeros(e, dtype=bool), np.zeros(e, dtype=bool)
    hits = np.zeros(e, dtype=np.int64)
    top_k = arrays.has_top_k
    for i, ex in enumerate(arrays.examples):
        nll[i] = -float(fused_log_likelihood(ex.gold, w[i]).sum())
        tokens[i] = ex.length(ex.answer)
        letter_ok[i] = letter_choice(ex.letter, w[i]) == ex.answer
        cloze_ok[i] = cloze_choice(ex.cloze, w[i], ex.lengths) == ex.answer
        if top_k and ex.top_ids is not None and ex.top_logprobs is not None:
            top1 = fused_top1(ex.top_ids, ex.top_logprobs, w[i], arrays.vocab_size)
            hits[i] = int((top1 == ex.cloze_ids[ex.answer]).sum())
    return PerExample(nll, tokens, letter_ok, cloze_ok, hits)


def aggregate(
    method: str, outcome: PerExample, *, top_k: bool, detail: dict[str, str] | None = None
) -> MethodResult:
    total = max(int(outcome.tokens.sum()), 1)
    return MethodResult(
        method=method,
        nll_per_token=float(outcome.nll.sum()) / total,
        letter_accuracy=float(outcome.letter_ok.mean()) if outcome.letter_ok.size else 0.0,
        cloze_accuracy=float(outcome.cloze_ok.mean()) if outcome.cloze_ok.size else 0.0,
        token_accuracy=float(outcome.token_hits.sum()) / total if top_k else None,
        detail=detail or {},
    )


def oracle(singles: Sequence[PerExample]) -> PerExample:
    """Per example and per metric, the best single expert on that example."""
    return PerExample(
        nll=np.min([s.nll for s in singles], axis=0),
        tokens=singles[0].tokens,
        letter_ok=np.any([s.letter_ok for s in singles], axis=0),
        cloze_ok=np.any([s.cloze_ok for s in singles], axis=0),
        token_hits=np.max([s.token_hits for s in singles], axis=0),
    )


def best_single(results: Sequence[MethodResult], expert_ids: Sequence[str]) -> MethodResult:
    """Per metric, the best single expert's figure (the expert may differ between metrics)."""
    nll = int(np.argmin([r.nll_per_token for r in results]))
    letter = int(np.argmax([r.letter_accuracy for r in results]))
    cloze = int(np.argmax([r.cloze_accuracy for r in results]))
    tokens = int(np.argmax([r.token_accuracy or 0.0 for r in results]))
    return MethodResult(
        method="best single",
        nll_per_token=results[nll].nll_per_token,
        letter_accuracy=results[letter].letter_accuracy,
        cloze_accuracy=results[cloze].cloze_accuracy,
        token_accuracy=results[tokens].token_accuracy,
        detail={
            "nll_per_token": expert_ids[nll],
            "letter_accuracy": expert_ids[letter],
            "cloze_accuracy": expert_ids[cloze],
            **({"token_accuracy": expert_ids[tokens]} if results[tokens].token_accuracy else {}),
        },
    )


@dataclass(frozen=True, slots=True)
class Difference:
    """``method`` minus ``baseline`` on one metric over the same examples, with a 95% paired
    bootstrap interval (percentile; the examples are resampled together for both)."""

    method: str
    baseline: str
    metric: str  # "nll" (per unit: lower is better), "letter" or "cloze" (accuracy)
    value: float
    low: float
    high: float

    @property
    def better(self) -> bool:
        """The whole interval is on the side where ``method`` is better."""
        return self.high < 0 if self.metric == "nll" else self.low > 0

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "baseline": self.baseline,
            "metric": self.metric,
            "value": self.value,
            "ci95": [self.low, self.high],
            "better": self.better,
        }


def _nll_rate(o: PerExample, idx: npt.NDArray[np.int64]) -> F64:
    return np.asarray(
        o.nll[idx].sum(axis=-1) / np.maximum(o.tokens[idx].sum(axis=-1), 1), dtype=np.float64
    )


def paired_differences(
    method: str,
    a: PerExample,
    baseline: str,
    b: PerExample,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> list[Difference]:
    """``a`` minus ``b`` in NLL per unit (a ratio of sums, as the tables report it), letter and
    cloze accuracy, each with its 95% paired bootstrap interval (seeded: reproducible)."""
    e = len(a.nll)
    every = np.arange(e, dtype=np.int64)
    idx = np.random.default_rng(seed).integers(0, e, size=(resamples, e), dtype=np.int64)
    out = []
    nll_boot = _nll_rate(a, idx) - _nll_rate(b, idx)
    point = float(_nll_rate(a, every) - _nll_rate(b, every))
    out.append(Difference(method, baseline, "nll", point, *_interval(nll_boot)))
    for metric, ok_a, ok_b in (
        ("letter", a.letter_ok, b.letter_ok),
        ("cloze", a.cloze_ok, b.cloze_ok),
    ):
        d = ok_a.astype(np.float64) - ok_b.astype(np.float64)
        out.append(
            Difference(method, baseline, metric, float(d.mean()), *_interval(d[idx].mean(1)))
        )
    return out


def _interval(boots: F64) -> tuple[float, float]:
    low, high = np.percentile(boots, [2.5, 97.5])
    return float(low), float(high)


@dataclass(frozen=True, slots=True)
class Evaluation:
    rows: list[MethodResult]
    differences: list[Difference]  # each gated method against best single and equal weights


def evaluate_all(arrays: ScoreArrays, gate_values: npt.ArrayLike | None) -> list[MethodResult]:
    """Every method of the report, in table order. ``gate_values``: (E, N) gating values
    ``g(x)`` (softmax over all N experts), or None to leave out the gated rows."""
    return evaluate(arrays, gate_values).rows


def evaluate(
    arrays: ScoreArrays, gate_values: npt.ArrayLike | None, *, resamples: int = 2000
) -> Evaluation:
    """The rows of :func:`evaluate_all` and, for every gated row, its paired differences
    against the best single expert (per metric: the expert best on that metric here, which
    favours the baseline) and against equal weights."""
    e, n = len(arrays.examples), len(arrays.expert_ids)
    top_k = arrays.has_top_k
    singles = [per_example(arrays, one_hot(e, n, j)) for j in range(n)]
    single_results = [
        aggregate(f"single: {eid}", s, top_k=top_k)
        for eid, s in zip(arrays.expert_ids, singles, strict=True)
    ]
    best = best_single(single_results, arrays.expert_ids)
    equal = per_example(arrays, equal_weights(e, n))
    rows = [*single_results, best]
    rows.append(aggregate("equal weights", equal, top_k=top_k))
    gated: list[tuple[str, PerExample]] = []
    if gate_values is not None:
        g = np.asarray(gate_values, dtype=np.float64)
        gated.append(("MoE² gating (all)", per_example(arrays, renormalise_on_subset(g))))
        for k in range(1, n + 1):
            gated.append((f"MoE² top-{k}", per_example(arrays, top_k_weights(g, k))))
        rows += [aggregate(name, outcome, top_k=top_k) for name, outcome in gated]
    rows.append(aggregate("oracle (per example)", oracle(singles), top_k=top_k))
    by_id = dict(zip(arrays.expert_ids, singles, strict=True))
    differences: list[Difference] = []
    for name, outcome in gated:
        for metric, key in (
            ("nll", "nll_per_token"),
            ("letter", "letter_accuracy"),
            ("cloze", "cloze_accuracy"),
        ):
            who = best.detail[key]
            differences += [
                d
                for d in paired_differences(
                    name, outcome, f"best single ({who})", by_id[who], resamples=resamples
                )
                if d.metric == metric
            ]
        differences += paired_differences(
            name, outcome, "equal weights", equal, resamples=resamples
        )
    return Evaluation(rows, differences)


# ---------------------------------------------------------------------------------------------
# The report (pure: strings and dicts).


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(row: MethodResult, key: str, text: str) -> str:
    who = row.detail.get(key)
    return f"{text} ({who})" if who else text


def markdown_table(rows: Sequence[MethodResult], unit: str = "token") -> str:
    """One line per method: NLL per gold token (or byte), letter / cloze accuracy, fused top-1
    tokens."""
    lines = [
        f"| method | NLL / {unit} | letter acc % | cloze acc % | top-1 token acc % |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            _cell(r, "nll_per_token", f"{r.nll_per_token:.4f}"),
            _cell(r, "letter_accuracy", _pct(r.letter_accuracy)),
            _cell(r, "cloze_accuracy", _pct(r.cloze_accuracy)),
            _cell(r, "token_accuracy", _pct(r.token_accuracy)),
        ]
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_table(differences: Sequence[Difference], unit: str = "token") -> str:
    """One line per (gated method, baseline): each metric's difference and its 95% interval;
    a ✓ where the interval shows the gated method better."""
    metrics = ("nll", "letter", "cloze")
    cells: dict[tuple[str, str], dict[str, Difference]] = {}
    for d in differences:
        cells.setdefault((d.method, d.baseline), {})[d.metric] = d
    lines = [
        f"| method | minus | NLL / {unit} [95% CI] | letter acc pp [95% CI] | "
        "cloze acc pp [95% CI] |",
        "|---|---|---:|---:|---:|",
    ]
    for (method, baseline), by_metric in cells.items():
        row = [method, baseline]
        for m in metrics:
            one = by_metric.get(m)
            if one is None:
                row.append("-")
                continue
            scale, fmt = (1.0, "{:+.4f}") if m == "nll" else (100.0, "{:+.1f}")
            text = (
                f"{fmt.format(scale * one.value)} [{fmt.format(scale * one.low)}, "
                f"{fmt.format(scale * one.high)}]"
            )
            row.append(text + (" ✓" if one.better else ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_report(
    rows: Sequence[MethodResult],
    context: dict[str, object],
    differences: Sequence[Difference] = (),
    unit: str = "token",
) -> str:
    """The table with what it was measured on (pool, data, split, gate) above it, and the
    gated methods' differences against the baselines below it."""
    head = ["# Gating evaluation", ""]
    head += [f"- {key}: {value}" for key, value in context.items()]
    parts = [*head, "", markdown_table(rows, unit), ""]
    if differences:
        parts += [
            "Per-example differences (gated minus baseline; NLL: negative is better, accuracy "
            "in percentage points: positive is better), 95% paired bootstrap intervals over "
            "the examples; ✓: the interval excludes zero on the gated method's side.",
            "",
            differences_table(differences, unit),
            "",
        ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# I/O: a store and a gating artifact in, the report out.


def run_evaluation(outputs: Path, gate: Path, split: str, stem: Path) -> str:
    """Evaluate the artifact at ``gate`` on the store at ``outputs`` (``split``: "heldout",
    the artifact's held-out example ids, or "all"); write ``stem``.md and .json; return the
    markdown."""
    store, arrays, values = gated_scores(outputs, gate, split)
    result = evaluate(arrays, values)
    context = report_context(store, gate, split, arrays)
    text = markdown_report(result.rows, context, result.differences, arrays.unit)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    body = {
        **context,
        "unit": arrays.unit,
        "rows": [r.as_dict() for r in result.rows],
        "differences": [d.as_dict() for d in result.differences],
    }
    stem.with_suffix(".json").write_bytes(msgspec.json.format(msgspec.json.encode(body), indent=2))
    return text


def gated_scores(
    outputs: Path, gate: Path, split: str, embedder: Any = None
) -> tuple[Any, ScoreArrays, np.ndarray]:
    """The store, its score arrays on ``split`` ("heldout" or "all"), and the gate's values
    for those examples (E, N). ``embedder``: one already loaded for the artifact (else loaded)."""
    from moe2.gating.artifact import GatingArtifact
    from moe2.gating.data import embed_text
    from moe2.gating.embed import load_embedder
    from moe2.gating.store import OutputStore

    store = OutputStore(outputs)
    artifact = GatingArtifact.load(gate, expert_ids=store.expert_ids)
    check_store_experts(store, artifact, gate)
    ids = heldout_ids(store, artifact.heldout_ids, gate) if split == "heldout" else None
    arrays = store.score_arrays(ids)
    if not arrays.examples:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"{outputs} holds no complete example")
    texts = [embed_text(store.example(i)) for i in arrays.example_ids]
    embedder = embedder or load_embedder(artifact.embedder)
    return store, arrays, artifact.values(embedder.embed(texts))


def check_store_experts(store: Any, artifact: Any, gate: Path) -> None:
    """Refuse a store whose experts (same ids, same order: ``GatingArtifact.load`` checked
    those) serve other models, adapters, contexts or tokenizers than the gate was trained on:
    the heartbeat's model string names all but the tokenizer. A gate that recorded none (trained
    before they were recorded) passes, with a warning that it could not be checked."""
    from moe2.gating.artifact import ExpertModel

    if not artifact.experts:
        structlog.get_logger("moe2.gating").warning(
            "gating_experts_unchecked",
            gate=str(gate),
            outputs=str(store.directory),
            why="the gate records no model per expert (trained before they were recorded): "
            "only the expert ids and their order are checked",
        )
        return
    serving = {e.id: ExpertModel(e.model, e.tokenizer) for e in store.meta.experts}
    differ = [
        f"expert {e}: the gate was trained on {trained.describe(now)}, "
        f"this store holds {now.describe(trained)}"
        for e, trained, now in artifact.mismatches(serving)
    ]
    if differ:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"gating artifact {gate} was trained on other experts than {store.directory} holds "
            f"under the same ids: {'; '.join(differ)}. Evaluate it on a store collected from "
            "the experts it was trained on, or train a gate on this store's experts",
        )


def heldout_ids(store: Any, ids: Sequence[str], gate: Path) -> list[str]:
    """The artifact's held-out example ids, every one complete in the store."""
    if not ids:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"{gate} records no held-out example ids; use --split all on a separate test set",
        )
    complete = {ex.id for ex in store.complete_examples()}
    missing = [i for i in ids if i not in complete]
    if missing:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"{len(missing)} of the {len(ids)} examples {gate} held out are not answered in "
            f"{store.directory} (e.g. {missing[:2]}): the gate was trained on another "
            "collection; evaluate a separate test set with --split all",
        )
    return list(ids)


def report_context(store: Any, gate: Path, split: str, arrays: ScoreArrays) -> dict[str, object]:
    """What a figure was measured on: the pool (experts and models), data, split and gate."""
    meta = store.meta
    models = {e.id: e.model for e in meta.experts}
    return {
        "outputs": str(store.directory),
        "pool": ", ".join(f"{e} ({m})" for e, m in models.items()),
        "data": f"{meta.dataset.path} (limit {meta.dataset.limit}, seed {meta.dataset.seed})",
        "collected from": meta.source,
        "gate": str(gate),
        "split": split,
        "examples": len(arrays.examples),
        f"gold {arrays.unit}s": int(sum(e.length(e.answer) for e in arrays.examples)),
        "top_k kept": meta.top_k,
    }
