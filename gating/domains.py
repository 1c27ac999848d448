"""Do the experts differ? Each expert's NLL and cloze accuracy per evaluation domain, against a
base expert (pure: arrays in, rows and markdown out).

A domain is where an example comes from: an MMLU category group (``mmlu_group``) of a split, or
an ARC / AGIEval file's split, read from the example id (``mmlu/val/<subject>/<n>``,
``arc_easy/test/<id>``, …). The table's NLL is per token when the experts share a tokenizer,
else per byte (gating/evaluate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moe2.gating.data import McExample
from moe2.gating.evaluate import (
    Difference,
    PerExample,
    ScoreArrays,
    one_hot,
    paired_differences,
    per_example,
)
from moe2.gating.pools import mmlu_group

SOURCE_NAMES = {"arc_challenge": "ARC-Challenge", "arc_easy": "ARC-Easy", "mmlu": "MMLU"}
ALL = "all"


def domain_of(ex: McExample) -> str:
    """``MMLU val: stem``, ``ARC-Challenge dev``, ``AGIEval lsat-lr``, …"""
    parts = ex.id.split("/")
    if ex.source == "mmlu":
        return f"MMLU {parts[1]}: {mmlu_group(ex.subject)}"
    name = SOURCE_NAMES.get(ex.source)
    if name is None:
        return f"{ex.source} {ex.subject}"
    return f"{name} {parts[1]}" if len(parts) > 2 else name


@dataclass(frozen=True, slots=True)
class Cell:
    nll: float  # per unit
    cloze: float  # accuracy
    examples: int


@dataclass(frozen=True, slots=True)
class DomainTable:
    experts: list[str]
    base: str
    unit: str
    domains: list[str]  # in first-seen order, then ALL
    cells: dict[tuple[str, str], Cell]  # (domain, expert)
    against_base: dict[str, list[Difference]]  # expert -> its differences to the base, over ALL

    def best(self, domain: str, metric: str) -> str:
        values = {e: self.cells[(domain, e)] for e in self.experts}
        if metric == "nll":
            return min(values, key=lambda e: values[e].nll)
        return max(values, key=lambda e: values[e].cloze)

    def _cell_dict(self, domain: str, expert: str) -> dict[str, float]:
        c = self.cells[(domain, expert)]
        return {"nll": c.nll, "cloze": c.cloze, "examples": c.examples}

    def as_dict(self) -> dict[str, object]:
        return {
            "experts": self.experts,
            "base": self.base,
            "unit": self.unit,
            "domains": {d: {e: self._cell_dict(d, e) for e in self.experts} for d in self.domains},
            "against_base": {
                e: [d.as_dict() for d in diffs] for e, diffs in self.against_base.items()
            },
        }


def domain_table(
    arrays: ScoreArrays, examples: Sequence[McExample], base: str, *, resamples: int = 2000
) -> DomainTable:
    """Every expert of ``arrays`` alone on every domain of ``examples`` (the examples of
    ``arrays``, in its order) and over all of them; and each expert minus ``base`` over all
    examples with 95% paired bootstrap intervals."""
    if [ex.id for ex in examples] != arrays.example_ids:
        raise ValueError("examples must be the arrays' examples, in order")
    if base not in arrays.expert_ids:
        raise ValueError(f"base {base!r} is not one of {arrays.expert_ids}")
    e, n = len(arrays.examples), len(arrays.expert_ids)
    outcomes = {
        eid: per_example(arrays, one_hot(e, n, j)) for j, eid in enumerate(arrays.expert_ids)
    }
    labels = [domain_of(ex) for ex in examples]
    domains = [*dict.fromkeys(labels), ALL]
    cells = {}
    for domain in domains:
        idx = np.arange(e) if domain == ALL else np.flatnonzero(np.array(labels) == domain)
        for eid, o in outcomes.items():
            cells[(domain, eid)] = _cell(o, idx)
    against = {
        eid: paired_differences(eid, o, base, outcomes[base], resamples=resamples)
        for eid, o in outcomes.items()
        if eid != base
    }
    return DomainTable(list(arrays.expert_ids), base, arrays.unit, domains, cells, against)


def _cell(o: PerExample, idx: np.ndarray) -> Cell:
    units = max(int(o.tokens[idx].sum()), 1)
    return Cell(float(o.nll[idx].sum()) / units, float(o.cloze_ok[idx].mean()), int(idx.size))


def markdown(table: DomainTable) -> str:
    """Two tables (NLL, cloze accuracy: domains x experts, the best of each row in bold) and
    each expert's difference to the base over every example, with its interval."""
    head = "| domain | n | " + " | ".join(table.experts) + " |"
    rule = "|---|---:|" + "---:|" * len(table.experts)
    parts = [f"NLL per {table.unit} (lower is better; bold: best in the row)", "", head, rule]
    parts += [_row(table, d, "nll") for d in table.domains]
    parts += ["", "Cloze accuracy % (bold: best in the row)", "", head, rule]
    parts += [_row(table, d, "cloze") for d in table.domains]
    parts += [
        "",
        f"Each expert minus {table.base} over all {table.cells[(ALL, table.base)].examples} "
        "examples, 95% paired bootstrap intervals (✓: the interval excludes zero on the "
        "expert's better side)",
        "",
        f"| expert | NLL / {table.unit} | cloze acc pp |",
        "|---|---:|---:|",
    ]
    for eid, diffs in table.against_base.items():
        by = {d.metric: d for d in diffs}
        parts.append(f"| {eid} | {_diff(by['nll'], 1.0, 4)} | {_diff(by['cloze'], 100.0, 1)} |")
    return "\n".join(parts)


def _row(table: DomainTable, domain: str, metric: str) -> str:
    best = table.best(domain, metric)
    cells = []
    for eid in table.experts:
        c = table.cells[(domain, eid)]
        text = f"{c.nll:.4f}" if metric == "nll" else f"{100 * c.cloze:.1f}"
        cells.append(f"**{text}**" if eid == best else text)
    n = table.cells[(domain, table.experts[0])].examples
    return f"| {domain} | {n} | " + " | ".join(cells) + " |"


def _diff(d: Difference, scale: float, digits: int) -> str:
    f = f"{{:+.{digits}f}}"
    mark = " ✓" if d.better else ""
    return (
        f"{f.format(scale * d.value)} [{f.format(scale * d.low)}, {f.format(scale * d.high)}]"
        + mark
    )
