"""The interface every model backend implements, and the tokenizer helpers they share.

A backend is synchronous and pure of I/O: the expert agent calls it from one worker thread at a
time. It keeps one KV cache per session, keyed by the session id, decodes the pending steps of
several sessions in one call (``decode_batch``), and scores targets by teacher
forcing without touching any session. A ``PrefixCache`` (the KV cache of an expert's context)
lets prompts that start with the same head be computed from a copy of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Final, Literal, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import ChatMessage

TokenizerKind = Literal["byte_level", "sentencepiece", "other"]
_SP_SPACE: Final = "\u2581"  # sentencepiece's "▁"


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What an expert announces about its model in every heartbeat."""

    model: str
    tokenizer: str  # identity: "<name>:<16 hex digits>" (``tokenizer_identity``)
    backend: str
    vocab_size: int  # the width of the logits, so every id in a slice is below it
    eos_ids: tuple[int, ...]
    max_context: int  # the model's own context length
    quantisation: str = (
        ""  # the weights' precision: "Q4_1", "Q4_K_M", "bfloat16"... ("": not known)
    )


@dataclass(frozen=True, slots=True)
class TopK:
    """The ``k`` most likely next tokens: ids by descending probability, with log-probabilities.

    ``logprobs`` are natural logs of the full-vocabulary softmax, so ``1 - sum(exp(logprobs))`` is
    the probability mass outside the ``k`` ids.
    """

    ids: npt.NDArray[np.uint32]
    logprobs: npt.NDArray[np.float32]


class TargetLogprobs(NamedTuple):
    """One target's teacher-forced scores: ``logprobs[t] = log f(y_t | prompt, y_<t)``.

    Natural logs of the full-vocabulary softmax; ``top_ids``/``top_logprobs`` hold the ``k`` most
    likely tokens at each position (descending), ``(T, 0)`` when no top-k was asked for.
    """

    logprobs: npt.NDArray[np.float32]  # (T,)
    top_ids: npt.NDArray[np.uint32]  # (T, k)
    top_logprobs: npt.NDArray[np.float32]  # (T, k)


class DecodeRequest(NamedTuple):
    """One session's pending decode step in a batch: append ``token``, return ``top_k`` ids."""

    session: str
    token: int
    top_k: int


@dataclass(frozen=True, slots=True, eq=False)
class PrefixCache:
    """The KV cache of a fixed head of prompts (an expert's context), made by ``keep_prefix``.

    A prompt whose ids share a head with ``ids`` starts from a copy of the cache of that shared
    head; ``state`` is the backend's own object and is never changed after it is made.
    """

    ids: tuple[int, ...]
    state: object


class PrefillRequest(NamedTuple):
    """One new session's prefill in a batch (``prefill_batch``): ``Backend.prefill``'s arguments."""

    session: str
    prompt_ids: Sequence[int]
    top_k: int
    prefix: PrefixCache | None = None


class Backend(Protocol):
    """One loaded model. Synchronous; never called from two threads at once."""

    @property
    def info(self) -> BackendInfo: ...

    @property
    def token_bytes(self) -> Sequence[bytes]:
        """id -> the raw bytes the token decodes to (``b""`` for special tokens)."""
        ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt ids: the model's own chat template, with the assistant turn opened."""
        ...

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, no special tokens added."""
        ...

    def encode_answer(self, text: str) -> list[int]:
        """The ids of ``text`` as the assistant's answer right after ``encode_chat``'s open turn,
        as the model would write it (a Score target's tokens): a plain-text chat ends at
        ``Assistant:``, so there the answer carries its leading space."""
        ...

    def keep_prefix(self, ids: Sequence[int]) -> PrefixCache | None:
        """Compute the KV cache of ``ids`` once for reuse; None if this backend cannot reuse it."""
        ...

    def prefill(
        self,
        session: str,
        prompt_ids: Sequence[int],
        top_k: int,
        prefix: PrefixCache | None = None,
    ) -> TopK:
        """Start ``session`` (replacing any cache it had) and return the first token's top-k.

        With ``prefix``, the head that ``prompt_ids`` shares with it is copied, not recomputed.
        """
        ...

    def score(
        self,
        prompt_ids: Sequence[int],
        targets_ids: Sequence[Sequence[int]],
        top_k: int,
        prefix: PrefixCache | None = None,
    ) -> list[TargetLogprobs]:
        """Teacher-forced scores of each non-empty target as the continuation of the prompt.

        Equal (up to float rounding) to one forward pass over ``prompt + target`` per target;
        ``top_k`` 0 asks for no top-k. Sessions are not touched.
        """
        ...

    def decode(self, session: str, token: int, top_k: int) -> TopK:
        """Append ``token`` to ``session`` and return the next token's top-k."""
        ...

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[TopK]:
        """``decode`` for several distinct sessions at once, results in the requests' order:
        one batched forward pass where the backend can (their caches may hold different
        lengths), each result equal to the session's own ``decode`` within float rounding. An
        unknown or repeated session is refused (``unknown_session``, ``invalid_field``) before
        any cache changes."""
        ...

    def rewrite(self, session: str, ids: Sequence[int], top_k: int) -> TopK:
        """Make ``session`` hold exactly ``ids`` (its prompt, then its answer) and return the
        next token's top-k: keep the cached head ``ids`` shares with what it holds, cut the
        rest, feed the new tail (the byte path's append, docs/protocol.md §5)."""
        ...

    def release(self, session: str) -> None:
        """Free the session's KV cache; a no-op for an unknown session."""
        ...

    def rename(self, session: str, to: str) -> list[int]:
        """Move ``session``'s KV cache, as it is, under the session id ``to`` (releasing what
        ``to`` held) and return the ids it holds; ``unknown_session`` if there is none. An
        expert keeps a conversation's cache between turns this way (docs/conversations.md)."""
        ...


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common head of two id sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


PLAIN_CHAT_LABELS: Final = {"system": "", "user": "User: ", "assistant": "Assistant: "}


def plain_chat_answer(text: str) -> str:
    """An answer as it follows a plain-text chat's ``Assistant:``: after a space."""
    return text if text[:1].isspace() else " " + text


def plain_chat_text(messages: Sequence[ChatMessage]) -> str:
    """The chat as plain text, for a base model whose tokenizer has no chat template.

    Each message is a line, its content after a label (a system message: none, then a blank
    line), and the open assistant turn is ``Assistant:``, so the model's first token carries its
    own leading space: ``System text\\n\\nUser: Hi\\nAssistant: Hello\\nUser: Why?\\nAssistant:``.
    """
    unknown = sorted({m.role for m in messages} - PLAIN_CHAT_LABELS.keys())
    if unknown:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"roles {unknown} are not system, user, assistant")
    lines = [
        PLAIN_CHAT_LABELS[m.role] + m.content + ("\n" if m.role == "system" else "")
        for m in messages
    ]
    return "\n".join([*lines, "Assistant:"])


def tokenizer_identity(name: str, token_bytes: Sequence[bytes]) -> str:
    """``<name>:<16 hex digits>``, the first of the SHA-256 of the token-bytes table.

    The table is hashed in id order, 0 … V-1: each id's byte length as a uint32 little-endian,
    then its bytes (what a slice's ``pieces`` carries for it: ``b""`` for special tokens and
    for logit rows with no token). Equal hashes mean every id decodes to the same bytes, so
    experts can be fused by token id. docs/protocol.md §10 has a worked example.
    """
    digest = hashlib.sha256()
    for piece in token_bytes:
        digest.update(len(piece).to_bytes(4, "little"))
        digest.update(piece)
    return f"{name}:{digest.hexdigest()[:16]}"


@cache
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def byte_level_bytes(token: str) -> bytes | None:
    """A byte-level BPE token's bytes, or None if it holds a character outside the byte map."""
    table = _byte_decoder()
    if not all(ch in table for ch in token):
        return None
    return bytes(table[ch] for ch in token)


def sentencepiece_bytes(token: str) -> bytes:
    """A sentencepiece token's bytes: ``<0xNN>`` is one raw byte, ``▁`` is a space."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace(_SP_SPACE, " ").encode()


def prefill_batch(backend: Backend, requests: Sequence[PrefillRequest]) -> list[TopK]:
    """``prefill`` for several distinct new sessions, results in the requests' order: the
    backend's own ``prefill_batch(requests)`` where it has one (one batched forward pass, each
    result equal to the session's own ``prefill`` within float rounding), else one ``prefill``
    after another (ONNX Runtime, llama.cpp). A repeated session is refused (``invalid_field``)
    before any cache changes."""
    sessions = [r.session for r in requests]
    if len(set(sessions)) != len(sessions):
        raise Moe2Error(ErrorCode.INVALID_FIELD, "a prefill batch names a session twice")
    batched = getattr(backend, "prefill_batch", None)
    if batched is None or len(requests) < 2:
        return [backend.prefill(*r) for r in requests]
    tops: list[TopK] = batched(requests)
    return tops


def check_batch(requests: Sequence[DecodeRequest], known: Callable[[str], bool]) -> None:
    """Refuse a batch that names a session twice or one with no cache, before anything runs."""
    sessions = [r.session for r in requests]
    if len(set(sessions)) != len(sessions):
        raise Moe2Error(ErrorCode.INVALID_FIELD, "a decode batch names a session twice")
    for session in sessions:
        if not known(session):
            raise Moe2Error(ErrorCode.UNKNOWN_SESSION, f"no KV cache for session {session!r}")
