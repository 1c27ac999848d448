"""The collected expert outputs on disk: append-only, resumable, readable while being written.

A store is a directory (docs/gating.md, "The store"):

- ``meta.json``: the experts (id, model, tokenizer, backend, vocabulary size) in the order of the
  expert axis, the dataset, the prompt formats, ``top_k``, when it was created and from what;
- ``examples.jsonl``: one example per line (the ``McExample`` fields), all written at creation;
- ``records.msgpack``: concatenated msgpack maps, one ``ScoreRecord`` per (example, expert):
  the expert's ``Scored`` answers to the letter and the cloze ``Score`` requests, or the error
  that expert gave for that example for good.

Each record is written whole and flushed before the next is taken (fsynced at least every
``fsync_s``), so a killed collector loses at most the record in flight. Reopening ignores a
truncated last record (and cuts it off before appending), so the pairs on disk are exactly
the ones done. One writer at a time (an exclusive lock on ``.lock``).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Final

import msgspec
import numpy as np
import structlog

from moe2.gating.data import McExample, cloze_targets, embed_text
from moe2.gating.evaluate import ExampleScores, ScoreArrays
from moe2.runtime import wire
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.trace import TruncatedObject, object_end

if TYPE_CHECKING:
    from moe2.gating.dataset import GatingData, OptionScores

STORE_FORMAT: Final = "moe2.gating.outputs"
STORE_VERSION: Final = 1
FORMATS: Final = ("letter", "cloze")
META, EXAMPLES, RECORDS, LOCK = "meta.json", "examples.jsonl", "records.msgpack", ".lock"

log = structlog.get_logger("moe2.gating.store")


class ExpertIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who answered: from the expert's heartbeat."""

    id: str
    model: str
    tokenizer: str
    backend: str = ""
    vocab_size: int = 0

    @classmethod
    def of(cls, hb: wire.Heartbeat) -> ExpertIdentity:
        return cls(
            id=hb.expert,
            model=hb.model,
            tokenizer=hb.tokenizer,
            backend=hb.backend,
            vocab_size=hb.vocab_size,
        )


class DatasetSpec(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    limit: int | None = None
    seed: int = 0
    examples: int = 0
    digest: str = ""  # of the examples' ids and contents, in order


class StoreMeta(msgspec.Struct, frozen=True, kw_only=True):
    format: str = STORE_FORMAT
    version: int = STORE_VERSION
    experts: list[ExpertIdentity]
    dataset: DatasetSpec
    formats: list[str] = msgspec.field(default_factory=lambda: list(FORMATS))
    top_k: int = 0
    created: str = ""
    source: str = ""  # "nats://…" for a live collection, "trace:PATH" for one from a trace

    @property
    def expert_ids(self) -> list[str]:
        return [e.id for e in self.experts]


class ScoreRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One (example, expert) pair: both answers, or the expert's lasting error for it."""

    example: str
    expert: str
    letter: wire.Scored | None = None
    cloze: wire.Scored | None = None
    error: wire.Error | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.letter is not None and self.cloze is not None


def now_iso() -> str:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


def examples_digest(examples: Sequence[McExample]) -> str:
    import hashlib

    h = hashlib.sha256()
    for ex in examples:
        h.update(msgspec.json.encode(ex))
        h.update(b"\n")
    return h.hexdigest()[:16]


class OutputStore:
    """``OutputStore(dir)`` reads a store; ``OutputStore.create(...)`` starts or resumes one."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META
        if not meta_path.is_file():
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"{self.directory} is not a gating output store (no {META}); "
                "make one with `moe2 gating collect --out DIR`",
            )
        self.meta = read_meta(self.directory)
        self.examples = _read_examples(self.directory / EXAMPLES)
        self._by_id = {ex.id: ex for ex in self.examples}
        self._records, self._good_end = _read_records(self.directory / RECORDS)
        self._writer: _RecordWriter | None = None

    # --- creating and resuming -------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, meta: StoreMeta, examples: Sequence[McExample]) -> OutputStore:
        """Start a store in ``directory``, or resume the one there if it was started with the
        same experts (ids, models, tokenizers), examples and ``top_k``; open it for appending."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lock = _lock(directory)
        try:
            if not (directory / META).exists():
                _write_examples(directory / EXAMPLES, examples)
                _write_meta(directory / META, meta)
                log.info("store_created", dir=str(directory), examples=len(examples))
            store = cls(directory)
            check_resumable(store.meta, store.examples, meta, examples)
            store._writer = _RecordWriter(directory / RECORDS, store._good_end, lock)
        except BaseException:
            lock.close()
            raise
        if store._records:
            log.info("store_resumed", dir=str(directory), done=len(store._records))
        return store

    def append(self, record: ScoreRecord) -> None:
        """Write one record (whole, flushed); a pair already done is refused."""
        if self._writer is None:
            raise Moe2Error(ErrorCode.INTERNAL, "this store was opened for reading only")
        key = (record.example, record.expert)
        if key in self._records:
            raise Moe2Error(ErrorCode.INTERNAL, f"{key} is already in the store")
        if record.example not in self._by_id or record.expert not in self.meta.expert_ids:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"{key} is not an example x expert here")
        self._writer.write(record)
        self._records[key] = record

    def close(self) -> None:
        """Idempotent: fsync and release the lock."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------------

    @property
    def expert_ids(self) -> list[str]:
        return self.meta.expert_ids

    def done(self) -> set[tuple[str, str]]:
        """The (example id, expert id) pairs on disk (answered or failed for good)."""
        return set(self._records)

    def records(self) -> Iterator[ScoreRecord]:
        return iter(self._records.values())

    def pending(self, examples: Iterable[McExample] | None = None) -> list[tuple[str, str]]:
        """The (example, expert) pairs still to collect, in example then expert order."""
        chosen = self.examples if examples is None else examples
        return [
            (ex.id, e) for ex in chosen for e in self.expert_ids if (ex.id, e) not in self._records
        ]

    def complete_examples(self, experts: Sequence[str] | None = None) -> list[McExample]:
        """The examples every expert (of ``experts``) answered, in store order: what training
        and eval use."""
        ids = self.expert_ids if experts is None else experts
        return [
            ex
            for ex in self.examples
            if all((r := self._records.get((ex.id, e))) is not None and r.ok for e in ids)
        ]

    def failed(self) -> list[ScoreRecord]:
        return [r for r in self._records.values() if not r.ok]

    def score_arrays(
        self, example_ids: Sequence[str] | None = None, experts: Sequence[str] | None = None
    ) -> ScoreArrays:
        """Evaluation arrays for ``example_ids`` (default: every example that ``experts``, by
        default all of the store's, answered), over ``experts`` in that order. Per token when
        those experts share a tokenizer, else per answer text and byte."""
        chosen_experts = list(self.expert_ids if experts is None else experts)
        unknown = sorted(set(chosen_experts) - set(self.expert_ids))
        if unknown or not chosen_experts:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"experts {unknown or chosen_experts} are not in {self.directory} "
                f"({self.expert_ids})",
            )
        chosen = (
            self.complete_examples(chosen_experts)
            if example_ids is None
            else [self.example(i) for i in example_ids]
        )
        identities = {e.id: e for e in self.meta.experts}
        mixed = self.mixes(chosen_experts)
        scores = [self._example_scores(ex, chosen_experts) for ex in chosen]
        vocab = {identities[e].vocab_size for e in chosen_experts}
        return ScoreArrays(
            expert_ids=chosen_experts,
            example_ids=[ex.id for ex in chosen],
            examples=scores,
            vocab_size=vocab.pop() if len(vocab) == 1 and not mixed else 0,
            unit="byte" if mixed else "token",
        )

    @property
    def mixed(self) -> bool:
        """The experts use more than one tokenizer: scores are per answer text, lengths in bytes."""
        return self.mixes(self.expert_ids)

    def mixes(self, experts: Sequence[str]) -> bool:
        """Whether ``experts`` use more than one tokenizer between them."""
        tokenizers = {e.id: e.tokenizer for e in self.meta.experts}
        return len({tokenizers[e] for e in experts}) > 1

    def to_gating_data(self, *, options: bool = False) -> GatingData:
        """The training data (contract: gating/dataset.py) over every complete example;
        ``options``: with every option's scores as cloze evaluation reads them (for
        ``TrainConfig.cloze_weight``; they enter the data hash, so leave them out otherwise)."""
        from moe2.gating.dataset import GatingData

        chosen = self.complete_examples()
        if not chosen:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"{self.directory} holds no example answered by every expert "
                f"({len(self._records)} records, {len(self.failed())} failed)",
            )
        scores = [self._example_scores(ex) for ex in chosen]
        return GatingData(
            expert_ids=self.expert_ids,
            example_ids=[ex.id for ex in chosen],
            texts=[embed_text(ex) for ex in chosen],
            gold_logprobs=[s.gold.astype(np.float32) for s in scores],
            subjects=[ex.subject for ex in chosen],
            options=[_option_scores(s) for s in scores] if options else None,
        )

    def example(self, example_id: str) -> McExample:
        ex = self._by_id.get(example_id)
        if ex is None:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"example {example_id!r} is not in this store")
        return ex

    def _example_scores(self, ex: McExample, experts: Sequence[str] | None = None) -> ExampleScores:
        """``ex`` scored by ``experts`` (default: all), per answer text if they mix tokenizers."""
        chosen = self.expert_ids if experts is None else experts
        recs = [self._record(ex.id, e) for e in chosen]
        return example_scores(ex, recs, by_text=self.mixes(chosen))

    def _record(self, example_id: str, expert: str) -> ScoreRecord:
        rec = self._records.get((example_id, expert))
        if rec is None or not rec.ok:
            why = "missing" if rec is None else f"failed: {rec.error and rec.error.message}"
            raise Moe2Error(
                ErrorCode.INVALID_FIELD, f"no answer of {expert} for {example_id} ({why})"
            )
        return rec


# ---------------------------------------------------------------------------------------------
# From records to arrays (pure).


def example_scores(
    ex: McExample, records: Sequence[ScoreRecord], *, by_text: bool = False
) -> ExampleScores:
    """Stack the experts' answers for one example. One tokenizer: per token (the experts must
    tokenise every option alike). ``by_text`` (experts with different tokenizers): one unit per
    option, each expert's log-probability of the whole option text, with the text's length in
    UTF-8 bytes as its length (docs/gating.md, "Pools of two tokenizers")."""
    letters = [_scored(r, "letter") for r in records]
    clozes = [_scored(r, "cloze") for r in records]
    letter = np.array([[float(t.logprobs_array().sum()) for t in s.targets] for s in letters])
    n_options = len(ex.options)
    if by_text:
        texts = cloze_targets(ex)
        return ExampleScores(
            answer=ex.answer,
            letter=letter,
            cloze=[
                np.array(
                    [
                        [float(s.targets[o].logprobs_array().astype(np.float64).sum())]
                        for s in clozes
                    ]
                )
                for o in range(n_options)
            ],
            cloze_ids=[np.zeros(0, dtype=np.int64) for _ in range(n_options)],
            lengths=[len(texts[o].encode()) for o in range(n_options)],
        )
    cloze, ids = [], []
    for o in range(n_options):
        per_expert = [s.targets[o] for s in clozes]
        ids.append(_same_ids(ex, o, per_expert))
        cloze.append(np.stack([t.logprobs_array() for t in per_expert]).astype(np.float64))
    top = [s.targets[ex.answer].top_arrays() for s in clozes]
    ks = {t[0].shape[1] for t in top}
    top_ids = np.stack([t[0] for t in top]) if len(ks) == 1 else None
    top_lps = np.stack([t[1] for t in top]) if len(ks) == 1 else None
    return ExampleScores(
        answer=ex.answer,
        letter=letter,
        cloze=cloze,
        cloze_ids=ids,
        top_ids=top_ids,
        top_logprobs=top_lps,
    )


def _option_scores(scores: ExampleScores) -> OptionScores:
    """Every option's scores and length in units, as ``cloze_scores`` reads them."""
    from moe2.gating.dataset import OptionScores

    lps = [np.asarray(lp, dtype=np.float32) for lp in scores.cloze]
    return OptionScores(lps, [scores.length(o) for o in range(len(lps))], scores.answer)


def _scored(record: ScoreRecord, fmt: str) -> wire.Scored:
    scored = record.letter if fmt == "letter" else record.cloze
    if scored is None:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"{record.expert} has no {fmt} answer")
    return scored


def _same_ids(ex: McExample, option: int, targets: Sequence[wire.TargetScore]) -> np.ndarray:
    first = targets[0].ids_array()
    if any(not np.array_equal(t.ids_array(), first) for t in targets[1:]):
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"the experts tokenise option {option} of {ex.id} differently "
            f"({cloze_targets(ex)[option]!r}); per-token fusion needs one tokenizer",
        )
    return first.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Resuming (pure).


def check_resumable(
    have: StoreMeta,
    have_examples: Sequence[McExample],
    want: StoreMeta,
    want_examples: Sequence[McExample],
) -> None:
    """Refuse to append to a store started with other experts, examples or top_k."""
    if have.format != STORE_FORMAT or have.version != STORE_VERSION:
        raise Moe2Error(
            ErrorCode.UNSUPPORTED_VERSION, f"store format {have.format} v{have.version}"
        )
    if have.expert_ids != want.expert_ids:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"this store was started with experts {have.expert_ids}, not {want.expert_ids}; "
            "resume with the same experts or use a new --out",
        )
    for old, new in zip(have.experts, want.experts, strict=True):
        if (old.model, old.tokenizer) != (new.model, new.tokenizer):
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"expert {old.id} now serves {new.model} ({new.tokenizer}); the store holds "
                f"answers from {old.model} ({old.tokenizer})",
            )
    if [ex.id for ex in have_examples] != [ex.id for ex in want_examples] or examples_digest(
        have_examples
    ) != examples_digest(want_examples):
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"this store holds {len(have_examples)} other examples ({have.dataset.path}, "
            f"limit {have.dataset.limit}, seed {have.dataset.seed}); resume with the same "
            "--data, --limit and --seed, or use a new --out",
        )
    if have.top_k != want.top_k:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, f"this store was collected with --top-k {have.top_k}"
        )


# ---------------------------------------------------------------------------------------------
# Files.


def _lock(directory: Path) -> IO[bytes]:
    f = open(directory / LOCK, "ab")  # noqa: SIM115  # held open while the store is written
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise Moe2Error(
            ErrorCode.BUSY, f"another collection is writing to {directory} (it holds {LOCK})"
        ) from None
    return f


def _write_meta(path: Path, meta: StoreMeta) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(meta), indent=2) + b"\n")
    os.replace(tmp, path)


def read_meta(directory: Path) -> StoreMeta:
    """The store's meta.json alone (cheap: no records read)."""
    path = Path(directory) / META
    try:
        meta = msgspec.json.decode(path.read_bytes(), type=StoreMeta)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Moe2Error(ErrorCode.MALFORMED, f"{path}: {exc}") from None
    if meta.format != STORE_FORMAT:
        raise Moe2Error(ErrorCode.MALFORMED, f"{path} is not a {STORE_FORMAT} store")
    return meta


def _write_examples(path: Path, examples: Sequence[McExample]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for ex in examples:
            f.write(msgspec.json.encode(ex) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_examples(path: Path) -> list[McExample]:
    decoder = msgspec.json.Decoder(McExample)
    try:
        return [decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()]
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Moe2Error(ErrorCode.MALFORMED, f"{path}: {exc}") from None


_record_decoder = msgspec.msgpack.Decoder(ScoreRecord)


def _read_records(path: Path) -> tuple[dict[tuple[str, str], ScoreRecord], int]:
    """Every whole record (the first of any duplicate pair) and the offset after the last."""
    buf = path.read_bytes() if path.exists() else b""
    records: dict[tuple[str, str], ScoreRecord] = {}
    pos = 0
    while pos < len(buf):
        try:
            end = object_end(buf, pos)
        except TruncatedObject:
            log.warning("store_truncated_record", path=str(path), lost_bytes=len(buf) - pos)
            break
        except ValueError as exc:
            raise Moe2Error(ErrorCode.MALFORMED, f"{path}: bad record at +{pos}: {exc}") from None
        rec = _decode_record(path, buf[pos:end], pos)
        if records.setdefault((rec.example, rec.expert), rec) is not rec:
            log.warning("store_duplicate_record", example=rec.example, expert=rec.expert)
        pos = end
    return records, pos


def _decode_record(path: Path, data: bytes, at: int) -> ScoreRecord:
    try:
        return _record_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Moe2Error(ErrorCode.MALFORMED, f"{path}: bad record at +{at}: {exc}") from None


class _RecordWriter:
    """Appends whole records after cutting off a truncated tail; holds the store's lock."""

    def __init__(self, path: Path, good_end: int, lock: IO[bytes], fsync_s: float = 1.0) -> None:
        self._lock = lock
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115  # closed by close()
        if self._file.tell() != good_end:
            self._file.truncate(good_end)
            self._file.seek(good_end)
        self._encoder = msgspec.msgpack.Encoder()
        self._fsync_s = fsync_s
        self._synced = time.monotonic()

    def write(self, record: ScoreRecord) -> None:
        self._file.write(self._encoder.encode(record))
        self._file.flush()
        if time.monotonic() - self._synced >= self._fsync_s:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        self._lock.close()
