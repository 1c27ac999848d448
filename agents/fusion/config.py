"""Fusion agent settings, from defaults, a TOML file, or both."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from moe2.runtime.errors import ErrorCode, Moe2Error

FUSION_PATHS = ("auto", "bytes", "ids")
MAX_SPECULATE = 16  # draft tokens a round (an expert takes up to 32 in one Step)


@dataclass(frozen=True)
class FusionConfig:
    prefix: str = "moe2"
    experts_per_prompt: int | None = None  # top-k experts by gating value; None: all of S
    slice_k: int = 32  # K: ids per expert slice
    step_deadline_s: float = 2.0  # a decode step's slices must arrive within this
    prefill_deadline_s: float = 60.0  # the step-0 slices (prefill) within this
    # once the first step-0 slice is in after e s, the others get max(step_deadline_s, this × e)
    prefill_grace: float = 2.0
    max_consecutive_late: int = 3  # this many late steps in a row drops an expert
    max_sessions: int = 64  # concurrent sessions per fusion agent; more get "busy"
    max_prompt_chars: int = 100_000  # the messages' content and the stop strings, together
    max_stop_strings: int = 16
    max_tokens_limit: int = 4096
    missed_heartbeats: int = 2  # an expert this many of its heartbeat intervals silent is gone
    # prompts per client (its reply inbox's prefix): a burst, refilled at a rate; more get
    # "busy" (agents/fusion/limits.py, docs/security.md); prompt_rate_per_s = 0: no limit
    prompt_rate_per_s: float = 16.0
    prompt_burst: int = 32
    wait_for_experts_s: float = 0.0  # on a prompt with no live experts, wait this long
    gate: str | None = None  # a trained gating artifact (directory); None: equal weights
    # SMO (Algorithm 2) chooses S when ``outputs`` is set: the store the gate was trained on
    outputs: str | None = None
    profiles: tuple[str, ...] = ()  # profile TOML files; unprofiled experts use their heartbeats
    tau_s: dict[str, float] = field(default_factory=dict)  # delay limit per application (eq. 9)
    energy_j: float | None = None  # energy budget per answer (eq. 12)
    select_eps: float = 1e-4  # SMO's ε, nats per gold token
    drift: float = 0.25  # re-select when an expert's measured decode time drifts this much
    # how a session fuses (docs/protocol.md §7, §10): "auto" by token id when its experts share
    # one tokenizer, else by bytes; "bytes" always by bytes; "ids" only experts of one tokenizer
    fusion_path: str = "auto"
    # speculative fusion (docs/speculative.md): the drafter proposes this many tokens a round
    # and the others verify them (by id: in one pass each); 0: plain step-by-step fusion
    speculate: int = 0
    metrics_port: int | None = None  # serve /metrics on this port (0: any free one; None: off)
    # $SRV.PING/INFO/STATS as the micro service moe2-fusion, and an agent of the Synadia Agent
    # Protocol (agents.prompt.moe2.<agent_owner>.<prefix>) answering agent_max_tokens at most
    discovery: bool = True
    agent_owner: str = "moe2"
    agent_max_tokens: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "profiles", tuple(self.profiles))  # a TOML list is welcome
        if self.fusion_path not in FUSION_PATHS:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"fusion_path must be one of {', '.join(FUSION_PATHS)}, not {self.fusion_path!r}",
            )
        if not 0 <= self.speculate <= MAX_SPECULATE:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD, f"speculate must be in 0..{MAX_SPECULATE} draft tokens"
            )
        if self.missed_heartbeats < 1:
            raise Moe2Error(ErrorCode.INVALID_FIELD, "missed_heartbeats must be >= 1")
        if self.outputs is not None and self.gate is None:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                "selection needs the gate that was trained on the outputs: set gate too",
            )

    @property
    def selects(self) -> bool:
        """Whether SMO chooses S (else every live expert may take part)."""
        return self.outputs is not None

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> FusionConfig:
        """Defaults, then the ``[fusion]`` table of a TOML file, then non-None overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                values.update(tomllib.loads(path.read_text()).get("fusion", {}))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise Moe2Error(ErrorCode.INVALID_FIELD, f"cannot read {path}: {exc}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"unknown fusion settings: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)
