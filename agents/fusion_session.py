"""One fused answer: open the experts, gather slices per step, fuse, sample, stream, close."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import numpy as np
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from moe2.agents.fusion_config import FusionConfig
from moe2.runtime import wire
from moe2.runtime.connection import flush_subscriptions
from moe2.runtime.deadline import LateTracker
from moe2.runtime.errors import ErrorCode, Moe2Error, error_code
from moe2.runtime.fusion import ExpertSlice, fuse
from moe2.runtime.sampling import SamplingParams, TokenSampler
from moe2.runtime.subjects import Subjects
from moe2.runtime.text import TextAssembler

log = structlog.get_logger("moe2.fusion")


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """Who answers this prompt, with which weights, and what their tokenizer knows."""

    session: str
    prompt: wire.Prompt
    reply: str
    experts: list[str]
    weights: list[float]
    vocab_size: int
    eos_ids: frozenset[int]
    observe: Callable[[wire.Slice], None] | None = None  # sees every accepted slice (costs)


@dataclass(slots=True)
class StepResult:
    slices: dict[str, wire.Slice] = field(default_factory=dict)
    errors: dict[str, wire.Error] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # expert -> why its slice was refused


class ContextFull(Exception):
    """Every expert left has run out of context: the answer ends with finish "length"."""


class FusionSession:
    """Runs one session to its end; every outcome reaches the client as Final or Error."""

    _step: int
    _result: StepResult
    _waiting: set[str]
    _complete: anyio.Event

    def __init__(self, nc: NATS, subjects: Subjects, config: FusionConfig, plan: SessionPlan):
        self.nc, self.subjects, self.config, self.plan = nc, subjects, config, plan
        self.weight = dict(zip(plan.experts, plan.weights, strict=True))
        self.active = list(plan.experts)
        self.tracker = LateTracker(config.max_consecutive_late)
        self.dropped: list[str] = []
        self.sampler = TokenSampler(
            SamplingParams(plan.prompt.temperature, plan.prompt.top_p, plan.prompt.seed)
        )
        self.text = TextAssembler(plan.prompt.stop)
        self.log = log.bind(session=plan.session)
        self.step_ms: list[float] = []
        self._chunks = 0

    async def run(self, started: float) -> None:
        self._begin_step(0)
        sub = await self.nc.subscribe(
            self.subjects.session_slices(self.plan.session), cb=self._deliver
        )
        await flush_subscriptions(self.nc)  # before any Open: slice 0 must find the subscription
        try:
            await self._answer(started)
        except Moe2Error as exc:
            self.log.info("session_failed", code=str(exc.code), message=exc.message)
            await self._reply(wire.error_from(exc, session=self.plan.session))
        finally:
            with anyio.CancelScope(shield=True):
                await self._close_experts(self.active, "done")
                await sub.unsubscribe()

    async def _answer(self, started: float) -> None:
        p = self.plan
        self.log.info("session_started", experts=p.experts, weights=p.weights)
        for expert in self.active:
            await self.nc.publish(
                self.subjects.expert_open(expert),
                wire.encode(
                    wire.Open(
                        session=p.session,
                        messages=p.prompt.messages,
                        top_k=self.config.slice_k,
                        max_tokens=p.prompt.max_tokens,
                    )
                ),
            )
        result = await self._gather(0, self.config.prefill_deadline_s)
        prompt_tokens = max((s.prompt_tokens for s in result.slices.values()), default=0)
        tokens: list[int] = []
        pending: list[int] = []
        ttft = 0.0
        finish = "length"
        for step in range(p.prompt.max_tokens):
            t0 = time.perf_counter()
            token, piece = self._choose(result, step)
            tokens.append(token)
            if token in p.eos_ids:
                finish = "eos"
                break
            pending.append(token)
            delta = self.text.push(piece)
            if delta:
                ttft = ttft or time.monotonic() - started
                await self._chunk(delta, pending)
                pending = []
            if self.text.stopped:
                finish = "stop"
                break
            if step + 1 == p.prompt.max_tokens:
                break
            self._begin_step(step + 1)
            await self._send_step(step + 1, token)
            try:
                result = await self._gather(step + 1, self.config.step_deadline_s)
            except ContextFull:
                break
            self.step_ms.append((time.perf_counter() - t0) * 1000)
        tail = self.text.finish()
        if tail or pending:
            ttft = ttft or time.monotonic() - started
            await self._chunk(tail, pending)
        await self._final(finish, prompt_tokens, len(tokens), ttft, started)

    def _choose(self, result: StepResult, step: int) -> tuple[int, bytes]:
        slices = [result.slices[e] for e in self.active if e in result.slices]
        if not slices:
            raise Moe2Error(ErrorCode.NO_SLICES, f"no expert answered step {step} in time")
        dist = fuse(
            [ExpertSlice(s.ids_array(), s.logprobs_array(), s.rest) for s in slices],
            [self.weight[s.expert] for s in slices],
            self.plan.vocab_size,
        )
        at = self.sampler.choose_index(dist)
        first = int(dist.source[at])
        for s in slices:
            if first < len(s.pieces):
                return int(dist.ids[at]), s.pieces[first]
            first -= len(s.pieces)
        raise AssertionError("a fused id always comes from some slice")

    async def _send_step(self, step: int, token: int) -> None:
        data = wire.encode(wire.Step(session=self.plan.session, step=step, token=token))
        for expert in self.active:
            await self.nc.publish(self.subjects.expert_step(expert), data)

    def _begin_step(self, step: int) -> None:
        """Expect this step's slices; call before publishing what asks for them."""
        self._step, self._result, self._waiting = step, StepResult(), set(self.active)
        self._complete = anyio.Event()

    async def _deliver(self, msg: Msg) -> None:
        """Subscription callback: take the slice straight into the current step."""
        self._accept(msg, self._step, self._result, self._waiting)
        if not self._waiting:
            self._complete.set()

    async def _gather(self, step: int, deadline_s: float) -> StepResult:
        """Wait for this step's slices until every active expert answered or the deadline."""
        with anyio.move_on_after(deadline_s):
            await self._complete.wait()
        self._waiting = set()  # what arrives from now on is late
        result = self._result
        await self._account(step, result, deadline_s)
        return result

    def _accept(self, msg: Msg, step: int, result: StepResult, waiting: set[str]) -> None:
        sender = self.subjects.expert_of_slice(msg.subject)
        try:
            item = wire.decode(msg.data)
        except Moe2Error as exc:
            self.log.warning("bad_slice", code=str(exc.code), expert=sender, error=exc.message)
            return
        if isinstance(item, wire.Error) and sender in waiting and item.step in (step, -1):
            self.log.warning("expert_error", expert=sender, code=item.code, error=item.message)
            result.errors[sender] = item
            waiting.discard(sender)
            return
        if not isinstance(item, wire.Slice):
            self.log.warning("bad_slice", code="unknown_type", expert=sender)
            return
        if (problem := self._slice_problem(item, sender, step, waiting)) is not None:
            self.log.warning("slice_dropped", expert=sender, step=item.step, at=step, why=problem)
            if problem in (ErrorCode.BAD_LOGPROBS, ErrorCode.INVALID_FIELD):
                result.rejected[sender] = problem
                waiting.discard(sender)  # a refused slice will not be followed by a good one
            return
        result.slices[sender] = item
        waiting.discard(sender)
        if self.plan.observe is not None:
            self.plan.observe(item)

    def _slice_problem(
        self, s: wire.Slice, sender: str, step: int, waiting: set[str]
    ) -> str | None:
        if s.expert != sender:
            return "subject_mismatch"
        if sender not in self.weight:
            return str(ErrorCode.NOT_IN_SESSION)
        if s.step < step:
            return "late"
        if s.step != step or sender not in waiting:
            return str(ErrorCode.WRONG_STEP)
        try:
            wire.check_slice(s, self.plan.vocab_size)
        except Moe2Error as exc:
            return str(exc.code)
        return None

    async def _account(self, step: int, result: StepResult, deadline_s: float) -> None:
        """Drop failed experts and experts late too often; end the session if none answered."""
        failed = [e for e in self.active if e in result.errors]
        late = [e for e in self.active if e not in result.slices and e not in result.errors]
        for expert in late:
            self.log.info("slice_late", expert=expert, step=step, deadline_ms=deadline_s * 1000)
        to_drop = failed + self.tracker.record(
            [e for e in self.active if e not in failed], result.slices
        )
        if to_drop:
            self.active = [e for e in self.active if e not in to_drop]
            self.dropped += [e for e in to_drop if e not in failed]
            await self._close_experts(to_drop, "dropped")
        if not result.slices:
            codes = {e.code for e in result.errors.values()}
            if step > 0 and not late and codes == {ErrorCode.PROMPT_TOO_LONG}:
                raise ContextFull
            if result.errors and len(result.errors) == len(failed) == len(failed + late):
                first = next(iter(result.errors.values()))
                raise Moe2Error(error_code(first.code), f"expert {first.expert}: {first.message}")
            if result.rejected:
                expert, why = next(iter(result.rejected.items()))
                raise Moe2Error(
                    error_code(why), f"every slice of step {step} refused ({expert}: {why})"
                )
            raise Moe2Error(
                ErrorCode.NO_SLICES,
                f"no slice arrived for step {step} within {deadline_s:.3g}s "
                f"(experts: {', '.join(failed + late) or 'none left'})",
            )

    async def _close_experts(self, experts: list[str], reason: str) -> None:
        data = wire.encode(wire.Close(session=self.plan.session, reason=reason))
        for expert in experts:
            await self.nc.publish(self.subjects.expert_close(expert), data)

    async def _chunk(self, text: str, tokens: list[int]) -> None:
        self._chunks += 1
        await self._reply(
            wire.Chunk(
                session=self.plan.session, index=self._chunks - 1, text=text, tokens=list(tokens)
            )
        )

    async def _final(
        self, finish: str, prompt_tokens: int, n: int, ttft: float, started: float
    ) -> None:
        total = time.monotonic() - started
        steps = np.asarray(self.step_ms or [0.0])
        await self._reply(
            wire.Final(
                session=self.plan.session,
                text=self.text.text,
                finish_reason=finish,
                usage=wire.Usage(prompt_tokens=prompt_tokens, completion_tokens=n),
                timings=wire.Timings(
                    ttft_s=ttft,
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
        )
        self.log.info("session_done", tokens=n, finish=finish, late=self.tracker.late)

    async def _reply(self, message: wire.Message) -> None:
        if self.plan.reply:
            await self.nc.publish(self.plan.reply, wire.encode(message))
