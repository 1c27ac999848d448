"""Synthetic traces: drive a fusion agent with no model at all (tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from moe2.runtime import wire
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects
from moe2.runtime.trace import TraceRecord, TraceWriter, new_header

# ---------------------------------------------------------------------------------------------
# Synthetic traces: drive a fusion agent with no model at all.


def synthetic_trace(
    path: Path,
    *,
    experts: Sequence[str],
    prompt_messages: Sequence[wire.ChatMessage],
    steps: int,
    top_k: int = 32,
    vocab_size: int = 49152,
    seed: int = 0,
    tokens: Sequence[int] | None = None,
    max_tokens: int | None = None,
    eos_ids: Sequence[int] = (0,),
    session: str = "synthetic-0",
    prefix: str = DEFAULT_PREFIX,
) -> list[int]:
    """Write a trace of one session: heartbeats, Open (``max_tokens`` defaults to ``steps``),
    slices for steps 0..steps and the Steps between them. In every slice of step t the token
    ``tokens[t]`` has the highest probability, so a greedy fusion picks it whatever the weights.
    ``tokens`` (steps + 1 ids, none in ``eos_ids``) defaults to random ones; returns them."""
    rng = np.random.default_rng(seed)
    plan = _SyntheticPlan(
        experts=list(experts),
        opened=wire.Open(
            session=session,
            messages=list(prompt_messages),
            top_k=top_k,
            max_tokens=steps if max_tokens is None else max_tokens,
        ),
        chosen=_chosen_tokens(rng, steps + 1, vocab_size, eos_ids, tokens),
        vocab_size=vocab_size,
        eos_ids=list(eos_ids),
    )
    with TraceWriter(Path(path), new_header(server="", subjects=[">"])) as writer:
        for i, (subject, message) in enumerate(plan.messages(rng, Subjects(prefix))):
            writer.write(TraceRecord(i * 0.001, subject, data=wire.encode(message)))
    return plan.chosen


@dataclass(frozen=True, slots=True)
class _SyntheticPlan:
    experts: list[str]
    opened: wire.Open
    chosen: list[int]  # the token chosen at each step
    vocab_size: int
    eos_ids: list[int]

    def messages(
        self, rng: np.random.Generator, sub: Subjects
    ) -> Iterator[tuple[str, wire.Message]]:
        for e in self.experts:
            yield sub.member(e), _synthetic_heartbeat(e, self.vocab_size, self.eos_ids)
        for step in range(len(self.chosen)):
            for e in self.experts:
                yield self._request(sub, e, step)
            for e in self.experts:
                yield sub.slice(self.opened.session, e), self._slice(rng, e, step)
        for e in self.experts:
            yield sub.expert_close(e), wire.Close(session=self.opened.session)

    def _request(self, sub: Subjects, expert: str, step: int) -> tuple[str, wire.Message]:
        if step == 0:
            return sub.expert_open(expert), self.opened
        token = self.chosen[step - 1]
        return sub.expert_step(expert), wire.Step(
            session=self.opened.session, step=step, token=token
        )

    def _slice(self, rng: np.random.Generator, expert: str, step: int) -> wire.Slice:
        prompt_tokens = (
            sum(len(m.content.split()) for m in self.opened.messages) if step == 0 else 0
        )
        ids, logprobs = _synthetic_top_k(rng, self.chosen[step], self.opened.top_k, self.vocab_size)
        return wire.make_slice(
            session=self.opened.session,
            expert=expert,
            step=step,
            ids=ids,
            logprobs=logprobs,
            pieces=[f" t{int(i)}".encode() for i in ids],
            compute_s=float(rng.uniform(0.005, 0.02)),
            prompt_tokens=prompt_tokens,
        )


def _chosen_tokens(
    rng: np.random.Generator,
    n: int,
    vocab_size: int,
    eos_ids: Sequence[int],
    tokens: Sequence[int] | None,
) -> list[int]:
    if tokens is not None:
        if len(tokens) != n or any(t in eos_ids or not 0 <= t < vocab_size for t in tokens):
            raise ValueError(f"tokens must be {n} ids in [0, {vocab_size}), none of {eos_ids}")
        return [int(t) for t in tokens]
    chosen: list[int] = []
    while len(chosen) < n:
        token = int(rng.integers(vocab_size))
        if token not in eos_ids:
            chosen.append(token)
    return chosen


def _synthetic_heartbeat(expert: str, vocab_size: int, eos_ids: list[int]) -> wire.Heartbeat:
    return wire.Heartbeat(
        expert=expert,
        model=f"synthetic/{expert}",
        tokenizer=f"synthetic-{vocab_size}",
        backend="replay",
        vocab_size=vocab_size,
        eos_ids=eos_ids,
    )


def _synthetic_top_k(
    rng: np.random.Generator, chosen: int, top_k: int, vocab_size: int
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float64]]:
    """Random top-k ids and descending logprobs, ``chosen`` first; 5-30 % of the mass is outside."""
    others = rng.choice(vocab_size, size=top_k, replace=False)
    ids = np.concatenate([[chosen], others[others != chosen][: top_k - 1]]).astype(np.uint32)
    logits = rng.normal(0.0, 1.0, size=len(ids))
    logits[0] = logits[1:].max(initial=0.0) + 0.5 + rng.random()
    probs = np.exp(logits - logits.max())
    probs *= (1.0 - rng.uniform(0.05, 0.3)) / probs.sum()
    order = np.argsort(-probs, kind="stable")
    return ids[order], np.log(probs[order])
