"""The expert agent: one model on the bus, a KV cache per session, a top-k slice per step.

Protocol (docs/protocol.md): an expert serves ``<prefix>.v1.expert.<id>.<verb>`` for the verbs
``open``, ``step``, ``close`` and ``score``, one ``runtime.endpoint.Endpoint`` each; a message of
another type than its subject carries is ``unknown_type``.

- ``Open`` prefills the prompt (the expert's context, then the messages, in the model's own chat
  template) and publishes slice 0 on ``<prefix>.v1.session.<sid>.slice.<id>``, with
  ``prompt_tokens`` set.
- ``Step(step=s, token=t)`` appends ``t`` and publishes slice ``s``; ``s`` must be one more than
  the last slice published, or the reply is ``wrong_step`` and nothing advances. A ``Step`` with
  ``text`` (a session fused by bytes) appends those bytes through this expert's tokenizer: the
  answer's bytes are tokenised again (``answer_tokens``), and the KV cache is cut back to the
  head the new tokens share with the old and fed the rest (``Backend.rewrite``).
- ``Close`` frees the KV cache; so does ``idle_timeout_s`` without a message for the session.
- An ``Open`` with a ``conversation`` starts from the KV cache kept of that conversation's last
  turn, if any, and prefills only the new tokens; the ``Close`` of such a session keeps its cache
  for the next turn instead of freeing it (``conversations.ConversationStore``, bounded, LRU).
- ``Score`` (request/reply, no session) builds the prompt as ``Open`` does, scores each target by
  teacher forcing and replies ``Scored``, or ``Error``, to the request's reply subject. A Score
  without a reply subject is logged and dropped.

The context (``ExpertConfig.context``, e.g. a system prompt and worked examples) comes before
every conversation and counts toward ``max_context``; its KV cache is computed once at start and
every prompt starts from a copy of it (``context_cache``). Heartbeats announce it as
``<model>+ctx:<name>@<hash>``.

The context holds at most ``max_context - 1`` tokens: a prompt of ``max_context`` tokens or more
is refused at open, and a step that would feed the ``max_context``-th token is refused with
``prompt_too_long`` (the session stays open and unadvanced; the fusion agent ends the answer).
``Open.top_k`` 0 means this expert's default; a request above ``max_top_k`` is served with
``max_top_k`` ids (every slice says how many it holds, and the rest mass covers the others).
``Open.max_tokens`` is the fusion agent's to enforce; the expert only guards its context.

Every error goes back as a ``wire.Error``: to the message's reply subject if it has one, else,
about a session, on that session's slice subject. Messages that name no usable session (not
msgpack, unknown type, another protocol version, missing fields) and have no reply subject are
logged and counted by their endpoint. A handler that raises replies ``internal`` and ends that
session (its KV cache may be half-written); the agent lives on.

Model calls (sessions and scores alike) run one at a time in a worker thread, so the event loop
keeps heartbeating; the messages of one session are handled in arrival order by that session's
own task. The calls go through one scheduler (``scheduler.ModelScheduler``): the pending decode
steps of all sessions run as one ``Backend.decode_batch`` (at most ``max_batch`` of them), the
waiting prefills of new sessions (those not resuming a conversation) as one
``Backend.prefill_batch`` (capped so that it fits one decode step's time), and every other call
(a score, a byte-path rewrite, a speculative step) runs alone, turns alternating, so a new
session's prefill holds the others back by about one step. A batch's compute time and energy
are shared equally among its sessions' slices (docs/backends.md).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Final, NamedTuple, TypeVar

import anyio
import anyio.abc
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from moe2.agents.discovery import EXPERT_SERVICE, Served, micro_service
from moe2.agents.expert.answer_tokens import AnswerTokenizer
from moe2.agents.expert.backends import Backend, DecodeRequest, PrefixCache, TopK, load_backend
from moe2.agents.expert.backends.base import PrefillRequest, common_prefix, prefill_batch
from moe2.agents.expert.config import ExpertConfig, ExpertStats
from moe2.agents.expert.conversations import ConversationStore, TurnOrder
from moe2.agents.expert.energy import EnergyMeter, Reading, choose_meter
from moe2.agents.expert.models import resolve_model
from moe2.agents.expert.scheduler import ModelScheduler
from moe2.agents.expert.score import run_score, score_refusal
from moe2.agents.expert.speculate import Held, Speculation, slices_of
from moe2.agents.expert.warmup import WARMUP_PROMPT, prefilled_tokens, warm_up
from moe2.agents.metrics import ExpertMetrics
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats, publish_or_log
from moe2.runtime.endpoint import (
    Endpoint,
    ErrorRoute,
    Request,
    error_counts,
    session_slice_route,
)
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.lifecycle import cancel_on_signals
from moe2.runtime.metrics import EndpointCollector, serve_metrics
from moe2.runtime.subjects import Subjects, valid_token

log = structlog.get_logger("moe2.expert")

DEFAULT_CONTEXT: Final = 4096
_INBOX_SIZE: Final = 16  # messages queued per session; a fusion agent keeps one step in flight
_T = TypeVar("_T")

__all__ = ["DEFAULT_CONTEXT", "ExpertAgent", "ExpertConfig", "ExpertStats", "serve_expert"]

SessionMessage = wire.Open | wire.Step | wire.Close
Queued = tuple[SessionMessage, str]  # a session's message and its reply subject ("" if none)


@dataclass(slots=True)
class _Session:
    id: str
    inbox: MemoryObjectSendStream[Queued]
    top_k: int = 0
    prompt_tokens: int = 0
    next_step: int = 0  # the step of the next slice; 0 until the prefill is done
    prompt_ids: list[int] = field(default_factory=list)
    answer: bytes = b""  # the answer's bytes so far: the pieces of its tokens, or the texts
    conversation: str | None = None  # the Open's: its cache is kept on Close (conversations.py)
    ended: str = "stopped"  # why it ended, for metrics: a Close's reason, idle, refused, failed


class _Prefill(NamedTuple):
    """A new session's prefill, waiting for the next batch of prefills
    (``ModelScheduler.call_batched``)."""

    session: str
    messages: Sequence[wire.ChatMessage]
    top_k: int


_Prefilled = tuple[TopK, list[int], Reading]


class _Decode(NamedTuple):
    """A session's decode step, waiting for the next batch (``ModelScheduler.step``)."""

    session: _Session
    token: int


class ExpertAgent:
    """Serves one backend on the bus; ``await tg.start(agent.run)`` returns once it is live.

    ``meter`` measures each compute call's joules; None chooses one from the config.
    """

    def __init__(
        self,
        nc: NATS,
        backend: Backend,
        config: ExpertConfig,
        meter: EnergyMeter | None = None,
    ) -> None:
        self._nc = nc
        self._backend = backend
        self.config = config
        self.info = backend.info
        self.subjects = Subjects(config.prefix)
        self.max_context = min(config.max_context or DEFAULT_CONTEXT, self.info.max_context)
        self.stats = ExpertStats()
        self.meter = meter or choose_meter(config.device, config.energy_source)
        self._sessions: dict[str, _Session] = {}
        self._scheduler: ModelScheduler[_Decode, tuple[TopK, Reading]] = ModelScheduler(
            self._decode_batch,
            max_batch=config.max_batch,
            gather_s=config.batch_gather_s,
            expected=lambda: sum(1 for s in self._sessions.values() if s.next_step > 0),
            on_batch=lambda size: self.metrics.batch.observe(size),
        )
        self._speculation = Speculation(
            backend, self.meter, self.max_context, lambda text: self.answer_tokenizer.ids(text)
        )
        self._heartbeat_seq = 0
        self._log = log.bind(expert=config.expert_id)
        self._context_head: PrefixCache | None = None
        self.context_tokens = 0  # the head every prompt shares: template start and context
        self._tg: anyio.abc.TaskGroup | None = None
        me = config.expert_id
        routed = session_slice_route(self.subjects, me)
        self.endpoints = (
            self._endpoint("open", self.subjects.expert_open(me), wire.Open, routed),
            self._endpoint("step", self.subjects.expert_step(me), wire.Step, routed),
            self._endpoint("close", self.subjects.expert_close(me), wire.Close, None),
            Endpoint(
                nc,
                "score",
                self.subjects.expert_score(me),
                wire.Score,
                self._on_score,
                agent=me,
                concurrency=config.max_pending_scores,
            ),
        )
        self._open_ep, self._step_ep, _, self._score_ep = self.endpoints
        self.metrics = self._metrics()
        self.conversations = ConversationStore(
            backend,
            max_conversations=config.max_conversations,
            max_tokens=config.conversation_tokens,
            idle_s=config.conversation_idle_s,
            registry=self.metrics.registry,
        )
        self._turns = TurnOrder()
        self.metrics_port: int | None = None  # where /metrics is served, once running

    def _metrics(self) -> ExpertMetrics:
        metrics = ExpertMetrics(
            CollectorRegistry(),
            energy_source=self.meter.source,
            sessions=lambda: len(self._sessions),
            queued=lambda: sum(
                s.inbox.statistics().current_buffer_used for s in self._sessions.values()
            ),
            waiting=lambda: self._scheduler.waiting,
        )
        info = self.info
        metrics.info.info(
            {
                "expert": self.config.expert_id,
                "model": self.model_label,
                "backend": info.backend,
                "quantisation": info.quantisation,
                "device": self.config.declared.name,
                "energy_source": self.meter.source,
            }
        )
        metrics.registry.register(EndpointCollector(lambda: [e.stats for e in self.endpoints]))
        return metrics

    def _endpoint(
        self,
        verb: str,
        subject: str,
        expects: type[SessionMessage],
        route: Callable[[SessionMessage], ErrorRoute | None] | None,
    ) -> Endpoint[Any]:
        return Endpoint(
            self._nc,
            verb,
            subject,
            expects,
            self._on_session_message,
            agent=self.config.expert_id,
            route_errors=route,
        )

    @property
    def model_label(self) -> str:
        """The model, with the context if any: ``SmolLM2-135M-Instruct+ctx:stem@1a2b3c4d``."""
        label = self.config.context_label
        return f"{self.info.model}+ctx:{label}" if label else self.info.model

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def scores_pending(self) -> int:
        return self._score_ep.in_flight

    def error_counts(self) -> Counter[str]:
        """Errors answered or logged by every endpoint of this expert, by code."""
        return error_counts(self.endpoints)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        if self.config.context:
            await self._in_worker(partial(self._prepare_context))
        if self.config.warmup:
            await self._in_worker(partial(self._warm_up))
        async with (
            serve_metrics(self.metrics.registry, self.config.metrics_port) as self.metrics_port,
            anyio.create_task_group() as tg,
        ):
            self._tg = tg
            await tg.start(self._scheduler.run)
            for endpoint in self.endpoints:
                await tg.start(endpoint.serve)
            await self._heartbeat()
            tg.start_soon(self._heartbeat_loop)
            if self.config.discovery:
                await tg.start(self._discoverable)
            self._log.info(
                "expert_ready",
                model=self.model_label,
                max_context=self.max_context,
                context_tokens=self.context_tokens,
                energy_source=self.meter.source,
                decode_s=self.stats.decode_s,
                prefill_s_per_token=self.stats.prefill_s_per_token,
            )
            task_status.started()

    async def _discoverable(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Registered on ``$SRV`` as ``moe2-expert`` until cancelled (docs/discovery.md)."""
        served = [Served(e.stats, e.queue) for e in self.endpoints]
        about = "moe2 expert: top-k slices of one model"
        async with micro_service(self._nc, EXPERT_SERVICE, about, self.describe, lambda: served):
            task_status.started()
            await anyio.sleep_forever()

    def describe(self) -> dict[str, object]:
        """``$SRV`` metadata: what the heartbeats announce, the device profile as JSON."""
        info, config = self.info, self.config
        return {
            "expert": config.expert_id,
            "model": self.model_label,
            "adapter": str(config.adapter) if config.adapter is not None else "",
            "backend": info.backend,
            "quantisation": info.quantisation,
            "tokenizer": info.tokenizer,
            "device": config.declared.name,
            "device_profile": msgspec.structs.asdict(self._device()),
            "energy_source": self.meter.source,
            "prefix": config.prefix,
            "sessions": len(self._sessions),
        }

    def _prepare_context(self) -> None:
        """Worker thread: check that the context fits, and keep its KV cache if configured."""
        probes = [self._prompt_ids([wire.ChatMessage("user", text)]) for text in ("a", "b")]
        if len(probes[0]) >= self.max_context:
            raise Moe2Error(
                ErrorCode.PROMPT_TOO_LONG,
                f"the context {self.config.context_label} takes {len(probes[0])} tokens with a "
                f"one-word question; this expert's context is {self.max_context} tokens",
            )
        self.context_tokens = common_prefix(*probes)
        if self.config.context_cache:
            self._context_head = self._backend.keep_prefix(probes[0][: self.context_tokens])

    def _warm_up(self) -> None:
        """Worker thread: measure the model before the first heartbeat announces it."""
        ids = self._prompt_ids(WARMUP_PROMPT)
        measured = warm_up(self._backend, ids, self.meter, prefix=self._context_head)
        self.stats.decode_s = measured.decode_s
        self.stats.prefill_s_per_token = measured.prefill_s_per_token
        self.stats.measured_at = time.monotonic()
        self._log.debug("expert_measured", decode_s=measured.decode_s)

    def _prompt_ids(self, messages: Sequence[wire.ChatMessage]) -> list[int]:
        """The ids of the expert's context and then ``messages``, in the model's chat template."""
        return self._backend.encode_chat([*self.config.context, *messages])

    # --- receiving: the endpoints' handlers route session messages to the session's task -------

    async def _on_session_message(self, request: Request[SessionMessage]) -> None:
        message = request.message
        if not valid_token(message.session):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "session must be one subject token")
        if isinstance(message, wire.Open):
            self._admit(message, request.reply)
        else:
            self._forward(message, request.reply)

    def _admit(self, open_: wire.Open, reply: str) -> None:
        refusal = self._refusal(open_)
        if refusal is not None:
            raise refusal
        assert self._tg is not None, "endpoints serve inside run()"
        send, receive = anyio.create_memory_object_stream[Queued](_INBOX_SIZE)
        session = _Session(id=open_.session, inbox=send, top_k=self._top_k(open_.top_k))
        self._sessions[session.id] = session
        self.metrics.opened.inc()
        send.send_nowait((open_, reply))
        self._tg.start_soon(self._serve_session, session, receive)

    def _refusal(self, open_: wire.Open) -> Moe2Error | None:
        if not wire.has_content(open_.messages):
            return Moe2Error(ErrorCode.EMPTY_PROMPT, "the prompt has no message with content")
        if open_.top_k < 0:
            return Moe2Error(ErrorCode.INVALID_FIELD, f"top_k must be >= 0, got {open_.top_k}")
        if open_.session in self._sessions:
            return Moe2Error(ErrorCode.INVALID_FIELD, f"session {open_.session} is already open")
        if len(self._sessions) >= self.config.max_sessions:
            limit = self.config.max_sessions
            return Moe2Error(ErrorCode.BUSY, f"this expert serves at most {limit} sessions")
        return None

    def _top_k(self, requested: int) -> int:
        wanted = requested or self.config.top_k
        return min(wanted, self.config.max_top_k, self.info.vocab_size)

    def _forward(self, message: wire.Step | wire.Close, reply: str) -> None:
        session = self._sessions.get(message.session)
        if session is None:
            if isinstance(message, wire.Step):
                raise Moe2Error(ErrorCode.UNKNOWN_SESSION, f"no session {message.session}")
            return  # a Close for a session that is gone: nothing to do
        try:
            session.inbox.send_nowait((message, reply))
        except anyio.WouldBlock:
            raise Moe2Error(ErrorCode.BUSY, f"more than {_INBOX_SIZE} messages queued") from None

    # --- one task per session ------------------------------------------------------------------

    async def _serve_session(
        self, session: _Session, inbox: MemoryObjectReceiveStream[Queued]
    ) -> None:
        try:
            with inbox:
                await self._session_loop(session, inbox)
                self._sessions.pop(session.id, None)
                await self._refuse_leftovers(session, inbox)
        finally:
            self._sessions.pop(session.id, None)
            self._scheduler.call_soon(partial(self._backend.release, session.id))  # worker's turn
            self._speculation.forget(session.id)
            if session.conversation is not None:
                self._turns.end(session.conversation, session.id)
            session.inbox.close()
            self.metrics.session_ended(session.ended)

    async def _session_loop(
        self, session: _Session, inbox: MemoryObjectReceiveStream[Queued]
    ) -> None:
        idle_s = self.config.idle_timeout_s
        while True:
            queued: Queued | None = None
            with anyio.move_on_after(idle_s):  # the timer covers the wait, never the work
                queued = await inbox.receive()
            if queued is None:
                self._log.info("session_idle_freed", session=session.id, idle_s=idle_s)
                session.ended = "idle"
                return
            if not await self._handle(session, *queued):
                return

    async def _refuse_leftovers(
        self, session: _Session, inbox: MemoryObjectReceiveStream[Queued]
    ) -> None:
        """Steps that were queued behind the end of the session learn that it is gone."""
        while True:
            try:
                message, reply = inbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return
            if isinstance(message, wire.Step):
                gone = Moe2Error(ErrorCode.UNKNOWN_SESSION, f"session {session.id} has ended")
                await self._reply_error(gone, session.id, message.step, reply)

    async def _handle(self, session: _Session, message: SessionMessage, reply: str) -> bool:
        """Handle one message; False ends the session."""
        step = message.step if isinstance(message, wire.Step) else 0
        try:
            if isinstance(message, wire.Open):
                await self._open(session, message)
            elif isinstance(message, wire.Step):
                await self._step(session, message)
            else:
                self._log.debug("session_closed", session=session.id, reason=message.reason)
                session.ended = message.reason
                await self._keep_conversation(session)
                return False
        except Moe2Error as exc:
            await self._reply_error(exc, session.id, step, reply)
            if session.next_step == 0:
                session.ended = "refused"
            return session.next_step > 0  # a refused open ends the session
        except Exception:
            self._log.exception("handler_failed", session=session.id, step=step)
            session.ended = "failed"
            failed = Moe2Error(ErrorCode.INTERNAL, "the expert failed on this message")
            await self._reply_error(failed, session.id, step, reply)
            return False
        return True

    async def _open(self, session: _Session, open_: wire.Open) -> None:
        if open_.conversation is not None:  # after the turn before is closed and kept
            session.conversation = open_.conversation
            await self._turns.begin(open_.conversation, session.id)
            prefill = partial(
                self._encode_and_prefill,
                session.id,
                open_.messages,
                session.top_k,
                open_.conversation,
            )
            top, session.prompt_ids, reading = await self._in_worker(prefill)
        else:  # batched with the other new sessions' prefills waiting then
            item = _Prefill(session.id, open_.messages, session.top_k)
            chars = sum(len(m.content) for m in [*self.config.context, *open_.messages])
            started: _Prefilled = await self._scheduler.call_batched(
                self._prefill_batch, item, cost=chars // 4 + 8
            )
            top, session.prompt_ids, reading = started
        session.prompt_tokens = len(session.prompt_ids)
        session.next_step = 1
        await self._publish_slice(session, 0, top, reading)

    def _prefill_batch(self, items: list[_Prefill]) -> list[_Prefilled | Moe2Error]:
        """Worker thread: the prefills of new sessions as one ``prefill_batch``; each slice
        carries an equal share of its compute time and energy. A refused prompt gets its own
        error; if the batch fails, each prefill runs alone (and fails alone)."""
        checked: list[list[int] | Moe2Error] = []
        for item in items:
            try:
                checked.append(self._checked_prompt(item.messages))
            except Moe2Error as exc:
                checked.append(exc)
        requests = [
            PrefillRequest(item.session, ids, item.top_k, self._context_head)
            for item, ids in zip(items, checked, strict=True)
            if not isinstance(ids, Moe2Error)
        ]
        try:
            with self.meter.measure() as reading:
                tops = iter(prefill_batch(self._backend, requests))
        except Exception:
            self._log.info("prefill_batch_failed", sessions=len(requests), exc_info=True)
            return [self._prefill_alone(item) for item in items]
        prefilled = sum(prefilled_tokens(r.prompt_ids, r.prefix) for r in requests)
        if requests:
            self.stats.note_prefill(reading.compute_s, prefilled)
            self.metrics.computed("prefill", prefilled, reading.compute_s, reading.energy_j)
        share = Reading(
            reading.compute_s / max(len(requests), 1), reading.energy_j / max(len(requests), 1)
        )
        return [ids if isinstance(ids, Moe2Error) else (next(tops), ids, share) for ids in checked]

    def _prefill_alone(self, item: _Prefill) -> _Prefilled | Moe2Error:
        try:
            return self._encode_and_prefill(item.session, item.messages, item.top_k)
        except Moe2Error as exc:
            return exc

    def _checked_prompt(self, messages: Sequence[wire.ChatMessage]) -> list[int]:
        """The prompt's ids; ``prompt_too_long`` if they fill the expert's context."""
        ids = self._prompt_ids(messages)
        if len(ids) >= self.max_context:
            raise Moe2Error(
                ErrorCode.PROMPT_TOO_LONG,
                f"the prompt is {len(ids)} tokens; this expert's context is "
                f"{self.max_context} tokens",
            )
        return ids

    def _encode_and_prefill(
        self,
        session: str,
        messages: Sequence[wire.ChatMessage],
        top_k: int,
        conversation: str | None = None,
    ) -> tuple[TopK, list[int], Reading]:
        """Runs in the worker thread."""
        ids = self._checked_prompt(messages)
        with self.meter.measure() as reading:  # from the conversation's kept cache, if any
            started = self.conversations.start(
                session, conversation, ids, top_k, self._context_head
            )
        top, prefilled = started.top, started.prefilled
        self.stats.note_prefill(reading.compute_s, prefilled)
        self.metrics.computed("prefill", prefilled, reading.compute_s, reading.energy_j)
        return top, ids, reading

    async def _keep_conversation(self, session: _Session) -> None:
        """On Close: the session's cache becomes its conversation's (docs/conversations.md)."""
        if session.conversation is not None and session.next_step > 0:
            keep = partial(self.conversations.keep, session.id, session.conversation)
            await self._in_worker(keep)

    async def _step(self, session: _Session, step: wire.Step) -> None:
        if self._speculation.handles(session.id, step):
            await self._speculative_step(session, step)
            return
        self._check_step(session, step)
        top, reading = await self._decode(session, step)
        session.next_step += 1  # the KV cache has advanced, whatever happens to the slice
        self.stats.note_decode(reading.compute_s)
        self.metrics.computed("decode", 1, reading.compute_s, reading.energy_j)
        await self._publish_slice(session, step.step, top, reading)

    async def _speculative_step(self, session: _Session, step: wire.Step) -> None:
        """A draft to verify or to propose, or a step back (speculate.py): a slice a position."""
        held = Held(
            session.id,
            session.prompt_tokens,
            session.next_step,
            session.top_k,
            session.prompt_ids,
            session.answer,
        )
        self._speculation.check(held, step)
        ran = await self._in_worker(partial(self._speculation.run, held, step))
        session.next_step, session.answer = step.step + len(ran.tops), ran.answer
        self.metrics.computed("decode", len(ran.tops), ran.reading.compute_s, ran.reading.energy_j)
        me, pieces = self.config.expert_id, self._backend.token_bytes
        subject = self.subjects.slice(session.id, me)
        for message in slices_of(ran, session=session.id, expert=me, step=step.step, pieces=pieces):
            self.stats.slices += 1
            self.metrics.slices.inc()
            await self._publish(subject, message)

    def _check_step(self, session: _Session, step: wire.Step) -> None:
        if step.step != session.next_step:
            raise Moe2Error(
                ErrorCode.WRONG_STEP, f"expected step {session.next_step}, got {step.step}"
            )
        if step.text is not None:
            if not step.text:
                raise Moe2Error(ErrorCode.INVALID_FIELD, "a step's text must not be empty")
            return  # its length in tokens is known once it is tokenised (_append)
        if not 0 <= step.token < self.info.vocab_size:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"token {step.token} is outside the vocabulary (0..{self.info.vocab_size - 1})",
            )
        if session.prompt_tokens + step.step >= self.max_context:
            raise Moe2Error(
                ErrorCode.PROMPT_TOO_LONG,
                f"the context is full: {session.prompt_tokens} prompt and {step.step} answer "
                f"tokens reach this expert's {self.max_context}-token context",
            )

    async def _decode(self, session: _Session, step: wire.Step) -> tuple[TopK, Reading]:
        """A token joins the next batch of steps; a text (the byte path, §5) runs on its own."""
        if step.text is not None:
            return await self._in_worker(partial(self._append, session, step.text))
        return await self._scheduler.step(_Decode(session, step.token))

    def _decode_batch(self, steps: list[_Decode]) -> list[tuple[TopK, Reading]]:
        """Worker thread: one batched decode of the sessions' steps; each session's slice
        carries an equal share of the batch's compute time and energy."""
        requests = [DecodeRequest(d.session.id, d.token, d.session.top_k) for d in steps]
        with self.meter.measure() as reading:
            tops = self._backend.decode_batch(requests)
        share = Reading(reading.compute_s / len(steps), reading.energy_j / len(steps))
        for d in steps:
            d.session.answer += self._backend.token_bytes[d.token]
        return [(top, share) for top in tops]

    def _append(self, session: _Session, text: bytes) -> tuple[TopK, Reading]:
        """The byte path: tokenise the answer's bytes again, cut the cache back to the head
        the new tokens share with the old, feed the rest (docs/protocol.md §5)."""
        with self.meter.measure() as reading:
            answer = session.answer + text
            ids = [*session.prompt_ids, *self.answer_tokenizer.ids(answer)]
            if len(ids) >= self.max_context:
                raise Moe2Error(
                    ErrorCode.PROMPT_TOO_LONG,
                    f"the context is full: {session.prompt_tokens} prompt and "
                    f"{len(ids) - session.prompt_tokens} answer tokens reach this expert's "
                    f"{self.max_context}-token context",
                )
            top = self._backend.rewrite(session.id, ids, session.top_k)
        session.answer = answer
        return top, reading

    @cached_property
    def answer_tokenizer(self) -> AnswerTokenizer:
        """The byte path's tokenisation of answers (built on first use, in the worker)."""
        return AnswerTokenizer(self._backend.encode, self._backend.token_bytes)

    # --- Score: request/reply, no session --------------------------------------------------------

    async def _on_score(self, request: Request[wire.Score]) -> wire.Scored:
        """Score the targets, after every request queued before (the endpoint runs up to
        ``max_pending_scores`` of these at once and refuses more with ``busy``)."""
        if not request.reply:
            raise Moe2Error(ErrorCode.INVALID_FIELD, "a score needs a reply subject")
        refusal = score_refusal(request.message)
        if refusal is not None:
            raise refusal
        scored = await self._in_worker(partial(self._score, request.message), abandon=True)
        self._check_fits(scored)
        self.stats.scores += 1
        return scored

    def _score(self, score: wire.Score) -> wire.Scored:
        """Runs in the worker thread."""
        ids = self._prompt_ids(score.messages)
        top_k = min(score.top_k, self.config.max_top_k, self.info.vocab_size)
        return run_score(
            self._backend,
            ids,
            score,
            expert=self.config.expert_id,
            top_k=top_k,
            max_context=self.max_context,
            meter=self.meter,
            prefix=self._context_head,
        )

    def _check_fits(self, scored: wire.Scored) -> None:
        size, limit = len(wire.encode(scored)), self._nc.max_payload
        if limit and size > limit:
            raise Moe2Error(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the reply takes {size} bytes, over the server's max_payload of {limit}; "
                "ask for a smaller top_k or fewer targets",
            )

    async def _in_worker(self, call: partial[_T], *, abandon: bool = False) -> _T:
        """A model call other than a decode step: alone, in its turn, off the event loop.
        ``abandon``: on cancellation (the agent stopping) return at once and drop the result
        instead of waiting for the call."""
        return await self._scheduler.call(call, abandon=abandon)

    # --- publishing -------------------------------------------------------------------------------

    async def _publish_slice(
        self, session: _Session, step: int, top: TopK, reading: Reading
    ) -> None:
        pieces = [self._backend.token_bytes[int(i)] for i in top.ids]
        message = wire.make_slice(
            session=session.id,
            expert=self.config.expert_id,
            step=step,
            ids=top.ids,
            logprobs=top.logprobs,
            pieces=pieces,
            compute_s=reading.compute_s,
            energy_j=reading.energy_j,
            prompt_tokens=session.prompt_tokens if step == 0 else 0,
        )
        self.stats.slices += 1
        self.metrics.slices.inc()
        await self._publish(self.subjects.slice(session.id, self.config.expert_id), message)

    async def _reply_error(self, exc: Moe2Error, session: str, step: int, reply: str) -> None:
        """An error found while serving a session, counted by the endpoint of its message: to
        the message's reply subject if it had one, else on the session's slice subject."""
        endpoint = self._open_ep if step == 0 else self._step_ep
        route = ErrorRoute(self.subjects.slice(session, self.config.expert_id), session, step)
        await endpoint.reply_error(reply, exc, route)

    async def _publish(self, subject: str, message: wire.Message) -> None:
        await self._publish_bytes(subject, wire.encode(message))

    async def _publish_bytes(self, subject: str, data: bytes) -> None:
        await publish_or_log(self._nc, subject, data, logger=self._log)

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.heartbeat_s)
            if len(self.conversations):  # free the idle ones
                await self._in_worker(partial(self.conversations.expire))
            if self._idle_too_long():
                try:
                    await self._in_worker(partial(self._warm_up))
                except Exception:  # a failed re-measure keeps the old figures, not a dead expert
                    self._log.exception("remeasure_failed")
                    self.stats.measured_at = time.monotonic()
            await self._heartbeat()

    def _idle_too_long(self) -> bool:
        """Measured nothing for ``remeasure_idle_s`` and serving nothing: measure again, so that
        a figure taken on a busy box (or long ago) does not keep the expert out of S forever."""
        idle = self.config.remeasure_idle_s
        return (
            self.config.warmup
            and idle is not None
            and not self._sessions
            and time.monotonic() - self.stats.measured_at >= idle
        )

    async def _heartbeat(self) -> None:
        self._heartbeat_seq += 1
        message = wire.Heartbeat(
            expert=self.config.expert_id,
            model=self.model_label,
            tokenizer=self.info.tokenizer,
            backend=self.info.backend,
            vocab_size=self.info.vocab_size,
            eos_ids=list(self.info.eos_ids),
            quantisation=self.info.quantisation,
            device=self._device(),
            energy_source=self.meter.source,
            sessions=len(self._sessions),
            interval_s=self.config.heartbeat_s,
            seq=self._heartbeat_seq,
        )
        await self._publish(self.subjects.member(self.config.expert_id), message)

    def _device(self) -> wire.DeviceProfile:
        """The declared device with what this expert has measured (docs/protocol.md §4)."""
        declared = self.config.declared
        return wire.DeviceProfile(
            name=declared.name,
            power_w=declared.power_w,
            decode_s=round(self.stats.decode_s, 6),
            prefill_s_per_token=round(self.stats.prefill_s_per_token, 7),
            max_context=self.max_context,
            context=self.config.context_label,
            context_tokens=self.context_tokens if self.config.context else 0,
        )


async def serve_expert(url: str, config: ExpertConfig) -> None:
    """Load the model, join the bus at ``url`` and serve until cancelled, SIGINT or SIGTERM."""
    meter = choose_meter(config.device, config.energy_source)  # before the slow model load
    source = resolve_model(config.model, adapter=config.adapter)
    log.info("model_loading", model=source.name, path=str(source.path), backend=config.backend)
    load = partial(load_backend, config.backend, source, threads=config.threads)
    backend = await anyio.to_thread.run_sync(load)
    nc = await connect_nats(url, name=f"moe2-expert-{config.expert_id}")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on_signals, tg.cancel_scope)
            await tg.start(ExpertAgent(nc, backend, config, meter).run)
    finally:
        await close_nats(nc)
        log.info("expert_stopped", expert=config.expert_id)
