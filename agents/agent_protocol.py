"""A fusion agent as an agent of the Synadia Agent Protocol for NATS (``synadia-ai-agent-service``).

Any caller of that protocol (``synadia-ai-agents``' ``Agents.discover()``, the ``nats`` CLI)
finds moe2 on ``$SRV.INFO.agents`` and prompts it on ``agents.prompt.moe2.<owner>.<session>``.
Each prompt becomes an ordinary moe2 session: a :class:`~moe2.runtime.client.Client` on the
agent's own connection asks ``<prefix>.v1.prompt``, so the fusion agents' queue group serves it
like any client's, and every fused chunk goes back as a protocol ``response`` chunk. A moe2 error
becomes the protocol's error frame with its code and message (docs/discovery.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager

import structlog
from nats.aio.client import Client as NATS
from synadia_ai.agent_service import (
    DEFAULT_MAX_PAYLOAD,
    AgentService,
    PromptStream,
    RequestRejectedError,
)
from synadia_ai.agents import Envelope

from moe2.agents.discovery import registered
from moe2.runtime.client import Client
from moe2.runtime.errors import ErrorCode, Moe2Error

log = structlog.get_logger("moe2.agent_protocol")

AGENT_NAME = "moe2"
# the protocol's error codes (HTTP-like, 400-599) for moe2's codes; others are 500
PROTOCOL_CODES = {
    ErrorCode.INVALID_FIELD: 400,
    ErrorCode.EMPTY_PROMPT: 400,
    ErrorCode.PROMPT_TOO_LONG: 413,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.BUSY: 429,
    ErrorCode.NO_EXPERTS: 503,
    ErrorCode.TIMEOUT: 504,
}


class PromptBridge:
    """Turns one protocol prompt into one moe2 session and streams its chunks back."""

    def __init__(self, client: Client, *, max_tokens: int, timeout_s: float) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s

    async def __call__(self, envelope: Envelope, stream: PromptStream) -> None:
        answer = self.client.ask(
            envelope.prompt, max_tokens=self.max_tokens, timeout=self.timeout_s
        )
        try:
            async for chunk in answer:
                if chunk.text:
                    await stream.send(chunk.text)
        except Moe2Error as exc:
            log.info("agent_prompt_refused", code=str(exc.code), error=exc.message)
            code = PROTOCOL_CODES.get(exc.code, 500)
            raise RequestRejectedError(code, f"[{exc.code}] {exc.message}") from None


def agent_protocol_service(
    nc: NATS,
    *,
    prefix: str,
    owner: str,
    session_name: str,
    metadata: Mapping[str, str],
    max_concurrent: int,
    max_tokens: int,
    timeout_s: float,
) -> AbstractAsyncContextManager[AgentService | None]:
    """Registered as the agent ``moe2`` while inside; ``None`` (and a log line) when that failed."""

    def create() -> AgentService:
        service = AgentService(
            agent=AGENT_NAME,
            owner=owner,
            session_name=session_name,
            nc=nc,
            description="moe2: fused answers of a pool of small LLM experts",
            extra_metadata=dict(metadata),
            max_payload=f"{nc.max_payload // 1024}KB" if nc.max_payload else DEFAULT_MAX_PAYLOAD,
            max_concurrent_prompts=max_concurrent,
        )
        client = Client(nc, prefix=prefix)
        service.on_prompt(PromptBridge(client, max_tokens=max_tokens, timeout_s=timeout_s))
        return service

    return registered(create, f"agent protocol agent {AGENT_NAME}.{owner}.{session_name}")
