"""Model backends behind one interface (``base.Backend``); ``load_backend`` picks one by name."""

from __future__ import annotations

import os
from typing import Final

from moe2.agents.expert.backends.base import (
    Backend,
    BackendInfo,
    DecodeRequest,
    PrefixCache,
    TargetLogprobs,
    TopK,
)
from moe2.agents.expert.models import ModelSource
from moe2.runtime.errors import ErrorCode, Moe2Error

BACKENDS: Final = ("transformers", "onnx", "onnx-int8", "llamacpp")

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendInfo",
    "DecodeRequest",
    "PrefixCache",
    "TargetLogprobs",
    "TopK",
    "check_backend",
    "load_backend",
]


def check_backend(name: str) -> str:
    """``name`` if it is a known backend, else an ``invalid_field`` error that lists them."""
    if name not in BACKENDS:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, f"unknown backend {name!r}; known: {', '.join(BACKENDS)}"
        )
    return name


def load_backend(name: str, source: ModelSource, *, threads: int | None = None) -> Backend:
    """Load ``source`` with the named backend. Slow (seconds): call it from a worker thread."""
    check_backend(name)
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded at run time, whatever the shell says
    if name == "transformers":
        from moe2.agents.expert.backends.transformers_backend import (
            load_transformers,  # torch is slow
        )

        return load_transformers(source, threads=threads)
    try:
        if name in ("onnx", "onnx-int8"):
            from moe2.agents.expert.backends.onnx_backend import load_onnx

            return load_onnx(
                source,
                precision="int8-dynamic" if name == "onnx-int8" else "float32",
                threads=threads,
            )
        from moe2.agents.expert.backends.llamacpp_backend import load_llamacpp

        return load_llamacpp(source, threads=threads)
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        extra = "onnx" if name.startswith("onnx") else "llamacpp"
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"backend {name!r} needs {exc.name}: pip install 'moe2[{extra}]'",
        ) from None
