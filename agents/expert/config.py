"""How one expert agent runs (``ExpertConfig``) and what it counts (``ExpertStats``)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from moe2.agents.expert.adapters import resolve_adapter
from moe2.agents.expert.energy import SOURCES
from moe2.agents.expert.models import DEFAULT_MODEL, model_name
from moe2.runtime.contexts import check_context, context_label
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import DEFAULT_PREFIX, check_token
from moe2.runtime.wire import MAX_HEARTBEAT_INTERVAL_S, ChatMessage

DEFAULT_CONTEXT_NAME: Final = "context"


def _default_device() -> dict[str, Any]:
    return {"name": "cpu", "power_w": 15.0}


class DeclaredDevice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The device profile an expert is given (``moe2 expert --device-name --power-w``).

    ``name`` and ``power_w`` go into every heartbeat's ``device``; ``gpu_index`` picks the GPU
    whose NVML counter measures energy.
    """

    name: str
    power_w: float
    gpu_index: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.power_w) and self.power_w >= 0):
            raise ValueError("power_w must be finite and >= 0")
        if self.gpu_index < 0:
            raise ValueError("gpu_index must be >= 0")


def declared_device(device: Mapping[str, Any]) -> DeclaredDevice:
    """``device`` checked: an unknown key, a missing one or a wrong type is ``invalid_field``."""
    try:
        return msgspec.convert(device, DeclaredDevice, strict=True)
    except msgspec.ValidationError as exc:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"device profile: {exc}") from None


@dataclass(frozen=True)
class ExpertConfig:
    """How one expert runs. ``device`` is its declared profile (``power_w`` prices energy).

    An unknown key, a missing or mistyped one in ``device`` is refused (``invalid_field``): the
    expert does not start with a profile its heartbeats could not announce.

    ``context``: messages put before every conversation the expert serves, sessions and scores
    alike (e.g. a system prompt and worked examples); ``context_name`` names them in heartbeats.
    ``context_cache`` computes the context's KV cache once and starts every prompt from a copy.
    ``energy_source``: ``nvml``, ``rapl`` or ``declared`` (``device["power_w"]`` times compute
    time); None picks the best this box has (``agents.energy.choose_meter``).
    ``warmup``: one small prefill and a few decode steps before joining the bus, so the first
    heartbeat already announces a measured ``decode_s`` and ``prefill_s_per_token``.
    """

    expert_id: str
    model: str = DEFAULT_MODEL
    adapter: Path | None = None  # a LoRA adapter directory (moe2 experts finetune), merged in
    backend: str = "transformers"
    top_k: int = 32  # served when an Open asks for 0
    max_top_k: int = 1024  # the most ids one slice (or one Score position) holds
    max_context: int | None = None  # None: min(the model's, 4096)
    max_sessions: int = 32  # open sessions; an Open beyond them is refused with busy
    # continuous batching (docs/backends.md): at most this many sessions' decode steps in one
    # batched forward pass, and how long a batch waits for the steps of sessions expected to
    # step (their fusion agents answer a bus round trip after the last slice)
    max_batch: int = 16
    batch_gather_s: float = 0.005
    max_pending_scores: int = 32  # Score requests queued or running; more are answered busy
    idle_timeout_s: float = 120.0
    heartbeat_s: float = 1.0
    prefix: str = DEFAULT_PREFIX
    # torch threads. 1 by default: a box usually hosts several experts, and torch's own default
    # (every core, per process) oversubscribes it: four experts on this 2-core box announced
    # 5.8 s per decode step with it, 0.11-0.31 s with 1. None (``--threads 0``): torch's default,
    # for a box that hosts one expert.
    threads: int | None = 1
    device: dict[str, Any] = field(default_factory=_default_device)
    context: tuple[ChatMessage, ...] = ()
    context_name: str = DEFAULT_CONTEXT_NAME
    context_cache: bool = True
    energy_source: str | None = None
    warmup: bool = True
    remeasure_idle_s: float | None = 30.0  # idle this long: warm up again (None: never)
    metrics_port: int | None = None  # serve /metrics on this port (0: any free one; None: off)
    discovery: bool = True  # $SRV.PING/INFO/STATS as the micro service moe2-expert
    # conversations (docs/conversations.md): the KV caches kept between turns, least recently
    # used evicted first: at most this many, holding at most this many tokens together, each
    # freed after this long without a turn. 0 conversations: keep none.
    max_conversations: int = 16
    conversation_tokens: int = 8192
    conversation_idle_s: float = 600.0
    declared: DeclaredDevice = field(init=False, repr=False, compare=False)  # ``device``, checked

    def __post_init__(self) -> None:
        check_token("expert id", self.expert_id)
        if self.adapter is not None:
            base = model_name(self.model)
            object.__setattr__(self, "adapter", resolve_adapter(self.adapter, base))
        object.__setattr__(self, "declared", declared_device(self.device))
        if not 1 <= self.top_k <= self.max_top_k:
            raise ValueError(f"top_k {self.top_k} must be between 1 and max_top_k {self.max_top_k}")
        for name in (
            "max_sessions",
            "max_pending_scores",
            "max_batch",
            "idle_timeout_s",
            "heartbeat_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_conversations", "conversation_tokens", "conversation_idle_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0 <= self.batch_gather_s <= 1:
            raise ValueError("batch_gather_s must be between 0 and 1")
        if self.heartbeat_s > MAX_HEARTBEAT_INTERVAL_S:
            raise ValueError(f"heartbeat_s must be at most {MAX_HEARTBEAT_INTERVAL_S:g}")
        if self.energy_source is not None and self.energy_source not in SOURCES:
            raise ValueError(f"energy_source must be one of {', '.join(SOURCES)} (or unset)")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be at least 2")
        object.__setattr__(self, "context", tuple(self.context))  # a list is welcome too
        if self.context:
            check_context(self.context_name, self.context)

    @property
    def power_w(self) -> float:
        return self.declared.power_w

    @property
    def context_label(self) -> str:
        """``name@hash`` of the context (``""`` without one), as heartbeats announce it."""
        return context_label(self.context_name, self.context)


@dataclass(slots=True)
class ExpertStats:
    """Counters a user can read (and metrics can export)."""

    slices: int = 0
    scores: int = 0  # Scored replies sent
    decode_s: float = 0.0  # moving average of one decode step's compute time
    prefill_s_per_token: float = 0.0  # moving average of prefill compute time per token computed
    measured_at: float = 0.0  # time.monotonic() of the last measurement

    def note_decode(self, compute_s: float) -> None:
        self.decode_s = _moving_average(self.decode_s, compute_s)
        self.measured_at = time.monotonic()

    def note_prefill(self, compute_s: float, tokens: int) -> None:
        per_token = compute_s / max(1, tokens)
        self.prefill_s_per_token = _moving_average(self.prefill_s_per_token, per_token)
        self.measured_at = time.monotonic()


def _moving_average(average: float, value: float) -> float:
    """Exponential, weight 0.1 on the new value; the first value starts it."""
    return value if not average else 0.9 * average + 0.1 * value
