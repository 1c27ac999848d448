"""The Hugging Face tokenizer of a model, for backends that run its weights elsewhere.

The ONNX Runtime and llama.cpp backends tokenise exactly as the transformers backend does: the
same tokenizer files (those of the float32 conversion of a GGUF file, or the model directory),
the same chat template, the same token-bytes table. So their ids, slices and tokenizer identity
equal the reference's, and experts on different backends fuse by id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from moe2.agents.expert.backends.base import (
    BackendInfo,
    plain_chat_answer,
    plain_chat_text,
    tokenizer_identity,
)
from moe2.agents.expert.backends.transformers_backend import (
    build_token_bytes,
    conversion_dir,
    eos_ids,
    load_model_and_tokenizer,
)
from moe2.agents.expert.models import ModelSource
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import ChatMessage


def reference_directory(source: ModelSource) -> Path:
    """The model as float32 safetensors with its tokenizer: the directory itself, or the
    transformers backend's conversion of the GGUF file (made now if it is not there yet)."""
    if source.adapter is not None:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, "LoRA adapters are served by the transformers backend only"
        )
    if source.format == "hf":
        return source.path
    target = conversion_dir(source)
    if not (target / "config.json").is_file():
        load_model_and_tokenizer(source)  # converts once and writes the cache
    if not (target / "config.json").is_file():
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"{source.path} could not be converted")
    return target


class ChatTokenizer:
    """Ids, chat prompts and the token-bytes table of one model, as the reference makes them."""

    def __init__(self, directory: Path, name: str) -> None:
        self._tokenizer: Any = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.config: Any = AutoConfig.from_pretrained(directory, local_files_only=True)
        self.vocab_size = int(self.config.get_text_config().vocab_size)
        self.token_bytes = build_token_bytes(self._tokenizer, self.vocab_size)
        self.identity = tokenizer_identity(name, self.token_bytes)
        self.eos_ids = eos_ids(
            SimpleNamespace(generation_config=_generation(directory)), self._tokenizer
        )
        self.max_context = int(self.config.get_text_config().max_position_embeddings)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if self._tokenizer.chat_template is None:  # a base model: plain text
            return self.encode_plain(plain_chat_text(messages))
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            ids = self._tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # jinja raises for roles or orders a template refuses
            raise Moe2Error(
                ErrorCode.INVALID_FIELD, f"the model's chat template refused the messages: {exc}"
            ) from None
        return [int(i) for i in ids]

    def encode_plain(self, text: str) -> list[int]:
        """``text`` as the tokenizer encodes it by default (with its BOS, if it adds one)."""
        return [int(i) for i in self._tokenizer.encode(text)]

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tokenizer.encode(text, add_special_tokens=False)]

    def encode_answer(self, text: str) -> list[int]:
        if self._tokenizer.chat_template is None:  # the answer follows "Assistant:"
            return self.encode(plain_chat_answer(text))
        return self.encode(text)


class TokenizedBackend:
    """The ``Backend`` members a backend with a ``ChatTokenizer`` gets from it and its info."""

    _tokenizer: ChatTokenizer
    _info: BackendInfo
    _sessions: dict[str, Any]

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def token_bytes(self) -> Sequence[bytes]:
        return self._tokenizer.token_bytes

    @property
    def sessions(self) -> int:
        """How many sessions hold a KV cache."""
        return len(self._sessions)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._tokenizer.encode_chat(messages)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def encode_answer(self, text: str) -> list[int]:
        return self._tokenizer.encode_answer(text)


def scored_targets(targets_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """A Score's targets as lists of ids; each must hold at least one token."""
    targets = [[int(i) for i in t] for t in targets_ids]
    if not all(targets):
        raise Moe2Error(ErrorCode.INVALID_FIELD, "every target needs at least one token")
    return targets


def _generation(directory: Path) -> Any:
    try:
        return GenerationConfig.from_pretrained(directory, local_files_only=True)
    except OSError:  # no generation_config.json: the model config's own ids
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        return GenerationConfig.from_model_config(config)
