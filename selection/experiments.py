"""The paper's Fig. 3, on our pool: MoE² against the baselines, each with a 95% bootstrap
interval, from collected outputs (pure: arrays in, rows out; ``run_fig3`` does the I/O).

Methods, each a weighting of the N experts per example except where said:

- **single agent**: each base model alone (an expert whose model string names no adapter or
  context), and the **best single** expert, chosen per metric on the training examples (not on
  the evaluated ones: a choice made in hindsight flatters the baseline);
- **average expert**: each metric averaged over the experts (not a weighting);
- **majority voting**: equal weights over all N, and a real **majority vote** over the experts'
  own answers for the accuracy columns (each expert's cloze and letter choice; the plurality
  wins; a tie goes to the tied option with the highest equal-weights score);
- **SMO + equal weights**: equal weights on the S that SMO chose (Algorithm 2) under the budgets;
- **random + equal weights**: equal weights on a random subset of the size of S, the mean over
  seeds (per example, so its interval is over examples too);
- **static weighting**: one weight vector for every prompt, fitted on the training examples to
  minimise eq. 13: the prompt-independent part of a gate;
- **MoE²**: the gate's top-k of S, renormalised (Algorithm 3, eq. 28);
- **oracle**: per example and metric, the best single expert on that example.

S is chosen on the gate's validation examples (not the evaluated ones), so no figure is tuned on
the examples it is reported on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from moe2.gating.evaluate import (
    Difference,
    PerExample,
    ScoreArrays,
    cloze_choice,
    cloze_scores,
    differences_table,
    equal_weights,
    letter_choice,
    letter_scores,
    one_hot,
    oracle,
    paired_differences,
    per_example,
)
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.mixture import top_k_weights
from moe2.selection.costs import Budgets
from moe2.selection.live import build_problem
from moe2.selection.oracle import LossOracle
from moe2.selection.profiles import Profiles
from moe2.selection.session_costs import SubsetCost, cost_side_markdown, plot_costs, subset_costs
from moe2.selection.smo import smo

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class PoolCosts:
    """What SMO needs of a pool: its profiles, budgets and the gate's k (from a pool file)."""

    profiles: Profiles
    budgets: Budgets
    k: int | None
    name: str = ""


@dataclass(frozen=True, slots=True)
class SessionsPlan:
    """Part 3, the cost side: where the recorded sessions of each S are (one trace per S,
    ``selection.session_costs.trace_name``), and, to record them first, a recorder called with
    the subsets the grid chose and the questions to ask (the first ``count`` evaluated ones)."""

    directory: Path
    record: Callable[[Sequence[Sequence[str]], Sequence[str], Path], object] | None = None
    count: int = 8


@dataclass(frozen=True, slots=True)
class Outcome:
    """Per-example outcomes with fractional correctness (a mean over seeds may be 0.3)."""

    nll: F64 | None  # summed NLL of the gold answer; None for a method with no likelihood
    units: npt.NDArray[np.int64]
    letter: F64
    cloze: F64

    @classmethod
    def of(cls, p: PerExample) -> Outcome:
        return cls(p.nll, p.tokens, p.letter_ok.astype(np.float64), p.cloze_ok.astype(np.float64))


@dataclass(frozen=True, slots=True)
class Row:
    method: str
    nll: float | None  # per unit
    letter: float
    cloze: float
    ci: dict[str, tuple[float, float]]  # metric -> 95% bootstrap interval
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "nll_per_unit": self.nll,
            "letter_accuracy": self.letter,
            "cloze_accuracy": self.cloze,
            "ci95": {k: list(v) for k, v in self.ci.items()},
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Fig3:
    rows: list[Row]
    differences: list[Difference]  # MoE² minus each baseline
    unit: str
    subset: list[str]  # S
    k: int | None
    notes: list[str] = field(default_factory=list)


def bootstrap_interval(
    o: Outcome, metric: str, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the metric (NLL per unit as a ratio of sums; accuracy as a
    mean) over ``resamples`` resamples of the examples."""
    e = len(o.units)
    idx = np.random.default_rng(seed).integers(0, e, size=(resamples, e))
    if metric == "nll":
        assert o.nll is not None
        boots = o.nll[idx].sum(1) / np.maximum(o.units[idx].sum(1), 1)
    else:
        boots = getattr(o, metric)[idx].mean(1)
    low, high = np.percentile(boots, [2.5, 97.5])
    return float(low), float(high)


def row(method: str, o: Outcome, detail: str = "", resamples: int = 2000) -> Row:
    nll = None if o.nll is None else float(o.nll.sum()) / max(int(o.units.sum()), 1)
    metrics = ["letter", "cloze", *(["nll"] if o.nll is not None else [])]
    return Row(
        method,
        nll,
        float(o.letter.mean()),
        float(o.cloze.mean()),
        {m: bootstrap_interval(o, m, resamples=resamples) for m in metrics},
        detail,
    )


def majority_vote(arrays: ScoreArrays) -> Outcome:
    """Each expert answers alone (its cloze and its letter choice); the plurality wins, a tie
    goes to the tied option with the highest equal-weights score. No likelihood."""
    n = len(arrays.expert_ids)
    alone = np.eye(n)
    equal = np.full(n, 1.0 / n)
    letter: list[float] = []
    cloze: list[float] = []
    for ex in arrays.examples:
        letter_votes = [letter_choice(ex.letter, w) for w in alone]
        letter.append(_vote(letter_votes, letter_scores(ex.letter, equal), ex.answer))
        cloze_votes = [cloze_choice(ex.cloze, w, ex.lengths) for w in alone]
        cloze.append(_vote(cloze_votes, cloze_scores(ex.cloze, equal, ex.lengths), ex.answer))
    units = np.array([ex.length(ex.answer) for ex in arrays.examples], dtype=np.int64)
    return Outcome(None, units, np.array(letter), np.array(cloze))


def _vote(choices: Sequence[int], tie_scores: F64, answer: int) -> float:
    """1.0 if the plurality of ``choices`` (a tie: the tied option with the highest
    ``tie_scores``) is ``answer``, else 0.0."""
    votes = np.bincount(choices, minlength=len(tie_scores))
    tied = np.flatnonzero(votes == votes.max())
    return float(int(tied[np.argmax(tie_scores[tied])]) == answer)


def per_example_mean(outcomes: Sequence[Outcome]) -> Outcome:
    """Each metric averaged over several outcomes, per example: the average expert (over the
    single experts) and the random baseline (over seeds)."""
    nll = np.mean([o.nll for o in outcomes if o.nll is not None], axis=0)
    return Outcome(
        nll,
        outcomes[0].units,
        np.mean([o.letter for o in outcomes], axis=0),
        np.mean([o.cloze for o in outcomes], axis=0),
    )


def static_weights(train: ScoreArrays, *, iterations: int = 500, tol: float = 1e-10) -> F64:
    """One weight vector (N,) maximising the mixture likelihood of eq. 13 over the training
    examples (for fixed experts the loss is convex in the weights): EM, whose update is the mean
    responsibility of each expert over every unit (a token, or an answer in a mixed pool)."""
    n = len(train.expert_ids)
    gold = np.concatenate([np.asarray(ex.gold, dtype=np.float64) for ex in train.examples], 1)
    w = np.full(n, 1.0 / n)
    for _ in range(iterations):
        terms = gold + np.log(np.maximum(w, 1e-300))[:, None]  # (N, units)
        post = np.exp(terms - terms.max(0))
        post /= post.sum(0)
        new = post.mean(1)
        if np.abs(new - w).max() < tol:
            return np.asarray(new, dtype=np.float64)
        w = new
    return np.asarray(w, dtype=np.float64)


def base_models(arrays: ScoreArrays, models: dict[str, str]) -> list[str]:
    """The experts whose model string names no adapter or context (``+lora:``, ``+ctx``)."""
    return [e for e in arrays.expert_ids if "+" not in models.get(e, "+")]


@dataclass(frozen=True, slots=True)
class TrainChoices:
    """What the baselines take from the training examples, computed once for every table."""

    best_nll: int  # expert index: the lowest NLL per unit on train
    best_cloze: int  # expert index: the highest cloze accuracy on train
    static: F64  # (N,) the static weighting (``static_weights``)

    @classmethod
    def of(cls, train: ScoreArrays) -> TrainChoices:
        e, n = len(train.examples), len(train.expert_ids)
        singles = [per_example(train, one_hot(e, n, j)) for j in range(n)]
        return cls(
            best_nll=int(np.argmin([p.nll.sum() / max(p.tokens.sum(), 1) for p in singles])),
            best_cloze=int(np.argmax([p.cloze_ok.mean() for p in singles])),
            static=static_weights(train),
        )


def fig3(
    arrays: ScoreArrays,
    gate_values: npt.ArrayLike,
    train: TrainChoices,
    subset: Sequence[str],
    k: int | None,
    models: dict[str, str],
    *,
    seeds: int = 10,
    resamples: int = 2000,
) -> Fig3:
    """Every method of the module docstring on ``arrays`` (the evaluated examples); ``train``:
    what the baselines chose on the training examples of the same experts, in the same order."""
    ids = arrays.expert_ids
    e, n = len(arrays.examples), len(ids)
    if len(train.static) != n:
        raise ValueError("train and evaluated arrays must have the same experts in order")
    singles_p = [per_example(arrays, one_hot(e, n, j)) for j in range(n)]
    singles = [Outcome.of(p) for p in singles_p]
    rows: list[Row] = []
    baselines: list[tuple[str, Outcome]] = []

    def add(name: str, o: Outcome, detail: str = "", baseline: bool = True) -> None:
        rows.append(row(name, o, detail, resamples))
        if baseline:
            baselines.append((name, o))

    for base in base_models(arrays, models):
        add(f"single agent: {base}", singles[ids.index(base)], models.get(base, ""))
    best_nll, best_cloze = train.best_nll, train.best_cloze
    add(f"best single, by NLL on train: {ids[best_nll]}", singles[best_nll])
    if best_cloze != best_nll:
        add(f"best single, by cloze on train: {ids[best_cloze]}", singles[best_cloze])
    add("average expert", per_example_mean(singles))
    add("majority voting: equal weights", Outcome.of(per_example(arrays, equal_weights(e, n))))
    add("majority voting: a vote of the experts' answers", majority_vote(arrays))
    s_idx = [ids.index(x) for x in subset]
    on_s = np.zeros((e, n))
    on_s[:, s_idx] = 1.0 / len(s_idx)
    add(f"SMO + equal weights (|S| = {len(s_idx)})", Outcome.of(per_example(arrays, on_s)))
    rng = np.random.default_rng(0)
    randoms = []
    for _ in range(seeds):
        pick = rng.choice(n, size=len(s_idx), replace=False)
        w = np.zeros((e, n))
        w[:, pick] = 1.0 / len(pick)
        randoms.append(Outcome.of(per_example(arrays, w)))
    add(f"random {len(s_idx)} + equal weights (mean of {seeds} seeds)", per_example_mean(randoms))
    static = train.static
    top = ", ".join(f"{ids[j]} {static[j]:.2f}" for j in np.argsort(-static)[:3])
    add(
        "static weighting (fitted on train)",
        Outcome.of(per_example(arrays, np.tile(static, (e, 1)))),
        top,
    )
    g = np.asarray(gate_values, dtype=np.float64)
    moe2_w = top_k_weights(g, k, s_idx)
    moe2 = Outcome.of(per_example(arrays, moe2_w))
    add(f"MoE² (gate, top-{k or len(s_idx)} of S)", moe2, baseline=False)
    add("oracle (per example)", Outcome.of(oracle(singles_p)), baseline=False)
    moe2_p = per_example(arrays, moe2_w)
    differences = []
    for name, o in baselines:
        differences += [
            d
            for d in paired_differences(
                "MoE²", moe2_p, name, _as_per_example(o), resamples=resamples
            )
            if not (d.metric == "nll" and o.nll is None)
        ]
    return Fig3(rows, differences, arrays.unit, list(subset), k)


def _as_per_example(o: Outcome) -> PerExample:
    """An Outcome as PerExample for ``paired_differences`` (fractional correctness is kept as
    floats: the paired difference of means is the same)."""
    nll = o.nll if o.nll is not None else np.zeros(len(o.units))
    return PerExample(nll, o.units, o.letter, o.cloze, np.zeros(len(o.units), dtype=np.int64))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# I/O: a store, a gate and a pool file in; report.md, report.json and fig3.png out.


def choose_subset(
    costs: PoolCosts, expert_ids: Sequence[str], values: F64, gold: Sequence[F64]
) -> tuple[list[str], list[str]]:
    """S by SMO (Algorithm 2) under the pool's profiles and budgets, its loss measured on the
    examples given (the gate's validation examples); and SMO's notes."""
    budgets = costs.budgets
    problem, notes = build_problem(
        costs.profiles, LossOracle(expert_ids, values, list(gold)), budgets.tau_s, budgets.energy_j
    )
    return list(smo(problem).experts), notes


def run_fig3(
    outputs: Path,
    gate: Path,
    costs: PoolCosts,
    out_dir: Path,
    *,
    train_outputs: Path | None = None,
    seeds: int = 10,
    progress: bool = True,
    sessions: SessionsPlan | None = None,
    source: str = "",
) -> tuple[str, Fig3]:
    """Fig. 3, the budget grid, the cost side (with ``sessions``) and Theorem 1; writes
    ``out_dir``/report.md, report.json, fig3.png, grid.png and costs.png; returns the markdown
    and the Fig. 3 result.

    ``train_outputs`` is the store the gate was trained on (default ``outputs``). When it is
    ``outputs``, the gate's held-out examples are evaluated; otherwise every complete example of
    ``outputs`` (a test split collected from the same experts) is, and the validation and training
    examples (for S, the static weighting and the best single expert) come from
    ``train_outputs``. Either way an example the gate trained on or chose S with is left out,
    and with ``source`` (``mmlu/val``) only the examples of that data file are evaluated."""
    import time

    from moe2.gating.artifact import GatingArtifact
    from moe2.gating.data import embed_text
    from moe2.gating.embed import load_embedder
    from moe2.gating.evaluate import check_store_experts, heldout_ids
    from moe2.gating.store import OutputStore

    started = time.perf_counter()
    store = OutputStore(outputs)
    trained_on = store if train_outputs is None else OutputStore(train_outputs)
    separate = (
        train_outputs is not None and trained_on.directory.resolve() != store.directory.resolve()
    )
    artifact = GatingArtifact.load(gate, expert_ids=trained_on.expert_ids)
    check_store_experts(trained_on, artifact, gate)
    validation = list(artifact.metadata.get("split", {}).get("validation", []))
    if not validation:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"{gate} records no validation examples (trained before the three-way split): "
            "retrain it with `moe2 gating train`",
        )
    taken = set(artifact.heldout_ids) | set(validation)
    train_ids = [ex.id for ex in trained_on.complete_examples() if ex.id not in taken]
    if separate:
        if store.expert_ids != trained_on.expert_ids:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"{outputs} holds experts {store.expert_ids}, the gate's store "
                f"{trained_on.expert_ids}: collect the test split from the same experts",
            )
        check_store_experts(store, artifact, gate)
        candidates = [ex.id for ex in store.complete_examples()]
    else:
        candidates = heldout_ids(trained_on, artifact.heldout_ids, gate)
    # a question the gate trained on or chose S with is never evaluated, whatever store it is in
    seen = set(train_ids) | set(validation)
    held = [i for i in candidates if i not in seen and i.startswith(source)]
    left_out = sum(1 for i in candidates if i in seen and i.startswith(source))
    if not held:
        where = f" from {source!r}" if source else ""
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"{outputs} holds no complete example{where} that the gate did not train on or "
            "choose S with",
        )
    arrays = store.score_arrays(held)
    val_arrays = trained_on.score_arrays(validation)
    train_arrays = trained_on.score_arrays(train_ids)
    embedder = load_embedder(artifact.embedder)
    texts = [embed_text(store.example(i)) for i in held]
    texts += [embed_text(trained_on.example(i)) for i in validation]
    x = embedder.embed(texts)
    values = artifact.values(x)
    held_values, val_values = values[: len(held)], values[len(held) :]
    gold = [np.asarray(ex.gold, dtype=np.float64) for ex in val_arrays.examples]
    subset, notes = choose_subset(costs, arrays.expert_ids, val_values, gold)
    k = costs.k
    from tqdm.auto import tqdm

    stages = tqdm(total=5, desc="eval", unit="part", disable=not progress)
    stages.set_postfix_str("Fig. 3")
    models = {e.id: e.model for e in store.meta.experts}
    chosen_on_train = TrainChoices.of(train_arrays)
    result = fig3(arrays, held_values, chosen_on_train, subset, k, models, seeds=seeds)
    result.notes.extend(notes)
    stages.update()
    stages.set_postfix_str("by source")
    by_source = {}
    for data_file in dict.fromkeys(_source(i) for i in held):
        idx = [i for i, ex_id in enumerate(held) if _source(ex_id) == data_file]
        part = ScoreArrays(
            arrays.expert_ids,
            [arrays.example_ids[i] for i in idx],
            [arrays.examples[i] for i in idx],
            arrays.vocab_size,
            arrays.unit,
        )
        by_source[data_file] = fig3(
            part, held_values[idx], chosen_on_train, subset, k, models, seeds=seeds
        )
    fig3_s = time.perf_counter() - started
    stages.update()
    stages.set_postfix_str("budget grid")
    cells = budget_grid(costs, arrays, held_values, val_values, gold, seeds=seeds)
    grid_s = time.perf_counter() - started - fig3_s
    from moe2.gating.theorem import theorem1_check

    chosen = [list(x) for x in dict.fromkeys(tuple(c.subset) for c in cells if c.subset)]
    stages.update()
    costs_text, costs_s = "", 0.0
    measured: dict[tuple[str, ...], SubsetCost] = {}
    if sessions is not None:
        stages.set_postfix_str("the cost side")
        questions = [embed_text(store.example(i)) for i in held[: sessions.count]]
        costs_text, measured, costs_s = cost_side(sessions, chosen, questions, cells, out_dir)
    stages.update()
    stages.set_postfix_str(f"Theorem 1 ({len(chosen)} subsets)")
    theorem = theorem1_check(trained_on.to_gating_data(), embedder, subsets=chosen)
    stages.update()
    stages.close()
    seconds = time.perf_counter() - started
    context: dict[str, object] = {
        "outputs": str(store.directory),
        "gate": str(gate),
        "pool": costs.name,
        "data": store.meta.dataset.path,
        "examples": f"{len(held)} {'of a separate store' if separate else 'held out'} "
        f"(evaluated{', ' + source + ' only' if source else ''}"
        f"{f'; {left_out} left out: the gate trained on or chose S with them' if left_out else ''}"
        f"), {len(validation)} validation (S chosen on them), {len(train_ids)} train "
        "(static weights, best single)",
        "gate trained on": str(trained_on.directory),
        "S": ", ".join(subset),
        "k": k,
        "seconds": f"{seconds:.1f} (Fig. 3 {fig3_s:.1f}, the budget grid {grid_s:.1f}, "
        f"the cost side {costs_s:.1f}, Theorem 1 {seconds - fig3_s - grid_s - costs_s:.1f})",
    }
    text = fig3_markdown(result, context)
    text += "\n## By source\n\n" + by_source_markdown(by_source, result.unit)
    text += "\n## The budget grid (Tables II–IV)\n\n" + grid_markdown(cells, result.unit)
    text += "\n## The cost side: predicted against measured\n\n" + (
        costs_text or "Not measured: no recorded sessions (`moe2 eval --record-sessions N`).\n"
    )
    text += (
        "\n## Theorem 1 on this pool\n\nFor every S the grid chose: the held-out eq. 13 loss "
        "(per answer in a pool of two tokenizers, else per token) of the full-set gate "
        "renormalised on S against a gate retrained on S alone (same three splits; gap = "
        "renormalised minus retrained, the theorem says 0):\n\n" + theorem.markdown() + "\n"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    body = {
        **context,
        "unit": result.unit,
        "rows": [r.as_dict() for r in result.rows],
        "differences": [d.as_dict() for d in result.differences],
        "notes": result.notes,
        "theorem1": list(theorem),
        "by_source": {src: [r.as_dict() for r in f.rows] for src, f in by_source.items()},
        "grid": [
            {
                "tau_s": c.tau,
                "energy_j": c.energy,
                "subset": c.subset,
                "methods": c.methods,
                "modelled": {"delay_s_per_token": c.delay_s, "energy_j": c.energy_j},
            }
            for c in cells
        ],
        "costs": [m.as_dict() for m in measured.values()],
    }
    (out_dir / "report.json").write_text(json.dumps(body, indent=2) + "\n")
    plot_fig3(result, out_dir / "fig3.png")
    plot_grid(cells, result.unit, out_dir / "grid.png")
    return text, result


def cost_side(
    sessions: SessionsPlan,
    chosen: Sequence[Sequence[str]],
    questions: Sequence[str],
    cells: Sequence[Cell],
    out_dir: Path,
) -> tuple[str, dict[tuple[str, ...], SubsetCost], float]:
    """Record the sessions if asked, then read every trace: the markdown, the figures by S and
    the seconds it took; costs.png is written when any session was read."""
    import time

    began = time.perf_counter()
    if sessions.record is not None:
        sessions.record(chosen, questions, sessions.directory)
    traces = sorted(sessions.directory.glob("*.trace")) if sessions.directory.is_dir() else []
    measured = subset_costs(traces)
    if not measured:
        return "", measured, time.perf_counter() - began
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_costs(measured, out_dir / "costs.png")
    text = (
        f"Sessions recorded in `{sessions.directory}`. SMO chose each S with the pool's costs "
        '(the devices the pool declares); the sessions ran here, so "predicted here" prices '
        "the same S with the costs its experts announced in their heartbeats on this box, and "
        "that is what the measurement checks.\n\n" + cost_side_markdown(cells, measured)
    )
    return text, measured, time.perf_counter() - began


def _source(example_id: str) -> str:
    """``mmlu/val``, ``arc_challenge/dev``, …: the data file an example came from."""
    return "/".join(example_id.split("/")[:2])


BY_SOURCE = ("best single, by NLL", "best single, by cloze", "majority voting: equal weights",
             "static weighting", "SMO + equal weights", "MoE²")  # fmt: skip


def by_source_markdown(by_source: dict[str, Fig3], unit: str) -> str:
    """The main rows of Fig. 3 on each source's held-out examples, with their intervals."""
    lines = [
        f"| source | method | NLL / {unit} [95% CI] | cloze acc % [95% CI] |",
        "|---|---|---:|---:|",
    ]
    for source, result in by_source.items():
        for r in result.rows:
            if not r.method.startswith(BY_SOURCE) or r.nll is None:
                continue
            nll = f"{r.nll:.4f} [{r.ci['nll'][0]:.4f}, {r.ci['nll'][1]:.4f}]"
            cloze = (
                f"{100 * r.cloze:.1f} [{100 * r.ci['cloze'][0]:.1f}, {100 * r.ci['cloze'][1]:.1f}]"
            )
            lines.append(f"| {source} | {r.method} | {nll} | {cloze} |")
    return "\n".join(lines) + "\n"


def fig3_markdown(result: Fig3, context: dict[str, object]) -> str:
    lines = ["# MoE² against the baselines (the paper's Fig. 3)", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += [
        "",
        f"| method | NLL / {result.unit} [95% CI] | cloze acc % [95% CI] | letter acc % [95% CI] |",
        "|---|---:|---:|---:|",
    ]
    for r in result.rows:
        nll = "-" if r.nll is None else f"{r.nll:.4f} [{r.ci['nll'][0]:.4f}, {r.ci['nll'][1]:.4f}]"
        cloze = f"{100 * r.cloze:.1f} [{100 * r.ci['cloze'][0]:.1f}, {100 * r.ci['cloze'][1]:.1f}]"
        letter = (
            f"{100 * r.letter:.1f} [{100 * r.ci['letter'][0]:.1f}, {100 * r.ci['letter'][1]:.1f}]"
        )
        name = f"{r.method} ({r.detail})" if r.detail else r.method
        lines.append(f"| {name} | {nll} | {cloze} | {letter} |")
    lines += [
        "",
        "MoE² minus each baseline, per example, 95% paired bootstrap intervals (NLL: negative is "
        "better; accuracy in points: positive is better; ✓: the interval excludes zero on "
        "MoE²'s side):",
        "",
        differences_table(result.differences, result.unit),
        "",
    ]
    if result.notes:
        lines += ["Notes:", "", *[f"- {n}" for n in result.notes], ""]
    return "\n".join(lines)


def plot_fig3(result: Fig3, path: Path) -> None:
    """Cloze accuracy and NLL per method with their intervals, as bars (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    names = [r.method for r in result.rows]
    y = np.arange(len(names))
    for i, (metric, label) in enumerate(
        (("cloze", "cloze accuracy %"), ("nll", f"NLL / {result.unit}"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        rows = [r for r in result.rows if metric != "nll" or r.nll is not None]
        ys = [names.index(r.method) for r in rows]
        scale = 100.0 if metric == "cloze" else 1.0
        values = [scale * (r.cloze if metric == "cloze" else r.nll or 0.0) for r in rows]
        errs = np.array(
            [
                [v - scale * r.ci[metric][0], scale * r.ci[metric][1] - v]
                for v, r in zip(values, rows, strict=True)
            ]
        ).T
        colours = ["tab:red" if r.method.startswith("MoE²") else "tab:grey" for r in rows]
        ax.barh(ys, values, xerr=errs, color=colours, capsize=2)
        ax.set_yticks(y, names if i == 0 else [""] * len(names), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        if metric == "nll":
            low = min(v - e for v, e in zip(values, errs[0], strict=True))
            ax.set_xlim(left=max(0.0, low * 0.97))
    fig.suptitle("MoE² (red) against the baselines, 95% bootstrap intervals")
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# Part 2: Tables II-IV, a grid of delay limits and energy budgets.


@dataclass(frozen=True, slots=True)
class Cell:
    tau: float  # seconds per token, every application alike
    energy: float  # joules per answer
    subset: list[str]  # S, empty when nothing fits
    methods: dict[str, tuple[float, float]]  # method -> (NLL per unit, cloze accuracy)
    delay_s: float = 0.0  # S's delay per token (the slowest application) under the pool's costs
    energy_j: float = 0.0  # S's energy per answer under the pool's costs


def grid_axes(problem: object, steps: int = 4) -> tuple[list[float], list[float]]:
    """Delay limits from "only the fastest expert fits" to "every expert fits", and energy
    budgets from "only the thriftiest fits" to "all of them together fit", ``steps`` each."""
    from moe2.selection.problem import Problem

    assert isinstance(problem, Problem)
    singles = [problem.describe(1 << i) for i in range(problem.size)]
    delays = [max(c.delay_s.values()) for c in singles]
    energies = [c.energy_j for c in singles]
    everyone = problem.describe((1 << problem.size) - 1)
    taus = np.linspace(min(delays), max(delays), steps)
    budgets = np.linspace(min(energies), everyone.energy_j, steps)
    return [float(t) for t in taus], [float(e) for e in budgets]


def budget_grid(
    costs: PoolCosts,
    arrays: ScoreArrays,
    held_values: F64,
    val_values: F64,
    val_gold: Sequence[F64],
    *,
    steps: int = 4,
    seeds: int = 10,
) -> list[Cell]:
    """For every (tau, E) of the grid: S by SMO (loss on the validation examples), then MoE²,
    SMO + equal weights and random + equal weights on the evaluated examples."""
    ids = arrays.expert_ids
    oracle = LossOracle(ids, val_values, list(val_gold))
    apps = list(costs.profiles.applications)
    loose, _ = build_problem(costs.profiles, oracle, {a: 1e9 for a in apps}, 1e12)
    taus, energies = grid_axes(loose, steps)
    e, n = len(arrays.examples), len(ids)
    rng = np.random.default_rng(0)
    cells = []
    for tau in taus:
        for energy in energies:
            problem, _ = build_problem(costs.profiles, oracle, {a: tau for a in apps}, energy)
            try:
                subset = list(smo(problem).experts)
            except Moe2Error:
                subset = []
            methods: dict[str, tuple[float, float]] = {}
            modelled = (0.0, 0.0)
            if subset:
                chosen = problem.describe(sum(1 << problem.expert_ids.index(x) for x in subset))
                modelled = (max(chosen.delay_s.values()), chosen.energy_j)
                s_idx = [ids.index(x) for x in subset]
                equal = np.zeros((e, n))
                equal[:, s_idx] = 1.0 / len(s_idx)
                weightings = {
                    "MoE²": top_k_weights(held_values, costs.k, s_idx),
                    "SMO + equal": equal,
                }
                for name, w in weightings.items():
                    p = per_example(arrays, w)
                    methods[name] = (
                        float(p.nll.sum() / max(p.tokens.sum(), 1)),
                        float(p.cloze_ok.mean()),
                    )
                randoms = []
                for _ in range(seeds):
                    pick = rng.choice(n, size=len(s_idx), replace=False)
                    w = np.zeros((e, n))
                    w[:, pick] = 1.0 / len(pick)
                    randoms.append(per_example(arrays, w))
                methods["random + equal"] = (
                    float(np.mean([p.nll.sum() / max(p.tokens.sum(), 1) for p in randoms])),
                    float(np.mean([p.cloze_ok.mean() for p in randoms])),
                )
            cells.append(Cell(tau, energy, subset, methods, *modelled))
    return cells


def grid_markdown(cells: Sequence[Cell], unit: str) -> str:
    """One table per metric: rows the delay limits, columns the energy budgets; each cell MoE²,
    SMO + equal and random + equal, and |S|."""
    taus = sorted({c.tau for c in cells})
    energies = sorted({c.energy for c in cells})
    at = {(c.tau, c.energy): c for c in cells}
    out = []
    for metric, label, fmt in ((0, f"NLL / {unit}", "{:.4f}"), (1, "cloze acc %", "{:.1f}")):
        scale = 100.0 if metric == 1 else 1.0
        out += [
            f"**{label}**: MoE² / SMO + equal / random + equal (|S|); rows τ (s/token), "
            "columns E (J/answer)",
            "",
            "| τ \\\\ E | " + " | ".join(f"{x:.1f}" for x in energies) + " |",
            "|---|" + "---:|" * len(energies),
        ]
        for tau in taus:
            cells_text = []
            for energy in energies:
                c = at[(tau, energy)]
                if not c.subset:
                    cells_text.append("nothing fits")
                    continue
                vals = [
                    fmt.format(scale * c.methods[m][metric])
                    for m in ("MoE²", "SMO + equal", "random + equal")
                ]
                cells_text.append(" / ".join(vals) + f" ({len(c.subset)})")
            out.append(f"| {tau:.3f} | " + " | ".join(cells_text) + " |")
        out.append("")
    chosen = sorted({", ".join(c.subset) for c in cells if c.subset})
    out += ["The subsets S chosen across the grid:", "", *[f"- {{{s}}}" for s in chosen], ""]
    return "\n".join(out)


def plot_grid(cells: Sequence[Cell], unit: str, path: Path) -> None:
    """MoE²'s NLL and cloze accuracy over the grid as heat maps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    taus = sorted({c.tau for c in cells})
    energies = sorted({c.energy for c in cells})
    at = {(c.tau, c.energy): c for c in cells}
    fig = Figure(figsize=(10, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, (metric, label) in enumerate(((0, f"MoE² NLL / {unit}"), (1, "MoE² cloze acc %"))):
        grid = np.full((len(taus), len(energies)), np.nan)
        for a, tau in enumerate(taus):
            for b, energy in enumerate(energies):
                c = at[(tau, energy)]
                if c.subset:
                    grid[a, b] = c.methods["MoE²"][metric] * (100.0 if metric else 1.0)
        ax = fig.add_subplot(1, 2, i + 1)
        im = ax.imshow(
            grid, origin="lower", aspect="auto", cmap="viridis_r" if metric == 0 else "viridis"
        )
        ax.set_xticks(range(len(energies)), [f"{x:.0f}" for x in energies])
        ax.set_yticks(range(len(taus)), [f"{t:.3f}" for t in taus])
        ax.set_xlabel("energy budget E (J/answer)")
        ax.set_ylabel("delay limit τ (s/token)")
        ax.set_title(label)
        for a in range(len(taus)):
            for b in range(len(energies)):
                c = at[(taus[a], energies[b])]
                ax.text(
                    b,
                    a,
                    str(len(c.subset)) if c.subset else "-",
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=8,
                )
        fig.colorbar(im, ax=ax)
    fig.suptitle("Tables II–IV analog: MoE² over delay and energy budgets (numbers: |S|)")
    fig.tight_layout()
    fig.savefig(path)
