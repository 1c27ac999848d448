"""Speculative fusion: fewer round trips than tokens (docs/speculative.md).

``SpeculativeDecoding`` is ``Decoding`` with rounds instead of steps. After choosing token
``c`` at step ``s - 1`` it asks one expert, the drafter (the fastest prefill per prompt token), to
append ``c`` and propose ``n`` more tokens greedily (``Step.propose``): the drafter answers a
slice per position, steps ``s`` … ``s + n``, and its top-1 ids along them are the draft
``d_1 … d_n``. Every other expert then appends ``c, d_1 … d_n`` in one forward pass
(``Step.draft``) and answers a slice per position too. The machine fuses position by position
exactly as ``Decoding`` fuses a step, and accepts while the fused choice is the draft's next
token: the first choice that differs, or the choice after the last position, ends the round.
So a round gives between 1 and ``n + 1`` tokens for two round trips, and the next round's
``Step`` names the step after the last token taken: every expert cuts its cache back to it.

Greedy: each position's choice is the plain step's choice from the same slices, so the answer
is the one ``Decoding`` gives (up to the float rounding of a batched pass). Sampling: the draft
is a point mass ``q = δ(d)``, so the speculative-sampling rule (Leviathan et al. 2023; verified
against the weighted ensemble as in "Speculative Ensemble", ICML 2025) is: accept ``d`` with
probability ``p(d)``, where ``p`` is what the plain sampler draws from (tempered, top-p), else
draw from ``p`` with ``d`` removed, renormalised. Each token is then distributed as ``p``.

On the byte path (experts of different tokenizers) the draft is the drafter's pieces
(``Step.draft_text``), each expert appends them through its own tokenizer as a text step does,
and a position is accepted while the fused candidate's bytes are the draft's next piece: each
slice is the one a plain text step gives, so the greedy answer is plain byte-path fusion's.
Sampling there draws as the plain sampler and accepts when the draw is the draft's piece, which
for a point-mass draft is the same rule.

An expert that answers a proposal or a draft with one slice does not speculate (one from before
speculation, a scripted or a replayed expert): what it answered is used as a plain step's, and
the session goes on in plain rounds, one round trip a token, as ``Decoding`` would.

An expert's answer to one ``Step`` is a run of slices ending with ``more == 0``. One that did
not finish its run within the deadline is late, as in ``Decoding``, and owes that run: its
slices are dropped until the run's last one has come (NATS keeps one publisher's order), so a
stale slice is never taken for a fresh one of the same step number.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from moe2.runtime import wire
from moe2.runtime.decoding import (
    REFUSALS,
    Accepted,
    Action,
    Arrived,
    Choice,
    DecodeSettings,
    Decoding,
    Refused,
    SessionPlan,
    StepWait,
    ToExpert,
)
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.sampling import SamplingParams, TokenSampler, tempered

Unit = int | bytes  # a draft's token: an id (the id path) or a piece (the byte path)

__all__ = ["DraftSampler", "SpeculativeDecoding", "decoding_for", "sampled_distribution"]


def decoding_for(
    plan: SessionPlan, settings: DecodeSettings, started: float, speculate: int
) -> Decoding:
    """The machine for a session: speculative with a draft of ``speculate`` tokens (by id, or
    by pieces on the byte path), plain with 0."""
    if speculate > 0:
        return SpeculativeDecoding(plan, settings, started, speculate)
    return Decoding(plan, settings, started)


def sampled_distribution(
    probs: npt.NDArray[np.float64], params: SamplingParams
) -> npt.NDArray[np.float64]:
    """What ``TokenSampler`` draws from, per candidate: tempered, cut to top-p, renormalised."""
    p = tempered(probs, params.temperature)
    order = np.argsort(-p, kind="stable")
    if params.top_p < 1:
        order = order[: int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1]
    kept = np.zeros_like(p)
    kept[order] = p[order]
    result: npt.NDArray[np.float64] = kept / kept.sum()
    return result


class DraftSampler(TokenSampler):
    """The plain sampler, but a position with a draft token decides by speculative sampling."""

    draft: int | None = None  # the draft's token at the position being chosen

    def choose_index(self, dist: Any) -> int:
        if self.draft is None or self.params.temperature == 0:
            return super().choose_index(dist)  # greedy: the argmax, as plain fusion
        p = sampled_distribution(dist.probs, self.params)
        at = int(np.searchsorted(dist.ids, self.draft))
        hit = at < len(dist.ids) and int(dist.ids[at]) == self.draft
        if hit and self._rng.random() < p[at]:
            return at
        if hit:
            p[at] = 0.0
        return int(self._rng.choice(len(p), p=p / p.sum()))


class SpeculativeDecoding(Decoding):
    """``Decoding`` in rounds of a draft and its verification; see the module."""

    def __init__(
        self, plan: SessionPlan, settings: DecodeSettings, started: float, speculate: int
    ) -> None:
        super().__init__(plan, settings, started)
        p = plan.prompt
        self._sampler = DraftSampler(SamplingParams(p.temperature, p.top_p, p.seed))
        self.sampler = self._sampler
        self.speculate = speculate
        self.rounds = 0  # waves of Steps sent (a draft and its verification are two)
        self.drafted = 0  # draft tokens offered for verification
        self.accepted = 0  # ... and accepted
        self._got: dict[str, list[wire.Slice]] = {}  # this wave's slices per expert, in order
        self._span = 1  # the most slices one expert may send in this wave
        self._drafter = ""  # who drafts this round ("": the round is verifying)
        self._draft: list[Unit] = []  # ids (the id path) or pieces (the byte path)
        self._piece = b""  # the byte path's last choice
        self._owed: Counter[str] = Counter()  # runs of slices a late expert still sends
        # experts by their prefill's own compute per prompt token, then by when it arrived:
        # the fastest drafts
        self._order: list[str] = []
        self._prefill_s: dict[str, float] = {}
        self._single: set[str] = set()  # answered a run of positions with one slice: no rounds
        self._ahead: Ahead | None = None  # the drafter's draft for the round after this one

    # --- arrivals: a run of slices per expert ----------------------------------------------------

    def _arrive(self, event: Arrived, now: float, out: list[Action]) -> None:
        m, sender = event.message, event.sender
        if not isinstance(m, wire.Slice) or m.expert != sender:
            errors = len(self._wait.errors)
            super()._arrive(event, now, out)
            if isinstance(m, wire.Error) and len(self._wait.errors) == errors:
                self._settle_owed(sender, 0)  # an error about an owed run ends it
            return
        if self._ahead is not None and sender == self._ahead.expert and not self._ahead.done:
            self._take_ahead(m, out)
            return
        if self._owed[sender]:
            self._settle_owed(sender, m.more)
            self.log.info("slice_dropped", expert=sender, step=m.step, why="stale")
            out.append(Refused(ErrorCode.WRONG_STEP, f"slice of {sender!r} is from a late run"))
            return
        self._take_slice(m, sender, now, out)

    def _settle_owed(self, sender: str, more: int) -> None:
        if self._owed[sender] and more == 0:
            self._owed[sender] -= 1

    def _take_slice(self, m: wire.Slice, sender: str, now: float, out: list[Action]) -> None:
        w = self._wait
        got = self._got.setdefault(sender, [])
        problem = self._run_problem(m, sender, w.step + len(got))
        if problem is not None:
            self.log.warning("slice_dropped", expert=sender, step=m.step, at=w.step, why=problem)
            if problem in REFUSALS and sender in w.waiting:
                w.refused.setdefault(sender, problem)
            code = ErrorCode.WRONG_STEP if problem == "late" else ErrorCode(problem)
            out.append(Refused(code, f"slice of {sender!r} for step {m.step}: {problem}"))
            return
        first = not w.slices and not w.errors and not got
        got.append(m)
        out.append(Accepted(m))
        if first:
            self._start_grace(now)
        if m.more == 0 or len(got) >= self._span:
            w.slices[sender] = got[0]
            w.waiting.discard(sender)
            if w.step == 0:
                self._prefill_s[sender] = m.compute_s / max(m.prompt_tokens, 1)
                self._order.append(sender)
                self._order.sort(key=self._prefill_s.__getitem__)  # stable: ties by arrival

    def _take_ahead(self, m: wire.Slice, out: list[Action]) -> None:
        """A slice of the draft ahead: kept for the next round, or the draft is given up."""
        ahead = self._ahead
        assert ahead is not None
        try:
            wire.check_slice(m, self.plan.vocabulary(ahead.expert).size)
            fits = m.session == self.plan.session and m.step == ahead.step + len(ahead.got)
        except Moe2Error:
            fits = False
        if not fits:
            self.log.warning("slice_dropped", expert=ahead.expert, step=m.step, why="ahead")
            self._owed[ahead.expert] += m.more > 0  # the rest of that run is dropped too
            self._ahead = None
            out.append(Refused(ErrorCode.WRONG_STEP, f"slice of step {m.step} not taken"))
            return
        ahead.got.append(m)
        out.append(Accepted(m))

    def _run_problem(self, s: wire.Slice, sender: str, expected: int) -> str | None:
        """``Decoding._problem`` for the next slice of a run, checked as its run's first: the
        step it must name is ``expected``."""
        return self._problem(
            msgspec.structs.replace(s, step=s.step + self._wait.step - expected), sender
        )

    # --- the end of a wave -----------------------------------------------------------------------

    def _end_step(self, now: float, out: list[Action]) -> None:
        w = self._wait
        self._owed.update(e for e in w.waiting if e in self.active)  # late: their runs are owed
        if self._drafter:
            self._verify(now, out)
        else:
            super()._end_step(now, out)

    def _verify(self, now: float, out: list[Action]) -> None:
        """The draft is in (or the drafter failed): send it to the others to verify."""
        w, drafter, asked = self._wait, self._drafter, self._span
        self._drafter = ""
        run = self._got.get(drafter, []) if drafter in w.slices else []
        if len(run) == 1 and not self._ended(run[0]):
            self._single.add(drafter)  # asked to propose, it answered as a plain step
        self._draft = [self._best(s) for s in run[:-1]]
        self._got = {drafter: run} if run else {}
        others = [e for e in self.active if e != drafter]
        self._span = len(self._draft) + 1
        deadline = now + self.settings.step_deadline_s * self._span
        self._wait = StepWait(w.step, now, deadline, set(others), dict(w.slices), dict(w.errors))
        self._wait.refused.update(w.refused)
        if not others:
            super()._end_step(now, out)
            return
        self.rounds += 1
        self.drafted += len(self._draft)
        step = self._step_of(w.step, self._chosen(), draft=self._draft)
        out += [ToExpert(e, step) for e in others]
        if len(run) == asked:  # a whole draft: the drafter goes on while the others verify
            self._draft_ahead(drafter, w.step + len(run), self._best(run[-1]), out)

    def _best(self, s: wire.Slice) -> Unit:
        """A slice's most likely token: its id, or on the byte path its piece (b"" for its
        end or a special token: nothing to draft after)."""
        best = int(s.ids_array()[0])
        if self.plan.fusion_path == "ids":
            return best
        return b"" if best in self.plan.vocabulary(s.expert).eos_ids else s.pieces[0]

    def _ended(self, s: wire.Slice) -> bool:
        """Whether a drafter stops after this slice: its most likely token is its end."""
        best = self._best(s)
        return best == b"" or best in self.plan.vocabulary(s.expert).eos_ids

    def _chosen(self) -> Unit:
        """The last choice, as a draft names it: its id, or on the byte path its bytes."""
        return self._piece if self.plan.fusion_path == "bytes" else self.tokens[-1]

    def _by_bytes(self, slices: list[wire.Slice]) -> Choice:
        choice = super()._by_bytes(slices)
        self._piece = choice.piece
        return choice

    def _step_of(
        self, step: int, unit: Unit, draft: Sequence[Unit] = (), propose: int = 0
    ) -> wire.Step:
        """A Step of this session's path: an id and ids, or bytes and pieces (§5, §7)."""
        sid = self.plan.session
        if isinstance(unit, bytes):
            texts = [d for d in draft if isinstance(d, bytes)]
            return wire.Step(
                session=sid, step=step, token=-1, text=unit, draft_text=texts, propose=propose
            )
        ids = [d for d in draft if isinstance(d, int)]
        return wire.Step(session=sid, step=step, token=unit, draft=ids, propose=propose)

    def _draft_ahead(self, drafter: str, step: int, token: Unit, out: list[Action]) -> None:
        """Ask the drafter for the next round's draft now, as if the whole draft and its own
        next token were taken: the next round uses it if they are (``_next_round``)."""
        n = min(
            self.speculate, self.plan.prompt.max_tokens - len(self.tokens) - len(self._draft) - 2
        )
        if n <= 0 or token == b"" or token in self.plan.vocabulary(drafter).eos_ids:
            return
        self._ahead = Ahead(drafter, step, token, n)
        out.append(ToExpert(drafter, self._step_of(step, token, propose=n)))

    def _advance(self, w: StepWait, now: float, out: list[Action]) -> None:
        """Fuse the wave's positions in turn, as ``Decoding`` fuses a step, while the choice is
        the draft's next token; then start the next round from the last token taken."""
        positions = self._positions(w)
        for at, slices in enumerate(positions):
            draft = self._draft[at] if at < len(self._draft) else None
            self._sampler.draft = draft if isinstance(draft, int) else None  # see DraftSampler
            chosen: list[Action] = []
            super()._advance(
                StepWait(w.step + at, w.opened_at, w.deadline, set(), slices), now, chosen
            )
            out += [a for a in chosen if not _is_step(a)]
            if self.finished:
                return
            if at + 1 == len(positions) or self._chosen() != self._draft[at]:
                break
            self.accepted += 1
        self._next_round(w.step + at + 1, now, out)

    def _positions(self, w: StepWait) -> list[dict[str, wire.Slice]]:
        """Per position of the wave, the slices of every expert whose run is complete, as far
        as every such run reaches (in plan order, as ``Decoding`` fuses them)."""
        runs = {e: self._got.get(e) or [w.slices[e]] for e in self.plan.experts if e in w.slices}
        if self._draft:  # a verifier that answered a draft with one slice does not speculate
            self._single.update(e for e, run in runs.items() if len(run) == 1)
        reach = min(len(run) for run in runs.values())
        return [{e: run[i] for e, run in runs.items()} for i in range(reach)]

    def _next_round(self, step: int, now: float, out: list[Action]) -> None:
        token, self._got, self._draft = self._chosen(), {}, []
        n = min(self.speculate, self.plan.prompt.max_tokens - len(self.tokens) - 1)
        drafters = [e for e in self._order if e in self.active]
        plain = n <= 0 or not drafters or bool(self._single & set(self.active))
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (plain or not ahead.fits(drafters[0], step, token, n)):
            self._owed[ahead.expert] += not ahead.done  # the rest of a draft nobody needs
            ahead = None
        self.rounds += ahead is None  # a draft asked for ahead costs no round trip now
        if plain:
            self._span = 1
            message = self._step_of(step, token)
            out += [ToExpert(e, message) for e in self.active]
            deadline = now + self.settings.step_deadline_s
            self._wait = StepWait(step, now, deadline, set(self.active))
            return
        self._drafter, self._span = drafters[0], n + 1
        deadline = now + self.settings.step_deadline_s * self._span
        self._wait = StepWait(step, now, deadline, {self._drafter})
        if ahead is None:
            out.append(ToExpert(self._drafter, self._step_of(step, token, propose=n)))
            return
        self._got[self._drafter] = ahead.got
        if ahead.done:
            self._wait.slices[self._drafter] = ahead.got[0]
            self._wait.waiting.clear()
            self._verify(now, out)

    def _end(self, outcome: str) -> None:
        super()._end(outcome)
        self.log.info(
            "speculation_done",
            round_trips=self.rounds,
            tokens=len(self.tokens),
            drafted=self.drafted,
            accepted=self.accepted,
        )


@dataclass(slots=True)
class Ahead:
    """A draft asked for before its round: from ``step``, after ``token``, ``n`` tokens."""

    expert: str
    step: int
    token: Unit
    n: int
    got: list[wire.Slice] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.got) and (self.got[-1].more == 0 or len(self.got) > self.n)

    def fits(self, expert: str, step: int, token: Unit, n: int) -> bool:
        return (self.expert, self.step, self.token, self.n) == (expert, step, token, n)


def _is_step(action: Action) -> bool:
    return isinstance(action, ToExpert) and isinstance(action.message, wire.Step)
