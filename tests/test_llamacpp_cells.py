"""The llama.cpp backend's KV cells: cells let go are reused only through a compaction, so live
sessions compute as they would alone, in a cache small enough to fill (docs/backends.md)."""

from __future__ import annotations

import importlib.util

import numpy as np
import numpy.typing as npt
import pytest
from structlog.testing import capture_logs

from moe2.agents.expert.backends import DecodeRequest, TopK
from moe2.agents.expert.models import resolve_model
from moe2.runtime.wire import ChatMessage

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama_cpp is not installed: pip install 'moe2[llamacpp]'",
    ),
]

STEPS = 50  # decoding steps of the two sessions that live on: more than the free cells hold
K = 16


def _dense(top: TopK, vocab: int) -> npt.NDArray[np.float32]:
    row = np.full(vocab, -np.inf, np.float32)
    row[np.asarray(top.ids)] = np.asarray(top.logprobs)
    return row


def test_sessions_across_releases_and_a_compaction_decode_as_each_alone() -> None:
    from moe2.agents.expert.backends.llamacpp_backend import load_llamacpp

    backend = load_llamacpp(resolve_model(), threads=1, cells=256)
    vocab = backend.info.vocab_size
    questions = ("What is the capital of France?", "Write a haiku about autumn.", "Hi!")
    prompts = [backend.encode_chat([ChatMessage("user", q)]) for q in questions]
    alone = []
    for prompt in prompts[:2]:  # each alone, with the whole cache to itself
        top = backend.prefill("alone", prompt, vocab)
        chain = [_dense(top, vocab)]
        for _ in range(STEPS):
            top = backend.decode("alone", int(top.ids[0]), vocab)
            chain.append(_dense(top, vocab))
        backend.release("alone")
        alone.append(np.stack(chain))
    prefix = backend.keep_prefix(prompts[1][:20])  # the chat template's system prompt
    with capture_logs() as logs:
        rows = {0: [_dense(backend.prefill("a", prompts[0], vocab), vocab)]}
        backend.prefill("gone", prompts[2], K)
        rows[1] = [_dense(backend.prefill("b", prompts[1], vocab, prefix), vocab)]
        backend.release("gone")  # its cells lie between a's and b's
        backend.prefill("gone", [*prompts[0], *prompts[2]], K)
        backend.release("gone")
        for _ in range(STEPS):
            requests = [
                DecodeRequest(s, int(rows[i][-1].argmax()), vocab) for i, s in ((0, "a"), (1, "b"))
            ]
            for i, top in enumerate(backend.decode_batch(requests)):
                rows[i].append(_dense(top, vocab))
    backend.release("a")
    backend.release("b")
    assert [e["event"] for e in logs].count("llamacpp_compacted") >= 1
    for i in (0, 1):
        best = np.argsort(-alone[i], axis=1)[:, :16]
        np.testing.assert_allclose(
            np.take_along_axis(np.stack(rows[i]), best, axis=1),
            np.take_along_axis(alone[i], best, axis=1),
            atol=2e-3,
        )
