"""One prompt's decode loop (Algorithm 3 of the MoE² paper) as a pure state machine.

``Decoding`` is fed events with the clock's value — a slice or an expert's error arrived, the
clock moved on, the client cancelled — and answers each with actions: messages for experts
(``Open``, ``Step``, ``Close``) and for the client (``Chunk``, then ``Final`` or ``Error``). Its
``deadline`` says when it next needs a ``Tick``. No bus, no event loop, no clock of its own:
``agents/fusion/session.py`` is the I/O around it. docs/protocol.md §5–§9 describe what it does.

    machine = Decoding(plan, settings, started=now())
    send(machine.start(now()))
    while not machine.finished:
        event = next event, or Tick() once machine.deadline has passed
        send(machine.apply(event, now()))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import structlog

from moe2.runtime import wire
from moe2.runtime.byte_fusion import PieceSlice, Vocabulary, fuse_bytes
from moe2.runtime.deadline import LateTracker
from moe2.runtime.errors import ErrorCode, Moe2Error, error_code
from moe2.runtime.fusion import ExpertSlice, fuse
from moe2.runtime.sampling import SamplingParams, TokenSampler
from moe2.runtime.text import TextAssembler

log = structlog.get_logger("moe2.fusion")

# a refused slice names one of these; the session reports the first if no slice is accepted
REFUSALS = frozenset({ErrorCode.WRONG_STEP, ErrorCode.INVALID_FIELD, ErrorCode.BAD_LOGPROBS})


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """Who answers this prompt, with which weights, and what their tokenizer knows."""

    session: str
    prompt: wire.Prompt
    experts: list[str]  # highest gating weight first
    weights: list[float]
    vocab_size: int  # the id path's V and eos ids (every expert shares one tokenizer)
    eos_ids: frozenset[int]
    # "ids": fuse by token id (one tokenizer); "bytes": fuse the pieces (docs/protocol.md §7)
    fusion_path: Literal["ids", "bytes"] = "ids"
    vocabularies: Mapping[str, Vocabulary] = field(default_factory=dict)  # per expert

    def vocabulary(self, expert: str) -> Vocabulary:
        """The expert's own vocabulary; the session's when the plan names none."""
        own = self.vocabularies.get(expert)
        return own if own is not None else Vocabulary("", self.vocab_size, self.eos_ids)


@dataclass(frozen=True, slots=True)
class DecodeSettings:
    slice_k: int = 32  # K, sent in every Open
    step_deadline_s: float = 2.0
    prefill_deadline_s: float = 60.0
    # once the first step-0 slice is in after e seconds, the others get max(step deadline, this × e)
    prefill_grace: float = 2.0
    max_consecutive_late: int = 3
    # a step with no slice at all waits this many more step deadlines while an expert it waits
    # for answers its probe (loaded, not gone: docs/faults.md) before the session fails
    no_slice_extensions: int = 0


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrived:
    """A message on the session's slice subject, decoded; ``sender``: the subject's last token."""

    sender: str
    message: wire.Message


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock moved on; the machine compares ``now`` with its own deadline."""


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The client is gone or asked to stop: close every expert, answer nothing more."""

    reason: str


@dataclass(frozen=True, slots=True)
class Gone:
    """An expert of the session is not there any more (NATS answered *no responders* on its
    subject, or it did not answer a liveness probe): dropped at once, not after more deadlines
    (docs/faults.md)."""

    expert: str
    reason: str


Event = Arrived | Tick | Cancelled | Gone


# --- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToExpert:
    expert: str
    message: wire.Open | wire.Step | wire.Close


@dataclass(frozen=True, slots=True)
class ToClient:
    message: wire.Chunk | wire.Final | wire.Error


@dataclass(frozen=True, slots=True)
class Accepted:
    """A slice fused into its step (for whoever watches costs, e.g. live selection)."""

    slice: wire.Slice


@dataclass(frozen=True, slots=True)
class Refused:
    """The arrival just applied was not taken (dropped or refused, §6), with a code and why:
    what its sender is told when it asked for an answer (a reply subject)."""

    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class Probe:
    """Ask whether ``expert`` is still there (it missed a step's deadline): the I/O layer
    answers with ``Gone`` when it is not, and with nothing when it is (docs/faults.md)."""

    expert: str


Action = ToExpert | ToClient | Accepted | Refused | Probe

# why a slice was not taken -> the code its sender is told
_PROBLEM_CODES = {
    "subject_mismatch": ErrorCode.INVALID_FIELD,
    "session_mismatch": ErrorCode.INVALID_FIELD,
    "late": ErrorCode.WRONG_STEP,
}


@dataclass(slots=True)
class StepWait:
    """What one step is waiting for, and what it has got."""

    step: int
    opened_at: float
    deadline: float
    waiting: set[str]
    slices: dict[str, wire.Slice] = field(default_factory=dict)
    errors: dict[str, wire.Error] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # expert -> its first refusal's code
    extended: int = 0  # step deadlines added because no slice had come (no_slice_extensions)


@dataclass(frozen=True, slots=True)
class Choice:
    """What one step chose: the bytes the answer grows by, and an id for ``Chunk.tokens``."""

    token: int  # byte path: the id under which the first slice (session order) listed it
    piece: bytes
    eos: bool
    dominant: str = ""  # the expert whose weight x probability of the choice was largest


def _position(ids: bytes, key: bytes) -> int:
    """Where the uint32 ``key`` is in a slice's little-endian ``ids`` (-1: not there); a bytes
    search, several times cheaper per fused token than an array comparison."""
    at = ids.find(key)
    while at % 4 and at >= 0:  # a match across two ids is not one
        at = ids.find(key, at + 1)
    return at // 4 if at >= 0 else -1


class _ContextFull(Exception):
    """Every expert left has run out of context: the answer ends with finish "length"."""


class Decoding:
    """One session from the Opens to its Final, Error or cancellation."""

    def __init__(self, plan: SessionPlan, settings: DecodeSettings, started: float) -> None:
        self.plan, self.settings, self.started = plan, settings, started
        self.weight = dict(zip(plan.experts, plan.weights, strict=True))
        self.active = list(plan.experts)
        self.tracker = LateTracker(settings.max_consecutive_late)
        self.dropped: list[str] = []
        p = plan.prompt
        self.sampler = TokenSampler(SamplingParams(p.temperature, p.top_p, p.seed))
        self.text = TextAssembler(p.stop)
        self.tokens: list[int] = []
        self.step_ms: list[float] = []  # per decode step: token chosen -> next step's slices in
        self.prompt_tokens = 0
        self.ttft = 0.0
        self.finished = False
        self.outcome = ""  # the finish reason, the error code, or "cancelled"
        self._wait = StepWait(0, started, started + settings.prefill_deadline_s, set())
        self._pending: list[int] = []  # chosen ids whose text has not gone out yet
        self._pending_dominant: list[str] = []  # per pending id: its dominant expert
        self._chunks = 0
        self._chosen_at = started
        self.log = log.bind(session=plan.session)

    @property
    def step(self) -> int:
        return self._wait.step

    @property
    def deadline(self) -> float | None:
        """When the current step stops waiting; None once the session is over."""
        return None if self.finished else self._wait.deadline

    def start(self, now: float) -> list[Action]:
        """Open every expert; call once the slice subject is subscribed."""
        p = self.plan
        self.log.info("session_started", experts=p.experts, weights=p.weights)
        self._wait = StepWait(0, now, now + self.settings.prefill_deadline_s, set(self.active))
        open_ = wire.Open(
            session=p.session,
            messages=p.prompt.messages,
            top_k=self.settings.slice_k,
            max_tokens=p.prompt.max_tokens,
            conversation=p.prompt.conversation,
        )
        return [ToExpert(e, open_) for e in self.active]

    def apply(self, event: Event, now: float) -> list[Action]:
        out: list[Action] = []
        if self.finished:
            return out
        if isinstance(event, Cancelled):
            self._cancel(event.reason, out)
            return out
        if now >= self._wait.deadline:
            self._end_step(now, out)
        gone = isinstance(event, Gone) and not self.finished and self._gone(event, out)
        if gone and not self._wait.waiting:
            self._end_step(now, out)
        if isinstance(event, Arrived) and not self.finished:
            self._arrive(event, now, out)
            if not self._wait.waiting:
                self._end_step(now, out)
        return out

    def _gone(self, event: Gone, out: list[Action]) -> bool:
        """Drop an expert that is not there any more; True if it was still in the session."""
        expert = event.expert
        if expert not in self.active:
            return False
        self.log.warning("expert_gone", expert=expert, step=self._wait.step, why=event.reason)
        self.active.remove(expert)
        self.dropped.append(expert)
        self._wait.waiting.discard(expert)
        self._close([expert], "dropped", out)
        return True

    def abort(self, error: Moe2Error) -> list[Action]:
        """End the session with ``error`` (the I/O layer's own failure)."""
        out: list[Action] = []
        if not self.finished:
            self._fail(error, out)
        return out

    # --- arrivals (docs/protocol.md §6, "Validation of an arriving message") ---------------------

    def _arrive(self, event: Arrived, now: float, out: list[Action]) -> None:
        w, sender, m = self._wait, event.sender, event.message
        if isinstance(m, wire.Error):
            if sender in w.waiting and self._about_this_step(m):
                self.log.warning("expert_error", expert=sender, code=m.code, error=m.message)
                first = not w.slices and not w.errors
                w.errors[sender] = m
                w.waiting.discard(sender)
                if first:
                    self._start_grace(now)
            else:
                self.log.info("error_dropped", expert=sender, code=m.code, step=m.step)
                why = f"no answer from {sender!r} is awaited at step {w.step}"
                out.append(Refused(ErrorCode.WRONG_STEP, why))
            return
        if not isinstance(m, wire.Slice):
            self.log.warning("bad_slice", code=str(ErrorCode.UNKNOWN_TYPE), expert=sender)
            why = f"a slice subject carries a Slice or an Error, not {type(m).__name__}"
            out.append(Refused(ErrorCode.UNKNOWN_TYPE, why))
            return
        problem = self._problem(m, sender)
        if problem is not None:
            self.log.warning("slice_dropped", expert=sender, step=m.step, at=w.step, why=problem)
            if problem in REFUSALS and sender in w.waiting:
                w.refused.setdefault(sender, problem)  # not an answer: keep waiting
            code = _PROBLEM_CODES.get(problem) or ErrorCode(problem)
            why = f"slice of {sender!r} for step {m.step} not taken at step {w.step}: {problem}"
            out.append(Refused(code, why))
            return
        first = not w.slices and not w.errors
        w.slices[sender] = m
        w.waiting.discard(sender)
        out.append(Accepted(m))
        if first:
            self._start_grace(now)

    def _about_this_step(self, error: wire.Error) -> bool:
        """An expert's Error fails it only if it is about this session (or names none) and this
        step (or names none): one about another step is an answer to a stray message."""
        session_ok = error.session in (self.plan.session, "")
        return session_ok and error.step in (self._wait.step, -1)

    def _start_grace(self, now: float) -> None:
        """Step 0: once the first expert has answered the Open, the others have a grace of
        max(step_deadline_s, prefill_grace x the time the first took) (docs/protocol.md §6)."""
        w = self._wait
        if w.step == 0:
            taken = self.settings.prefill_grace * (now - w.opened_at)
            w.deadline = min(w.deadline, now + max(self.settings.step_deadline_s, taken))

    def _problem(self, s: wire.Slice, sender: str) -> str | None:
        w = self._wait
        if s.expert != sender:
            return "subject_mismatch"
        if s.session != self.plan.session:
            return "session_mismatch"
        if sender not in self.weight:
            return str(ErrorCode.NOT_IN_SESSION)
        if s.step < w.step:
            return "late"
        if s.step > w.step or sender not in w.waiting:
            return str(ErrorCode.WRONG_STEP)
        try:
            wire.check_slice(s, self.plan.vocabulary(sender).size)
        except Moe2Error as exc:
            return str(exc.code)
        return None

    # --- the end of a step: account, fuse, sample, emit ------------------------------------------

    def _end_step(self, now: float, out: list[Action]) -> None:
        w = self._wait
        if self._extend(w, now, out):
            return
        try:
            self._account(w, out)
        except _ContextFull:
            self._finish("length", now, out)
            return
        except Moe2Error as exc:
            self._fail(exc, out)
            return
        if w.step == 0:
            self.prompt_tokens = max(s.prompt_tokens for s in w.slices.values())
        else:
            self.step_ms.append((now - self._chosen_at) * 1000)
        self._advance(w, now, out)

    def _extend(self, w: StepWait, now: float, out: list[Action]) -> bool:
        """No slice at all yet, and experts still awaited: wait one more step deadline (at most
        ``no_slice_extensions`` times) and probe them; one that is gone ends the wait early.
        A loaded expert makes the answer slower, not a failure (docs/faults.md)."""
        awaited = [e for e in self.active if e in w.waiting]
        if w.slices or not awaited or w.extended >= self.settings.no_slice_extensions:
            return False
        w.extended += 1
        w.deadline = now + self.settings.step_deadline_s
        self.log.info("step_extended", step=w.step, waiting=awaited, times=w.extended)
        out += [Probe(e) for e in awaited]
        return True

    def _account(self, w: StepWait, out: list[Action]) -> None:
        """Drop failed experts and experts late too often; raise if no slice was accepted."""
        failed = [e for e in self.active if e in w.errors]
        late = [e for e in self.active if e not in w.slices and e not in w.errors]
        for expert in late:
            self.log.info("slice_late", expert=expert, step=w.step, refused=w.refused.get(expert))
        to_drop = failed + self.tracker.record(
            [e for e in self.active if e not in failed], w.slices
        )
        if to_drop:
            self.active = [e for e in self.active if e not in to_drop]
            self.dropped += [e for e in to_drop if e not in failed]
            self._close(to_drop, "dropped", out)
        out += [Probe(e) for e in late if e in self.active]  # one not there any more: Gone
        if not w.slices:
            raise self._no_slice(w, late)

    def _no_slice(self, w: StepWait, late: list[str]) -> Exception:
        codes = {e.code for e in w.errors.values()}
        if w.step > 0 and not late and codes == {ErrorCode.PROMPT_TOO_LONG}:
            return _ContextFull()
        if w.errors and not late:
            expert, first = next(iter(w.errors.items()))
            return Moe2Error(error_code(first.code), f"expert {expert}: {first.message}")
        if w.refused:
            expert, why = next(iter(w.refused.items()))
            return Moe2Error(
                error_code(why), f"every slice of step {w.step} refused ({expert}: {why})"
            )
        return Moe2Error(
            ErrorCode.NO_SLICES,
            f"no slice arrived for step {w.step} within {w.deadline - w.opened_at:.3g}s "
            f"(experts: {', '.join([*w.errors, *late]) or 'none left'})",
        )

    def _advance(self, w: StepWait, now: float, out: list[Action]) -> None:
        slices = [w.slices[e] for e in self.plan.experts if e in w.slices]
        choice = self._by_bytes(slices) if self.plan.fusion_path == "bytes" else self._by_id(slices)
        self.tokens.append(choice.token)
        self._chosen_at = now
        if choice.eos:
            self._finish("eos", now, out)
            return
        self._pending.append(choice.token)
        self._pending_dominant.append(choice.dominant)
        if delta := self.text.push(choice.piece):
            self._chunk(delta, now, out)
        if self.text.stopped:
            self._finish("stop", now, out)
        elif len(self.tokens) == self.plan.prompt.max_tokens:
            self._finish("length", now, out)
        else:
            out += [ToExpert(e, self._step_message(w.step + 1, choice)) for e in self.active]
            deadline = now + self.settings.step_deadline_s
            self._wait = StepWait(w.step + 1, now, deadline, set(self.active))

    def _step_message(self, step: int, choice: Choice) -> wire.Step:
        """The id path sends the id; the byte path the bytes, with token -1 (§4)."""
        if self.plan.fusion_path == "bytes":
            return wire.Step(session=self.plan.session, step=step, token=-1, text=choice.piece)
        return wire.Step(session=self.plan.session, step=step, token=choice.token)

    def _by_bytes(self, slices: list[wire.Slice]) -> Choice:
        """Fuse the pieces of this step's slices (§7, the byte path) and sample a candidate."""
        dist = fuse_bytes(
            [
                PieceSlice(
                    s.ids_array(),
                    np.exp(s.logprobs_array().astype(np.float64)),
                    s.rest,
                    s.pieces,
                    self.plan.vocabulary(s.expert),
                )
                for s in slices
            ],
            [self.weight[s.expert] for s in slices],
        )
        at = self.sampler.choose_index(dist)
        weights = np.array([self.weight[s.expert] for s in slices])
        dominant = slices[int(np.argmax(weights * dist.values[:, at]))].expert
        return Choice(dist.tokens[at], dist.candidates[at], dist.is_eos(at), dominant)

    def _by_id(self, slices: list[wire.Slice]) -> Choice:
        """Fuse this step's slices (eq. 28-29), sample an id, and take its bytes from the first
        expert of the session that lists it."""
        dist = fuse(
            [ExpertSlice(s.ids_array(), s.logprobs_array(), s.rest) for s in slices],
            [self.weight[s.expert] for s in slices],
            self.plan.vocab_size,
        )
        at = self.sampler.choose_index(dist)
        token, first = int(dist.ids[at]), int(dist.source[at])
        dominant = self._dominant_by_id(slices, token)
        for s in slices:
            if first < len(s.pieces):
                return Choice(token, s.pieces[first], token in self.plan.eos_ids, dominant)
            first -= len(s.pieces)
        raise AssertionError("a fused id always comes from some slice")

    def _dominant_by_id(self, slices: list[wire.Slice], token: int) -> str:
        """The expert whose ``w_n f_n(token)`` is largest, an unlisted id valued as in ``fuse``:
        ``r_n / (V - K_n)``; ties go to the first in session order."""
        key = token.to_bytes(4, "little")  # an id of a checked slice: uint32
        values = []
        for s in slices:
            at = _position(s.ids, key)
            p = (
                float(np.exp(s.logprobs_array()[at]))
                if at >= 0
                else s.rest / max(self.plan.vocab_size - len(s.ids) // 4, 1)
            )
            values.append(self.weight[s.expert] * p)
        return slices[int(np.argmax(values))].expert

    # --- endings ----------------------------------------------------------------------------------

    def _chunk(self, text: str, now: float, out: list[Action]) -> None:
        self.ttft = self.ttft or now - self.started
        chunk = wire.Chunk(
            session=self.plan.session,
            index=self._chunks,
            text=text,
            tokens=self._pending,
            dominant=self._pending_dominant,
        )
        out.append(ToClient(chunk))
        self._chunks += 1
        self._pending, self._pending_dominant = [], []

    def _finish(self, reason: str, now: float, out: list[Action]) -> None:
        tail = self.text.finish()
        if tail or self._pending:
            self._chunk(tail, now, out)
        out.append(ToClient(self._final(reason, now)))
        self._close(self.active, "done", out)
        self._end(reason)
        self.log.info(
            "session_done", tokens=len(self.tokens), finish=reason, late=self.tracker.late
        )

    def _final(self, reason: str, now: float) -> wire.Final:
        total = now - self.started
        steps = np.asarray(self.step_ms or [0.0])
        n = len(self.tokens)
        return wire.Final(
            session=self.plan.session,
            text=self.text.text,
            finish_reason=reason,
            usage=wire.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=n),
            timings=wire.Timings(
                ttft_s=self.ttft,
                total_s=total,
                tokens_per_s=n / total if total > 0 else 0.0,
                step_p50_ms=float(np.percentile(steps, 50)),
                step_p99_ms=float(np.percentile(steps, 99)),
            ),
            experts=list(self.plan.experts),
            weights=list(self.plan.weights),
            late=dict(self.tracker.late),
            dropped=list(self.dropped),
        )

    def _fail(self, error: Moe2Error, out: list[Action]) -> None:
        self.log.info("session_failed", code=str(error.code), message=error.message)
        out.append(ToClient(wire.error_from(error, session=self.plan.session)))
        self._close(self.active, "done", out)
        self._end(str(error.code))

    def _cancel(self, reason: str, out: list[Action]) -> None:
        self.log.info("session_cancelled", reason=reason, step=self._wait.step)
        self._close(self.active, "cancelled", out)
        self._end("cancelled")

    def _close(self, experts: list[str], reason: str, out: list[Action]) -> None:
        close = wire.Close(session=self.plan.session, reason=reason)
        out += [ToExpert(e, close) for e in experts]

    def _end(self, outcome: str) -> None:
        self.finished, self.outcome = True, outcome
        self._wait.waiting = set()
