"""Exporting a causal LM to ONNX with an explicit KV cache, and its dynamic int8 quantisation.

The graph takes ``input_ids`` (1, S), ``attention_mask`` (1, P+S), ``position_ids`` (1, S),
``logit_positions`` (M,) (which of the S positions to compute logits for: the last one for a
prefill, all of them for scoring) and, per layer, ``past.<i>.key``/``past.<i>.value``
(1, heads, P, head_dim); it returns ``logits`` (1, M, V) and ``present.<i>.key``/``.value``
(1, heads, P+S, head_dim). A prefill passes P = 0.

The export is made from the float32 safetensors (the transformers backend's conversion of a GGUF
file) by torch's TorchScript exporter, with eager attention, and kept under
``$MOE2_CACHE/onnx`` keyed by the source directory, the torch/onnx/onnxruntime versions and the
precision. ``int8-dynamic`` is onnxruntime's dynamic quantisation of the float32 export: int8
per-channel weights for the MatMuls of the projections (all but the MLP's down projection,
``kept_in_float``), activations quantised per call (what optimum's
``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)`` asks for; optimum
itself is not used: its ONNX package pins transformers below 4.58). Each is written to a
temporary directory and renamed into place, so experts starting together never see half of one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import onnx
import onnxruntime
import structlog

from moe2.agents.expert.models import cache_root
from moe2.runtime.errors import ErrorCode, Moe2Error

log = structlog.get_logger("moe2.backend")

Precision = Literal["float32", "int8-dynamic"]
EXPORT_FORMAT: Final = 2
MODEL_FILE: Final = "model.onnx"
MARKER: Final = "moe2-onnx.json"
OPSET: Final = 17


def export_dir(reference: Path, precision: Precision) -> Path:
    """Where the export of the model in ``reference`` at ``precision`` lives."""
    weights = reference / "model.safetensors"
    stamp = weights.stat().st_mtime_ns if weights.is_file() else 0
    key = [
        EXPORT_FORMAT,
        str(reference.resolve()),
        stamp,
        _torch_version(),
        onnx.__version__,
        onnxruntime.__version__,
        precision,
    ]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return cache_root() / "onnx" / f"{reference.name}-{precision}-{digest}"


def _torch_version() -> str:
    """torch's version as the export key has it, read without importing torch (serving a cached
    export needs no torch; only making one does)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def exported(reference: Path, precision: Precision) -> Path:
    """The ONNX model file for ``reference`` at ``precision``, exported now if not cached."""
    target = export_dir(reference, precision)
    if (target / MARKER).is_file():
        log.info("onnx_cache_hit", path=str(target))
        return target / MODEL_FILE
    if _torch_version() == "none":  # cannot export here: serve an export made with torch
        return _made_elsewhere(target, reference, precision) / MODEL_FILE
    if precision == "float32":
        write = _export_float32(reference)
    else:
        write = _quantise_int8(exported(reference, "float32"))
    log.info("onnx_exporting", reference=str(reference), precision=precision)
    _write_atomically(target, write, {"reference": str(reference), "precision": precision})
    return target / MODEL_FILE


def _made_elsewhere(target: Path, reference: Path, precision: Precision) -> Path:
    """On a box without torch: an export of ``reference`` at ``precision`` in the cache, made
    where torch was (its key names that torch), or the error that says how to get one."""
    for marker in sorted(target.parent.glob(f"{reference.name}-{precision}-*/{MARKER}")):
        try:
            made = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if made.get("reference") == str(reference) and made.get("precision") == precision:
            log.info("onnx_cache_hit", path=str(marker.parent), torch="none")
            return marker.parent
    raise Moe2Error(
        ErrorCode.INVALID_FIELD,
        f"no ONNX export of {reference.name} ({precision}) in {target.parent}, and making one "
        "needs torch: pip install 'moe2[models]' once (or copy that cache from a box that has it)",
    )


def _write_atomically(target: Path, write: Callable[[Path], None], marker: dict[str, str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp / MODEL_FILE)
        (tmp / MARKER).write_text(json.dumps(marker))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from other users of the cache
        tmp.rename(target)  # atomic; fails if another process got there first, which is fine
        log.info("onnx_cache_written", path=str(target))
    except OSError as exc:
        if not (target / MARKER).is_file():
            raise
        log.info("onnx_cache_not_written", path=str(target), error=str(exc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quantise_int8(source: Path) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            source,
            path,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=kept_in_float(source),
        )

    return write


def kept_in_float(model_file: Path) -> list[str]:
    """The MatMuls that stay float32 in the int8 model: attention's own products (two
    activations: no weight to quantise) and the MLP down projections, whose inputs carry
    outliers that one per-tensor activation scale flattens (quantised, SmolLM2's greedy tokens
    part from the float model's at the first token on 5 of 6 prompts; kept, after 5-24)."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and (node.input[1] not in weights or "down_proj" in node.name)
    ]


def _export_float32(reference: Path) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import torch  # making an export needs torch; serving one does not
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(
            reference, dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
        step = _step_module(model.eval())
        names_in, names_out, dynamic = _signature(step.layers)
        with torch.no_grad():
            torch.onnx.export(
                step,
                step.example(),
                str(path),
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )

    return write


def _signature(layers: int) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    past = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    dynamic = {
        "input_ids": {1: "new"},
        "attention_mask": {1: "total"},
        "position_ids": {1: "new"},
        "logit_positions": {0: "kept"},
        "logits": {1: "kept"},
        **{name: {2: "held"} for name in past},
        **{name: {2: "total"} for name in present},
    }
    names_in = ["input_ids", "attention_mask", "position_ids", "logit_positions", *past]
    return names_in, ["logits", *present], dynamic


def _step_module(model: Any) -> Any:
    """``model`` wrapped as one forward pass with its KV cache as flat tensors in and out."""
    import torch
    from transformers import DynamicCache

    class _StepModule(torch.nn.Module):
        """One forward pass of ``model`` with its KV cache as flat tensors in and out."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            config = model.config.get_text_config()
            self.layers = int(config.num_hidden_layers)
            self.heads = int(config.num_key_value_heads)
            self.head_dim = int(
                getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads
            )

        def forward(
            self, input_ids: Any, attention_mask: Any, position_ids: Any, keep: Any, *past: Any
        ) -> Any:
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=keep,
            )
            flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *flat)

        def example(self) -> tuple[Any, ...]:
            """Inputs to trace with: 2 new positions after 3 held ones (so no axis is special)."""
            held, new = 3, 2
            past = [torch.randn(1, self.heads, held, self.head_dim) for _ in range(2 * self.layers)]
            return (
                torch.tensor([[1, 2]]),
                torch.ones(1, held + new, dtype=torch.long),
                torch.arange(held, held + new)[None],
                torch.tensor([0, 1]),
                *past,
            )

    return _StepModule(model)
