"""The built-in Gemma-3-270M (base): its file, its tokenizer's bytes, and one expert on the bus.

The model is loaded once for the module. On a fresh box that first load converts the GGUF (about
90 s on 2 cores) and caches the result; later runs load the cache in seconds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import gguf
import numpy as np
import pytest
import torch

from moe2.agents.expert.agent import ExpertAgent, ExpertConfig
from moe2.agents.expert.backends import load_backend
from moe2.agents.expert.backends.base import plain_chat_text
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.expert.models import BUILTIN_MODELS, BuiltinModel, resolve_model
from moe2.runtime import wire
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.errors import Moe2Error
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects
from moe2.runtime.wire import ChatMessage
from tests.test_end_to_end import fusion

GEMMA = "gemma3-270m"
NAME = "gemma-3-270m-q4_k_m"
GEMMA_IDENTITY = "gemma-3-270m-q4_k_m:5ab04baf4dc84899"  # as protocol.md §10 gives it
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
QUESTION = "What is the capital of France?"
TEXTS = [
    "naïve — 東京",
    "Two lines,\nthen a blank one:\n\n  and  doubled   spaces\tand a tab.",
    " a leading space and a trailing one ",
    "🌊 is one token; \x07 and 𓀀 (U+13000) are bytes: <0x07>, <0xF0><0x93><0x80><0x80>",
]
CONTROL, BYTE = 3, 6  # gguf's token types of special tokens and of <0xNN> byte tokens


@pytest.fixture(scope="module")
def gemma() -> Iterator[TransformersBackend]:
    loaded = load_backend("transformers", resolve_model(GEMMA))
    assert isinstance(loaded, TransformersBackend)
    yield loaded


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- the file --------------------------------------------------------------------------------


def test_experts_starting_together_assemble_the_file_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOE2_CACHE", str(tmp_path))
    with ThreadPoolExecutor(3) as pool:
        sources = list(pool.map(lambda _: resolve_model(GEMMA), range(3)))
    path = tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert {(s.name, s.path, s.format) for s in sources} == {(NAME, path, "gguf")}
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    assert sha256_of(path) == GGUF_SHA256
    written = path.stat().st_mtime_ns
    assert resolve_model(GEMMA).path == path
    assert path.stat().st_mtime_ns == written  # found, not assembled again


def test_a_chunked_builtin_that_is_not_installed_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MOE2_CACHE", str(tmp_path))
    missing = BuiltinModel("moe2_no_such_package", "x.gguf", "pip install no-such", assembled=True)
    monkeypatch.setitem(BUILTIN_MODELS, "missing", missing)
    with pytest.raises(Moe2Error, match="install it with: pip install no-such"):
        resolve_model("missing")


def test_a_base_model_chat_is_plain_text() -> None:
    m = ChatMessage
    chat = [m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello"), m("user", "Why?")]
    assert (
        plain_chat_text(chat) == "Be brief.\n\nUser: Hi\nAssistant: Hello\nUser: Why?\nAssistant:"
    )
    with pytest.raises(Moe2Error, match="tool"):
        plain_chat_text([m("tool", "{}")])


# --- the tokenizer ---------------------------------------------------------------------------


@pytest.mark.model
def test_info_describes_gemma(gemma: TransformersBackend) -> None:
    info = gemma.info
    assert (info.model, info.backend, info.vocab_size) == (NAME, "transformers", 262144)
    assert info.eos_ids[0] == 1  # <eos>
    assert info.tokenizer == GEMMA_IDENTITY
    assert info.quantisation == "Q4_K_M"
    assert GEMMA_IDENTITY in DOC.read_text(encoding="utf-8")


@pytest.mark.model
def test_the_identity_is_the_hash_of_the_gguf_files_own_token_table(
    gemma: TransformersBackend,
) -> None:
    """Computed with no transformers: ``▁`` is a space, a byte token its byte, a control token
    no bytes, every other token its own text."""
    reader = gguf.GGUFReader(str(resolve_model(GEMMA).path))
    tokens, types = (reader.fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type"))
    digest = hashlib.sha256()
    for i, kind in zip(tokens.data, types.data, strict=True):
        text, kind = bytes(tokens.parts[i]).decode(), int(types.parts[kind][0])
        piece = text.replace("\u2581", " ").encode()
        piece = b"" if kind == CONTROL else bytes([int(text[3:5], 16)]) if kind == BYTE else piece
        digest.update(len(piece).to_bytes(4, "little") + piece)
    assert gemma.info.tokenizer == f"{NAME}:{digest.hexdigest()[:16]}"


@pytest.mark.model
def test_token_bytes_give_back_the_text_they_were_encoded_from(gemma: TransformersBackend) -> None:
    table, vocab = gemma.token_bytes, gemma._tokenizer.get_vocab()
    assert table[vocab["<0x0A>"]] == b"\n" and table[vocab["<0xE2>"]] == b"\xe2"
    assert table[vocab["\u2581the"]] == b" the"
    assert table[vocab["<eos>"]] == table[vocab["<start_of_turn>"]] == b""
    for text in TEXTS:
        ids = gemma.encode(text)
        assert b"".join(table[i] for i in ids) == text.encode(), text
        assert gemma._tokenizer.decode(ids) == text
    assert any(vocab["<0xF0>"] in gemma.encode(t) for t in TEXTS)  # byte fallback was exercised


@pytest.mark.model
def test_the_prompt_is_the_plain_text_chat_after_bos(gemma: TransformersBackend) -> None:
    ids = gemma.encode_chat([ChatMessage("user", QUESTION)])
    assert ids[0] == gemma._tokenizer.bos_token_id == 2
    assert (
        b"".join(gemma.token_bytes[i] for i in ids[1:]) == f"User: {QUESTION}\nAssistant:".encode()
    )


@pytest.mark.model
def test_an_answer_is_scored_as_the_model_writes_it_after_its_leading_space(
    gemma: TransformersBackend,
) -> None:
    """The plain-text chat ends at "Assistant:": the model writes " Paris", one "▁Paris" token,
    so a Score target is encoded with its leading space. Scored without it ("Assistant:Paris"),
    the right answer loses its lead over the wrong ones (the collection once did that, and
    Gemma-3 looked as good as chance)."""
    assert gemma.encode_answer("Paris") == gemma.encode(" Paris")
    assert gemma.encode_answer(" Paris") == gemma.encode(" Paris")
    prompt = gemma.encode_chat([ChatMessage("user", "What is the capital of France?")])
    options = ["Paris", "Lyon", "Berlin", "Madrid"]
    spaced = gemma.score(prompt, [gemma.encode_answer(o) for o in options], 0)
    totals = [float(s.logprobs.sum()) for s in spaced]
    assert int(np.argmax(totals)) == 0
    bare = gemma.score(prompt, [gemma.encode(o) for o in options], 0)
    assert totals[0] > float(bare[0].logprobs.sum()) + 1.0  # " Paris" is far likelier


@pytest.mark.model
def test_scores_past_the_sliding_window_equal_one_forward_pass(gemma: TransformersBackend) -> None:
    """Gemma-3's sliding-window layers keep 512 positions: a 600-token prompt goes past them."""
    long_question = " ".join(["The sea is wide and blue."] * 85) + " What colour is the sea?"
    prompt = gemma.encode_chat([ChatMessage("user", long_question)])
    targets = [gemma.encode(" Blue."), gemma.encode(" The sea is blue, of course.")]
    assert len(prompt) > 600
    for target, got in zip(targets, gemma.score(prompt, targets, 0), strict=True):
        with torch.inference_mode():
            logits = gemma._model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 :]
        expected = torch.log_softmax(logits[:-1].float(), -1)[range(len(target)), target]
        np.testing.assert_allclose(got.logprobs, expected.numpy(), atol=1e-4)


# --- one expert on the bus -------------------------------------------------------------------


def reference_greedy(backend: TransformersBackend, n: int) -> str:
    """The model's own greedy generation (transformers' generate) of the prompt."""
    ids = backend.encode_chat([ChatMessage("user", QUESTION)])
    with torch.inference_mode():
        out = backend._model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
        )
    return str(backend._tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


@asynccontextmanager
async def gemma_expert(
    backend: TransformersBackend, url: str, config: ExpertConfig | None = None
) -> AsyncIterator[wire.Heartbeat]:
    """A Gemma expert in this process on the default prefix (``config``: default, id ``gemma``);
    yields its first heartbeat."""
    config = config or ExpertConfig(expert_id="gemma", warmup=False, energy_source="declared")
    expert_nc = await connect_nats(url, name=config.expert_id)
    nc = await connect_nats(url, name="look")
    try:
        beats = await nc.subscribe(Subjects(DEFAULT_PREFIX).member(config.expert_id))
        await nc.flush()
        await nc.flush()  # nats-py 2.16: the first PONG may overtake the SUB (see test_expert.py)
        async with anyio.create_task_group() as tg:
            await tg.start(ExpertAgent(expert_nc, backend, config).run)
            beat = wire.decode((await beats.next_msg(timeout=10)).data)
            assert isinstance(beat, wire.Heartbeat)
            yield beat
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
        await close_nats(expert_nc)


@pytest.mark.anyio
@pytest.mark.model
async def test_one_gemma_expert_through_the_bus_equals_the_models_greedy_generation(
    gemma: TransformersBackend, nats_url: str
) -> None:
    async with gemma_expert(gemma, nats_url) as beat, fusion(nats_url, 1) as client:
        with anyio.fail_after(120):
            answer = client.ask(QUESTION, max_tokens=24)
            chunks = [c.text async for c in answer]
    assert (beat.model, beat.tokenizer, beat.vocab_size) == (NAME, GEMMA_IDENTITY, 262144)
    assert beat.quantisation == "Q4_K_M"
    assert answer.final is not None and answer.final.experts == ["gemma"]
    assert "".join(chunks) == answer.final.text == reference_greedy(gemma, 24)
    assert "Paris" in answer.final.text
