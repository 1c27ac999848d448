"""LoRA adapters on disk, and serving one merged into its base model (``moe2 expert --adapter``).

An adapter is a directory: peft's ``adapter_config.json``, the LoRA weights in fp16
(``adapter_model.safetensors``) and ``moe2-adapter.json``, the record of what it was trained on
and how (``agents.expert.lora``). The record is written last, into a temporary directory renamed
into place, so a directory without it never exists under its final name.

Served, the adapter is merged into the base weights (peft ``merge_and_unload``): one decode step
costs what the base model's does. Heartbeats name both: ``SmolLM2-135M-Instruct+lora:cluster-3@
1a2b3c4d``, the last part the start of the weights file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Final

from moe2.runtime.errors import ErrorCode, Moe2Error

RECORD: Final = "moe2-adapter.json"
WEIGHTS: Final = "adapter_model.safetensors"
CONFIG: Final = "adapter_config.json"
ADAPTERS_ENV: Final = "MOE2_ADAPTERS"  # more directories of named adapters (os.pathsep-separated)
# The adapters that ship in the repository, by base model family (a source checkout or an
# editable install finds them; elsewhere point MOE2_ADAPTERS at a copy).
SHIPPED: Final = ("deploy/experts/adapters", "deploy/experts/adapters-gemma")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a whole adapter: weights, peft config and moe2's record."""
    return all((directory / name).is_file() for name in (WEIGHTS, CONFIG, RECORD))


def check_adapter(directory: Path) -> Path:
    """``directory`` resolved, or ``invalid_field`` naming what is missing."""
    missing = [name for name in (WEIGHTS, CONFIG, RECORD) if not (directory / name).is_file()]
    if missing:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"adapter {directory} is not a complete LoRA adapter: no {', '.join(missing)} "
            "(moe2 experts finetune writes them)",
        )
    return directory.resolve()


def adapter_dirs() -> list[Path]:
    """Where named adapters are looked up: ``$MOE2_ADAPTERS``, then the shipped ones."""
    env = [Path(p).expanduser() for p in os.environ.get(ADAPTERS_ENV, "").split(os.pathsep) if p]
    root = Path(__file__).resolve().parents[2]
    return [d for d in (*env, *(root / s for s in SHIPPED)) if d.is_dir()]


def base_of(directory: Path) -> str:
    """The base model an adapter was trained on, from its record ("" if unreadable)."""
    try:
        return str(json.loads((directory / RECORD).read_text()).get("base_model", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def resolve_adapter(spec: str | Path, base_model: str) -> Path:
    """An adapter directory, or the name of one (``cluster-3``) trained on ``base_model`` (the
    model's name, e.g. ``SmolLM2-135M-Instruct``) in ``adapter_dirs()``; checked whole."""
    path = Path(spec).expanduser()
    if path.exists() or not _NAME.fullmatch(str(spec)):
        return check_adapter(path)
    dirs = adapter_dirs()
    found = [d / str(spec) for d in dirs if is_complete(d / str(spec))]
    for candidate in found:
        if base_of(candidate) == base_model:
            return candidate.resolve()
    others = ", ".join(f"{c} (on {base_of(c) or '?'})" for c in found) or "none"
    raise Moe2Error(
        ErrorCode.INVALID_FIELD,
        f"no adapter named {str(spec)!r} for {base_model} in {', '.join(map(str, dirs)) or '-'} "
        f"(found: {others}); give the adapter's directory, or add one to ${ADAPTERS_ENV}",
    )


def weights_sha256(directory: Path) -> str:
    """The SHA-256 of the adapter's weights file, in hex."""
    return hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()


def adapter_label(base: str, directory: Path) -> str:
    """What heartbeats call the merged model: ``<base>+lora:<name>@<8 hex of the weights>``."""
    return f"{base}+lora:{directory.name}@{weights_sha256(directory)[:8]}"


def merged_with_adapter(model: Any, directory: Path) -> Any:
    """``model`` with the adapter's LoRA weights added into its own (no LoRA layers remain)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, directory).merge_and_unload()
