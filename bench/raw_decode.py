"""Each backend's library driven directly: the floor a backend's decode step is measured against.

A raw loop feeds one token, takes the argmax of the logits it gets back, and keeps its KV cache
itself: no sessions, no log-softmax, no top-k. ``bench/backends.py`` times it beside the backend
on the same model and thread count.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from moe2.agents.expert.models import ModelSource


class RawLoop(Protocol):
    def start(self, prompt: list[int]) -> int: ...

    def step(self, token: int) -> int: ...


class TorchLoop:
    """transformers' model called with its own cache object."""

    def __init__(self, source: ModelSource) -> None:
        from moe2.agents.expert.backends.transformers_backend import load_model_and_tokenizer

        self._model, _ = load_model_and_tokenizer(source)
        self._past: Any = None

    def start(self, prompt: list[int]) -> int:
        self._past = None
        return self._run(prompt)

    def step(self, token: int) -> int:
        return self._run([token])

    def _run(self, ids: list[int]) -> int:
        import torch

        with torch.inference_mode():
            out = self._model(
                input_ids=torch.tensor([ids]), past_key_values=self._past, use_cache=True
            )
        self._past = out.past_key_values
        return int(out.logits[0, -1].argmax())


class OrtLoop:
    """The exported graph run by an onnxruntime session, its cache held as the outputs came."""

    def __init__(self, source: ModelSource, precision: str, threads: int) -> None:
        import onnxruntime as ort

        from moe2.agents.expert.backends.chat_tokenizer import reference_directory
        from moe2.agents.expert.backends.onnx_export import exported

        model_file = exported(reference_directory(source), precision)  # type: ignore[arg-type]  # checked by the caller
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(model_file), options)
        self._names = [i.name for i in self._session.get_inputs()[4:]]
        shape = self._session.get_inputs()[4].shape
        self._empty = np.zeros((1, shape[1], 0, shape[3]), dtype=np.float32)
        self._past: list[Any] = []

    def start(self, prompt: list[int]) -> int:
        self._past = [self._empty] * len(self._names)
        return self._run(prompt)

    def step(self, token: int) -> int:
        return self._run([token])

    def _run(self, ids: list[int]) -> int:
        held = self._past[0].shape[2]
        feed = dict(zip(self._names, self._past, strict=True))
        feed["input_ids"] = np.asarray([ids], dtype=np.int64)
        feed["attention_mask"] = np.ones((1, held + len(ids)), dtype=np.int64)
        feed["position_ids"] = np.arange(held, held + len(ids), dtype=np.int64)[None, :]
        feed["logit_positions"] = np.asarray([len(ids) - 1], dtype=np.int64)
        logits, *self._past = self._session.run(None, feed)
        return int(logits[0, -1].argmax())


class LlamaLoop:
    """llama-cpp-python's high-level ``Llama.eval`` and the context's last logits."""

    def __init__(self, source: ModelSource, threads: int) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self._llm = llama_cpp.Llama(
            str(source.path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self._vocab = self._llm.n_vocab()

    def start(self, prompt: list[int]) -> int:
        self._llm.reset()
        return self._run(prompt)

    def step(self, token: int) -> int:
        return self._run([token])

    def _run(self, ids: list[int]) -> int:
        self._llm.eval(ids)
        pointer = self._llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        return int(np.ctypeslib.as_array(pointer, shape=(self._vocab,)).argmax())


def raw_loop(name: str, source: ModelSource, threads: int) -> RawLoop:
    if name == "transformers":
        return TorchLoop(source)
    if name == "llamacpp":
        return LlamaLoop(source, threads)
    return OrtLoop(source, "int8-dynamic" if name == "onnx-int8" else "float32", threads)
