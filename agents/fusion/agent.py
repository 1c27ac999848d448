"""The fusion agent: a queue-group member that turns prompts into fused, streamed answers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from moe2.agents.agent_protocol import agent_protocol_service
from moe2.agents.discovery import FUSION_SERVICE, Served, as_metadata, micro_service
from moe2.agents.fusion.config import FusionConfig
from moe2.agents.fusion.conversations import ConversationRouter
from moe2.agents.fusion.limits import PromptRate, client_of
from moe2.agents.fusion.membership import Membership, probe_expert, same_tokenizer, vocabulary_of
from moe2.agents.fusion.reselection import Reselector
from moe2.agents.fusion.session import (
    ALIVE_HEADER,
    ALIVE_SUFFIX,
    FusionSession,
    SessionCounters,
    SessionPlan,
)
from moe2.agents.metrics import FusionMetrics
from moe2.gating import Gate, UniformGate, top_k_experts
from moe2.runtime import wire
from moe2.runtime.auth import NatsAuth
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.endpoint import Endpoint, EndpointStats, Request, publisher_named_by
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.metrics import EndpointCollector, serve_metrics
from moe2.runtime.subjects import FUSION_QUEUE, Subjects
from moe2.selection import AllLive, SubsetSelector
from moe2.selection.costs import Budgets
from moe2.selection.live import LiveSelection
from moe2.selection.profiles import Profiles

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
        self.prompt_rate = PromptRate(self.config.prompt_rate_per_s, self.config.prompt_burst)
        self.agent_id = f"fusion-{uuid.uuid4().hex[:8]}"
        self.sessions = 0
        self.served = 0
        self._members_changed = anyio.Event()
        self._tg: TaskGroup | None = None
        self.prompt_endpoint = Endpoint(
            nc, "prompt", self.subjects.prompt, wire.Prompt, self._on_prompt, queue=FUSION_QUEUE
        )
        self.session_counters = SessionCounters.of(self.subjects)
        self.members_endpoint = Endpoint(
            nc,
            "members",
            self.subjects.members,
            wire.Heartbeat,
            self._on_heartbeat,
            identity=publisher_named_by("expert"),
        )
        self.metrics = FusionMetrics(
            CollectorRegistry(),
            max_sessions=self.config.max_sessions,
            sessions=lambda: self.sessions,
            live=lambda: len(self.membership.live(time.monotonic())),
            selection=self.live_selection,
        )
        self.metrics.registry.register(EndpointCollector(self.endpoint_stats))
        self.metrics_port: int | None = None  # where /metrics is served, once running
        self.conversations = ConversationRouter(self.metrics.registry)  # docs/conversations.md

    def endpoint_stats(self) -> list[EndpointStats]:
        """Every subject this agent serves, its sessions' slice and cancel subjects included."""
        counters = self.session_counters
        return [
            self.prompt_endpoint.stats,
            self.members_endpoint.stats,
            counters.slices,
            counters.cancels,
        ]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with (
            serve_metrics(self.metrics.registry, self.config.metrics_port) as self.metrics_port,
            anyio.create_task_group() as tg,
        ):
            self._tg = tg
            await tg.start(self.members_endpoint.serve)
            if self.live_selection is not None:
                reselector = Reselector(
                    self.nc, self.subjects, self.membership, self.live_selection, self.agent_id
                )
                await tg.start(reselector.run)
            await tg.start(self.prompt_endpoint.serve)
            if self.config.discovery:
                await tg.start(self._discoverable)
            log.info("fusion_ready", prompt=self.subjects.prompt)
            task_status.started()

    async def _discoverable(self, *, task_status: TaskStatus[None]) -> None:
        """Registered on ``$SRV`` and as a protocol agent until cancelled (docs/discovery.md)."""
        config = self.config
        async with (
            micro_service(
                self.nc, FUSION_SERVICE, "moe2 fusion agent", self.describe, self.served_endpoints
            ),
            agent_protocol_service(
                self.nc,
                prefix=config.prefix,
                owner=config.agent_owner,
                session_name=config.prefix,
                metadata=as_metadata(self.settings()),
                max_concurrent=config.max_sessions,
                max_tokens=config.agent_max_tokens,
                timeout_s=config.prefill_deadline_s + 60,
            ),
        ):
            task_status.started()
            await anyio.sleep_forever()

    def settings(self) -> dict[str, object]:
        """What this agent is set to do: the prefix, gate, k, selection and its budgets (those
        of the live selection it runs, else the configured ones)."""
        config = self.config
        smo = self.live_selection
        budgets = smo.budgets if smo is not None else Budgets(config.tau_s, config.energy_j)
        return {
            "prefix": config.prefix,
            "gate": config.gate or "uniform",
            "k": config.experts_per_prompt or "all",
            "slice_k": config.slice_k,
            "selection": "smo" if config.selects or smo is not None else "all-live",
            "tau_s": dict(budgets.tau_s),
            "energy_j": budgets.energy_j,
            "fusion_path": config.fusion_path,
            "step_deadline_s": config.step_deadline_s,
            "max_sessions": config.max_sessions,
        }

    def describe(self) -> dict[str, object]:
        """``$SRV`` metadata: the settings, this agent's id and what it serves now."""
        live = len(self.membership.live(time.monotonic()))
        return {
            **self.settings(),
            "agent": self.agent_id,
            "experts": live,
            "sessions": self.sessions,
        }

    def served_endpoints(self) -> list[Served]:
        return [
            Served(s, FUSION_QUEUE if s is self.prompt_endpoint.stats else "")
            for s in self.endpoint_stats()
        ]

    async def _on_heartbeat(self, request: Request[wire.Heartbeat]) -> None:
        hb = request.message
        notice = getattr(self.gate, "notice_expert", None)  # a LearnedGate warns on a new model
        if notice is not None:
            notice(hb.expert, hb.model, hb.tokenizer)
        if self.membership.seen(hb, time.monotonic()):
            if self._tg is None:  # not serving (a unit test): no bus to probe it on
                self._joined(hb)
            else:  # selectable once it answered on its own subject (docs/security.md)
                self._tg.start_soon(self._probe, hb)

    async def _probe(self, hb: wire.Heartbeat) -> None:
        failure = await probe_expert(self.nc, self.subjects, hb.expert)
        if failure:
            self.membership.refuse(hb.expert, time.monotonic())
            log.warning("expert_probe_failed", expert=hb.expert, error=failure)
        elif self.membership.admit(hb.expert):
            self._joined(hb)

    def _joined(self, hb: wire.Heartbeat) -> None:
        self.membership.admit(hb.expert)
        log.info(
            "expert_joined",
            expert=hb.expert,
            model=hb.model,
            quantisation=hb.quantisation,
            backend=hb.backend,
        )
        self._members_changed.set()
        self._members_changed = anyio.Event()

    async def wait_for_experts(self, n: int, limit_s: float) -> list[str]:
        """Wait until at least ``n`` experts are live (for the demo and tests)."""
        with anyio.fail_after(limit_s):
            while len(live := self.membership.live(time.monotonic())) < n:
                await self._members_changed.wait()
        return sorted(live)

    async def _on_prompt(self, request: Request[wire.Prompt]) -> None:
        """Check the prompt and start its session; a refusal is the client's Error."""
        started = time.monotonic()
        if not request.reply:
            raise Moe2Error(ErrorCode.INVALID_FIELD, "a prompt needs a reply subject")
        check_prompt(request.message, self.config)
        client = client_of(request.reply.removesuffix(ALIVE_SUFFIX))
        self.prompt_rate.take(client, started)  # busy past its rate
        if self.sessions >= self.config.max_sessions:
            raise Moe2Error(ErrorCode.BUSY, f"at the limit of {self.config.max_sessions} sessions")
        assert self._tg is not None, "the endpoints serve inside run()"
        self.sessions += 1
        self._tg.start_soon(self._serve, request.message, request.reply, started)

    async def _refuse(self, reply: str, exc: Moe2Error) -> None:
        await self.prompt_endpoint.reply_error(reply, exc)

    async def _serve(self, prompt: wire.Prompt, reply: str, started: float) -> None:
        done = False
        session: FusionSession | None = None

        def ended(failure: str = "") -> None:
            """Once: the session is over for the client (its clean-up may go on a moment)."""
            nonlocal done
            if not done:
                done = True
                self.sessions -= 1
                self.served += 1
                self.metrics.session_ended(session.machine if session else None, failure)

        keepalive = reply.endswith(ALIVE_SUFFIX)  # the client asked for keepalives
        if keepalive:  # taken: the client need not ask another fusion agent (docs/faults.md)
            await self._alive(reply)
        try:
            plan = await self._plan(prompt)
            self.metrics.planned(plan.experts, plan.weights)
            observe = self.live_selection.observe if self.live_selection is not None else None
            session = FusionSession(
                self.nc,
                self.subjects,
                self.config,
                plan,
                reply,
                started,
                observe,
                ended,
                self.session_counters,
                gone=self._expert_gone,
                keepalive=keepalive,
            )
            await session.run()
        except Moe2Error as exc:
            ended(str(exc.code))
            await self._refuse(reply, exc)
        except Exception as exc:  # a handler's bug becomes an error reply, never a dead agent
            log.exception("session_crashed")
            ended(str(ErrorCode.INTERNAL))
            await self._refuse(reply, Moe2Error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            ended()

    async def _alive(self, reply: str) -> None:
        try:
            await self.nc.publish(reply, b"", headers={ALIVE_HEADER: "1"})
        except Exception as exc:  # the bus failed, not the agent
            log.warning("keepalive_failed", error=repr(exc))

    def _expert_gone(self, expert: str) -> None:
        """A session found ``expert`` not there any more (no responders, or no answer to a
        probe): not selectable until it answers a probe again (docs/faults.md)."""
        if self.membership.gone(expert, time.monotonic()):
            log.warning("expert_gone", expert=expert)

    async def choose(
        self, messages: Sequence[wire.ChatMessage], k: int | None = None
    ) -> tuple[dict[str, wire.Heartbeat], list[str], list[float]]:
        """The live experts, and for this prompt the gate's top-k of S (the selection over
        them) with their renormalised weights (Algorithm 3, eq. 28): what a session will use."""
        live = await self._live_experts()
        allowed = self.selector.select(sorted(live))
        if self.config.fusion_path == "ids":  # today's rule: one tokenizer, the most common
            allowed = same_tokenizer(live, allowed)
        if not allowed:
            why = "no live expert may serve this prompt"
            if self.live_selection is not None and self.live_selection.choice.error:
                why += f": {self.live_selection.choice.error}"
            raise Moe2Error(ErrorCode.NO_EXPERTS, why)
        values = await anyio.to_thread.run_sync(self.gate.gate, list(messages), allowed)
        gated = [(e, v) for e, v in zip(allowed, values, strict=True) if v > 0]
        if not gated:
            raise Moe2Error(ErrorCode.NO_EXPERTS, "the gating gives no live expert any weight")
        k = k or self.config.experts_per_prompt
        experts, weights = top_k_experts([e for e, _ in gated], [v for _, v in gated], k)
        return live, experts, weights

    async def _plan(self, prompt: wire.Prompt) -> SessionPlan:
        live, experts, weights = await self.conversations.choose(
            prompt, self._live_experts, self.choose
        )
        first = live[experts[0]]
        vocabularies = {e: vocabulary_of(live[e]) for e in experts}
        one = len({v.tokenizer for v in vocabularies.values()}) == 1
        return SessionPlan(
            session=uuid.uuid4().hex,
            prompt=prompt,
            experts=experts,
            weights=weights,
            vocab_size=first.vocab_size,
            eos_ids=frozenset(first.eos_ids),
            fusion_path="ids" if one and self.config.fusion_path != "bytes" else "bytes",
            vocabularies=vocabularies,
        )

    async def _live_experts(self) -> dict[str, wire.Heartbeat]:
        self.membership.expire(time.monotonic())  # forget the silent: the table stays bounded
        live = self.membership.live(time.monotonic())
        if not live and self.config.wait_for_experts_s > 0:
            with anyio.move_on_after(self.config.wait_for_experts_s):
                await self.wait_for_experts(1, self.config.wait_for_experts_s)
            live = self.membership.live(time.monotonic())
        return live


def check_prompt(prompt: wire.Prompt, config: FusionConfig) -> None:
    """Refuse prompts no expert should see, with the code that says why."""
    if not wire.has_content(prompt.messages):
        raise Moe2Error(ErrorCode.EMPTY_PROMPT, "the prompt is empty")
    chars = sum(len(m.content) for m in prompt.messages) + sum(len(s) for s in prompt.stop)
    if chars > config.max_prompt_chars:
        raise Moe2Error(
            ErrorCode.PROMPT_TOO_LONG,
            f"the prompt has {chars} characters (messages and stop strings); "
            f"the limit is {config.max_prompt_chars}",
        )
    if not 1 <= prompt.max_tokens <= config.max_tokens_limit:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, f"max_tokens must be in 1..{config.max_tokens_limit}"
        )
    if not (prompt.temperature >= 0 and prompt.temperature < float("inf")):
        raise Moe2Error(ErrorCode.INVALID_FIELD, "temperature must be a finite number >= 0")
    if not 0 < prompt.top_p <= 1:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "top_p must be in (0, 1]")
    if prompt.seed is not None and prompt.seed < 0:  # msgpack caps it at 2**64-1
        raise Moe2Error(ErrorCode.INVALID_FIELD, "seed must be in 0..2**64-1")
    if len(prompt.stop) > config.max_stop_strings:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, f"at most {config.max_stop_strings} stop strings are allowed"
        )
    if prompt.experts is not None and prompt.experts < 1:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "experts must be >= 1")
    deadline = prompt.step_deadline_s
    if deadline is not None and not 0 < deadline <= wire.MAX_STEP_DEADLINE_S:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"step_deadline_s must be in (0, {wire.MAX_STEP_DEADLINE_S:g}] seconds",
        )


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


def load_live_selection(
    config: FusionConfig, gate: Gate | None = None, profiles: Profiles | None = None
) -> SubsetSelector | None:
    """SMO over the live experts when ``outputs`` is configured, else None (every live expert).
    ``gate``: the agent's loaded gate, whose embedder the loss oracle reuses; ``profiles``:
    costs already read (a pool file's), instead of ``config.profiles``."""
    if not config.selects or config.outputs is None or config.gate is None:
        return None
    from pathlib import Path

    from moe2.selection.costs import Budgets
    from moe2.selection.live import default_profiles
    from moe2.selection.profiles import load_profiles
    from moe2.selection.sources import oracle_from_outputs

    embedder = getattr(gate, "embedder", None)  # a LearnedGate's; UniformGate has none
    oracle = oracle_from_outputs(Path(config.outputs), Path(config.gate), embedder=embedder)
    if profiles is None:
        paths = [Path(p) for p in config.profiles]
        profiles = load_profiles(paths) if paths else default_profiles()
    budgets = Budgets(dict(config.tau_s), config.energy_j)
    log.info("selection_loaded", experts=oracle.expert_ids, profiles=config.profiles)
    return LiveSelection(oracle, profiles, budgets, eps=config.select_eps, drift=config.drift)


async def serve_fusion(
    url: str,
    config: FusionConfig,
    *,
    profiles: Profiles | None = None,
    auth: NatsAuth | None = None,
    task_status: TaskStatus[FusionAgent] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Connect and run one fusion agent until cancelled (``moe2 fusion``); ``profiles``: SMO's
    costs when already read, instead of ``config.profiles``; ``auth``: its NATS credentials
    (default: ``MOE2_NATS_*``)."""
    gate = await anyio.to_thread.run_sync(load_gate, config.gate)
    selector = await anyio.to_thread.run_sync(load_live_selection, config, gate, profiles)
    nc = await connect_nats(url, name="moe2-fusion", auth=auth)
    try:
        agent = FusionAgent(nc, config, gate=gate, selector=selector)
        async with anyio.create_task_group() as tg:
            await tg.start(agent.run)
            task_status.started(agent)
    finally:
        await close_nats(nc)
