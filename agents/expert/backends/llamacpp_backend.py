"""The llama.cpp backend: a GGUF file run as it is, with llama.cpp's own quantised kernels.

Sessions are llama.cpp *sequences* of one context. The context holds one KV cache of ``cells``
positions shared by up to ``slots`` sequences (``kv_unified``); each session owns one sequence id
while it lives, so its cache stays where it is between steps and nothing is copied when the expert
switches from one session to another; ``decode_batch`` is one ``llama_decode`` of a batch that
holds one token of each session, each in its own sequence. ``save_state`` and ``load_state`` would
copy a session's whole cache in and out at every switch (and the high-level ``Llama`` keeps a
vocab-wide score row per position with ``logits_all``), and a ``Llama`` per session would hold a
context, its buffers and a full-size cache per session. A rewrite removes the tail of its sequence
(``llama_memory_seq_rm``); a prefix (``keep_prefix``) is a sequence of its own that prompts start
from by ``llama_memory_seq_cp``, which shares the cells rather than copying them. Logits are asked
for per token: the last position of a step, every position of a scored target. Tokenising is the
reference's (``chat_tokenizer``), so ids and the tokenizer identity equal the transformers
backend's. Install: ``pip install 'moe2[llamacpp]'`` (builds llama.cpp from source: about 9-14
minutes on 2 cores).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import llama_cpp
import numpy as np
import numpy.typing as npt
import structlog
from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel

from moe2.agents.expert.backends.base import (
    BackendInfo,
    DecodeRequest,
    PrefixCache,
    TargetLogprobs,
    TopK,
    check_batch,
    common_prefix,
)
from moe2.agents.expert.backends.chat_tokenizer import (
    ChatTokenizer,
    TokenizedBackend,
    reference_directory,
    scored_targets,
)
from moe2.agents.expert.backends.logits import teacher_forced, top_k_of
from moe2.agents.expert.models import ModelSource, quantisation
from moe2.runtime.errors import ErrorCode, Moe2Error

log = structlog.get_logger("moe2.backend")

_T = TypeVar("_T")

NAME: Final = "llama.cpp"
SLOTS: Final = 34  # sequences: the expert's 32 sessions, one for scoring, one for a prefix
GRAVE: Final = SLOTS  # the sequence that holds cells let go while others live (never decoded)
CELLS: Final = 16384  # KV positions shared by all sequences (SmolLM2: 23 KB each in f16)
BATCH: Final = 512  # tokens per llama_decode call
ROWS: Final = 64  # a batch of this many tokens or more is computed otherwise (measured, CPU)


class LlamaCppBackend(TokenizedBackend):
    """One llama.cpp model and context, a sequence per session; implements ``Backend``."""

    def __init__(
        self,
        source: ModelSource,
        tokenizer: ChatTokenizer,
        *,
        threads: int | None = None,
        cells: int = CELLS,
    ) -> None:
        model_params = llama_cpp.llama_model_default_params()
        self._model = LlamaModel(path_model=str(source.path), params=model_params, verbose=False)
        self._context = LlamaContext(
            model=self._model, params=_context_params(threads, cells), verbose=False
        )
        self._batch = LlamaBatch(n_tokens=BATCH, embd=0, n_seq_max=1, verbose=False)
        self._vocab = self._model.n_vocab()
        if self._vocab != tokenizer.vocab_size:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"{source.path}: llama.cpp has {self._vocab} logits, the tokenizer "
                f"{tokenizer.vocab_size}",
            )
        self._tokenizer = tokenizer
        self._free = list(range(SLOTS - 1, -1, -1))  # sequence ids not in use, popped from the end
        self._sessions: dict[str, tuple[int, list[int]]] = {}  # session -> (sequence, ids held)
        self._starts: dict[int, tuple[int, int]] = {}  # sequence -> (prefix sequence, ids shared)
        self._segments: dict[int, list[int]] = {}  # sequence -> ids per llama_decode, after those
        self._cells = cells
        self._prefixes: dict[tuple[int, ...], PrefixCache] = {}
        self._info = BackendInfo(
            model=source.name,
            tokenizer=tokenizer.identity,
            backend=NAME,
            vocab_size=self._vocab,
            eos_ids=tokenizer.eos_ids,
            max_context=tokenizer.max_context,
            quantisation=quantisation(source),
        )

    def keep_prefix(self, ids: Sequence[int]) -> PrefixCache | None:
        if not ids:
            return None
        held = tuple(int(i) for i in ids)
        if held not in self._prefixes:  # the same head asked again: the same sequence
            sequence = self._take()  # kept for the life of the backend: nothing writes to it
            try:
                self._roomy(lambda: self._feed(sequence, list(held), 0, every=False))
            except BaseException:
                self._give_back(sequence)
                raise
            self._prefixes[held] = PrefixCache(ids=held, state=sequence)
        return self._prefixes[held]

    def prefill(
        self, session: str, prompt_ids: Sequence[int], top_k: int, prefix: PrefixCache | None = None
    ) -> TopK:
        self.release(session)
        ids = [int(i) for i in prompt_ids]
        sequence = self._take()
        try:
            logits = self._roomy(lambda: self._start(sequence, ids, prefix))
        except BaseException:
            self._give_back(sequence)
            raise
        self._sessions[session] = (sequence, ids)
        return top_k_of(logits, top_k)

    def extend(self, session: str, ids: Sequence[int], top_k: int) -> list[TopK]:
        """Append ``ids`` in one batch, logits at each; the top-k after each (speculation)."""
        sequence, held = self._held(session)
        new = [int(i) for i in ids]
        if not new:
            return []
        rows = self._roomy(lambda: self._feed(sequence, new, len(held), every=True))
        held += new
        return [top_k_of(row, top_k) for row in rows]

    def truncate(self, session: str, length: int) -> None:
        """Keep the first ``length`` ids of ``session`` (a rejected draft's tail goes)."""
        sequence, held = self._held(session)
        if length >= len(held):
            return
        if length < 1:
            raise Moe2Error(ErrorCode.INVALID_FIELD, "a session keeps at least one token")
        self._let_go(sequence, length)
        del held[length:]

    def score(
        self,
        prompt_ids: Sequence[int],
        targets_ids: Sequence[Sequence[int]],
        top_k: int,
        prefix: PrefixCache | None = None,
    ) -> list[TargetLogprobs]:
        targets = scored_targets(targets_ids)
        k, prompt = min(top_k, self._vocab), [int(i) for i in prompt_ids]
        sequence = self._take()
        try:
            return self._roomy(lambda: self._score_all(sequence, prompt, prefix, targets, k))
        finally:
            self._give_back(sequence)

    def decode(self, session: str, token: int, top_k: int) -> TopK:
        sequence, held = self._held(session)
        logits = self._roomy(lambda: self._feed(sequence, [int(token)], len(held), every=False))
        held.append(int(token))
        return top_k_of(logits[-1], top_k)

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[TopK]:
        """One ``llama_decode`` of one token per session, each in its own sequence."""
        check_batch(requests, self._sessions.__contains__)
        if not requests:
            return []
        entries = [self._sessions[r.session] for r in requests]
        self._roomy(lambda: self._decode_one_each(requests, entries))
        for r, (_, held) in zip(requests, entries, strict=True):
            held.append(int(r.token))
        return [top_k_of(self._logits(i), r.top_k) for i, r in enumerate(requests)]

    def rewrite(self, session: str, ids: Sequence[int], top_k: int) -> TopK:
        sequence, held = self._held(session)
        new = [int(i) for i in ids]
        keep = min(common_prefix(held, new), len(new) - 1)
        self._let_go(sequence, keep)
        del held[keep:]
        logits = self._roomy(lambda: self._feed(sequence, new[keep:], keep, every=False))
        held += new[keep:]
        return top_k_of(logits[-1], top_k)

    def release(self, session: str) -> None:
        entry = self._sessions.pop(session, None)
        if entry is not None:
            self._give_back(entry[0])

    def rename(self, session: str, to: str) -> list[int]:
        entry = self._held(session)
        if to != session:
            self.release(to)
            self._sessions[to] = self._sessions.pop(session)  # the same sequence, renamed
        return list(entry[1])

    def _held(self, session: str) -> tuple[int, list[int]]:
        entry = self._sessions.get(session)
        if entry is None:
            raise Moe2Error(ErrorCode.UNKNOWN_SESSION, f"no KV cache for session {session!r}")
        return entry

    def _take(self) -> int:
        if not self._free:
            raise Moe2Error(ErrorCode.BUSY, f"all {SLOTS} llama.cpp sequences are in use")
        return self._free.pop()

    def _give_back(self, sequence: int) -> None:
        self._let_go(sequence, 0)
        self._free.append(sequence)
        if len(self._free) == SLOTS:  # no session, prefix or score left: every cell is free
            self._clear()

    def _clear(self) -> None:
        llama_cpp.llama_memory_clear(self._context.memory, True)  # the cells' data too

    def _let_go(self, sequence: int, start: int) -> None:
        """Drop positions ``start``… of ``sequence``, their cells kept (by ``GRAVE``) until a
        compaction: llama.cpp would put the next token of any sequence into the lowest free
        cell, below that sequence's earlier ones, and its attention visits a sequence's cells
        in cell order, so that token's result would differ by rounding, which the Q4 kernels'
        8-bit activations grow to tenths of a nat (docs/backends.md)."""
        self._context.kv_cache_seq_cp(sequence, GRAVE, start, -1)
        self._context.kv_cache_seq_rm(sequence, start, -1)
        source, shared = self._starts.pop(sequence, (-1, 0))
        if min(shared, start):
            self._starts[sequence] = (source, min(shared, start))
        self._segments[sequence] = _first(self._segments.pop(sequence, []), start - shared)

    def _roomy(self, step: Callable[[], _T]) -> _T:
        """Run ``step``; if the cells ran out, lay the live sequences out afresh, run it again."""
        try:
            return step()
        except _NoRoom:
            pass
        try:
            self._compact()
            return step()
        except _NoRoom as full:
            raise Moe2Error(ErrorCode.BUSY, f"llama.cpp's {self._cells} KV cells: {full}") from None

    def _compact(self) -> None:
        """Clear the cache and feed the prefixes, then the sessions, again, each in one run of
        cells in position order: the cells let go are free again, and every sequence's cells
        are where a fresh prefill puts them, so what follows computes as it would alone."""
        self._clear()
        laid = {int(p.state) for p in self._prefixes.values()}  # type: ignore[call-overload]  # this backend's own state: sequence ids
        laid |= {sequence for sequence, _ in self._sessions.values()}
        for records in (self._starts, self._segments):  # a step cut short starts again
            for sequence in set(records) - laid:
                del records[sequence]
        for prefix in self._prefixes.values():
            self._lay_again(int(prefix.state), list(prefix.ids))  # type: ignore[call-overload]  # this backend's own state: a sequence id
        for session, (sequence, held) in list(self._sessions.items()):
            try:
                self._lay_again(sequence, held)
            except _NoRoom:  # the live sessions alone fill the cache: this one cannot stay
                log.warning("llamacpp_session_dropped", session=session, tokens=len(held))
                self.release(session)
        log.info("llamacpp_compacted", sessions=len(self._sessions))

    def _lay_again(self, sequence: int, ids: list[int]) -> None:
        """Feed ``ids`` into the emptied ``sequence`` as they were fed: llama.cpp computes a
        batch of ``ROWS`` or more tokens otherwise than fewer (tenths of a nat apart), so such a
        batch is fed again as it was, and the tokens between them in batches of fewer."""
        source, shared = self._starts.get(sequence, (-1, 0))
        if shared:
            self._context.kv_cache_seq_cp(source, sequence, 0, shared)
        at = shared
        fed = _first(self._segments.pop(sequence, []), len(ids) - shared)  # not a cut-short step
        for n in _batches(fed):
            self._feed(sequence, ids[at : at + n], at, every=False)
            at += n
        if at < len(ids):  # not expected: the record covers every id after the shared ones
            self._feed(sequence, ids[at:], at, every=False)

    def _decode_one_each(
        self, requests: Sequence[DecodeRequest], entries: list[tuple[int, list[int]]]
    ) -> None:
        batch = self._batch.batch
        batch.n_tokens = len(requests)
        for i, (r, (sequence, held)) in enumerate(zip(requests, entries, strict=True)):
            batch.token[i], batch.pos[i] = int(r.token), len(held)
            batch.seq_id[i][0], batch.n_seq_id[i], batch.logits[i] = sequence, 1, True
        self._decode()
        for sequence, _ in entries:
            self._segments.setdefault(sequence, []).append(1)

    def _score_all(
        self,
        sequence: int,
        prompt: list[int],
        prefix: PrefixCache | None,
        targets: list[list[int]],
        k: int,
    ) -> list[TargetLogprobs]:
        last = self._start(sequence, prompt, prefix)
        return [self._score_one(sequence, len(prompt), last, t, k) for t in targets]

    def _start(self, sequence: int, ids: list[int], prefix: PrefixCache | None) -> Any:
        """Fill the empty ``sequence`` with ``ids`` (from ``prefix``'s head): the last logits."""
        if not ids:
            raise Moe2Error(ErrorCode.EMPTY_PROMPT, "the prompt has no tokens")
        shared = 0 if prefix is None else min(common_prefix(ids, prefix.ids), len(ids) - 1)
        if prefix is not None and shared:
            self._context.kv_cache_seq_cp(int(prefix.state), sequence, 0, shared)  # type: ignore[call-overload]  # this backend's own state: a sequence id
            self._starts[sequence] = (int(prefix.state), shared)  # type: ignore[call-overload]  # the same
        return self._feed(sequence, ids[shared:], shared, every=False)[-1]

    def _score_one(
        self, sequence: int, prompt: int, last: Any, target: list[int], k: int
    ) -> TargetLogprobs:
        following = self._feed(sequence, target[:-1], prompt, every=True) if target[1:] else None
        self._let_go(sequence, prompt)  # back to the prompt alone
        rows = following if following is not None else np.zeros((0, self._vocab), np.float32)
        return teacher_forced(last, rows, target, k)

    def _feed(
        self, sequence: int, ids: list[int], start: int, *, every: bool
    ) -> npt.NDArray[np.float32]:
        """Decode ``ids`` at positions ``start``… of ``sequence``: the logits of each position
        (``every``) or of the last one, (N, V)."""
        rows: list[npt.NDArray[np.float32]] = []
        for at in range(0, len(ids), BATCH):
            chunk = ids[at : at + BATCH]
            self._fill_batch(sequence, chunk, start + at, every)
            self._decode()
            self._segments.setdefault(sequence, []).append(len(chunk))
            wanted = range(len(chunk)) if every else range(len(chunk) - 1, len(chunk))
            if every or at + BATCH >= len(ids):
                rows += [self._logits(i) for i in wanted]
        return np.stack(rows)

    def _decode(self) -> None:
        try:
            self._context.decode(self._batch)
        except RuntimeError as exc:  # llama_decode's 1: no free cells for this batch
            raise _NoRoom(str(exc)) from None

    def _fill_batch(self, sequence: int, ids: list[int], start: int, every: bool) -> None:
        batch = self._batch.batch
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.seq_id[i][0] = sequence
            batch.n_seq_id[i] = 1
            batch.logits[i] = every or i == len(ids) - 1

    def _logits(self, index: int) -> npt.NDArray[np.float32]:
        pointer = self._context.get_logits_ith(index)
        row = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (self._vocab,)
        )
        return row.copy()


def _first(segments: list[int], length: int) -> list[int]:
    """The batch sizes of ``segments`` that held the first ``length`` ids."""
    kept: list[int] = []
    for n in segments:
        if length <= 0:
            break
        kept.append(min(n, length))
        length -= n
    return kept


def _batches(segments: list[int]) -> list[int]:
    """Batch sizes that compute as ``segments`` did: each of ``ROWS`` or more as it was, the
    runs of smaller ones (computed as one token at a time) joined up to ``ROWS - 1``."""
    sizes, small = [], 0
    for n in segments:
        if n < ROWS:
            small += n
            continue
        sizes += _split(small)
        sizes.append(n)
        small = 0
    return sizes + _split(small)


def _split(n: int) -> list[int]:
    return [ROWS - 1] * (n // (ROWS - 1)) + ([n % (ROWS - 1)] if n % (ROWS - 1) else [])


class _NoRoom(Exception):
    """``llama_decode`` found no free cells for a batch (a compaction may make room)."""


def _context_params(threads: int | None, cells: int) -> Any:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = cells
    params.n_batch = BATCH
    params.n_ubatch = BATCH
    params.n_seq_max = SLOTS + 1  # and GRAVE
    params.kv_unified = True  # one pool of cells for all sessions, whatever their lengths
    params.swa_full = True  # sliding-window layers keep every position, so a tail can be cut
    params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
    return params


def load_llamacpp(
    source: ModelSource, *, threads: int | None = None, cells: int = CELLS
) -> LlamaCppBackend:
    """Load the GGUF file of ``source`` into llama.cpp (a model directory is refused)."""
    if source.format != "gguf":
        raise Moe2Error(ErrorCode.INVALID_FIELD, "the llama.cpp backend serves GGUF files only")
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    tokenizer = ChatTokenizer(reference_directory(source), source.name)
    backend = LlamaCppBackend(source, tokenizer, threads=threads, cells=cells)
    log.info("llamacpp_loaded", model=source.name, quantisation=backend.info.quantisation)
    return backend


def _ignore(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's own log lines (model metadata, buffer sizes) would flood the expert's stderr."""


_QUIET: Final = llama_cpp.llama_log_callback(_ignore)  # kept alive: C holds the pointer
