"""Speculative steps on the expert side (docs/speculative.md, docs/protocol.md §5).

A ``Step`` may carry a ``draft`` (ids to append after its ``token``, in the same pass) and a
``propose`` count (tokens to draft greedily after them, one decode each). The expert answers
one slice per position, steps ``step`` … ``step + n``, each saying how many ``more`` follow.
Once a session has taken such a step it may be sent back: the next ``Step`` may name any step
from the last speculative one's ``step + 1`` up to the next, and the KV cache is cut to the
prompt and the answer's first ``step - 1`` tokens before its token is appended (a rejected
draft's tail goes). Speculation is the id path's: a speculating session refuses ``text``.

A backend speculates if it implements ``Extending`` (all three shipped ones do); one that does
not answers a speculative ``Step`` as a plain one (one slice), as an expert from before
speculation would, and the fusion agent copes.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Where a session stands: ``prompt`` tokens, then answer tokens up to ``next_step - 1``."""

    session: str
    prompt: int
    next_step: int
    top_k: int


class Speculation:
    """The speculative steps of one expert's sessions; ``run`` is called in the worker."""

    def __init__(self, backend: Backend, meter: EnergyMeter, max_context: int) -> None:
        self._backend, self._meter, self._max_context = backend, meter, max_context
        self._floor: dict[str, int] = {}  # session -> the lowest step its next Step may name

    def handles(self, session: str, step: wire.Step) -> bool:
        """Whether this step is speculation's: it asks for it, or its session has speculated."""
        if not isinstance(self._backend, Extending):
            return False
        return bool(step.draft) or step.propose > 0 or session in self._floor

    def forget(self, session: str) -> None:
        self._floor.pop(session, None)

    def check(self, held: Held, step: wire.Step) -> None:
        """Refuse a step that names a step out of reach, an id out of the vocabulary, or text."""
        floor = self._floor.get(held.session, held.next_step)
        vocab = self._backend.info.vocab_size
        speculated = len(step.draft) + step.propose
        refusals = (
            (not floor <= step.step <= held.next_step, ErrorCode.WRONG_STEP,
             f"expected a step from {floor} to {held.next_step}, got {step.step}"),
            (step.text is not None, ErrorCode.INVALID_FIELD,
             "a speculating session fuses by id, not by text"),
            (not all(0 <= t < vocab for t in [step.token, *step.draft]), ErrorCode.INVALID_FIELD,
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

    def run(self, held: Held, step: wire.Step) -> tuple[list[TopK], Reading]:
        """Worker thread: go back to the step, append token and draft in one pass, propose.

        As many positions as the context has room for; at least one (``check`` made sure)."""
        backend = self._backend
        assert isinstance(backend, Extending), "handles() let only extending backends in"
        keep = held.prompt + step.step - 1  # the prompt and the answer before ``token``
        room = self._max_context - 1 - keep
        appended = [step.token, *step.draft][:room]
        with self._meter.measure() as reading:
            backend.truncate(held.session, keep)
            tops = backend.extend(held.session, appended, held.top_k)
            for _ in range(min(step.propose, room - len(appended))):
                drafted = int(tops[-1].ids[0])
                if drafted in self._backend.info.eos_ids:
                    break  # nothing follows the end: the last slice shows it
                tops.append(self._backend.decode(held.session, drafted, held.top_k))
        self._floor[held.session] = 1  # from now on any step back is a cut of the cache
        return tops, reading


def slices_of(
    tops: list[TopK],
    *,
    session: str,
    expert: str,
    step: int,
    reading: Reading,
    pieces: Sequence[bytes],
) -> list[wire.Slice]:
    """One slice per position from ``step`` on, the compute shared evenly, ``more`` counting
    down to 0 on the last."""
    n = len(tops)
    return [
        wire.make_slice(
            session=session,
            expert=expert,
            step=step + i,
            ids=top.ids,
            logprobs=top.logprobs,
            pieces=[pieces[int(t)] for t in top.ids],
            compute_s=reading.compute_s / n,
            energy_j=reading.energy_j / n,
            more=n - 1 - i,
        )
        for i, top in enumerate(tops)
    ]
