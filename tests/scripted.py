"""A scripted expert for fusion tests: speaks the wire protocol, misbehaves on request.

Its tokenizer is bytes: token id = byte value, 0 = EOS, so answers are easy to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS

from moe2.runtime import wire
from moe2.runtime.endpoint import Endpoint, Request
from moe2.runtime.subjects import Subjects

VOCAB = 256


@dataclass
class Script:
    text: bytes = b"Hello from the bus."
    confidence: float = 0.6
    delay_s: float = 0.0  # every step, prefill included
    vanish_at: int | None = None  # from this step on: no slices, no heartbeats
    nan_at: int | None = None  # NaN logprobs at this step
    open_error: str | None = None  # answer the open with this error code
    context: int | None = None  # answer steps from here on with prompt_too_long
    forge: bool = False  # also publish forged and wrong-step slices
    heartbeat_s: float = 0.2
    compute_s: float = 0.001  # what its slices report as measured compute time
    served: list[str] = field(default_factory=list)  # sessions opened here
    tokenizer: str = "bytes"  # the identity it announces (another one forces the byte path)
    steps: list[wire.Step] = field(default_factory=list)  # every Step received


class ScriptedExpert:
    def __init__(self, nc: NATS, expert: str, script: Script, prefix: str = "moe2") -> None:
        self.nc, self.expert, self.script, self.s = nc, expert, script, Subjects(prefix)
        self.gone = False
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for verb, subject, expects in (
                ("open", self.s.expert_open(self.expert), wire.Open),
                ("step", self.s.expert_step(self.expert), wire.Step),
            ):
                endpoint = Endpoint[Any](
                    self.nc, verb, subject, expects, self._on_message, agent=self.expert
                )
                await tg.start(endpoint.serve)
            tg.start_soon(self._heartbeat)
            task_status.started()

    async def _on_message(self, request: Request[Any]) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._answer, request.message)

    async def _heartbeat(self) -> None:
        seq = 0
        while not self.gone:
            hb = wire.Heartbeat(
                expert=self.expert,
                model="scripted",
                tokenizer=self.script.tokenizer,
                backend="script",
                vocab_size=VOCAB,
                eos_ids=[0],
                seq=seq,
                interval_s=self.script.heartbeat_s,
            )
            await self.nc.publish(self.s.member(self.expert), wire.encode(hb))
            seq += 1
            await anyio.sleep(self.script.heartbeat_s)

    async def _answer(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.Open):
            self.script.served.append(msg.session)
            if self.script.open_error:
                err = wire.Error(
                    code=self.script.open_error,
                    message="scripted refusal",
                    session=msg.session,
                    expert=self.expert,
                    step=0,
                )
                await self.nc.publish(self.s.slice(msg.session, self.expert), wire.encode(err))
                return
            await self._slice(msg.session, 0)
        elif isinstance(msg, wire.Step):
            self.script.steps.append(msg)
            await self._slice(msg.session, msg.step)

    async def _slice(self, session: str, step: int) -> None:
        sc = self.script
        if sc.vanish_at is not None and step >= sc.vanish_at:
            self.gone = True
            return
        await anyio.sleep(sc.delay_s)
        if sc.context is not None and step >= sc.context:
            err = wire.Error(
                code="prompt_too_long",
                message="context full",
                session=session,
                expert=self.expert,
                step=step,
            )
            await self.nc.publish(self.s.slice(session, self.expert), wire.encode(err))
            return
        want = sc.text[step] if step < len(sc.text) else 0
        others = [t for t in (ord("x"), ord("y"), ord("z")) if t != want]
        ids = np.array([want, *others])
        probs = np.array([sc.confidence, *[(1 - sc.confidence) / 4] * 3])
        lp = np.log(probs)
        if sc.nan_at == step:
            lp[1] = np.nan
        pieces = [bytes([i]) if i else b"" for i in ids]
        s = wire.make_slice(
            session=session,
            expert=self.expert,
            step=step,
            ids=ids,
            logprobs=lp,
            pieces=pieces,
            compute_s=sc.compute_s,
        )
        if sc.forge:
            forged = wire.make_slice(
                session=session,
                expert="intruder",
                step=step,
                ids=np.array([ord("!")]),
                logprobs=np.zeros(1),
                pieces=[b"!"],
            )
            await self.nc.publish(self.s.slice(session, "intruder"), wire.encode(forged))
            await self.nc.publish(self.s.slice(session, self.expert), wire.encode(forged))
            ahead = wire.make_slice(
                session=session,
                expert=self.expert,
                step=step + 5,
                ids=np.array([ord("!")]),
                logprobs=np.zeros(1),
                pieces=[b"!"],
            )
            await self.nc.publish(self.s.slice(session, self.expert), wire.encode(ahead))
        await self.nc.publish(self.s.slice(session, self.expert), wire.encode(s))
