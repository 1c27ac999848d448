"""Multiple-choice loaders, prompt builders and GatingData: small fixtures in tests/data/gating,
and the real row counts of ../shared/data where it exists."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from moe2.gating.data import (
    LETTERS,
    McExample,
    cloze_messages,
    cloze_targets,
    embed_text,
    letter_messages,
    letter_targets,
    load_examples,
)
from moe2.gating.dataset import GatingData, split_indices
from moe2.runtime.errors import ErrorCode, Moe2Error

FIXTURES = Path(__file__).parent / "data" / "gating"
# The shared evaluation data beside the checkout (../shared/data), or wherever MOE2_DATA says.
SHARED = Path(os.environ.get("MOE2_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
real_data = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared data at {SHARED}")


def by_id(examples: list[McExample]) -> dict[str, McExample]:
    return {ex.id: ex for ex in examples}


def test_mmlu_dir_reads_any_csv_with_quoted_commas_and_newlines() -> None:
    examples = by_id(load_examples(FIXTURES / "mmlu" / "dev"))
    assert list(examples) == [
        "mmlu/dev/astronomy/0",
        "mmlu/dev/astronomy/1",
        "mmlu/dev/astronomy/2",
    ]
    planets = examples["mmlu/dev/astronomy/1"]
    assert planets.question == "Which planets, in order, are closest to the Sun?"
    assert planets.options == ("Mercury, Venus", "Venus, Earth", "Earth, Mars", "Mars,\nJupiter")
    assert (planets.source, planets.subject, planets.answer) == ("mmlu", "astronomy", 0)
    assert (
        examples["mmlu/dev/astronomy/2"].options[0]
        == 'Because it is covered with "rust", iron oxide'
    )


def test_mmlu_answer_letters_and_layout_walk_in_sorted_order() -> None:
    examples = load_examples(FIXTURES / "mmlu")
    assert [ex.id for ex in examples][3:] == [
        "mmlu/val/astronomy/0",
        "mmlu/val/astronomy/1",
        "mmlu/val/virology/0",
    ]
    assert [ex.answer for ex in examples[3:]] == [2, 1, 1]
    assert examples == load_examples(FIXTURES / "mmlu")


def test_arc_matches_the_answer_key_against_labels_and_drops_para() -> None:
    examples = by_id(load_examples(FIXTURES / "arc" / "arc_easy" / "dev.jsonl"))
    numeric = examples["arc_easy/dev/NYSEDREGENTS_2015_4_8"]
    assert numeric.options == ("chemical", "light", "electrical", "sound")
    assert numeric.answer == 3  # answerKey "4" is the fourth option, not index 4
    lettered = examples["arc_easy/dev/Mercury_7175875"]
    assert lettered.answer == 2 and lettered.source == "arc_easy" and lettered.subject == "arc"
    assert not any("evidence" in option for option in lettered.options)
    five = examples["arc_easy/dev/MCAS_2004_5_9"]
    assert len(five.options) == 5 and five.options[five.answer] == "whale"


def test_agieval_strips_option_prefixes_and_puts_the_passage_first() -> None:
    examples = by_id(load_examples(FIXTURES / "agieval"))
    math = examples["agieval/sat-math/0"]
    assert math.options == ("2", "4", "9", "10") and math.answer == 3
    train = examples["agieval/sat-math/1"]
    assert (
        train.question == "A train travels 60 miles per hour.\n\nHow far does it travel in 2 hours?"
    )
    assert train.options[train.answer] == "120 miles"
    rc = examples["agieval/lsat-rc/0"]
    assert rc.options[-1] == "None of the above (A) or (B)." and rc.answer == 1
    assert rc.question.startswith("Some scholars hold that (A)")


def test_letter_prompt_lists_the_options_and_targets_are_letters() -> None:
    ex = by_id(load_examples(FIXTURES / "arc"))["arc_easy/dev/MCAS_2004_5_9"]
    (message,) = letter_messages(ex)
    assert message.role == "user"
    assert message.content.startswith(embed_text(ex))
    assert "A. shark\nB. frog\nC. whale\nD. eagle\nE. snake" in message.content
    assert letter_targets(ex) == list(LETTERS)


def test_cloze_prompt_is_the_question_alone_and_targets_are_option_texts() -> None:
    ex = by_id(load_examples(FIXTURES / "arc"))["arc_easy/dev/MCAS_2004_5_9"]
    (message,) = cloze_messages(ex)
    assert message.content.startswith(ex.question)
    assert "shark" not in message.content
    assert cloze_targets(ex) == ["shark", "frog", "whale", "eagle", "snake"]
    assert cloze_targets(ex)[ex.answer] == "whale"


def test_a_held_back_test_dir_in_mmlu_layout_loads_the_same_way(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "anatomy_test.csv").write_text("q1,a,b,c,d,D\nq2,a,b,c,d,A\n")
    (tmp_path / "test" / "extra.csv").write_text("q3,a,b,c,d,B\n")
    ids = [ex.id for ex in load_examples(tmp_path / "test")]
    assert ids == ["mmlu/test/anatomy/0", "mmlu/test/anatomy/1", "mmlu/test/extra/0"]


@pytest.mark.parametrize(
    ("name", "text", "why"),
    [
        ("bad.jsonl", '{"question": {"stem": "q", "choices": [', "line 1"),
        ("bad.jsonl", '{"id": "x", "question": {"stem": "q", "choices": []}}', "answerKey"),
        ("bad.jsonl", '{"question": "q", "options": ["(A)a", "(B)b"], "label": "C"}', "'C'"),
        ("x_dev.csv", "question,a,b,c,d,F\n", "'F'"),
        ("x_dev.csv", "question,a\n", "2 fields"),
        ("notes.txt", "hello", "not a directory"),
    ],
)
def test_unreadable_input_is_a_clear_error(tmp_path: Path, name: str, text: str, why: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(Moe2Error) as caught:
        load_examples(path)
    assert caught.value.code == ErrorCode.INVALID_FIELD
    assert str(path) in caught.value.message and why in caught.value.message


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Moe2Error, match="not a directory"):
        load_examples(tmp_path / "nothing.jsonl.gz")


@real_data
@pytest.mark.parametrize(
    ("path", "rows"),
    [
        ("mmlu/dev", 285),
        ("mmlu/val", 1531),
        ("arc/arc_easy/dev.jsonl", 570),
        ("arc/arc_challenge/dev.jsonl", 299),
        ("agieval/sat-math.jsonl", 220),
        ("agieval", 1895),
    ],
)
def test_real_data_row_counts(path: str, rows: int) -> None:
    examples = load_examples(SHARED / path)
    assert len(examples) == rows
    assert len({ex.id for ex in examples}) == rows
    assert all(0 <= ex.answer < len(ex.options) for ex in examples)


@real_data
def test_real_arc_numeric_labels() -> None:
    examples = load_examples(SHARED / "arc" / "arc_easy" / "dev.jsonl")
    assert by_id(examples)["arc_easy/dev/MCAS_2000_4_6"].options[0] == "cellular telephone"
    assert sum(len(ex.options) == 5 for ex in examples) == 2


# --- GatingData -------------------------------------------------------------------------------


def gating_data(n: int = 10, experts: tuple[str, ...] = ("a", "b", "c")) -> GatingData:
    rng = np.random.default_rng(0)
    lps = [-rng.random((len(experts), 1 + i % 3)).astype(np.float32) for i in range(n)]
    ids = [f"ex/{i}" for i in range(n)]
    return GatingData(list(experts), ids, [f"text {i}" for i in range(n)], lps, ["s"] * n)


def test_split_is_seeded_disjoint_and_covers_everything() -> None:
    data = gating_data(10)
    train, held = data.split(seed=3, holdout=0.2)
    assert len(train) == 8 and len(held) == 2
    assert set(train.example_ids) | set(held.example_ids) == set(data.example_ids)
    assert data.split(seed=3)[1].example_ids == held.example_ids
    assert any(data.split(seed=s)[1].example_ids != held.example_ids for s in range(4, 10))


def test_split_indices_hold_out_at_least_one_and_refuse_nonsense() -> None:
    train, held = split_indices(3, 0, 0.01)
    assert len(held) == 1 and len(train) == 2
    with pytest.raises(Moe2Error, match="holdout"):
        split_indices(10, 0, 1.0)
    with pytest.raises(Moe2Error, match="two examples"):
        split_indices(1, 0, 0.2)


def test_padded_masks_the_tail_of_short_targets() -> None:
    lp, mask = gating_data(3).padded()
    assert lp.shape == (3, 3, 3) and mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert np.all(lp[0, :, 1:] == 0)


def test_data_hash_follows_content_and_order() -> None:
    data = gating_data(5)
    assert data.data_hash() == gating_data(5).data_hash()
    assert data.subset([1, 0, 2, 3, 4]).data_hash() != data.data_hash()
    changed = list(data.gold_logprobs)
    changed[2] = changed[2] - 0.5
    other = GatingData(data.expert_ids, data.example_ids, data.texts, changed, data.subjects)
    assert other.data_hash() != data.data_hash()


def test_with_experts_and_by_ids_pick_columns_and_rows() -> None:
    data = gating_data(4)
    on_s = data.with_experts(["c", "a"])
    assert on_s.expert_ids == ["c", "a"]
    assert np.array_equal(on_s.gold_logprobs[1], data.gold_logprobs[1][[2, 0]])
    assert data.by_ids(["ex/3", "ex/1"]).example_ids == ["ex/3", "ex/1"]
    with pytest.raises(Moe2Error, match="not in the data"):
        data.by_ids(["ex/9"])


@pytest.mark.parametrize(
    ("shape", "value", "why"),
    [
        ((2, 1), -0.1, "shape"),
        ((3, 0), -0.1, "shape"),
        ((3, 1), 0.5, "<= 0"),
        ((3, 1), np.nan, "finite"),
    ],
)
def test_gating_data_refuses_bad_logprobs(shape: tuple[int, int], value: float, why: str) -> None:
    with pytest.raises(Moe2Error, match=why):
        GatingData(["a", "b", "c"], ["x"], ["t"], [np.full(shape, value, np.float32)], ["s"])
