"""Model backends behind one interface (``base.Backend``); ``load_backend`` picks one by name."""

from __future__ import annotations

import os
from typing import Final

from moe2.agents.expert.backends.base import Backend, BackendInfo, PrefixCache, TargetLogprobs, TopK
from moe2.agents.expert.models import ModelSource
from moe2.runtime.errors import ErrorCode, Moe2Error

BACKENDS: Final = ("transformers",)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendInfo",
    "PrefixCache",
    "TargetLogprobs",
    "TopK",
    "load_backend",
]


def load_backend(name: str, source: ModelSource, *, threads: int | None = None) -> Backend:
    """Load ``source`` with the named backend. Slow (seconds): call it from a worker thread."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded at run time, whatever the shell says
    if name == "transformers":
        from moe2.agents.expert.backends.transformers_backend import (
            load_transformers,  # torch is slow
        )

        return load_transformers(source, threads=threads)
    raise Moe2Error(
        ErrorCode.INVALID_FIELD, f"unknown backend {name!r}; known: {', '.join(BACKENDS)}"
    )
