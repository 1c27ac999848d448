"""The decode loop as a pure state machine (runtime/decoding.py), driven with no bus: events in,
actions out, the clock a number. docs/protocol.md §5-§9."""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.runtime import wire
from moe2.runtime.decoding import (
    Accepted,
    Action,
    Arrived,
    Cancelled,
    DecodeSettings,
    Decoding,
    Refused,
    SessionPlan,
    Tick,
    ToClient,
    ToExpert,
)
from moe2.runtime.errors import ErrorCode
from moe2.runtime.text import TextAssembler

SESSION = "s" * 32
SETTINGS = DecodeSettings(step_deadline_s=1.0, prefill_deadline_s=60.0, max_consecutive_late=3)


def plan(
    experts: list[str], text_limit: int = 64, vocab_size: int = 256, **prompt: object
) -> SessionPlan:
    return SessionPlan(
        session=SESSION,
        prompt=wire.Prompt(
            messages=[wire.ChatMessage("user", "x")],
            max_tokens=text_limit,
            **prompt,  # type: ignore[arg-type]
        ),
        experts=experts,
        weights=[1 / len(experts)] * len(experts),
        vocab_size=vocab_size,
        eos_ids=frozenset({0}),
    )


def slice_of(
    expert: str, step: int, text: bytes, *, confidence: float = 0.6, sender_says: str | None = None
) -> wire.Slice:
    """What a byte-tokenizer expert that means to write ``text`` sends at ``step`` (0 = EOS)."""
    want = text[step] if step < len(text) else 0
    ids = np.array([want, *[t for t in b"xyz" if t != want][:3]])
    probs = np.array([confidence, *[(1 - confidence) / 4] * (len(ids) - 1)])
    return wire.make_slice(
        session=SESSION,
        expert=sender_says or expert,
        step=step,
        ids=ids,
        logprobs=np.log(probs),
        pieces=[bytes([i]) if i else b"" for i in ids],
    )


def error_of(expert: str, step: int, code: str = "prompt_too_long") -> wire.Error:
    return wire.Error(code=code, message="scripted", session=SESSION, expert=expert, step=step)


@dataclass
class Run:
    """A machine and everything it emitted, by kind."""

    machine: Decoding
    actions: list[Action] = field(default_factory=list)

    def feed(self, event: Arrived | Tick | Cancelled, now: float) -> list[Action]:
        out = self.machine.apply(event, now)
        self.actions += out
        return out

    def arrive(self, message: wire.Message, now: float, sender: str | None = None) -> list[Action]:
        who = sender or getattr(message, "expert", "")
        return self.feed(Arrived(who, message), now)

    def to_expert(self, expert: str, kind: type) -> list[wire.Message]:
        return [
            a.message
            for a in self.actions
            if isinstance(a, ToExpert) and a.expert == expert and isinstance(a.message, kind)
        ]

    def to_client(self) -> list[wire.Message]:
        return [a.message for a in self.actions if isinstance(a, ToClient)]

    @property
    def final(self) -> wire.Final:
        last = self.to_client()[-1]
        assert isinstance(last, wire.Final), last
        return last

    @property
    def error(self) -> wire.Error:
        last = self.to_client()[-1]
        assert isinstance(last, wire.Error), last
        return last


def started(experts: list[str], **kwargs: object) -> Run:
    settings_ = kwargs.pop("settings", SETTINGS)
    machine = Decoding(plan(experts, **kwargs), settings_, started=0.0)  # type: ignore[arg-type]
    run = Run(machine)
    run.actions += machine.start(0.0)
    return run


def answer_all(run: Run, experts: list[str], text: bytes, now: float, step: int) -> None:
    for e in experts:
        run.arrive(slice_of(e, step, text), now)


# --- the plain path -------------------------------------------------------------------------------


def test_open_then_steps_then_chunks_final_and_close() -> None:
    run = started(["a", "b"])
    assert [type(m) for m in run.to_expert("a", wire.Open)] == [wire.Open]
    assert run.machine.deadline == 60.0
    now = 0.0
    while not run.machine.finished:
        now += 0.01
        answer_all(run, ["a", "b"], b"Hi!", now, run.machine.step)
    chunks = [m for m in run.to_client() if isinstance(m, wire.Chunk)]
    assert [c.text for c in chunks] == ["H", "i", "!"]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.tokens for c in chunks] == [[ord("H")], [ord("i")], [ord("!")]]
    final = run.final
    assert (final.text, final.finish_reason) == ("Hi!", "eos")
    assert final.usage.completion_tokens == 4 and final.late == {} and final.dropped == []
    assert final.timings.step_p50_ms == pytest.approx(10.0)
    steps = run.to_expert("b", wire.Step)
    assert [(s.step, s.token) for s in steps] == [(1, ord("H")), (2, ord("i")), (3, ord("!"))]
    assert [c.reason for c in run.to_expert("a", wire.Close)] == ["done"]
    assert run.machine.deadline is None and run.machine.outcome == "eos"
    assert run.feed(Tick(), now + 100) == []  # nothing after the end


def test_every_accepted_slice_is_reported_for_the_cost_watchers() -> None:
    run = started(["a"])
    out = run.arrive(slice_of("a", 0, b"ab"), 0.1)
    assert [a.slice.expert for a in out if isinstance(a, Accepted)] == ["a"]


def test_each_token_names_the_expert_that_weighed_most_for_it() -> None:
    """Chunk.dominant: per token, the expert with the largest w_n f_n(token); an expert that did
    not list the token counts with its rest mass spread over the unlisted ids."""
    run = started(["a", "b"])
    confident = {0: ("a", b"Hi"), 1: ("b", b"Hi"), 2: ("a", b"Jo")}  # step -> (sure one, b's text)
    for step, (sure, b_text) in confident.items():
        run.arrive(slice_of("a", step, b"Hi!", confidence=0.9 if sure == "a" else 0.5), 0.1)
        run.arrive(slice_of("b", step, b_text, confidence=0.9 if sure == "b" else 0.5), 0.1)
    chunks = [m for m in run.to_client() if isinstance(m, wire.Chunk)]
    assert [(c.text, c.dominant) for c in chunks] == [("H", ["a"]), ("i", ["b"]), ("!", ["a"])]

    by_bytes = Decoding(replace(plan(["a", "b"]), fusion_path="bytes"), SETTINGS, started=0.0)
    by_bytes.start(0.0)
    by_bytes.apply(Arrived("a", slice_of("a", 0, b"H", confidence=0.3)), 0.0)
    out = by_bytes.apply(Arrived("b", slice_of("b", 0, b"H", confidence=0.8)), 0.0)
    sent = [a.message for a in out if isinstance(a, ToClient)]
    assert [(c.text, c.dominant) for c in sent if isinstance(c, wire.Chunk)] == [("H", ["b"])]


def test_a_stop_string_and_max_tokens_end_the_answer() -> None:
    run = started(["a"], stop=[" two"])
    now = 0.0
    while not run.machine.finished:
        now += 0.01
        run.arrive(slice_of("a", run.machine.step, b"one. two. three."), now)
    assert (run.final.text, run.final.finish_reason) == ("one.", "stop")
    assert "".join(m.text for m in run.to_client() if isinstance(m, wire.Chunk)) == "one."

    run = started(["a"], text_limit=3)
    for step in range(3):
        run.arrive(slice_of("a", step, b"one. two."), 0.01 * step)
    assert (run.final.text, run.final.finish_reason) == ("one", "length")
    assert len(run.to_expert("a", wire.Step)) == 2  # no Step after the last token


def test_max_tokens_inside_a_character_ends_in_a_replacement_character() -> None:
    run = started(["a"], text_limit=2)
    euro = "€uro".encode()  # € is three bytes
    run.arrive(slice_of("a", 0, euro), 0.01)
    assert run.to_client() == []  # half a character: nothing to show yet
    run.arrive(slice_of("a", 1, euro), 0.02)
    chunk, final = run.to_client()
    assert isinstance(chunk, wire.Chunk) and chunk.text == "\ufffd"
    assert chunk.tokens == [euro[0], euro[1]]
    assert (final.text, final.finish_reason) == ("\ufffd", "length")  # type: ignore[union-attr]


def test_a_subnormal_temperature_samples_like_greedy() -> None:
    run = started(["a"], temperature=5e-324, seed=3)
    now = 0.0
    while not run.machine.finished:
        now += 0.01
        run.arrive(slice_of("a", run.machine.step, b"tiny"), now)
    assert (run.final.text, run.final.finish_reason) == ("tiny", "eos")


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
def test_seeds_up_to_2_64_minus_1_draw_reproducibly(seed: int) -> None:
    def answer() -> str:
        run = started(["a"], temperature=1.0, seed=seed, text_limit=8)
        for step in range(8):
            run.arrive(slice_of("a", step, b"abcdefgh", confidence=0.3), 0.01 * (step + 1))
        return run.final.text

    assert answer() == answer()


# --- deadlines, late and dropped experts ----------------------------------------------------------


def test_a_silent_expert_is_late_then_dropped_and_the_answer_completes() -> None:
    run = started(["a", "b"])
    text = b"Hello"
    now = 0.0
    while not run.machine.finished:
        now += 0.05
        step = run.machine.step
        run.arrive(slice_of("a", step, text), now)
        if not run.machine.finished and run.machine.step == step:  # still waiting for b
            deadline = run.machine.deadline
            assert deadline is not None
            now = deadline
            run.feed(Tick(), now)
    assert run.final.text == "Hello"
    assert run.final.late == {"b": 3} and run.final.dropped == ["b"]
    assert [c.reason for c in run.to_expert("b", wire.Close)] == ["dropped"]
    assert len(run.to_expert("b", wire.Step)) == 2  # steps 1 and 2; dropped at the end of 2


def test_a_tick_before_the_deadline_changes_nothing() -> None:
    run = started(["a", "b"])
    run.arrive(slice_of("a", 0, b"ab"), 0.1)
    deadline = run.machine.deadline
    assert deadline is not None
    assert run.feed(Tick(), deadline - 0.001) == []
    assert run.machine.step == 0
    out = run.feed(Tick(), deadline)
    steps = [(a.expert, a.message) for a in out if isinstance(a, ToExpert)]
    assert [(e, m.step) for e, m in steps] == [("a", 1), ("b", 1)]  # type: ignore[union-attr]
    assert run.machine.tracker.late == {"b": 1}  # late, not yet dropped: b still gets the Step


def test_a_missing_expert_holds_step_0_only_for_the_grace() -> None:
    """The first step-0 slice after e s: the others get max(step deadline, 2 e) more."""
    run = started(["a", "b", "c"])
    assert run.machine.deadline == 60.0
    run.arrive(slice_of("a", 0, b"ok"), 0.3)
    assert run.machine.deadline == pytest.approx(0.3 + 1.0)  # max(1.0, 2 × 0.3)
    run.arrive(slice_of("b", 0, b"ok"), 0.4)
    assert run.machine.step == 0  # still waiting for c, within the grace
    run.feed(Tick(), 1.3)
    assert run.machine.step == 1 and run.machine.tracker.late == {"c": 1}
    chunk = run.to_client()[0]
    assert isinstance(chunk, wire.Chunk) and chunk.text == "o"

    slow = started(["a", "b"])
    slow.arrive(slice_of("a", 0, b"ok"), 10.0)  # a long prefill: b gets twice as long again
    assert slow.machine.deadline == pytest.approx(30.0)
    slow.arrive(slice_of("b", 0, b"ok"), 29.0)
    assert slow.machine.step == 1 and slow.machine.tracker.late == {}


def test_no_slice_at_all_is_no_slices_with_the_step() -> None:
    run = started(["a"])
    run.arrive(slice_of("a", 0, b"abc"), 0.1)
    run.feed(Tick(), 1.1)
    assert run.error.code == ErrorCode.NO_SLICES and "step 1" in run.error.message
    assert run.error.session == SESSION
    assert [c.reason for c in run.to_expert("a", wire.Close)] == ["done"]


# --- validation of what arrives (§6) --------------------------------------------------------------


def test_a_refused_slice_is_not_an_answer_the_expert_may_still_send_a_good_one() -> None:
    run = started(["a", "b"])
    bad = slice_of("a", 0, b"ab")
    nan = wire.Slice(**{**_fields(bad), "logprobs": np.full(4, np.nan, "<f4").tobytes()})
    run.arrive(nan, 0.1)
    run.arrive(slice_of("b", 0, b"ab"), 0.2)
    assert run.machine.step == 0  # a's refused slice did not end the wait
    run.arrive(slice_of("a", 0, b"ab"), 0.3)
    assert run.machine.step == 1 and run.machine.tracker.late == {}


def test_when_every_slice_of_a_step_was_refused_the_first_refusal_is_the_error() -> None:
    for bad, code in [
        (lambda s: {"logprobs": np.full(4, np.nan, "<f4").tobytes()}, ErrorCode.BAD_LOGPROBS),
        (lambda s: {"ids": s.ids[:-1]}, ErrorCode.INVALID_FIELD),
        (lambda s: {"ids": np.full(4, 999, "<u4").tobytes()}, ErrorCode.INVALID_FIELD),
        (lambda s: {"step": s.step + 5}, ErrorCode.WRONG_STEP),
    ]:
        run = started(["a"])
        run.arrive(slice_of("a", 0, b"ab"), 0.1)
        good = slice_of("a", 1, b"ab")
        run.arrive(wire.Slice(**{**_fields(good), **bad(good)}), 0.2)
        assert not run.machine.finished  # still waiting until the deadline
        run.feed(Tick(), 1.1)
        assert run.error.code == code, code
        assert run.machine.tracker.late == {"a": 1}


def test_forged_foreign_late_and_duplicate_slices_are_dropped_and_say_why() -> None:
    run = started(["a", "b"])

    def refused(out: list[Action]) -> list[str]:
        return [str(a.code) for a in out if isinstance(a, Refused)]

    other = wire.Slice(**{**_fields(slice_of("a", 0, b"!!")), "session": "t" * 32})
    assert refused(run.arrive(slice_of("a", 0, b"!!"), 0.05, sender="b")) == ["invalid_field"]
    assert refused(run.arrive(other, 0.055)) == ["invalid_field"]  # another session's
    assert refused(run.arrive(slice_of("intruder", 0, b"!!"), 0.06)) == ["not_in_session"]
    assert refused(run.arrive(slice_of("a", 0, b"ab"), 0.1)) == []
    assert refused(run.arrive(slice_of("a", 0, b"!!"), 0.11)) == ["wrong_step"]  # a second one
    assert refused(run.arrive(error_of("a", 0, "busy"), 0.12)) == ["wrong_step"]  # a answered
    hello = wire.Heartbeat(
        expert="b", model="m", tokenizer="t", backend="x", vocab_size=256, eos_ids=[0]
    )
    assert refused(run.arrive(hello, 0.13)) == ["unknown_type"]
    assert refused(run.arrive(slice_of("b", 0, b"ab"), 0.2)) == []
    assert run.machine.step == 1
    assert refused(run.arrive(slice_of("b", 0, b"!!"), 0.3)) == ["wrong_step"]  # late
    run.arrive(slice_of("a", 1, b"ab"), 0.4)
    run.arrive(slice_of("b", 1, b"ab"), 0.5)
    run.arrive(slice_of("a", 2, b"ab"), 0.6)
    run.arrive(slice_of("b", 2, b"ab"), 0.7)
    assert (run.final.text, run.final.late) == ("ab", {})


def test_an_expert_error_fails_that_expert_only() -> None:
    run = started(["a", "b"])
    run.arrive(error_of("b", 0, "busy"), 0.05)
    run.arrive(slice_of("a", 0, b"a"), 0.1)
    assert run.machine.step == 1 and run.machine.active == ["a"]
    assert [c.reason for c in run.to_expert("b", wire.Close)] == ["dropped"]
    run.arrive(slice_of("a", 1, b"a"), 0.2)
    assert run.final.dropped == [] and run.final.text == "a"  # failed is not "dropped"


def test_an_error_about_this_step_fails_an_expert_and_one_about_another_fails_nobody() -> None:
    """A stray Step(step=7) sent to b by anyone makes b answer wrong_step for step 7: that is
    no answer to this session's step and must not cost b its place."""
    run = started(["a", "b"])
    answer_all(run, ["a", "b"], b"abc", 0.1, 0)
    stray = run.arrive(error_of("b", 7, "wrong_step"), 0.15)
    assert [a.code for a in stray if isinstance(a, Refused)] == [ErrorCode.WRONG_STEP]
    other = wire.Error(code="internal", message="x", session="other", expert="b", step=1)
    run.arrive(other, 0.16)
    run.arrive(slice_of("a", 1, b"abc"), 0.2)
    assert run.machine.active == ["a", "b"] and run.machine.step == 1  # still waiting for b
    run.arrive(error_of("b", -1, "internal"), 0.25)  # names no step: about this one
    assert run.machine.active == ["a"] and run.machine.step == 2


def test_an_error_at_step_0_starts_the_grace_like_a_slice() -> None:
    run = started(["a", "b"])
    run.arrive(error_of("a", 0, "busy"), 0.5)
    assert run.machine.deadline == pytest.approx(0.5 + max(SETTINGS.step_deadline_s, 2 * 0.5))


def test_when_every_expert_fails_the_client_gets_the_first_code() -> None:
    run = started(["a", "b"])
    run.arrive(error_of("b", 0, "prompt_too_long"), 0.1)
    run.arrive(error_of("a", 0, "strange_new_code"), 0.2)
    assert run.error.code == ErrorCode.PROMPT_TOO_LONG
    assert run.error.message == "expert b: scripted"
    run = started(["a"])
    run.arrive(error_of("a", 0, "strange_new_code"), 0.2)
    assert run.error.code == ErrorCode.INTERNAL  # an unknown code


def test_every_expert_out_of_context_ends_with_length() -> None:
    run = started(["a", "b"])
    answer_all(run, ["a", "b"], b"abc", 0.1, 0)
    run.arrive(error_of("a", 1), 0.2)
    run.arrive(error_of("b", 1), 0.3)
    assert (run.final.text, run.final.finish_reason) == ("a", "length")


# --- cancel ---------------------------------------------------------------------------------------


def test_cancel_closes_every_expert_and_tells_the_client_nothing() -> None:
    run = started(["a", "b", "c"])
    run.arrive(error_of("c", 0, "busy"), 0.05)
    answer_all(run, ["a", "b"], b"a long answer", 0.1, 0)
    before = len(run.to_client())
    out = run.feed(Cancelled("client"), 0.2)
    closes = [(a.expert, a.message) for a in out if isinstance(a, ToExpert)]
    assert [(e, m.reason) for e, m in closes] == [("a", "cancelled"), ("b", "cancelled")]  # type: ignore[union-attr]
    assert not [a for a in out if isinstance(a, ToClient)] and len(run.to_client()) == before
    assert run.machine.finished and run.machine.outcome == "cancelled"
    assert run.machine.deadline is None
    assert run.arrive(slice_of("a", 1, b"a long answer"), 0.3) == []


def test_abort_sends_one_error_and_closes() -> None:
    from moe2.runtime.errors import Moe2Error

    run = started(["a"])
    out = run.machine.abort(Moe2Error(ErrorCode.INTERNAL, "boom"))
    assert [type(a.message) for a in out if isinstance(a, (ToClient, ToExpert))] == [
        wire.Error,
        wire.Close,
    ]
    assert run.machine.abort(Moe2Error(ErrorCode.INTERNAL, "again")) == []


# --- any order of arrivals: a simulated bus -------------------------------------------------------


@dataclass
class ExpertBehaviour:
    delays: list[float | None]  # per step: seconds to answer, None: never
    noise: bool  # also sends a future-step and a duplicate slice


def simulate(
    behaviours: dict[str, ExpertBehaviour], text: bytes, max_tokens: int
) -> tuple[Run, list[tuple[float, str, wire.Message]]]:
    """Play the machine against experts that answer after the given delays, in time order."""
    run = started(list(behaviours), text_limit=max_tokens)
    queue: list[tuple[float, int, str, wire.Message]] = []
    sent: list[tuple[float, str, wire.Message]] = []
    order = 0

    def react(actions: list[Action], now: float) -> None:
        nonlocal order
        for a in actions:
            if not isinstance(a, ToExpert):
                continue
            sent.append((now, a.expert, a.message))
            if isinstance(a.message, wire.Close):
                continue
            step = a.message.step if isinstance(a.message, wire.Step) else 0
            b = behaviours[a.expert]
            delay = b.delays[step % len(b.delays)]
            if delay is None:
                continue
            good = slice_of(a.expert, step, text)
            msgs: list[wire.Message] = [good]
            if b.noise:
                msgs = [slice_of(a.expert, step + 5, text), good, good]
            for m in msgs:
                order += 1
                heapq.heappush(queue, (now + delay, order, a.expert, m))

    react(run.actions, 0.0)
    while not run.machine.finished:
        deadline = run.machine.deadline
        assert deadline is not None
        if queue and queue[0][0] < deadline:
            at, _, sender, message = heapq.heappop(queue)
            react(run.feed(Arrived(sender, message), at), at)
        else:
            react(run.feed(Tick(), deadline), deadline)
    return run, sent


behaviour = st.builds(
    ExpertBehaviour,
    delays=st.lists(
        st.one_of(st.floats(0.0, 0.9), st.floats(0.0, 0.9), st.floats(0.0, 2.5), st.none()),
        min_size=1,
        max_size=5,
    ),
    noise=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    behaviours=st.dictionaries(st.sampled_from("abcd"), behaviour, min_size=1, max_size=4),
    max_tokens=st.integers(1, 14),
)
def test_any_timing_gives_the_right_text_or_no_slices_and_keeps_the_protocol(
    behaviours: dict[str, ExpertBehaviour], max_tokens: int
) -> None:
    text = b"fused text"
    run, sent = simulate(behaviours, text, max_tokens)
    out = run.to_client()
    chunks = [m for m in out if isinstance(m, wire.Chunk)]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(m.session == SESSION for m in out)  # type: ignore[union-attr]
    last = out[-1]
    if isinstance(last, wire.Error):
        noisy = any(b.noise for b in behaviours.values())  # a refused future slice names the step
        assert last.code in (
            {ErrorCode.NO_SLICES, ErrorCode.WRONG_STEP} if noisy else {"no_slices"}
        )
    else:
        assert isinstance(last, wire.Final)
        # whichever experts answered, they agree, so the fused text is the script's
        assert last.text == "".join(c.text for c in chunks)
        assert last.text == text[:max_tokens].decode()
        n = last.usage.completion_tokens
        assert n == min(max_tokens, len(text) + 1)
        assert all(0 < v <= n for v in last.late.values())
    for expert in behaviours:
        mine = [(t, m) for t, e, m in sent if e == expert]
        closes = [m for _, m in mine if isinstance(m, wire.Close)]
        assert len(closes) == 1, (expert, closes)  # exactly one Close each, always
        assert isinstance(mine[-1][1], wire.Close)  # and nothing after it
        steps = [m.step for _, m in mine if isinstance(m, wire.Step)]
        assert steps == list(range(1, len(steps) + 1))
        if expert in getattr(last, "dropped", []):
            assert closes[0].reason == "dropped"
            assert run.machine.tracker.late[expert] >= SETTINGS.max_consecutive_late


# --- text: stop strings against the plain reference ----------------------------------------------


class ReferenceText:
    """The earlier TextAssembler (searches the whole text each token): the behaviour to keep,
    except that it cut at whichever of several stop strings came first in its list."""

    def __init__(self, stop: list[str]) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        self.text += self._decoder.decode(piece)
        found = [at for s in self._stop if (at := self.text.find(s)) >= 0]
        if found:  # several with one token: cut before the one that starts first
            self.text = self.text[: min(found)]
            self.stopped = True
        return self._release(final=self.stopped)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        held = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    held = max(held, n)
                    break
        end = len(self.text) if final else len(self.text) - held
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(st.text("abé€", max_size=4).map(str.encode), max_size=12),
    stops=st.lists(st.text("abé€", max_size=5), max_size=4),
    split=st.integers(0, 3),
)
def test_text_assembler_matches_the_plain_reference(
    pieces: list[bytes], stops: list[str], split: int
) -> None:
    data = b"".join(pieces)  # re-cut the bytes so characters split across pieces too
    cut = [data[i : i + split + 1] for i in range(0, len(data), split + 1)] if split else pieces
    fast, slow = TextAssembler(stops), ReferenceText(stops)
    for p in cut:
        assert fast.push(p) == slow.push(p)
        assert fast.stopped == slow.stopped
    assert fast.finish() == slow.finish()
    assert fast.text == slow.text


def test_sixteen_long_stop_strings_cost_little_per_token() -> None:
    stops = [("ab" * 3000) + chr(0x4E00 + i) for i in range(16)]
    text = TextAssembler(stops)
    began = time.perf_counter()
    out = [text.push(b"ab") for _ in range(4096)]
    elapsed = time.perf_counter() - began
    assert not text.stopped and "".join(out) + text.finish() == "ab" * 4096
    assert elapsed < 2.0, elapsed


def _fields(s: wire.Slice) -> dict[str, object]:
    import msgspec

    return {f.name: getattr(s, f.name) for f in msgspec.structs.fields(s)}
