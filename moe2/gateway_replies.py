"""The bodies the gateway answers with: OpenAI's chat and text completions, their streamed
chunks, usage, and the ``moe2`` extension field built from the wire ``Chunk`` and ``Final``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from moe2.runtime import wire

FINISH_REASONS: Final = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(final: wire.Final) -> dict[str, int]:
    u = final.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def extension(final: wire.Final) -> dict[str, Any]:
    """``moe2``: the experts that wrote the answer, their weights, and how the session went."""
    return {
        "session": final.session,
        "experts": final.experts,
        "weights": final.weights,
        "finish_reason": final.finish_reason,
        "late": final.late,
        "dropped": final.dropped,
        "timings": msgspec.to_builtins(final.timings),
    }


@dataclass
class Reply:
    """One answer's bodies; ``chat`` picks chat.completion over text_completion shapes."""

    chat: bool
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def named(self, session: str) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{session}"

    def complete(self, final: wire.Final) -> dict[str, Any]:
        """The whole answer, not streamed."""
        finish = FINISH_REASONS.get(final.finish_reason, "stop")
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": final.text}
        else:
            choice["text"] = final.text
        body = self._head("chat.completion" if self.chat else "text_completion", [choice])
        return {**body, "usage": usage(final), "moe2": extension(final)}

    def delta(self, chunk: wire.Chunk, *, first: bool) -> dict[str, Any]:
        """A streamed piece of the answer; the first chat delta names the role. Its ``moe2``
        names, per token, the expert that weighed most for it (``Chunk.dominant``)."""
        body = self._chunk(self._choice(chunk.text, first=first, finish=None))
        return {**body, "moe2": {"dominant": chunk.dominant}}

    def last(self, final: wire.Final, *, first: bool) -> dict[str, Any]:
        """The chunk with the finish reason, and the ``moe2`` extension."""
        finish = FINISH_REASONS.get(final.finish_reason, "stop")
        return {
            **self._chunk(self._choice("", first=first, finish=finish)),
            "moe2": extension(final),
        }

    def usage_chunk(self, final: wire.Final) -> dict[str, Any]:
        """After the last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return {**self._chunk(None), "usage": usage(final)}

    def _choice(self, text: str, *, first: bool, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if not self.chat:
            return {**choice, "text": text}
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {**choice, "delta": delta if text or first else {}}

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        body = self._head(
            "chat.completion.chunk" if self.chat else "text_completion",
            [choice] if choice is not None else [],
        )
        return {**body, "usage": None} if self.include_usage else body

    def _head(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
