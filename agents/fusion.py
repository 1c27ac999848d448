"""The fusion agent: a queue-group member that turns prompts into fused, streamed answers."""

from __future__ import annotations

import time
import uuid

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from moe2.agents.fusion_config import FusionConfig
from moe2.agents.fusion_session import FusionSession, SessionPlan
from moe2.agents.membership import Membership, same_tokenizer
from moe2.agents.reselection import Reselector
from moe2.gating import Gate, UniformGate, top_k_weights
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats, flush_subscriptions
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import FUSION_QUEUE, Subjects
from moe2.selection import AllLive, SubsetSelector
from moe2.selection.live import LiveSelection

log = structlog.get_logger("moe2.fusion")


class FusionAgent:
    def __init__(
        self,
        nc: NATS,
        config: FusionConfig | None = None,
        *,
        gate: Gate | None = None,
        selector: SubsetSelector | None = None,
    ) -> None:
        self.nc = nc
        self.config = config or FusionConfig()
        self.subjects = Subjects(self.config.prefix)
        self.gate: Gate = gate or UniformGate()
        self.selector: SubsetSelector = selector or AllLive()
        # SMO on the live bus: re-selects on membership and cost changes, sees every slice
        self.live_selection = selector if isinstance(selector, LiveSelection) else None
        self.membership = Membership(self.config.missed_heartbeats)
        self.agent_id = f"fusion-{uuid.uuid4().hex[:8]}"
        self.sessions = 0
        self.served = 0
        self._members_changed = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        prompts = await self.nc.subscribe(self.subjects.prompt, queue=FUSION_QUEUE)
        members = await self.nc.subscribe(self.subjects.members)
        await flush_subscriptions(self.nc)
        log.info("fusion_ready", prompt=self.subjects.prompt)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_members, members)
                if self.live_selection is not None:
                    reselector = Reselector(
                        self.nc, self.subjects, self.membership, self.live_selection, self.agent_id
                    )
                    await tg.start(reselector.run)
                task_status.started()
                async for msg in prompts.messages:
                    self._dispatch(tg, msg)
        finally:
            with anyio.CancelScope(shield=True):
                await prompts.unsubscribe()
                await members.unsubscribe()

    async def _watch_members(self, sub: object) -> None:
        async for msg in sub.messages:  # type: ignore[attr-defined]  # nats Subscription
            try:
                hb = wire.decode(msg.data)
            except Moe2Error as exc:
                log.warning("bad_heartbeat", subject=msg.subject, code=str(exc.code))
                continue
            if not isinstance(hb, wire.Heartbeat) or msg.subject != self.subjects.member(hb.expert):
                log.warning("bad_heartbeat", subject=msg.subject, code="subject_mismatch")
                continue
            if self.membership.seen(hb, time.monotonic()):
                log.info("expert_joined", expert=hb.expert, model=hb.model, backend=hb.backend)
                self._members_changed.set()
                self._members_changed = anyio.Event()

    async def wait_for_experts(self, n: int, limit_s: float) -> list[str]:
        """Wait until at least ``n`` experts are live (for the demo and tests)."""
        with anyio.fail_after(limit_s):
            while len(live := self.membership.live(time.monotonic())) < n:
                await self._members_changed.wait()
        return sorted(live)

    def _dispatch(self, tg: TaskGroup, msg: Msg) -> None:
        started = time.monotonic()
        if not msg.reply:
            log.warning(
                "prompt_refused", code=str(ErrorCode.INVALID_FIELD), error="no reply subject"
            )
            return
        try:
            prompt = self._read_prompt(msg)
            if self.sessions >= self.config.max_sessions:
                raise Moe2Error(
                    ErrorCode.BUSY, f"at the limit of {self.config.max_sessions} sessions"
                )
        except Moe2Error as exc:
            log.warning("prompt_refused", code=str(exc.code), error=exc.message)
            tg.start_soon(self._refuse, msg.reply, exc)
            return
        self.sessions += 1
        tg.start_soon(self._serve, prompt, msg.reply, started)

    def _read_prompt(self, msg: Msg) -> wire.Prompt:
        prompt = wire.decode(msg.data)
        if not isinstance(prompt, wire.Prompt):
            raise Moe2Error(
                ErrorCode.UNKNOWN_TYPE, f"expected a prompt, got {type(prompt).__name__}"
            )
        check_prompt(prompt, self.config)
        return prompt

    async def _refuse(self, reply: str, exc: Moe2Error) -> None:
        if reply:
            await self.nc.publish(reply, wire.encode(wire.error_from(exc)))

    async def _serve(self, prompt: wire.Prompt, reply: str, started: float) -> None:
        try:
            plan = await self._plan(prompt, reply)
            await FusionSession(self.nc, self.subjects, self.config, plan).run(started)
        except Moe2Error as exc:
            await self._refuse(reply, exc)
        except Exception as exc:  # a handler's bug becomes an error reply, never a dead agent
            log.exception("session_crashed")
            await self._refuse(reply, Moe2Error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            self.sessions -= 1
            self.served += 1

    async def _plan(self, prompt: wire.Prompt, reply: str) -> SessionPlan:
        live = await self._live_experts()
        allowed = same_tokenizer(live, self.selector.select(sorted(live)))
        if not allowed:
            why = "no live expert may serve this prompt"
            if self.live_selection is not None and self.live_selection.choice.error:
                why += f": {self.live_selection.choice.error}"
            raise Moe2Error(ErrorCode.NO_EXPERTS, why)
        values = await anyio.to_thread.run_sync(self.gate.gate, prompt.messages, allowed)
        gated = [(e, v) for e, v in zip(allowed, values, strict=True) if v > 0]
        if not gated:
            raise Moe2Error(ErrorCode.NO_EXPERTS, "the gating gives no live expert any weight")
        k = prompt.experts or self.config.experts_per_prompt
        experts, weights = top_k_weights([e for e, _ in gated], [v for _, v in gated], k)
        first = live[experts[0]]
        observe = self.live_selection.observe if self.live_selection is not None else None
        return SessionPlan(
            session=uuid.uuid4().hex,
            prompt=prompt,
            reply=reply,
            experts=experts,
            weights=weights,
            vocab_size=first.vocab_size,
            eos_ids=frozenset(first.eos_ids),
            observe=observe,
        )

    async def _live_experts(self) -> dict[str, wire.Heartbeat]:
        live = self.membership.live(time.monotonic())
        if not live and self.config.wait_for_experts_s > 0:
            with anyio.move_on_after(self.config.wait_for_experts_s):
                await self.wait_for_experts(1, self.config.wait_for_experts_s)
            live = self.membership.live(time.monotonic())
        return live


def check_prompt(prompt: wire.Prompt, config: FusionConfig) -> None:
    """Refuse prompts no expert should see, with the code that says why."""
    if not prompt.messages or not any(m.content.strip() for m in prompt.messages):
        raise Moe2Error(ErrorCode.EMPTY_PROMPT, "the prompt is empty")
    chars = sum(len(m.content) for m in prompt.messages)
    if chars > config.max_prompt_chars:
        raise Moe2Error(
            ErrorCode.PROMPT_TOO_LONG,
            f"the prompt has {chars} characters; the limit is {config.max_prompt_chars}",
        )
    if not 1 <= prompt.max_tokens <= config.max_tokens_limit:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, f"max_tokens must be in 1..{config.max_tokens_limit}"
        )
    if not (prompt.temperature >= 0 and prompt.temperature < float("inf")):
        raise Moe2Error(ErrorCode.INVALID_FIELD, "temperature must be a finite number >= 0")
    if not 0 < prompt.top_p <= 1:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "top_p must be in (0, 1]")
    if prompt.seed is not None and not 0 <= prompt.seed < 2**63:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "seed must be in 0..2**63-1")
    if prompt.experts is not None and prompt.experts < 1:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "experts must be >= 1")


def load_gate(path: str | None) -> Gate:
    """The learned gating of a trained artifact, or equal weights when none is configured."""
    if path is None:
        return UniformGate()
    from pathlib import Path

    from moe2.gating.artifact import GatingArtifact, LearnedGate
    from moe2.gating.embed import load_embedder

    artifact = GatingArtifact.load(Path(path))
    log.info("gating_loaded", path=path, experts=artifact.expert_ids, embedder=artifact.embedder)
    return LearnedGate(artifact, load_embedder(artifact.embedder))


def load_selection(config: FusionConfig, gate: Gate | None = None) -> SubsetSelector | None:
    """SMO over the live experts when ``outputs`` is configured, else None (every live expert).
    ``gate``: the agent's loaded gate, whose embedder the loss oracle reuses."""
    if not config.selects or config.outputs is None or config.gate is None:
        return None
    from pathlib import Path

    from moe2.selection.costs import Budgets
    from moe2.selection.live import default_profiles
    from moe2.selection.profiles import load_profiles
    from moe2.selection.sources import oracle_from_outputs

    embedder = getattr(gate, "embedder", None)  # a LearnedGate's; UniformGate has none
    oracle = oracle_from_outputs(Path(config.outputs), Path(config.gate), embedder=embedder)
    paths = [Path(p) for p in config.profiles]
    profiles = load_profiles(paths) if paths else default_profiles()
    budgets = Budgets(dict(config.tau_s), config.energy_j)
    log.info("selection_loaded", experts=oracle.expert_ids, profiles=config.profiles)
    return LiveSelection(oracle, profiles, budgets, eps=config.select_eps, drift=config.drift)


async def serve_fusion(
    url: str,
    config: FusionConfig,
    *,
    task_status: TaskStatus[FusionAgent] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Connect and run one fusion agent until cancelled (``moe2 fusion``)."""
    gate = await anyio.to_thread.run_sync(load_gate, config.gate)
    selector = await anyio.to_thread.run_sync(load_selection, config, gate)
    nc = await connect_nats(url, name="moe2-fusion")
    try:
        agent = FusionAgent(nc, config, gate=gate, selector=selector)
        async with anyio.create_task_group() as tg:
            await tg.start(agent.run)
            task_status.started(agent)
    finally:
        await close_nats(nc)
