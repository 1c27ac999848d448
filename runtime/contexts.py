"""An expert's context: messages it puts before every conversation it serves.

Until domain experts exist, one small model under different contexts (a system prompt and a few
worked examples from one domain) makes a genuinely heterogeneous pool. ``moe2 expert --context
FILE`` reads one from a JSON file::

    {"name": "stem", "messages": [{"role": "system", "content": "..."}, ...]}

The heartbeat names it by ``label`` (``stem@1a2b3c4d``: the name and 8 hex digits of a SHA-256 of
the messages), so two experts with equal labels answer alike and the gating data can tell apart
experts whose contexts differ.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import ChatMessage

ROLES: Final = frozenset({"system", "user", "assistant"})
_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _ContextFile(msgspec.Struct, frozen=True):
    name: str
    messages: list[ChatMessage]


@dataclass(frozen=True, slots=True)
class ExpertContext:
    """A named list of messages; see the module docstring."""

    name: str
    messages: tuple[ChatMessage, ...]

    def __post_init__(self) -> None:
        check_context(self.name, self.messages)

    @property
    def label(self) -> str:
        return context_label(self.name, self.messages)


def check_context(name: str, messages: Sequence[ChatMessage]) -> None:
    """Refuse (ValueError) a context that names itself badly or holds nothing to say."""
    if not _NAME.match(name):
        raise ValueError(f"context name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    if not any(m.content for m in messages):
        raise ValueError(f"context {name!r} has no message with content")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"context message {i} has role {m.role!r}; use one of {sorted(ROLES)}")


def context_digest(messages: Sequence[ChatMessage]) -> str:
    """8 hex digits of a SHA-256 over the roles and contents, in order."""
    encoded = msgspec.json.encode([[m.role, m.content] for m in messages])
    return hashlib.sha256(encoded).hexdigest()[:8]


def context_label(name: str, messages: Sequence[ChatMessage]) -> str:
    """``name@digest``; ``""`` for no context."""
    return f"{name}@{context_digest(messages)}" if messages else ""


def save_context(context: ExpertContext, path: Path) -> None:
    """Write ``context`` in the format ``load_context`` (and ``moe2 expert --context``) reads."""
    data = _ContextFile(name=context.name, messages=list(context.messages))
    path.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2))


def load_context(path: Path) -> ExpertContext:
    """Read a context file; Moe2Error(INVALID_FIELD) that names the file and the fault."""
    try:
        parsed = msgspec.json.decode(path.read_bytes(), type=_ContextFile)
        return ExpertContext(name=parsed.name, messages=tuple(parsed.messages))
    except OSError as exc:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"cannot read {path}: {exc.strerror}") from None
    except (msgspec.DecodeError, ValueError) as exc:  # ValidationError is a DecodeError
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"{path} is not a context file ({exc}); expected "
            '{"name": "...", "messages": [{"role": "system", "content": "..."}, ...]}',
        ) from None
