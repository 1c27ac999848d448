"""The ONNX Runtime backend: the model exported to ONNX (``onnx_export``), float32 or dynamic int8.

Each session keeps its KV cache as numpy arrays, one key and one value per layer, fed back as
the graph's ``past`` inputs at the next step; a rewrite cuts them to the shared head. Tokenising
is the reference's (``chat_tokenizer``), so ids and tokenizer identity equal the transformers
backend's. ``onnxruntime`` runs it on the CPU; on an NVIDIA box install ``onnxruntime-gpu``
instead and the CUDA provider is used first.

``decode_batch`` decodes its sessions one after another (a documented fallback, no speed-up):
the graph is traced with a batch of one, and a batched graph would need a new export with a
batch axis and left-padded masks (docs/backends.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog

from moe2.agents.expert.backends.base import (
    BackendInfo,
    DecodeRequest,
    PrefixCache,
    TargetLogprobs,
    TopK,
    check_batch,
    common_prefix,
)
from moe2.agents.expert.backends.chat_tokenizer import (
    ChatTokenizer,
    TokenizedBackend,
    reference_directory,
    scored_targets,
)
from moe2.agents.expert.backends.logits import teacher_forced, top_k_of
from moe2.agents.expert.backends.onnx_export import Precision, exported
from moe2.agents.expert.models import ModelSource
from moe2.runtime.errors import ErrorCode, Moe2Error

log = structlog.get_logger("moe2.backend")

NAME: Final = "onnxruntime"
Past = list[npt.NDArray[np.float32]]


@dataclass(slots=True)
class _Session:
    ids: list[int]  # what the cache holds
    past: Past


class OnnxBackend(TokenizedBackend):
    """An ONNX Runtime session over an exported model; implements ``Backend``."""

    def __init__(
        self,
        model_file: Path,
        tokenizer: ChatTokenizer,
        *,
        name: str,
        precision: Precision,
        threads: int | None = None,
    ) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = [p for p in ort.get_available_providers() if p in _PREFERRED]
        self._session = ort.InferenceSession(str(model_file), options, providers=providers)
        self._tokenizer = tokenizer
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        self._layers = sum(1 for name in inputs if name.startswith("past.")) // 2
        shape = inputs["past.0.key"]  # (1, heads, held, head_dim)
        self._empty = np.zeros((1, int(shape[1]), 0, int(shape[3])), dtype=np.float32)
        self._sessions: dict[str, _Session] = {}
        # Dynamic int8 quantises each call's activations with one scale, and the first
        # position's are far larger than the rest (an attention sink): computed with the others,
        # it would cost them their precision.
        self._first_alone = precision == "int8-dynamic"
        self._info = BackendInfo(
            model=name,
            tokenizer=tokenizer.identity,
            backend=NAME,
            vocab_size=tokenizer.vocab_size,
            eos_ids=tokenizer.eos_ids,
            max_context=tokenizer.max_context,
            quantisation=precision,
        )

    def keep_prefix(self, ids: Sequence[int]) -> PrefixCache | None:
        if not ids:
            return None
        _, past = self._prefill([int(i) for i in ids], None)
        return PrefixCache(ids=tuple(int(i) for i in ids), state=past)

    def prefill(
        self,
        session: str,
        prompt_ids: Sequence[int],
        top_k: int,
        prefix: PrefixCache | None = None,
    ) -> TopK:
        self._sessions.pop(session, None)
        ids = [int(i) for i in prompt_ids]
        logits, past = self._prefill(ids, prefix)
        self._sessions[session] = _Session(ids=ids, past=past)
        return top_k_of(logits[-1], top_k)

    def extend(self, session: str, ids: Sequence[int], top_k: int) -> list[TopK]:
        """Append ``ids`` in one run of the graph; the top-k after each of them (speculation)."""
        held, new = self._held(session), [int(i) for i in ids]
        if not new:
            return []
        logits, held.past = self._forward(new, held.past, last_only=False)
        held.ids += new
        return [top_k_of(row, top_k) for row in logits]

    def truncate(self, session: str, length: int) -> None:
        """Keep the first ``length`` ids of ``session`` (a rejected draft's tail goes)."""
        held = self._held(session)
        if length >= len(held.ids):
            return
        if length < 1:
            raise Moe2Error(ErrorCode.INVALID_FIELD, "a session keeps at least one token")
        held.past = [a[:, :, :length] for a in held.past]
        held.ids = held.ids[:length]

    def score(
        self,
        prompt_ids: Sequence[int],
        targets_ids: Sequence[Sequence[int]],
        top_k: int,
        prefix: PrefixCache | None = None,
    ) -> list[TargetLogprobs]:
        targets = scored_targets(targets_ids)
        k = min(top_k, self._info.vocab_size)
        logits, past = self._prefill([int(i) for i in prompt_ids], prefix)
        scored = []
        for target in targets:
            following = (
                self._forward(target[:-1], past, last_only=False)[0] if target[1:] else logits[:0]
            )
            scored.append(teacher_forced(logits[-1], following, target, k))
        return scored

    def decode(self, session: str, token: int, top_k: int) -> TopK:
        held = self._held(session)
        logits, held.past = self._forward([int(token)], held.past, last_only=True)
        held.ids.append(int(token))
        return top_k_of(logits[-1], top_k)

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[TopK]:
        """One session after another: the export's batch axis is fixed at 1 (see the module)."""
        check_batch(requests, self._sessions.__contains__)
        return [self.decode(*r) for r in requests]

    def rewrite(self, session: str, ids: Sequence[int], top_k: int) -> TopK:
        held, new = self._held(session), [int(i) for i in ids]
        keep = min(common_prefix(held.ids, new), len(new) - 1)
        past = [a[:, :, :keep] for a in held.past]
        logits, held.past = self._forward(new[keep:], past, last_only=True)
        held.ids = new
        return top_k_of(logits[-1], top_k)

    def release(self, session: str) -> None:
        self._sessions.pop(session, None)

    def rename(self, session: str, to: str) -> list[int]:
        held = self._held(session)
        self._sessions.pop(session)
        self._sessions[to] = held  # what ``to`` held is dropped with its arrays
        return list(held.ids)

    def _held(self, session: str) -> _Session:
        held = self._sessions.get(session)
        if held is None:
            raise Moe2Error(ErrorCode.UNKNOWN_SESSION, f"no KV cache for session {session!r}")
        return held

    def _empty_past(self) -> Past:
        return [self._empty] * (2 * self._layers)

    def _prefill(
        self, ids: list[int], prefix: PrefixCache | None
    ) -> tuple[npt.NDArray[np.float32], Past]:
        """The last position's logits (1, V) and the cache, from ``prefix``'s shared head."""
        if not ids:
            raise Moe2Error(ErrorCode.EMPTY_PROMPT, "the prompt has no tokens")
        shared = 0 if prefix is None else min(common_prefix(ids, prefix.ids), len(ids) - 1)
        if prefix is None or not shared:
            if self._first_alone and len(ids) > 1:  # see ``_first_alone``
                _, past = self._forward(ids[:1], self._empty_past(), last_only=True)
                return self._forward(ids[1:], past, last_only=True)
            return self._forward(ids, self._empty_past(), last_only=True)
        state: Past = prefix.state  # type: ignore[assignment]  # this backend's own PrefixCache
        return self._forward(ids[shared:], [a[:, :, :shared] for a in state], last_only=True)

    def _forward(
        self, ids: list[int], past: Past, *, last_only: bool
    ) -> tuple[npt.NDArray[np.float32], Past]:
        """Logits (M, V) of the last position (or of every new one) and the extended cache."""
        held, new = past[0].shape[2], len(ids)
        feed: dict[str, npt.NDArray[np.generic]] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, held + new), dtype=np.int64),
            "position_ids": np.arange(held, held + new, dtype=np.int64)[None, :],
            "logit_positions": np.arange(new - 1 if last_only else 0, new, dtype=np.int64),
        }
        for i in range(self._layers):
            feed[f"past.{i}.key"], feed[f"past.{i}.value"] = past[2 * i], past[2 * i + 1]
        logits, *present = self._session.run(None, feed)
        return logits[0], present


_PREFERRED: Final = ("CUDAExecutionProvider", "CPUExecutionProvider")


def load_onnx(
    source: ModelSource, *, precision: Precision = "float32", threads: int | None = None
) -> OnnxBackend:
    """Load ``source`` through its cached ONNX export at ``precision`` (exported now if missing)."""
    reference = reference_directory(source)
    model_file = exported(reference, precision)
    tokenizer = ChatTokenizer(reference, source.name)
    log.info("onnx_loaded", model=source.name, precision=precision, path=str(model_file))
    return OnnxBackend(
        model_file, tokenizer, name=source.name, precision=precision, threads=threads
    )
