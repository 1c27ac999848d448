"""The Hugging Face tokenizer of a model: one implementation for every backend, without torch.

Every backend tokenises with the functions here: the same tokenizer files (those of the float32
conversion of a GGUF file, or the model directory), the same chat template, the same token-bytes
table. So the ONNX Runtime and llama.cpp backends' ids, slices and tokenizer identity equal the
transformers backend's, and experts on different backends fuse by id.

Nothing here imports torch: a box that serves with ONNX Runtime or llama.cpp installs
``moe2[onnx]`` or ``moe2[llamacpp]`` without it (tests/test_torch_free.py). Only making the
float32 conversion of a GGUF file, once, takes torch (``moe2[models]``); ``reference_directory``
says so when it is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final

import transformers
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from moe2.agents.expert.backends.base import (
    BackendInfo,
    TokenizerKind,
    byte_level_bytes,
    plain_chat_answer,
    plain_chat_text,
    sentencepiece_bytes,
    tokenizer_identity,
)
from moe2.agents.expert.models import ModelSource, cache_root
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import ChatMessage

CACHE_FORMAT: Final = 1  # of the transformers backend's conversion cache (conversion_dir)


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
        try:
            from moe2.agents.expert.backends.transformers_backend import (
                load_model_and_tokenizer,
            )
        except ModuleNotFoundError as exc:  # a box without torch: the conversion is not there
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"{source.path.name} has no float32 conversion in {target.parent} yet, and "
                f"making it needs {exc.name}: pip install 'moe2[models]' once (or copy that "
                "cache from a box that has it)",
            ) from None
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
        return encode_chat(self._tokenizer, messages)

    def encode_plain(self, text: str) -> list[int]:
        return encode_plain(self._tokenizer, text)

    def encode(self, text: str) -> list[int]:
        return encode(self._tokenizer, text)

    def encode_answer(self, text: str) -> list[int]:
        return encode_answer(self._tokenizer, text)


# --- the encodings every backend shares (``tokenizer``: a Hugging Face tokenizer) -------------


def encode_chat(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """The prompt of a chat, the assistant's turn open: the model's chat template, or for a base
    model without one (Gemma-3-270M) the plain "User: ... Assistant:" text."""
    if tokenizer.chat_template is None:
        return encode_plain(tokenizer, plain_chat_text(messages))
    chat = [{"role": m.role, "content": m.content} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except Exception as exc:  # jinja raises for roles or orders a template refuses
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, f"the model's chat template refused the messages: {exc}"
        ) from None
    return [int(i) for i in ids]


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """``text`` as the tokenizer encodes it by default (with its BOS, if it adds one)."""
    return [int(i) for i in tokenizer.encode(text)]


def encode(tokenizer: Any, text: str) -> list[int]:
    """``text`` alone, no special tokens."""
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def encode_answer(tokenizer: Any, text: str) -> list[int]:
    """The ids of ``text`` as the assistant's answer right after ``encode_chat``'s open turn."""
    if tokenizer.chat_template is None:  # the answer follows "Assistant:"
        return encode(tokenizer, plain_chat_answer(text))
    return encode(tokenizer, text)


def eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The generation config's stop ids and the tokenizer's eos, in that order, once each."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    ids = [*ids, tokenizer.eos_token_id]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


# --- the token-bytes table -------------------------------------------------------------------


def tokenizer_kind(tokenizer: Any) -> TokenizerKind:
    """How the tokenizer's decoder turns token strings into bytes."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {part.get("type") for part in parts}
    if "ByteLevel" in types:
        return "byte_level"
    if types & {"ByteFallback", "Metaspace", "Replace"}:
        return "sentencepiece"
    return "other"


def build_token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """id -> raw bytes; ``b""`` for special tokens and for logit rows with no token."""
    kind = tokenizer_kind(tokenizer)
    added = tokenizer.added_tokens_decoder
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    table = [_piece(tokenizer, kind, i, token, added.get(i)) for i, token in enumerate(tokens)]
    return table + [b""] * (vocab_size - len(table))


def _piece(tokenizer: Any, kind: TokenizerKind, i: int, token: str | None, added: Any) -> bytes:
    if added is not None:
        return b"" if added.special else str(added.content).encode()
    if token is None:
        return b""
    if kind == "byte_level":
        raw = byte_level_bytes(token)
        if raw is not None:
            return raw
    if kind == "sentencepiece":
        return sentencepiece_bytes(token)
    return str(tokenizer.decode([i])).encode()


def conversion_dir(source: ModelSource) -> Path:
    """Where the transformers backend keeps the float32 conversion of this exact GGUF file
    (model and tokenizer files)."""
    st = source.path.stat()
    key = [CACHE_FORMAT, source.path.name, st.st_size, st.st_mtime_ns, transformers.__version__]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return cache_root() / "transformers" / f"{source.name}-{digest}"


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
