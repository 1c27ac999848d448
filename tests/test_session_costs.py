"""The cost side of ``moe2 eval`` (selection/session_costs.py): sessions read back from a trace
and the cost model's prediction for them, on traces written by hand with known figures, and
(marked model) real sessions of a real expert recorded by ``moe2.cost_sessions``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe2.runtime import wire
from moe2.runtime.errors import Moe2Error
from moe2.runtime.subjects import Subjects
from moe2.runtime.trace import TraceRecord, TraceWriter, new_header
from moe2.selection.experiments import Cell
from moe2.selection.session_costs import (
    cost_side_markdown,
    predicted_costs,
    read_sessions,
    relative_error,
    subset_costs,
    trace_name,
)

SUBJECTS = Subjects()


@dataclass(frozen=True)
class Box:
    """An expert as its heartbeat announces it, and what each of its steps really costs."""

    decode_s: float  # announced
    prefill_s_per_token: float  # announced
    power_w: float
    step_compute_s: float  # what every step measures (the prefill too)
    answers_in_s: float  # request to slice on the bus


def heartbeat(expert: str, box: Box) -> wire.Heartbeat:
    device = wire.DeviceProfile(
        name="box",
        power_w=box.power_w,
        decode_s=box.decode_s,
        prefill_s_per_token=box.prefill_s_per_token,
        max_context=2048,
    )
    return wire.Heartbeat(
        expert=expert,
        model="m",
        tokenizer="t",
        backend="b",
        vocab_size=8,
        eos_ids=[0],
        device=device,
    )


def session_records(
    session: str,
    boxes: dict[str, Box],
    steps: int,
    *,
    start: float,
    prompt_tokens: int = 10,
    missing: Iterable[tuple[str, int]] = (),
) -> list[TraceRecord]:
    """Open, then ``steps`` steps, each expert answering after its ``answers_in_s``; the slices
    in ``missing`` (expert, step) never come."""
    gone = set(missing)
    out = []
    t = start
    for step in range(steps):
        for expert, box in boxes.items():
            request: wire.Message = (
                wire.Open(session=session, messages=[wire.ChatMessage("user", "q")])
                if step == 0
                else wire.Step(session=session, step=step, token=3)
            )
            verb = SUBJECTS.expert_open if step == 0 else SUBJECTS.expert_step
            out.append(TraceRecord(t, verb(expert), data=wire.encode(request)))
            if (expert, step) in gone:
                continue
            piece = wire.Slice(
                session=session,
                expert=expert,
                step=step,
                ids=b"\x03\x00\x00\x00",
                logprobs=b"\x00\x00\x00\x00",
                rest=0.0,
                pieces=[b"x"],
                compute_s=box.step_compute_s,
                energy_j=box.power_w * box.step_compute_s,
                prompt_tokens=prompt_tokens if step == 0 else 0,
            )
            slice_t = t + box.answers_in_s
            out.append(
                TraceRecord(slice_t, SUBJECTS.slice(session, expert), data=wire.encode(piece))
            )
        t += 1.0
    return out


def write_trace(path: Path, boxes: dict[str, Box], sessions: Sequence[list[TraceRecord]]) -> Path:
    records = [
        TraceRecord(0.0, SUBJECTS.member(e), data=wire.encode(heartbeat(e, b)))
        for e, b in boxes.items()
    ]
    records.append(TraceRecord(0.1, "_INBOX.x", data=b"not a moe2 message"))
    for s in sessions:
        records += s
    with TraceWriter(path, new_header(server="", subjects=[">"])) as writer:
        for r in sorted(records, key=lambda r: r.t):
            writer.write(r)
    return path


FAST = Box(
    decode_s=0.1, prefill_s_per_token=0.01, power_w=10.0, step_compute_s=0.12, answers_in_s=0.13
)
SLOW = Box(
    decode_s=0.2, prefill_s_per_token=0.02, power_w=20.0, step_compute_s=0.25, answers_in_s=0.3
)


def test_a_session_is_measured_by_its_slowest_expert_and_predicted_from_the_heartbeats(
    tmp_path: Path,
) -> None:
    boxes = {"fast": FAST, "slow": SLOW}
    trace = write_trace(tmp_path / "t.trace", boxes, [session_records("s1", boxes, 3, start=1.0)])
    [s] = read_sessions(trace)
    assert (s.session, s.experts, s.tokens) == ("s1", ("fast", "slow"), 3)
    assert s.prompt_tokens == {"fast": 10, "slow": 10}
    # measured: per step the slower expert (0.3 s on the bus, 0.25 s computing), 3 steps
    assert s.delay_s == pytest.approx(0.9)
    assert s.compute_s == pytest.approx(0.75)
    assert s.energy_j == pytest.approx(3 * (10 * 0.12 + 20 * 0.25))  # every slice's joules
    # predicted: the prefill of 10 tokens then 2 decodes; the slow expert is slowest at each
    # (10 x 0.02 = 0.2 s, 0.2 s, 0.2 s); energy: 10 W x 0.3 s + 20 W x 0.6 s
    assert s.predicted_delay_s == pytest.approx(0.6)
    assert s.predicted_energy_j == pytest.approx(15.0)
    assert s.delay_per_token_s == pytest.approx(0.3) and s.predicted_per_token_s == pytest.approx(
        0.2
    )


def test_a_subset_sums_its_sessions_and_gives_relative_errors(tmp_path: Path) -> None:
    boxes = {"fast": FAST, "slow": SLOW}
    sessions = [session_records(f"s{i}", boxes, 3, start=1.0 + 10 * i) for i in range(2)]
    alone = {"fast": FAST}
    trace = write_trace(tmp_path / trace_name(["slow", "fast"]), boxes, sessions)
    other = write_trace(
        tmp_path / "other.trace", alone, [session_records("a", alone, 4, start=1.0)]
    )
    assert trace.name == "fast+slow.trace"
    costs = subset_costs([trace, other])
    assert set(costs) == {("fast", "slow"), ("fast",)}
    both = costs[("fast", "slow")]
    assert (len(both.sessions), both.tokens) == (2, 6)
    assert both.per_token("delay_s") == pytest.approx(0.3)
    assert both.delay_error == pytest.approx((0.2 - 0.3) / 0.3)
    assert both.energy_error == pytest.approx((15.0 - 18.6) / 18.6)
    assert both.session_errors() == pytest.approx((1 / 3, 3.6 / 18.6))
    # one expert alone: prefill 10 x 0.01 = 0.1 s then 0.1 s per step; measured 0.13 s per step
    assert costs[("fast",)].delay_error == pytest.approx((0.1 - 0.13) / 0.13)
    assert costs[("fast",)].as_dict()["energy_sources"] == ["declared"]


def test_only_the_steps_every_expert_answered_are_counted(tmp_path: Path) -> None:
    boxes = {"fast": FAST, "slow": SLOW}
    records = session_records("s1", boxes, 5, start=1.0, missing=[("slow", 3)])
    [s] = read_sessions(write_trace(tmp_path / "t.trace", boxes, [records]))
    assert s.tokens == 3  # steps 0-2; the slow expert's step 3 never came


def test_an_expert_that_announced_no_costs_is_a_clear_error() -> None:
    unmeasured = heartbeat("e", Box(0.0, 0.0, 10.0, 0.1, 0.1))
    with pytest.raises(Moe2Error, match="announces no measured costs"):
        predicted_costs({"e": unmeasured}, {"e": 10}, 4)
    with pytest.raises(Moe2Error, match="no relative error"):
        relative_error(1.0, 0.0)


def test_the_table_has_a_row_per_cell_and_says_where_nothing_was_recorded(tmp_path: Path) -> None:
    boxes = {"fast": FAST, "slow": SLOW}
    trace = write_trace(tmp_path / "t.trace", boxes, [session_records("s1", boxes, 3, start=1.0)])
    costs = subset_costs([trace])
    cells = [
        Cell(0.05, 10.0, [], {}),
        Cell(0.3, 20.0, ["slow", "fast"], {}, 0.31, 19.0),
        Cell(0.3, 30.0, ["fast"], {}, 0.12, 4.0),
    ]
    table = cost_side_markdown(cells, costs).splitlines()
    assert table[2] == "| 0.050 | 10.0 | nothing fits | | | | | | | | |"
    assert table[3] == (
        "| 0.300 | 20.0 | {slow, fast} | 0.310, 19.0 | 0.2000 | 0.3000 (0.2500) | -33.3% "
        "| 15.0 | 18.6 | -19.4% | 1 (3) |"
    )
    assert "| {fast} | 0.120, 4.0 | no recorded sessions |" in table[4]
    assert "| {fast, slow} | 1 | 33.3% | 19.4% | declared |" in table


@pytest.mark.model
def test_real_sessions_of_a_real_expert_are_recorded_and_priced(tmp_path: Path) -> None:
    """The shipped pool's SmolLM2 expert as a process, two questions: the trace holds both
    sessions, measured on the bus, and the heartbeat's costs predict them to within a factor."""
    from moe2.cost_sessions import record_subsets
    from moe2.pool import DEFAULT_POOL, load_pool

    questions = ["What is the boiling point of water?", "Name a primary colour."]
    pool = load_pool(DEFAULT_POOL)
    [path] = record_subsets(pool, [["smollm2"]], questions, tmp_path, max_tokens=8, progress=False)
    assert path == tmp_path / "smollm2.trace"
    assert not list(tmp_path.glob("*.partial"))
    sessions = read_sessions(path)
    assert len(sessions) == 2
    for s in sessions:
        assert s.experts == ("smollm2",) and 1 <= s.tokens <= 8
        assert s.prompt_tokens["smollm2"] > 20  # the chat template and the question
        assert s.delay_s > s.compute_s > 0
        assert s.energy_j == pytest.approx(15.0 * s.compute_s, rel=0.01)  # declared 15 W
        assert 1 / 3 < s.predicted_delay_s / s.compute_s < 3
