"""A box that serves with ONNX Runtime or llama.cpp needs no torch (issue 11 §2): the backends,
the shared tokenizer code (``chat_tokenizer``) and the expert agent import without it, an
expert's tokenizer path gives the ids the model's own chat template gives, and the ONNX and
llama.cpp backends serve the cached export / the GGUF file with the same first token as with
torch present. torch is hidden from the child process as if it were not installed (a meta-path
finder that finds neither the module nor its distribution)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from moe2.agents.expert.backends import load_backend
from moe2.agents.expert.backends.chat_tokenizer import reference_directory
from moe2.agents.expert.models import resolve_model
from moe2.runtime.wire import ChatMessage

pytestmark = pytest.mark.model

QUESTION = "What is the capital of France?"

WITHOUT_TORCH = textwrap.dedent(
    """
    import importlib.abc, json, sys

    HIDDEN = {"torch", "torchvision", "torchaudio"}

    class Hide(importlib.abc.MetaPathFinder):
        '''Wraps a finder; torch is neither a module nor a distribution through it.'''

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def find_distributions(self, *args, **kwargs):
            find = getattr(self.inner, "find_distributions", None)
            found = find(*args, **kwargs) if find else []
            return [d for d in found if (d.metadata["Name"] or "").lower() not in HIDDEN]

        def invalidate_caches(self):
            getattr(self.inner, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]

    import moe2.agents.expert.agent  # the expert, as `moe2 expert` imports it
    from moe2.agents.expert.backends import load_backend
    from moe2.agents.expert.backends.chat_tokenizer import ChatTokenizer, reference_directory
    from moe2.agents.expert.models import resolve_model
    from moe2.runtime.wire import ChatMessage

    question = [ChatMessage("user", sys.argv[1])]
    source = resolve_model()
    tokenizer = ChatTokenizer(reference_directory(source), source.name)
    out = {"prompt": tokenizer.encode_chat(question), "identity": tokenizer.identity}
    for name in sys.argv[2:]:
        backend = load_backend(name, source, threads=1)
        ids = backend.encode_chat(question)
        out[name] = [ids, int(backend.prefill("s", ids, 1).ids[0])]
    out["torch_imported"] = sorted(m for m in sys.modules if m.partition(".")[0] == "torch")
    print(json.dumps(out))
    """
)


def without_torch(*backends: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, QUESTION, *backends],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_the_tokenizer_path_runs_without_torch_and_gives_the_templates_ids() -> None:
    from transformers import AutoTokenizer

    result = without_torch()
    assert result["torch_imported"] == []
    source = resolve_model()
    reference = AutoTokenizer.from_pretrained(reference_directory(source), local_files_only=True)
    expected = reference.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert result["prompt"] == [int(i) for i in expected]
    with_torch = load_backend("transformers", source, threads=1)
    assert result["identity"] == with_torch.info.tokenizer  # the same tokenizer, so fusable by id


@pytest.mark.skipif(not installed("onnxruntime"), reason="pip install 'moe2[onnx]'")
def test_the_onnx_backend_serves_a_cached_export_without_torch() -> None:
    source = resolve_model()
    with_torch = load_backend("onnx-int8", source, threads=1)  # makes the export if not cached
    ids = with_torch.encode_chat([ChatMessage("user", QUESTION)])
    first = int(with_torch.prefill("s", ids, 1).ids[0])
    result = without_torch("onnx-int8")
    assert result["torch_imported"] == []
    assert result["onnx-int8"] == [ids, first]


@pytest.mark.skipif(not installed("llama_cpp"), reason="pip install 'moe2[llamacpp]'")
def test_the_llamacpp_backend_serves_without_torch() -> None:
    source = resolve_model()
    with_torch = load_backend("llamacpp", source, threads=1)
    ids = with_torch.encode_chat([ChatMessage("user", QUESTION)])
    first = int(with_torch.prefill("s", ids, 1).ids[0])
    result = without_torch("llamacpp")
    assert result["torch_imported"] == []
    assert result["llamacpp"] == [ids, first]
