"""Stable error codes carried on the wire, and the exception that carries one in Python."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable, documented error codes (docs/protocol.md). Never renumber or rename one."""

    MALFORMED = "malformed"  # not msgpack, or not a map
    UNKNOWN_TYPE = "unknown_type"  # type tag not known to this version
    UNSUPPORTED_VERSION = "unsupported_version"  # a moe2.vN type tag with N != 1
    INVALID_FIELD = "invalid_field"  # a field missing, of the wrong type or out of range
    UNKNOWN_SESSION = "unknown_session"
    WRONG_STEP = "wrong_step"  # a step or slice for a step the receiver is not at
    NOT_IN_SESSION = "not_in_session"  # a slice from an expert the session did not open
    EMPTY_PROMPT = "empty_prompt"
    PROMPT_TOO_LONG = "prompt_too_long"  # longer than the model's context
    PAYLOAD_TOO_LARGE = "payload_too_large"  # over the server's max_payload
    BAD_LOGPROBS = "bad_logprobs"  # NaN, inf or positive log-probabilities
    NO_EXPERTS = "no_experts"  # no live expert may serve this prompt
    NO_FUSION_AGENT = "no_fusion_agent"  # nobody listens on the prompt subject
    FUSION_LOST = "fusion_lost"  # the fusion agent serving an answer stopped mid-answer
    NO_SLICES = "no_slices"  # a step passed its deadline with no slice at all
    BUSY = "busy"  # the agent is at its session limit
    TRACE_DIVERGED = "trace_diverged"  # a replay expert was asked for a path its trace lacks
    UNREACHABLE = "unreachable"  # no NATS server at the URL
    TIMEOUT = "timeout"
    INFEASIBLE = "infeasible"  # no subset of experts meets the delay and energy budgets
    NO_ENERGY_METER = "no_energy_meter"  # the energy source asked for cannot be read on this box
    INTERNAL = "internal"


def error_code(code: str) -> ErrorCode:
    """The code a peer sent; one this version does not know reads as ``internal``."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL


class Moe2Error(Exception):
    """An error with a stable code and a human message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
