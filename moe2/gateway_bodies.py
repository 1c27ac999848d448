"""The request bodies the gateway accepts, checked by pydantic, and the question each one asks
the fusion agents (the fields of a ``wire.Prompt``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from moe2.gateway_errors import ApiError
from moe2.runtime import wire
from moe2.runtime.client import Answer, Client

# Known OpenAI fields moe2 does not implement, and the values that ask for nothing (accepted).
# Any other value is refused with a 400 naming the field, rather than silently not done.
HARMLESS: Final[dict[str, tuple[Any, ...]]] = {
    "logprobs": (None, False),  # also 0, which equals False
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}
ROLES: Final = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class Moe2Options(BaseModel):
    """The request's extension field ``moe2`` (the openai client sends it with ``extra_body``)."""

    model_config = ConfigDict(extra="forbid")
    experts: int | None = Field(default=None, ge=1)  # the gate's top-k for this prompt
    timeout_s: float | None = Field(default=None, gt=0, le=3600)  # most seconds between messages
    # seconds each decode step waits for the experts' slices (the fusion agent's default: None)
    step_deadline_s: float | None = Field(default=None, gt=0, le=wire.MAX_STEP_DEADLINE_S)
    # the conversation this request's messages continue (docs/conversations.md)
    conversation: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def to_wire(self) -> wire.ChatMessage:
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return wire.ChatMessage(role=ROLES[self.role], content=text)


class RequestBody(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="allow")  # other fields are ignored, or refused (HARMLESS)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    moe2: Moe2Options | None = None

    def wire_messages(self) -> list[wire.ChatMessage]:
        raise NotImplementedError

    def answer_tokens(self) -> int | None:
        return self.max_tokens

    def question(self, defaults: QuestionDefaults) -> Question:
        """What to ask, or an ``ApiError`` (400) for a field moe2 cannot honour."""
        self._refuse_unsupported()
        options = self.moe2 or Moe2Options()
        return Question(
            messages=self.wire_messages(),
            max_tokens=self.answer_tokens() or defaults.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            experts=options.experts,
            timeout_s=options.timeout_s or defaults.timeout_s,
            step_deadline_s=options.step_deadline_s,
            conversation=options.conversation,
        )

    def _refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise ApiError.invalid("n must be 1: moe2 writes one answer per request", "n")
        for name, value in (self.model_extra or {}).items():
            if name in HARMLESS and value not in HARMLESS[name]:
                raise ApiError.invalid(f"{name} is not supported by moe2", name)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatBody(RequestBody):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def wire_messages(self) -> list[wire.ChatMessage]:
        return [m.to_wire() for m in self.messages]

    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(RequestBody):
    prompt: str | list[str]

    def wire_messages(self) -> list[wire.ChatMessage]:
        """The prompt as one user turn: experts answer in their own chat template."""
        if isinstance(self.prompt, str):
            return [wire.ChatMessage(role="user", content=self.prompt)]
        if len(self.prompt) != 1:
            raise ApiError.invalid("send one prompt per request, not a batch", "prompt")
        return [wire.ChatMessage(role="user", content=self.prompt[0])]


@dataclass(frozen=True)
class QuestionDefaults:
    """The gateway's answers to fields a request leaves out."""

    max_tokens: int = 128
    timeout_s: float = 120.0


@dataclass(frozen=True)
class Question:
    messages: list[wire.ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    experts: int | None
    timeout_s: float
    step_deadline_s: float | None = None
    conversation: str | None = None

    def ask(self, client: Client) -> Answer:
        return client.ask(
            self.messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
            experts=self.experts,
            timeout=self.timeout_s,
            step_deadline_s=self.step_deadline_s,
            conversation=self.conversation,
        )
