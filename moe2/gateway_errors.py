"""How a failure reaches an OpenAI client: one HTTP status and error type per moe2 error code,
in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` (docs/gateway.md)."""

from __future__ import annotations

from typing import Any, Final

from moe2.runtime.errors import ErrorCode, Moe2Error

INVALID: Final = "invalid_request_error"

# Every code of runtime/errors.py, and what the gateway answers for it.
HTTP_STATUS: Final[dict[ErrorCode, tuple[int, str]]] = {
    ErrorCode.INVALID_FIELD: (400, INVALID),
    ErrorCode.EMPTY_PROMPT: (400, INVALID),
    ErrorCode.MALFORMED: (400, INVALID),
    ErrorCode.UNSUPPORTED_VERSION: (400, INVALID),
    ErrorCode.PROMPT_TOO_LONG: (413, INVALID),
    ErrorCode.PAYLOAD_TOO_LARGE: (413, INVALID),
    ErrorCode.BUSY: (429, "rate_limit_error"),
    ErrorCode.NO_FUSION_AGENT: (503, "service_unavailable_error"),
    ErrorCode.NO_EXPERTS: (503, "service_unavailable_error"),
    ErrorCode.INFEASIBLE: (503, "service_unavailable_error"),
    ErrorCode.UNREACHABLE: (503, "service_unavailable_error"),
    ErrorCode.TIMEOUT: (504, "timeout_error"),
    ErrorCode.NO_SLICES: (504, "timeout_error"),
    # an agent on the bus answered something it should not have
    ErrorCode.UNKNOWN_TYPE: (502, "server_error"),
    ErrorCode.UNKNOWN_SESSION: (502, "server_error"),
    ErrorCode.WRONG_STEP: (502, "server_error"),
    ErrorCode.NOT_IN_SESSION: (502, "server_error"),
    ErrorCode.BAD_LOGPROBS: (502, "server_error"),
    ErrorCode.TRACE_DIVERGED: (502, "server_error"),
    ErrorCode.FUSION_LOST: (502, "server_error"),  # the fusion agent stopped mid-answer
    ErrorCode.NO_ENERGY_METER: (500, "server_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}
RETRY_LATER: Final = frozenset({429, 503})  # answered with ``Retry-After``


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``status``, ``type``, ``param`` and ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    @classmethod
    def invalid(cls, message: str, param: str | None) -> ApiError:
        """A 400 for a field of the request (``invalid_field``), naming it."""
        return cls(400, message, param=param, code=str(ErrorCode.INVALID_FIELD))

    @classmethod
    def of(cls, exc: Moe2Error) -> ApiError:
        """The answer to a moe2 error, by the table."""
        status, type_ = HTTP_STATUS.get(exc.code, HTTP_STATUS[ErrorCode.INTERNAL])
        return cls(status, exc.message, type=type_, code=str(exc.code))

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"} if self.status in RETRY_LATER else {}
