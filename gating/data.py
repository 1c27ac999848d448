"""Multiple-choice QA data: loaders for MMLU, ARC and AGIEval, and the prompts built from them.

Two prompt formats. The *letter* format shows the lettered options and asks for the letter (the
target of option i is ``LETTERS[i]``). The *cloze* format shows the question alone and scores each
option's text as the answer; small models only rise above chance in this one. The gating network
embeds ``embed_text``: the question and its lettered options, which is how the letter prompt begins.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import ChatMessage

LETTERS = "ABCDE"
_SPLIT_SUFFIXES = ("_dev", "_val", "_test", "_train")
_OPTION_PREFIX = re.compile(r"^\s*\(([A-E])\)\s*")
_ARC_SOURCES = ("arc_easy", "arc_challenge")

LETTER_INSTRUCTION = "Answer with the letter of the correct option."
CLOZE_INSTRUCTION = "Answer with the correct answer only."


@dataclass(frozen=True, slots=True)
class McExample:
    """One multiple-choice question."""

    id: str  # stable: "mmlu/val/anatomy/3", "arc_easy/dev/Mercury_7175875", "agieval/sat-math/12"
    source: str  # "mmlu", "arc_easy", "arc_challenge", "arc" or "agieval"
    subject: str  # the MMLU subject, the AGIEval file stem, or "arc"
    question: str  # with the passage first for AGIEval, where there is one
    options: tuple[str, ...]  # option texts, no "(A)" prefixes
    answer: int  # index into options


def load_examples(path: Path) -> list[McExample]:
    """Every example under ``path``: a directory in MMLU's layout (``*.csv``, no header), an ARC or
    AGIEval ``.jsonl`` file, or a directory of those, walked in sorted order (a stable order).
    Unreadable input is a ``Moe2Error(INVALID_FIELD)`` that names the file."""
    path = Path(path)
    if path.is_dir():
        return [ex for child in sorted(path.iterdir()) for ex in _load_child(child)]
    if path.suffix == ".csv":
        return _load_mmlu_csv(path)
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    raise _invalid(path, "not a directory, a .csv or a .jsonl file")


def _load_child(child: Path) -> list[McExample]:
    if child.is_dir() or child.suffix in (".csv", ".jsonl"):
        return load_examples(child)
    return []


def _invalid(path: Path, why: str) -> Moe2Error:
    return Moe2Error(ErrorCode.INVALID_FIELD, f"cannot read multiple-choice data {path}: {why}")


def _checked(path: Path, ex: McExample) -> McExample:
    if not 2 <= len(ex.options) <= len(LETTERS):
        raise _invalid(path, f"{ex.id}: {len(ex.options)} options (2 to {len(LETTERS)} supported)")
    return ex


# --- MMLU -------------------------------------------------------------------------------------


def _mmlu_names(path: Path) -> tuple[str, str]:
    """(subject, split) of an MMLU file: ``anatomy_val.csv`` -> ("anatomy", "val")."""
    stem = path.stem
    for suffix in _SPLIT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)], suffix[1:]
    return stem, path.parent.name


def _load_mmlu_csv(path: Path) -> list[McExample]:
    subject, split = _mmlu_names(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _invalid(path, str(e)) from e
    return [
        _mmlu_example(path, f"mmlu/{split}/{subject}/{i}", subject, row)
        for i, row in enumerate(rows)
    ]


def _mmlu_example(path: Path, ex_id: str, subject: str, row: list[str]) -> McExample:
    if len(row) < 4:
        raise _invalid(
            path, f"{ex_id}: expected question, options..., answer; got {len(row)} fields"
        )
    question, options, answer = row[0], tuple(row[1:-1]), row[-1].strip()
    index = _letter_index(path, ex_id, answer, options)
    return _checked(path, McExample(ex_id, "mmlu", subject, question, options, index))


def _letter_index(path: Path, ex_id: str, letter: str, options: tuple[str, ...]) -> int:
    index = LETTERS.find(letter) if len(letter) == 1 else -1
    if not 0 <= index < len(options):
        raise _invalid(path, f"{ex_id}: answer {letter!r} is not one of {len(options)} options")
    return index


# --- JSONL (ARC, AGIEval) ---------------------------------------------------------------------


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _invalid(path, str(e)) from e
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _invalid(path, f"line {number + 1}: {e}") from e
        if not isinstance(row, dict):
            raise _invalid(path, f"line {number + 1}: not a JSON object")
        yield number, row


def _load_jsonl(path: Path) -> list[McExample]:
    examples = []
    for index, (number, row) in enumerate(_jsonl_rows(path)):
        try:
            examples.append(
                _arc_example(path, row) if _is_arc(row) else _agieval_example(path, index, row)
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise _invalid(path, f"line {number + 1}: unexpected layout ({e!r})") from e
    return examples


def _is_arc(row: dict[str, Any]) -> bool:
    return isinstance(row.get("question"), dict)


def _arc_example(path: Path, row: dict[str, Any]) -> McExample:
    """ARC: ``{"id", "question": {"stem", "choices": [{"text", "label", "para"?}]}, "answerKey"}``.
    Labels are A-E or 1-4: the answer is the choice whose label is the answer key. ``para`` (GenMC's
    retrieved evidence) is dropped."""
    source = path.parent.name if path.parent.name in _ARC_SOURCES else "arc"
    ex_id = f"{source}/{path.stem}/{row['id']}"
    choices = row["question"]["choices"]
    labels = [str(c["label"]) for c in choices]
    key = str(row["answerKey"])
    if key not in labels:
        raise _invalid(path, f"{ex_id}: answer key {key!r} is not one of the labels {labels}")
    options = tuple(str(c["text"]) for c in choices)
    stem = str(row["question"]["stem"])
    return _checked(path, McExample(ex_id, source, "arc", stem, options, labels.index(key)))


def _agieval_example(path: Path, index: int, row: dict[str, Any]) -> McExample:
    """AGIEval: ``{"passage", "question", "options": ["(A)...", ...], "label": "A"}``; the passage,
    where there is one, comes first in the question."""
    ex_id = f"agieval/{path.stem}/{index}"
    passage = (row.get("passage") or "").strip()
    question = str(row["question"])
    options = tuple(_OPTION_PREFIX.sub("", str(o), count=1) for o in row["options"])
    full = f"{passage}\n\n{question}" if passage else question
    answer = _letter_index(path, ex_id, str(row["label"]).strip(), options)
    return _checked(path, McExample(ex_id, "agieval", path.stem, full, options, answer))


# --- prompts ----------------------------------------------------------------------------------


def embed_text(ex: McExample) -> str:
    """What the gating network embeds: the question and its lettered options."""
    lettered = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(ex.options))
    return f"{ex.question}\n{lettered}"


def letter_messages(ex: McExample) -> list[ChatMessage]:
    """The question with lettered options; the answer is one letter."""
    return [ChatMessage("user", f"{embed_text(ex)}\n\n{LETTER_INSTRUCTION}")]


def letter_targets(ex: McExample) -> list[str]:
    """``["A", "B", ...]``, one per option."""
    return list(LETTERS[: len(ex.options)])


def cloze_messages(ex: McExample) -> list[ChatMessage]:
    """The question alone; the answer is an option's text."""
    return [ChatMessage("user", f"{ex.question}\n\n{CLOZE_INSTRUCTION}")]


def cloze_targets(ex: McExample) -> list[str]:
    """The option texts."""
    return list(ex.options)
