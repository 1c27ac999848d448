"""Every message on the bus: frozen, strict msgspec structs encoded as msgpack maps.

Each map carries ``type``, a tag with the protocol version in it (``moe2.v1.slice``). Token ids
and log-probabilities travel as packed little-endian arrays (uint32 / float32). Never pickle.
docs/protocol.md is the reference for other languages; keep it in step with this module.
"""

from __future__ import annotations

import math
import re
from typing import Any, TypeAlias

import msgspec
import numpy as np
import numpy.typing as npt

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.mixture import rest_mass

PROTOCOL_VERSION = 1
_TAG = re.compile(r"^moe2\.v(\d{1,9})\.[a-z_]+$")  # bounded: int() of 5,000 digits raises
MAX_HEARTBEAT_INTERVAL_S = 60.0  # an expert silent longer than this is not an expert
MAX_CONVERSATION_CHARS = 64  # a conversation id: one subject token, A-Z a-z 0-9 _ -
_CONVERSATION = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_CONVERSATION_CHARS}}}$")
MAX_STEP_DEADLINE_S = 60.0  # the longest per-step deadline a prompt may ask for


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every wire message; the subclass's tag is its ``type``."""


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


def valid_conversation(conversation: str | None) -> bool:
    """A conversation id is one subject token: 1-64 characters of A-Z a-z 0-9 _ - (or None)."""
    return conversation is None or bool(_CONVERSATION.match(conversation))


def check_conversation(conversation: str | None) -> None:
    """Raises ValueError for a bad id, which decoding reports as ``invalid_field``."""
    if not valid_conversation(conversation):
        raise ValueError(conversation_rule(str(conversation)))


def conversation_rule(conversation: str) -> str:
    return (
        f"conversation {conversation[:80]!r} must be 1-{MAX_CONVERSATION_CHARS} characters "
        "of A-Z a-z 0-9 _ - (one subject token)"
    )


def has_content(messages: list[ChatMessage]) -> bool:
    """A prompt needs at least one message whose content is not blank (else ``empty_prompt``)."""
    return any(m.content.strip() for m in messages)


class Prompt(_Message, frozen=True, tag="moe2.v1.prompt"):
    """Client -> fusion agents (queue group), with a reply inbox for the answer stream."""

    messages: list[ChatMessage]
    max_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    experts: int | None = None  # top-k experts by gating value; None: the agent's default
    # seconds each decode step waits for slices, in (0, MAX_STEP_DEADLINE_S]; None: the agent's
    step_deadline_s: float | None = None
    # a multi-turn conversation this prompt continues (docs/conversations.md); None: none
    conversation: str | None = None

    def __post_init__(self) -> None:
        check_conversation(self.conversation)


class Open(_Message, frozen=True, tag="moe2.v1.open"):
    """Fusion -> expert: prefill this prompt and publish the slice for step 0."""

    session: str
    messages: list[ChatMessage]
    top_k: int = 32
    max_tokens: int = 128
    conversation: str | None = None  # the Prompt's: keep and reuse its KV cache between turns

    def __post_init__(self) -> None:
        check_conversation(self.conversation)


class Step(_Message, frozen=True, tag="moe2.v1.step"):
    """Fusion -> expert: ``token`` was chosen at ``step - 1``; publish the slice for ``step``.

    In a session whose experts' tokenizers differ, ``text`` carries the chosen bytes instead and
    ``token`` is -1: the expert appends the bytes through its own tokenizer (docs/protocol.md §5).
    """

    session: str
    step: int
    token: int
    text: bytes | None = None  # the chosen candidate's bytes (byte path); None: append ``token``
    # speculation (docs/protocol.md §5, docs/speculative.md): append these ids after ``token``
    # in the same pass and publish a slice for each position, steps ``step`` … ``step + len``
    draft: list[int] = []
    propose: int = 0  # then draft this many more greedily, a slice for each (0: none)
    draft_text: list[bytes] = []  # the byte path's ``draft``: pieces to append after ``text``


class Close(_Message, frozen=True, tag="moe2.v1.close"):
    session: str
    reason: str = "done"


class Cancel(_Message, frozen=True, tag="moe2.v1.cancel"):
    """Client -> the fusion agent running ``session``, on ``<prefix>.v1.session.<sid>.cancel``:
    stop generating; the agent closes the experts and answers nothing more."""

    session: str
    reason: str = "client"


class Slice(_Message, frozen=True, tag="moe2.v1.slice"):
    """Expert -> fusion: the top-k of one expert's next-token distribution at one step."""

    session: str
    expert: str
    step: int
    ids: bytes  # uint32 little-endian, K of them
    logprobs: bytes  # float32 little-endian, K of them, natural log, descending
    rest: float  # probability mass outside the K ids: 1 - sum(exp(logprobs))
    pieces: list[bytes]  # the raw bytes each id decodes to ("" for special tokens)
    compute_s: float = 0.0
    energy_j: float = 0.0
    prompt_tokens: int = 0  # set on step 0
    more: int = 0  # slices of the same Step still to come after this one (speculation)

    def ids_array(self) -> npt.NDArray[np.uint32]:
        return np.frombuffer(self.ids, dtype="<u4")

    def logprobs_array(self) -> npt.NDArray[np.float32]:
        return np.frombuffer(self.logprobs, dtype="<f4")


DEVICE_PROFILE_VERSION = 1


class DeviceProfile(msgspec.Struct, frozen=True, kw_only=True):
    """A heartbeat's ``device``: what the expert runs on and what its compute costs, measured.

    ``profile`` is this map's own version. A receiver refuses (``invalid_field``) a missing field,
    one of the wrong type, a negative or non-finite figure, and a profile other than 1, so a
    renamed key is an error, never an expert silently left uncosted. Unknown keys are ignored.
    """

    profile: int = DEVICE_PROFILE_VERSION
    name: str  # the box, as declared
    power_w: float  # declared draw while computing
    decode_s: float  # moving average of one decode step's compute; 0: not measured yet
    prefill_s_per_token: float  # moving average of prefill compute per token; 0: not measured
    max_context: int  # the most tokens a prompt and its answer may take together
    context: str = ""  # ``<name>@<hash>`` of the expert's context; "" without one
    context_tokens: int = 0  # the shared head of every prompt (template start and context)

    def __post_init__(self) -> None:
        if self.profile != DEVICE_PROFILE_VERSION:
            raise ValueError(
                f"device profile v{self.profile}; this agent reads v{DEVICE_PROFILE_VERSION}"
            )
        figures = ("power_w", "decode_s", "prefill_s_per_token", "max_context", "context_tokens")
        values = {f: getattr(self, f) for f in figures}
        bad = [f for f, x in values.items() if not (math.isfinite(x) and x >= 0)]
        if bad:
            raise ValueError(f"device {', '.join(bad)} must be finite and >= 0")


class Heartbeat(_Message, frozen=True, tag="moe2.v1.heartbeat"):
    """Expert -> everyone, every ``interval_s``: who it is, what it serves, what it costs."""

    expert: str
    model: str
    tokenizer: str  # identity: name and a hash of the token bytes (backends.tokenizer_identity)
    backend: str
    vocab_size: int
    eos_ids: list[int]
    quantisation: str = ""  # the weights' precision: "Q4_1", "Q4_K_M", "bfloat16"... ("": unknown)
    device: DeviceProfile | None = None  # None: no profile, so never costed from heartbeats
    energy_source: str = "declared"
    sessions: int = 0
    interval_s: float = 1.0
    seq: int = 0

    def __post_init__(self) -> None:
        """Refused on decode (``invalid_field``): numbers no expert can mean."""
        if not 0 < self.interval_s <= MAX_HEARTBEAT_INTERVAL_S:
            raise ValueError(f"interval_s must be in (0, {MAX_HEARTBEAT_INTERVAL_S:g}] seconds")
        if self.vocab_size < 1:
            raise ValueError("vocab_size must be >= 1")
        if any(not 0 <= e < self.vocab_size for e in self.eos_ids):
            raise ValueError("every eos id must be below vocab_size")
        if self.sessions < 0 or self.seq < 0:
            raise ValueError("sessions and seq must be >= 0")


class Chunk(_Message, frozen=True, tag="moe2.v1.chunk"):
    """Fusion -> client: the next piece of the answer."""

    session: str
    index: int
    text: str
    tokens: list[int]
    # per id in ``tokens``: the expert whose weight x probability of it was largest ([]: unknown)
    dominant: list[str] = []


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int


class Timings(msgspec.Struct, frozen=True):
    ttft_s: float
    total_s: float
    tokens_per_s: float
    step_p50_ms: float
    step_p99_ms: float


class Final(_Message, frozen=True, tag="moe2.v1.final"):
    """Fusion -> client: the answer is complete."""

    session: str
    text: str
    finish_reason: str  # "eos", "stop" or "length"
    usage: Usage
    timings: Timings
    experts: list[str]
    weights: list[float]
    late: dict[str, int]  # expert -> slices that missed their step deadline
    dropped: list[str]  # experts dropped from the session for being late too often


class Score(_Message, frozen=True, tag="moe2.v1.score"):
    """Collector -> expert, request/reply: teacher-forced log-probabilities of each target.

    The expert builds the prompt exactly as for ``Open`` (its own chat template and context),
    appends each target's tokens as the assistant's answer and scores them in one forward pass.
    """

    messages: list[ChatMessage]
    targets: list[str]
    top_k: int = 0  # also return the top-k at every target position (0: none)


class TargetScore(msgspec.Struct, frozen=True):
    """One target's T tokens: ``log f_n(y_t | x, y_<t)`` and, if asked, the top-k per position."""

    ids: bytes  # uint32 little-endian, T
    logprobs: bytes  # float32 little-endian, T
    top_ids: bytes = b""  # uint32 little-endian, T x top_k, row-major
    top_logprobs: bytes = b""  # float32 little-endian, T x top_k

    def ids_array(self) -> npt.NDArray[np.uint32]:
        return np.frombuffer(self.ids, dtype="<u4")

    def logprobs_array(self) -> npt.NDArray[np.float32]:
        return np.frombuffer(self.logprobs, dtype="<f4")

    def top_arrays(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32]]:
        """(T, top_k) ids and log-probabilities; (T, 0) when none were asked for."""
        t = len(self.ids) // 4
        ids = np.frombuffer(self.top_ids, dtype="<u4")
        lps = np.frombuffer(self.top_logprobs, dtype="<f4")
        k = ids.size // t if t else 0
        return ids.reshape(t, k), lps.reshape(t, k)


class Scored(_Message, frozen=True, tag="moe2.v1.scored"):
    """Expert -> collector: the answer to a ``Score``, one entry per target in order."""

    expert: str
    prompt_tokens: int
    targets: list[TargetScore]
    compute_s: float = 0.0
    energy_j: float = 0.0


class SubsetAnnouncement(_Message, frozen=True, tag="moe2.v1.selection"):
    """Fusion agent -> operators, on ``<prefix>.v1.selection``: the subset S new sessions use."""

    agent: str  # the fusion agent's id (several may share the prompts)
    version: int  # counts up by one per choice of this agent
    reason: str  # what made it choose again: start, joined …, left …, drift …, refresh
    live: list[str]  # the live experts it chose from
    experts: list[str]  # S; empty when no subset meets the budgets (see error)
    loss: float | None = None  # predicted L(θ*, S), nats per gold token
    delay_s: dict[str, float] = {}  # predicted answer delay per application (eq. 8)
    energy_j: float | None = None  # predicted energy per answer (eq. 12)
    left_out: dict[str, str] = {}  # live experts not considered, and why
    error: str | None = None  # "[code] message" when no S could be chosen
    oracle_calls: int = 0
    solve_s: float = 0.0


class Error(_Message, frozen=True, tag="moe2.v1.error"):
    code: str
    message: str
    session: str = ""
    expert: str = ""
    step: int = -1


Message: TypeAlias = (
    Prompt
    | Open
    | Step
    | Close
    | Cancel
    | Slice
    | Heartbeat
    | Chunk
    | Final
    | Score
    | Scored
    | SubsetAnnouncement
    | Error
)
KNOWN_TYPES = frozenset(
    t.__struct_config__.tag
    for t in (
        Prompt,
        Open,
        Step,
        Close,
        Cancel,
        Slice,
        Heartbeat,
        Chunk,
        Final,
        Score,
        Scored,
        SubsetAnnouncement,
        Error,
    )
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


class _Envelope(msgspec.Struct):
    """What any message must have, read when the full decode fails: its ``type``."""

    type: Any = None


_envelope: msgspec.msgpack.Decoder[_Envelope] = msgspec.msgpack.Decoder(_Envelope)
# What a hostile body can make msgspec raise besides DecodeError: deep nesting, bad UTF-8 in a
# str, numbers beyond what a field holds.
_UNREADABLE = (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError, OverflowError)


def decode(data: bytes) -> Message:
    """Decode one message, or raise Moe2Error with the code that says what is wrong.

    Never raises anything else, whatever the bytes (docs/protocol.md §12 gives the order).
    """
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _classify(data, exc) from None
    except _UNREADABLE as exc:
        raise Moe2Error(ErrorCode.MALFORMED, f"not a msgpack message: {exc}") from None


def _classify(data: bytes, exc: msgspec.ValidationError) -> Moe2Error:
    try:
        tag = _envelope.decode(data).type
    except msgspec.ValidationError as why:
        return Moe2Error(ErrorCode.MALFORMED, f"a message must be a map: {why}")
    except _UNREADABLE as why:
        return Moe2Error(ErrorCode.MALFORMED, f"not a msgpack message: {why}")
    if not isinstance(tag, str):
        return Moe2Error(ErrorCode.INVALID_FIELD, "missing string field 'type'")
    match = _TAG.match(tag)
    if match and int(match.group(1)) != PROTOCOL_VERSION:
        return Moe2Error(
            ErrorCode.UNSUPPORTED_VERSION,
            f"{tag!r} is protocol v{match.group(1)}; this agent speaks v{PROTOCOL_VERSION}",
        )
    if tag not in KNOWN_TYPES:
        return Moe2Error(ErrorCode.UNKNOWN_TYPE, f"unknown message type {tag[:64]!r}")
    return Moe2Error(ErrorCode.INVALID_FIELD, f"{tag}: {exc}")


def make_slice(
    *,
    session: str,
    expert: str,
    step: int,
    ids: npt.NDArray[np.integer[Any]],
    logprobs: npt.NDArray[np.floating[Any]],
    pieces: list[bytes],
    compute_s: float = 0.0,
    energy_j: float = 0.0,
    prompt_tokens: int = 0,
    more: int = 0,
) -> Slice:
    """Pack a top-k slice; ``rest`` is computed from the log-probabilities."""
    lp = np.ascontiguousarray(logprobs, dtype="<f4")
    rest = rest_mass(np.exp(lp.astype(np.float64)))
    return Slice(
        session=session,
        expert=expert,
        step=step,
        ids=np.ascontiguousarray(ids, dtype="<u4").tobytes(),
        logprobs=lp.tobytes(),
        rest=rest,
        pieces=pieces,
        compute_s=compute_s,
        energy_j=energy_j,
        prompt_tokens=prompt_tokens,
        more=more,
    )


def check_slice(s: Slice, vocab_size: int | None = None) -> None:
    """Refuse a slice whose arrays disagree in length or hold NaN, inf or positive logprobs."""
    if len(s.ids) % 4 or len(s.logprobs) % 4 or len(s.ids) != len(s.logprobs) or not s.ids:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "ids and logprobs must be equal, non-empty arrays")
    if len(s.pieces) != len(s.ids) // 4:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "pieces must have one entry per id")
    # Python's max and set over K values: cheaper than numpy reductions at K = 32, and every
    # fused token checks one slice per expert (bench/bus_overhead.py). The float32 sum comes
    # first: it is not finite if any value is NaN or infinite, so max never sees a NaN.
    lp = s.logprobs_array()
    if not math.isfinite(float(lp.sum())) or max(lp.tolist()) > 1e-4 or not math.isfinite(s.rest):
        raise Moe2Error(ErrorCode.BAD_LOGPROBS, "logprobs must be finite and <= 0")
    if not -1e-4 <= s.rest <= 1.0 + 1e-4:
        raise Moe2Error(ErrorCode.BAD_LOGPROBS, f"rest mass {s.rest} is outside [0, 1]")
    ids = s.ids_array().tolist()
    if len(set(ids)) != len(ids):
        raise Moe2Error(ErrorCode.INVALID_FIELD, "a slice lists a token id twice")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"token id beyond the vocabulary ({vocab_size})")


def error_from(exc: Moe2Error, *, session: str = "", expert: str = "", step: int = -1) -> Error:
    return Error(code=str(exc.code), message=exc.message, session=session, expert=expert, step=step)
