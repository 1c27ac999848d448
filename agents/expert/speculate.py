"""Speculative steps on the expert side (docs/speculative.md, docs/protocol.md §5).

A ``Step`` may carry a ``draft`` (ids to append after its ``token``, in the same pass) and a
``propose`` count (tokens to draft greedily after them, one decode each). The expert answers
one slice per position, steps ``step`` … ``step + n``, each saying how many ``more`` follow.
Once a session has taken such a step it may be sent back: the next ``Step`` may name any step
from 1 up to the next, and the KV cache is cut to the prompt and the answer's first
``step - 1`` tokens before its token is appended (a rejected draft's tail goes).

On the byte path a ``Step`` carries ``text`` and ``draft_text`` (pieces): after the text and
after each piece, the answer's bytes go through this expert's tokenizer again and the cache is
cut back to the head they share (``Backend.rewrite``, as a plain text step does), a slice after
each; proposing appends the piece of its own most likely token. It keeps the answer's length
after each step, so it can go back to any step since it started speculating.

A backend speculates if it implements ``Extending`` (all three shipped ones do); one that does
not answers a speculative ``Step`` as a plain one (one slice), as an expert from before
speculation would, and the fusion agent copes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from moe2.agents.expert.backends import Backend, TopK
from moe2.agents.expert.energy import EnergyMeter, Reading
from moe2.runtime import wire
from moe2.runtime.errors import ErrorCode, Moe2Error

MAX_SPECULATED: Final = 32  # draft ids + proposed tokens in one Step


@runtime_checkable
class Extending(Protocol):
    """What a backend adds to ``Backend`` to speculate."""

    def extend(self, session: str, ids: Sequence[int], top_k: int) -> list[TopK]:
        """Append ``ids`` in one forward pass and return the top-k after each of them."""
        ...

    def truncate(self, session: str, length: int) -> None:
        """Keep only the first ``length`` ids of ``session`` in its KV cache."""
        ...


@dataclass(frozen=True, slots=True)
class Held:
    """Where a session stands: ``prompt`` tokens, then answer tokens up to ``next_step - 1``;
    the byte path reads the prompt's ids and the answer's bytes too."""

    session: str
    prompt: int
    next_step: int
    top_k: int
    prompt_ids: Sequence[int] = ()
    answer: bytes = b""


@dataclass(frozen=True, slots=True)
class Ran:
    """A speculative step's top-k per position, its cost, and the answer's bytes after it."""

    tops: list[TopK]
    reading: Reading
    answer: bytes


class Speculation:
    """The speculative steps of one expert's sessions; ``run`` is called in the worker.

    ``answer_ids`` is the byte path's tokenisation of an answer's bytes (``AnswerTokenizer``).
    """

    def __init__(
        self,
        backend: Backend,
        meter: EnergyMeter,
        max_context: int,
        answer_ids: Callable[[bytes], list[int]],
    ) -> None:
        self._backend, self._meter, self._max_context = backend, meter, max_context
        self._answer_ids = answer_ids
        self._by_id: set[str] = set()  # sessions that have speculated by id
        self._ends: dict[str, dict[int, int]] = {}  # byte path: step -> the answer's length after

    def handles(self, session: str, step: wire.Step) -> bool:
        """Whether this step is speculation's: it asks for it, or its session has speculated."""
        if not isinstance(self._backend, Extending):
            return False
        asked = bool(step.draft or step.draft_text) or step.propose > 0
        return asked or session in self._by_id or session in self._ends

    def forget(self, session: str) -> None:
        self._by_id.discard(session)
        self._ends.pop(session, None)

    def check(self, held: Held, step: wire.Step) -> None:
        """Refuse a step that names a step out of reach, an id out of the vocabulary, or mixes
        the id path and the byte path."""
        by_text = step.text is not None
        ends = self._ends.get(held.session)
        floor = held.next_step if held.session not in self._by_id and ends is None else 1
        floor = min(ends) + 1 if ends else floor  # the byte path goes back to its first step
        vocab = self._backend.info.vocab_size
        speculated = len(step.draft) + len(step.draft_text) + step.propose
        ids = [] if by_text else [step.token, *step.draft]
        refusals = (
            (not floor <= step.step <= held.next_step, ErrorCode.WRONG_STEP,
             f"expected a step from {floor} to {held.next_step}, got {step.step}"),
            (by_text and (held.session in self._by_id or bool(step.draft)), ErrorCode.INVALID_FIELD,
             "a session speculating by id takes no text"),
            (not by_text and (ends is not None or bool(step.draft_text)), ErrorCode.INVALID_FIELD,
             "a session speculating by bytes takes text, not ids"),
            (by_text and not all([step.text, *step.draft_text]), ErrorCode.INVALID_FIELD,
             "a step's text and draft texts must not be empty"),
            (not all(0 <= t < vocab for t in ids), ErrorCode.INVALID_FIELD,
             f"an id of the step is outside the vocabulary (0..{vocab - 1})"),
            (step.propose < 0 or speculated > MAX_SPECULATED, ErrorCode.INVALID_FIELD,
             f"draft and propose must be >= 0 and together at most {MAX_SPECULATED}"),
            (held.prompt + step.step >= self._max_context, ErrorCode.PROMPT_TOO_LONG,
             f"no room for step {step.step} after a {held.prompt}-token prompt in this "
             f"expert's {self._max_context}-token context"),
        )  # fmt: skip
        for refused, code, why in refusals:
            if refused:
                raise Moe2Error(code, why)

    def run(self, held: Held, step: wire.Step) -> Ran:
        """Worker thread: go back to the step, append its token (or text) and draft, propose.

        As many positions as the context has room for; at least one (else ``prompt_too_long``).
        """
        with self._meter.measure() as reading:
            if step.text is None:
                tops, answer = self._run_ids(held, step), held.answer
            else:
                tops, answer = self._run_text(held, step, step.text)
        return Ran(tops, reading, answer)

    def _run_ids(self, held: Held, step: wire.Step) -> list[TopK]:
        """By id: cut the cache, append token and draft in one pass, then propose."""
        backend = self._backend
        assert isinstance(backend, Extending), "handles() let only extending backends in"
        keep = held.prompt + step.step - 1  # the prompt and the answer before ``token``
        room = self._max_context - 1 - keep
        appended = [step.token, *step.draft][:room]
        backend.truncate(held.session, keep)
        tops = backend.extend(held.session, appended, held.top_k)
        for _ in range(min(step.propose, room - len(appended))):
            drafted = int(tops[-1].ids[0])
            if drafted in backend.info.eos_ids:
                break  # nothing follows the end: the last slice shows it
            tops.append(backend.decode(held.session, drafted, held.top_k))
        self._by_id.add(held.session)  # from now on any step back is a cut of the cache
        return tops

    def _run_text(self, held: Held, step: wire.Step, text: bytes) -> tuple[list[TopK], bytes]:
        """By bytes: after each piece, the answer's bytes tokenised again and the cache cut
        back to the head they share with it (``rewrite``, as a plain text step does), so each
        slice is the one a plain step with the same answer gets; then propose its own pieces."""
        ends = self._ends.setdefault(held.session, {held.next_step - 1: len(held.answer)})
        answer = held.answer[: ends[step.step - 1]]
        tops: list[TopK] = []
        pieces = [text, *step.draft_text]
        while pieces or (tops and len(tops) < 1 + len(step.draft_text) + step.propose):
            piece = pieces.pop(0) if pieces else self._proposed(tops[-1])
            ids = [*held.prompt_ids, *self._answer_ids(answer + piece)] if piece else []
            if not piece or len(ids) >= self._max_context:
                break
            answer += piece
            tops.append(self._backend.rewrite(held.session, ids, held.top_k))
            ends[step.step + len(tops) - 1] = len(answer)
        if not tops:
            raise Moe2Error(ErrorCode.PROMPT_TOO_LONG, "the step's text does not fit the context")
        return tops, answer

    def _proposed(self, top: TopK) -> bytes:
        """The piece of this expert's most likely token; b"" at its end (or a special token)."""
        best = int(top.ids[0])
        return b"" if best in self._backend.info.eos_ids else self._backend.token_bytes[best]


def slices_of(
    ran: Ran, *, session: str, expert: str, step: int, pieces: Sequence[bytes]
) -> list[wire.Slice]:
    """One slice per position from ``step`` on, the compute shared evenly, ``more`` counting
    down to 0 on the last."""
    n = len(ran.tops)
    return [
        wire.make_slice(
            session=session,
            expert=expert,
            step=step + i,
            ids=top.ids,
            logprobs=top.logprobs,
            pieces=[pieces[int(t)] for t in top.ids],
            compute_s=ran.reading.compute_s / n,
            energy_j=ran.reading.energy_j / n,
            more=n - 1 - i,
        )
        for i, top in enumerate(ran.tops)
    ]
