"""The transformers backend: a causal LM on CPU (or wherever torch puts it), a KV cache per session.

A GGUF file is de-quantised to float32 by transformers, which takes a while (about 18 s for
SmolLM2-135M on 2 cores). The result, model and tokenizer, is kept in a local conversion cache
(``$MOE2_CACHE``, default ``~/.cache/moe2``) keyed by the GGUF file's name, size and mtime and the
transformers version, so later starts load plain safetensors in well under a second. The cache is
written to a temporary directory and renamed into place, so experts starting together never see a
half-written one. Nothing is ever downloaded: every load is ``local_files_only``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import structlog
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe2.agents.expert.backends.base import (
    BackendInfo,
    DecodeRequest,
    PrefillRequest,
    PrefixCache,
    TargetLogprobs,
    TopK,
    check_batch,
    common_prefix,
    tokenizer_identity,
)
from moe2.agents.expert.backends.chat_tokenizer import (  # the one tokenizer code, torch-free
    build_token_bytes,
    conversion_dir,
    encode,
    encode_answer,
    encode_chat,
    eos_ids,
)
from moe2.agents.expert.backends.transformers_batch import Layers, Stacked, prefill_rows
from moe2.agents.expert.backends.transformers_scoring import (
    copied_cache,
    cut_cache,
    reusable,
    score_targets,
)
from moe2.agents.expert.models import ModelSource, quantisation
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import ChatMessage

log = structlog.get_logger("moe2.backend")

NAME: Final = "transformers"
_MARKER: Final = "moe2-conversion.json"
_STACKED: Final = object()  # in ``_caches``: the session's cache is a row of a kept batch


class TransformersBackend:
    """A loaded transformers model and tokenizer; implements ``Backend``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        label: str | None = None,
        quantisation: str = "",
    ) -> None:
        self._model = model.eval()
        self._tokenizer = tokenizer
        self._caches: dict[str, Any] = {}
        # the batches decode_batch left stacked, by session (each session in one at most): kept
        # while the same sessions step together, so alternating batches are not re-stacked
        self._stack_of: dict[str, Stacked] = {}
        self._ids: dict[str, list[int]] = {}  # per session: the ids its cache holds
        vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._token_bytes = build_token_bytes(tokenizer, vocab_size)
        self._info = BackendInfo(
            model=label or name,  # the label names an adapter too; the tokenizer is the base's
            tokenizer=tokenizer_identity(name, self._token_bytes),
            backend=NAME,
            vocab_size=vocab_size,
            eos_ids=eos_ids(model, tokenizer),
            max_context=int(model.config.max_position_embeddings),
            quantisation=quantisation,
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def token_bytes(self) -> Sequence[bytes]:
        return self._token_bytes

    @property
    def sessions(self) -> int:
        return len(self._caches)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return encode_chat(self._tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        return encode(self._tokenizer, text)

    def encode_answer(self, text: str) -> list[int]:
        return encode_answer(self._tokenizer, text)

    def keep_prefix(self, ids: Sequence[int]) -> PrefixCache | None:
        if not ids:
            return None
        _, past = self._forward([int(i) for i in ids], None)
        return PrefixCache(ids=tuple(int(i) for i in ids), state=past) if reusable(past) else None

    def prefill(
        self,
        session: str,
        prompt_ids: Sequence[int],
        top_k: int,
        prefix: PrefixCache | None = None,
    ) -> TopK:
        self.release(session)
        logits, self._caches[session] = self._prefill(list(prompt_ids), prefix)
        self._ids[session] = [int(i) for i in prompt_ids]
        return top_k_of(logits, top_k)

    def prefill_batch(self, requests: Sequence[PrefillRequest]) -> list[TopK]:
        """``prefill`` for several new sessions in one padded forward pass
        (``transformers_batch.prefill_rows``); each from a copy of its prefix's shared head."""
        if len({r.session for r in requests}) != len(requests):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "a prefill batch names a session twice")
        plans = [self._prefill_plan(list(r.prompt_ids), r.prefix) for r in requests]
        ready = [p for p in plans if p is not None]
        if len(requests) < 2 or len(ready) < len(plans):
            return [self.prefill(*r) for r in requests]
        for r in requests:
            self.release(r.session)
        logits, caches = prefill_rows(self._model, [h for h, _ in ready], [t for _, t in ready])
        for r, cache in zip(requests, caches, strict=True):
            self._caches[r.session] = cache
            self._ids[r.session] = [int(i) for i in r.prompt_ids]
        return [top_k_of(row, r.top_k) for row, r in zip(logits, requests, strict=True)]

    def _prefill_plan(
        self, ids: list[int], prefix: PrefixCache | None
    ) -> tuple[Layers | None, list[int]] | None:
        """A prompt as (its shared head's cache layers, the tail to compute); None if the
        prefix's cache cannot be sliced (sliding-window layers)."""
        if not ids:
            raise Moe2Error(ErrorCode.EMPTY_PROMPT, "the prompt has no tokens")
        shared = 0 if prefix is None else min(common_prefix(ids, prefix.ids), len(ids) - 1)
        if prefix is None or not shared:
            return None, ids
        if not reusable(prefix.state):
            return None
        head = [(k[:, :, :shared], v[:, :, :shared]) for k, v, *_ in prefix.state]  # type: ignore[attr-defined]
        return head, ids[shared:]

    def extend(self, session: str, ids: Sequence[int], top_k: int) -> list[TopK]:
        """Append ``ids`` in one forward pass; the top-k after each of them (speculation)."""
        new = [int(i) for i in ids]
        past = self._own_cache(session)
        if not new:
            return []
        with torch.inference_mode():
            out = self._model(
                input_ids=torch.tensor([new], dtype=torch.long, device=self._model.device),
                past_key_values=past,
                use_cache=True,
                logits_to_keep=len(new),
            )
        self._caches[session] = out.past_key_values
        self._ids[session] += new
        return [top_k_of(row, top_k) for row in out.logits[0, -len(new) :]]

    def truncate(self, session: str, length: int) -> None:
        """Keep the first ``length`` ids of ``session`` (a rejected draft's tail goes)."""
        past, held = self._own_cache(session), self._ids[session]
        if length >= len(held):
            return
        if length < 1:
            raise Moe2Error(ErrorCode.INVALID_FIELD, "a session keeps at least one token")
        if not cut_cache(past, len(held) - length):  # sliding-window layers: recompute
            _, past = self._forward(held[:length], None)
        self._caches[session], self._ids[session] = past, held[:length]

    def score(
        self,
        prompt_ids: Sequence[int],
        targets_ids: Sequence[Sequence[int]],
        top_k: int,
        prefix: PrefixCache | None = None,
    ) -> list[TargetLogprobs]:
        targets = [[int(i) for i in t] for t in targets_ids]
        if not all(targets):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "every target needs at least one token")
        k = min(top_k, self._info.vocab_size)
        last, past = self._prefill(list(prompt_ids), prefix)
        with torch.inference_mode():
            return score_targets(self._model, last, past, targets, k)

    def decode(self, session: str, token: int, top_k: int) -> TopK:
        logits, self._caches[session] = self._forward([token], self._own_cache(session))
        self._ids[session].append(int(token))
        return top_k_of(logits, top_k)

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[TopK]:
        check_batch(requests, self._caches.__contains__)
        if len(requests) < 2:
            return [self.decode(*r) for r in requests]
        stacked = self._stacked_for([r.session for r in requests])
        if stacked is None:  # a cache that cannot be stacked (sliding-window layers)
            return [self.decode(*r) for r in requests]
        row = {session: i for i, session in enumerate(stacked.sessions)}
        tokens = [0] * len(requests)
        for r in requests:
            tokens[row[r.session]] = int(r.token)
        with torch.inference_mode():
            out = self._model(
                input_ids=torch.tensor(tokens, dtype=torch.long, device=self._model.device)[
                    :, None
                ],
                attention_mask=stacked.mask().to(self._model.device),
                position_ids=stacked.positions().to(self._model.device),
                past_key_values=stacked.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        advanced = stacked.advanced(out.past_key_values)
        for r in requests:
            self._caches[r.session], self._stack_of[r.session] = _STACKED, advanced
            self._ids[r.session].append(int(r.token))
        return [top_k_of(out.logits[row[r.session], -1], r.top_k) for r in requests]

    def rewrite(self, session: str, ids: Sequence[int], top_k: int) -> TopK:
        past = self._own_cache(session)
        new, held = [int(i) for i in ids], self._ids.pop(session)
        keep = min(common_prefix(held, new), len(new) - 1)
        del self._caches[session]
        if not cut_cache(past, len(held) - keep):  # sliding-window layers past their window
            past, keep = None, 0
        logits, self._caches[session] = self._forward(new[keep:], past)
        self._ids[session] = new
        return top_k_of(logits, top_k)

    def release(self, session: str) -> None:
        if session in self._stack_of:
            self._unstack(self._stack_of[session])
        self._caches.pop(session, None)
        self._ids.pop(session, None)

    def rename(self, session: str, to: str) -> list[int]:
        past = self._own_cache(session)
        if to != session:
            self.release(to)
            del self._caches[session]
            self._caches[to], self._ids[to] = past, self._ids.pop(session)
        return list(self._ids[to])

    def _own_cache(self, session: str) -> Any:
        """The session's cache, taken out of the stacked batch if it is in it."""
        if session not in self._caches:
            raise Moe2Error(ErrorCode.UNKNOWN_SESSION, f"no KV cache for session {session!r}")
        if session in self._stack_of:
            self._unstack(self._stack_of[session])
        return self._caches[session]

    def _stacked_for(self, sessions: list[str]) -> Stacked | None:
        """The batch of ``sessions``: a kept one if it holds exactly them, else a new one (the
        kept batches that hold any of them are split first)."""
        kept = self._stack_of.get(sessions[0])
        if kept is not None and set(kept.sessions) == set(sessions):
            return kept
        for session in sessions:
            if session in self._stack_of:
                self._unstack(self._stack_of[session])
        caches = [self._caches[s] for s in sessions]
        return Stacked.of(sessions, caches) if all(reusable(c) for c in caches) else None

    def _unstack(self, stacked: Stacked) -> None:
        """Give every session of a kept batch its own cache again."""
        for row, session in enumerate(stacked.sessions):
            if self._stack_of.get(session) is stacked:
                del self._stack_of[session]
                self._caches[session] = stacked.row(row)

    def _prefill(self, ids: list[int], prefix: PrefixCache | None) -> tuple[torch.Tensor, Any]:
        """The last position's logits and the cache, from a copy of ``prefix``'s shared head."""
        if not ids:
            raise Moe2Error(ErrorCode.EMPTY_PROMPT, "the prompt has no tokens")
        shared = 0 if prefix is None else min(common_prefix(ids, prefix.ids), len(ids) - 1)
        past = copied_cache(prefix.state, shared) if prefix is not None and shared else None
        return self._forward(ids[shared:], past)

    def _forward(self, ids: list[int], past: Any) -> tuple[torch.Tensor, Any]:
        with torch.inference_mode():
            out = self._model(
                input_ids=torch.tensor([ids], dtype=torch.long, device=self._model.device),
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[0, -1], out.past_key_values


def top_k_of(logits: torch.Tensor, k: int) -> TopK:
    """The k best ids with their log-probabilities under the full-vocabulary softmax."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return TopK(
        ids=indices.cpu().numpy().astype(np.uint32),
        logprobs=values.cpu().numpy().astype(np.float32),
    )


# --- loading, with the conversion cache ------------------------------------------------------


def load_transformers(
    source: ModelSource, *, threads: int | None = None, use_cache: bool = True
) -> TransformersBackend:
    """Load ``source``; a GGUF file goes through the conversion cache unless ``use_cache``.
    ``source.adapter``, a LoRA adapter, is merged into the weights."""
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model_and_tokenizer(source, use_cache=use_cache)
    precision = quantisation(source)
    if source.adapter is None:
        return TransformersBackend(model, tokenizer, name=source.name, quantisation=precision)
    from moe2.agents.expert.adapters import adapter_label, merged_with_adapter

    merged = merged_with_adapter(model, source.adapter)
    label = adapter_label(source.name, source.adapter)
    return TransformersBackend(
        merged, tokenizer, name=source.name, label=label, quantisation=precision
    )


def load_model_and_tokenizer(source: ModelSource, *, use_cache: bool = True) -> tuple[Any, Any]:
    """The base model (float32) and its tokenizer, as transformers objects."""
    if source.format == "hf":
        return _load_directory(source.path)
    return _load_gguf_cached(source) if use_cache else _load_gguf(source)


def _load_directory(path: Path) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return _realigned(model), tokenizer


def _realigned(model: Any) -> Any:
    """Copy the weights out of the memory-mapped safetensors file into fresh, aligned memory.

    MKL's results depend on the alignment of its operands, and mapped tensors sit at whatever
    offset the file gives them: without this copy a cached model's logits differ from the GGUF
    load's in the 6th digit. Tied weights stay tied (they are one Parameter).
    """
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return model


def _load_gguf(source: ModelSource) -> tuple[Any, Any]:
    kwargs = {"gguf_file": source.path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kwargs)
    return model, tokenizer


def _load_gguf_cached(source: ModelSource) -> tuple[Any, Any]:
    target = conversion_dir(source)
    if (target / _MARKER).is_file():
        try:
            loaded = _load_directory(target)
            log.info("model_cache_hit", model=source.name, path=str(target))
            return loaded
        except Exception:  # a damaged cache must not stop the expert: convert again
            log.warning("model_cache_unreadable", path=str(target), exc_info=True)
    log.info("model_converting", model=source.name, gguf=str(source.path))
    model, tokenizer = _load_gguf(source)
    _write_cache(model, tokenizer, source, target)
    return model, tokenizer


def _write_cache(model: Any, tokenizer: Any, source: ModelSource, target: Path) -> None:
    if not _fully_dequantised(model):
        log.info("model_cache_skipped", reason="weights still quantised", model=source.name)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        log.warning("model_cache_unwritable", path=str(target), error=str(exc))
        return
    try:
        _save(model, tokenizer, source, tmp)
        tmp.rename(target)  # atomic; fails if another process got there first, which is fine
        log.info("model_cache_written", path=str(target))
    except OSError as exc:
        log.info("model_cache_not_written", path=str(target), error=str(exc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fully_dequantised(model: Any) -> bool:
    """transformers' GGUF loader may keep packed blocks in future; only plain floats are cached."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer, "packed_modules", None):
        return False
    return all(p.dtype.is_floating_point for p in model.parameters())


def _save(model: Any, tokenizer: Any, source: ModelSource, directory: Path) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are already float32 tensors; the GGUF quantizer only refuses to save.
        # This is what transformers itself does after loading with GgufConfig(dequantize=True).
        quantizer.remove_quantization_config(model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    marker = {"gguf": str(source.path), "transformers": transformers.__version__}
    (directory / _MARKER).write_text(json.dumps(marker))
