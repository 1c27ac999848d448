"""``moe2 profile``'s bus half: drive one live expert through sessions and time every step.

It speaks the wire protocol as a fusion agent does (docs/protocol.md §5): wait for the expert's
heartbeat, then per prompt length open a session, step it ``decode_steps`` times with the
expert's own greedy token and close it. Each slice gives the expert's ``compute_s`` and
``energy_j``; the wall time from publishing to the slice's arrival, minus compute, is the
transmission and bus overhead. Prompts are repeated common words, calibrated by two probe
sessions (tokens = overhead + rate * words) so a prompt of L tokens can be asked for.
``selection/profiling.py`` fits and writes the result.

Run it on a quiet expert: other sessions on the same expert (or box) slow its steps down.
"""

from __future__ import annotations

import itertools
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from tqdm import tqdm

from moe2.runtime import wire
from moe2.runtime.connection import flush_subscriptions, nats_connection
from moe2.runtime.endpoint import Endpoint, Request, publisher_named_by
from moe2.runtime.errors import ErrorCode, Moe2Error, error_code
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects
from moe2.selection.profiling import ExpertProfile, StepSample, fit_profile

log = structlog.get_logger("moe2.profiler")

DEFAULT_LENGTHS: Final = (16, 32, 64, 128, 256, 512, 1024, 2048)
_TEXT: Final = (
    "the sea and the sky were grey over the old town while people walked along the water "
    "talking about work and weather and what they would eat for dinner that night"
)
_CYCLE: Final = len(_TEXT.split())
_PROBE_WORDS: Final = (8, 8 + 2 * _CYCLE)  # two whole cycles apart: the mean rate, exactly
_CONTEXT_MARGIN: Final = 8  # tokens kept free below max_context for calibration error

Note = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ProfilerConfig:
    expert: str
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    decode_steps: int = 8
    repeats: int = 3
    prefix: str = DEFAULT_PREFIX
    wait_s: float = 10.0  # for the expert's heartbeat
    step_timeout_s: float = 300.0  # for one slice (a long prefill on a slow box takes a while)
    top_k: int = 32  # ids per slice, as a fusion agent asks
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError("lengths must be positive token counts")
        if self.decode_steps < 1 or self.repeats < 1:
            raise ValueError("decode_steps and repeats must be at least 1")


@dataclass(frozen=True, slots=True)
class PromptScale:
    """Prompt tokens = ``overhead`` + ``per_word`` * words, from two probe sessions."""

    overhead: float
    per_word: float

    def words_for(self, tokens: int) -> int:
        return max(1, round((tokens - self.overhead) / self.per_word))

    def shortest(self) -> int:
        return round(self.overhead + self.per_word)


def prompt_of(words: int) -> list[wire.ChatMessage]:
    """A user message of ``words`` common words (the same text every time)."""
    text = " ".join(itertools.islice(itertools.cycle(_TEXT.split()), words))
    return [wire.ChatMessage("user", text)]


def clip_lengths(lengths: Sequence[int], max_context: int, decode_steps: int) -> list[int]:
    """Sorted, distinct lengths, none above what fits with the decode steps in the context."""
    limit = max_context - decode_steps - _CONTEXT_MARGIN
    return sorted({min(length, limit) for length in lengths})


class Profiler:
    """One expert, one session at a time, over one connection."""

    def __init__(self, nc: NATS, config: ProfilerConfig, note: Note) -> None:
        self.nc, self.config, self.note = nc, config, note
        self.subjects = Subjects(config.prefix)

    async def heartbeat(self) -> wire.Heartbeat:
        """The expert's next heartbeat; Moe2Error(no_experts) if none comes in ``wait_s``."""
        expert, wait_s = self.config.expert, self.config.wait_s
        silent = Moe2Error(
            ErrorCode.NO_EXPERTS,
            f"expert {expert!r} sent no heartbeat within {wait_s:g} s "
            f"(is it running, with prefix {self.config.prefix!r}?)",
        )
        heard: list[wire.Heartbeat] = []
        arrived = anyio.Event()

        async def on_heartbeat(request: Request[wire.Heartbeat]) -> None:
            heard.append(request.message)
            arrived.set()

        member = self.subjects.member(expert)
        watch = Endpoint(
            self.nc,
            "members",
            member,
            wire.Heartbeat,
            on_heartbeat,
            identity=publisher_named_by("expert"),
        )
        sub = await watch.subscribe()
        try:
            with anyio.move_on_after(wait_s):
                await arrived.wait()
        finally:
            await sub.unsubscribe()
        if not heard:
            raise silent
        return heard[0]

    async def calibrate(self) -> PromptScale:
        """Two probe sessions (prefill only) measure the template overhead and tokens per word."""
        few, many = _PROBE_WORDS
        short = await self.prompt_tokens(few)
        long = await self.prompt_tokens(many)
        if long <= short:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"expert {self.config.expert!r} reported {short} and {long} prompt tokens for "
                f"prompts of {few} and {many} words: without a growing prompt_tokens in its "
                "step-0 slices, prompt lengths cannot be measured",
            )
        per_word = (long - short) / (many - few)
        return PromptScale(overhead=short - per_word * few, per_word=per_word)

    async def prompt_tokens(self, words: int) -> int:
        samples = await self.session(words, decode_steps=0)
        return samples[0].prompt_tokens

    async def measure(self, lengths: Sequence[int], scale: PromptScale) -> list[StepSample]:
        """``repeats`` sessions per length, with a progress bar."""
        runs = [length for length in lengths for _ in range(self.config.repeats)]
        samples: list[StepSample] = []
        with tqdm(runs, desc="profile", unit="session", disable=not self.config.progress) as bar:
            for length in bar:
                bar.set_postfix(tokens=length)
                samples += await self.session(scale.words_for(length), self.config.decode_steps)
        return samples

    async def session(self, words: int, decode_steps: int) -> list[StepSample]:
        """Open, step ``decode_steps`` times, close; one sample per slice."""
        sid = uuid.uuid4().hex
        sub = await self.nc.subscribe(self.subjects.session_slices(sid))
        await flush_subscriptions(self.nc)  # slice 0 must find the subscription
        try:
            return await self._steps(sid, sub, words, decode_steps)
        finally:
            with anyio.CancelScope(shield=True):
                await self._send(
                    self.subjects.expert_close(self.config.expert), wire.Close(session=sid)
                )
                await sub.unsubscribe()

    async def _steps(self, sid: str, sub: Any, words: int, decode_steps: int) -> list[StepSample]:
        messages, top_k, expert = prompt_of(words), self.config.top_k, self.config.expert
        step_subject = self.subjects.expert_step(expert)
        open_ = wire.Open(session=sid, messages=messages, top_k=top_k, max_tokens=decode_steps + 1)
        first, wall_s = await self._round_trip(sub, self.subjects.expert_open(expert), open_, 0)
        samples = [_sample(sid, first, first.prompt_tokens, wall_s)]
        latest = first
        for step in range(1, decode_steps + 1):
            token = int(latest.ids_array()[0])
            request = wire.Step(session=sid, step=step, token=token)
            latest, wall_s = await self._round_trip(sub, step_subject, request, step)
            samples.append(_sample(sid, latest, first.prompt_tokens, wall_s))
        return samples

    async def _round_trip(
        self, sub: Any, subject: str, message: wire.Message, step: int
    ) -> tuple[wire.Slice, float]:
        started = time.perf_counter()
        await self._send(subject, message)
        reply = await self._next_slice(sub, step)
        return reply, time.perf_counter() - started

    async def _send(self, subject: str, message: wire.Message) -> None:
        await self.nc.publish(subject, wire.encode(message))

    async def _next_slice(self, sub: Any, step: int) -> wire.Slice:
        expert, timeout_s = self.config.expert, self.config.step_timeout_s
        late = Moe2Error(
            ErrorCode.TIMEOUT,
            f"expert {expert!r} sent no slice for step {step} within {timeout_s:g} s",
        )
        msg = await _next_msg(sub, timeout_s, late)
        return _slice_of(wire.decode(msg.data), expert, step)


async def _next_msg(sub: Any, timeout_s: float, silence: Moe2Error) -> Msg:
    """The subscription's next message, or ``silence`` raised after ``timeout_s``."""
    try:
        msg: Msg = await sub.next_msg(timeout=timeout_s)
    except nats.errors.TimeoutError:
        raise silence from None
    return msg


def _slice_of(reply: wire.Message, expert: str, step: int) -> wire.Slice:
    """The slice for ``step``, or the Moe2Error the expert's reply stands for."""
    if isinstance(reply, wire.Error):
        raise Moe2Error(error_code(reply.code), f"expert {expert}: {reply.message}")
    if not isinstance(reply, wire.Slice):
        raise Moe2Error(ErrorCode.UNKNOWN_TYPE, f"expert {expert} answered with {type(reply)}")
    if reply.step != step:
        raise Moe2Error(ErrorCode.WRONG_STEP, f"expected slice {step}, got {reply.step}")
    return reply


def _sample(session: str, reply: wire.Slice, prompt_tokens: int, wall_s: float) -> StepSample:
    return StepSample(session, prompt_tokens, reply.step, reply.compute_s, reply.energy_j, wall_s)


async def profile_expert(url: str, config: ProfilerConfig, note: Note) -> ExpertProfile:
    """Measure the expert at ``url`` and fit its profile; ``note`` hears what a user should."""
    async with nats_connection(url, name=f"moe2-profile-{config.expert}") as nc:
        profiler = Profiler(nc, config, note)
        heartbeat = await profiler.heartbeat()
        note(_introduction(heartbeat))
        lengths = _lengths(config, heartbeat, note)
        scale = await profiler.calibrate()
        if lengths[0] < scale.shortest():
            note(
                f"the shortest prompt this expert takes is about {scale.shortest()} tokens "
                "(its chat template and context): shorter lengths are measured there"
            )
        samples = await profiler.measure(lengths, scale)
    fit, points = fit_profile(samples)
    return ExpertProfile(
        expert=config.expert,
        model=heartbeat.model,
        backend=heartbeat.backend,
        device=heartbeat.device.name if heartbeat.device else "unknown",
        energy_source=heartbeat.energy_source,
        host=socket.gethostname(),
        measured_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        fit=fit,
        points=tuple(points),
    )


def _introduction(heartbeat: wire.Heartbeat) -> str:
    device = heartbeat.device
    where = "an undeclared device"
    if device is not None:
        where = f"{device.name}, max context {device.max_context} tokens"
    return (
        f"expert {heartbeat.expert}: {heartbeat.model} ({heartbeat.backend}) on {where}; "
        f"energy source: {heartbeat.energy_source}"
    )


def _lengths(config: ProfilerConfig, heartbeat: wire.Heartbeat, note: Note) -> list[int]:
    max_context = heartbeat.device.max_context if heartbeat.device else None
    if max_context is None:
        note("the expert announces no device profile: prompt lengths are not clipped")
        lengths = sorted(set(config.lengths))
    else:
        lengths = clip_lengths(config.lengths, max_context, config.decode_steps)
        if max(config.lengths) > lengths[-1]:
            note(
                f"prompt lengths above {lengths[-1]} tokens clipped to {lengths[-1]} (the "
                f"expert's max_context is {max_context}, and {config.decode_steps} decode steps "
                "follow the prompt)"
            )
    if len(lengths) < 2:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, f"the fit needs two or more prompt lengths, got {lengths}"
        )
    return lengths
