"""``moe2 gating collect``: ask every live expert to score every example, into an OutputStore.

For each example and each expert, two ``Score`` requests (request/reply on the expert's score
subject): the letter format (targets "A", "B", …) and the cloze format (targets: the option
texts; the gold one is the gating target). Both answers go into one record, written whole, so
an interrupted collection resumes where it stopped with nothing collected twice.

The same store can be built from a trace (``moe2 record``) of a live collection: each ``Score``
request is paired with the reply published on its inbox (see ``store_from_trace``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from tqdm import tqdm

from moe2.gating.data import (
    McExample,
    cloze_messages,
    cloze_targets,
    letter_messages,
    letter_targets,
)
from moe2.gating.store import (
    META,
    DatasetSpec,
    ExpertIdentity,
    OutputStore,
    ScoreRecord,
    StoreMeta,
    now_iso,
    read_meta,
)
from moe2.runtime import wire
from moe2.runtime.connection import nats_connection
from moe2.runtime.endpoint import Endpoint, Request, publisher_named_by
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects
from moe2.runtime.trace import TraceRecord, read_trace

log = structlog.get_logger("moe2.collect")

RETRIED_CODES = frozenset({ErrorCode.BUSY, ErrorCode.TIMEOUT, ErrorCode.INTERNAL})
STOP_CODES = frozenset({ErrorCode.BUSY})  # still refused after the retries: stop the run


@dataclass(frozen=True, slots=True)
class CollectConfig:
    experts: tuple[str, ...] | None = None  # None: every expert live at the start
    top_k: int = 8
    concurrency: int = 2  # requests in flight per expert
    timeout_s: float = 120.0  # per request
    retries: int = 2  # more tries per request after a timeout or a transient error
    backoff_s: float = 1.0  # before retry r: backoff_s * 2**r
    wait_s: float = 60.0  # for the experts' heartbeats
    settle_s: float = 3.0  # after the first heartbeat, to hear the others (no --experts)
    prefix: str = DEFAULT_PREFIX
    progress: bool = True
    reuse: tuple[Path, ...] = ()  # earlier stores whose matching records are copied, not asked

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.retries < 0 or self.top_k < 0 or self.timeout_s <= 0:
            raise ValueError("concurrency >= 1, retries >= 0, top_k >= 0 and timeout > 0")


@dataclass(frozen=True, slots=True)
class CollectSummary:
    directory: str
    pairs: int  # examples x experts
    done_before: int
    collected: int
    failed: int  # pairs an expert refused for good (kept in the store as errors)
    seconds: float

    @property
    def complete(self) -> bool:
        return self.done_before + self.collected == self.pairs


def choose_examples(
    examples: Sequence[McExample], limit: int | None, seed: int = 0
) -> list[McExample]:
    """All examples, or a seeded sample of ``limit`` of them kept in their original order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "--limit must be at least 1")
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def requests_for(ex: McExample, top_k: int) -> tuple[wire.Score, wire.Score]:
    """The letter-format and the cloze-format Score requests for one example."""
    return (
        wire.Score(messages=letter_messages(ex), targets=letter_targets(ex), top_k=top_k),
        wire.Score(messages=cloze_messages(ex), targets=cloze_targets(ex), top_k=top_k),
    )


def check_scored(scored: wire.Scored, expert: str, request: wire.Score) -> None:
    """Refuse an answer that does not fit its request (raises Moe2Error)."""
    import numpy as np

    if scored.expert != expert:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"answer from {scored.expert!r}, not {expert!r}")
    if len(scored.targets) != len(request.targets):
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"{len(scored.targets)} targets scored, {len(request.targets)} asked",
        )
    for t in scored.targets:
        ids, lps = t.ids_array(), t.logprobs_array()
        if ids.size == 0 or ids.size != lps.size or len(t.top_ids) != len(t.top_logprobs):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "a target's arrays are empty or disagree")
        if not np.isfinite(lps).all() or float(lps.max()) > 1e-4:
            raise Moe2Error(ErrorCode.BAD_LOGPROBS, "logprobs must be finite and <= 0")
        if len(t.top_ids) % (4 * ids.size):
            raise Moe2Error(ErrorCode.INVALID_FIELD, "top-k arrays are not T x k")


def record_of(
    example: str,
    expert: str,
    requests: tuple[wire.Score, wire.Score],
    answers: tuple[wire.Scored | wire.Error, wire.Scored | wire.Error],
) -> ScoreRecord:
    """One store record from the two answers: an error record if either is not usable."""
    for request, answer in zip(requests, answers, strict=True):
        if isinstance(answer, wire.Error):
            return ScoreRecord(example=example, expert=expert, error=answer)
        try:
            check_scored(answer, expert, request)
        except Moe2Error as exc:
            return ScoreRecord(example=example, expert=expert, error=wire.error_from(exc))
    letter, cloze = answers
    assert isinstance(letter, wire.Scored) and isinstance(cloze, wire.Scored)
    return ScoreRecord(example=example, expert=expert, letter=letter, cloze=cloze)


# ---------------------------------------------------------------------------------------------
# Who is live.


class _Heard:
    """Heartbeats heard so far; ``changed`` fires on any, ``joined`` on a new expert."""

    def __init__(self, subjects: Subjects) -> None:
        self.subjects = subjects
        self.seen: dict[str, wire.Heartbeat] = {}
        self.changed, self.joined = anyio.Event(), anyio.Event()

    async def on_beat(self, request: Request[wire.Heartbeat]) -> None:
        hb = request.message
        if hb.expert not in self.seen:
            self.joined.set()
        self.seen[hb.expert] = hb
        self.changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.changed.wait()
            self.changed = anyio.Event()

    async def until_quiet(self, settle_s: float) -> None:
        """Until no new expert has appeared for ``settle_s`` (or two heartbeat intervals)."""
        while True:
            self.joined = anyio.Event()
            quiet = max(settle_s, *(2 * hb.interval_s for hb in self.seen.values()))
            with anyio.move_on_after(quiet):
                await self.joined.wait()
                continue
            return


async def discover_experts(
    nc: NATS, subjects: Subjects, wanted: Sequence[str] | None, wait_s: float, settle_s: float
) -> dict[str, wire.Heartbeat]:
    """The experts heard by heartbeat: all of ``wanted`` (within ``wait_s``), or, without it,
    everyone heard until no new expert has appeared for ``settle_s``."""
    heard = _Heard(subjects)
    members = Endpoint(
        nc,
        "members",
        subjects.members,
        wire.Heartbeat,
        heard.on_beat,
        identity=publisher_named_by("expert"),
    )
    sub = await members.subscribe()
    try:
        with anyio.move_on_after(wait_s):
            await heard.until(
                lambda: set(wanted) <= heard.seen.keys() if wanted else bool(heard.seen)
            )
        if not wanted and heard.seen:
            await heard.until_quiet(settle_s)
    finally:
        await sub.unsubscribe()
    return _chosen(heard.seen, wanted, subjects, wait_s)


def _chosen(
    seen: dict[str, wire.Heartbeat], wanted: Sequence[str] | None, subjects: Subjects, wait_s: float
) -> dict[str, wire.Heartbeat]:
    if not seen:
        raise Moe2Error(
            ErrorCode.NO_EXPERTS,
            f"no expert heartbeat on {subjects.members} within {wait_s:g} s: start the experts "
            "(`moe2 expert --id … --nats …`), check --nats and --prefix, or, if they are still "
            f"loading their models, wait longer (--wait {max(4 * wait_s, 300):g})",
        )
    missing = sorted(set(wanted or ()) - seen.keys())
    if missing:
        raise Moe2Error(
            ErrorCode.NO_EXPERTS,
            f"experts {missing} sent no heartbeat within {wait_s:g} s; live: {sorted(seen)}; if "
            f"they are still loading their models, wait longer (--wait {max(4 * wait_s, 300):g})",
        )
    return {e: seen[e] for e in sorted(wanted or seen)}


# ---------------------------------------------------------------------------------------------
# Collecting.


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first Moe2Error in a task group's exceptions (else the group itself)."""
    for exc in group.exceptions:
        if isinstance(exc, Moe2Error):
            return exc
        if isinstance(exc, BaseExceptionGroup) and isinstance(
            found := _first_error(exc), Moe2Error
        ):
            return found
    return group


class Collector:
    """Sends the pending pairs of a store to the experts, ``concurrency`` at a time per expert."""

    def __init__(
        self, nc: NATS, store: OutputStore, examples: Sequence[McExample], config: CollectConfig
    ) -> None:
        self.nc, self.store, self.config = nc, store, config
        self.subjects = Subjects(config.prefix)
        self.examples = {ex.id: ex for ex in examples}
        self.collected = 0
        self.failed = 0
        self._bar: tqdm[None] | None = None

    async def run(self) -> None:
        pending = self.store.pending(self.examples.values())
        total = len(self.examples) * len(self.store.expert_ids)
        with tqdm(
            total=total,
            initial=total - len(pending),
            unit="pair",
            desc="collect",
            disable=not self.config.progress,
            dynamic_ncols=True,
        ) as self._bar:
            try:
                async with anyio.create_task_group() as tg:
                    for expert in self.store.expert_ids:
                        queue = iter([ex for ex, e in pending if e == expert])
                        for _ in range(self.config.concurrency):
                            tg.start_soon(self._worker, expert, queue)
            except BaseExceptionGroup as group:
                raise _first_error(group) from None

    async def _worker(self, expert: str, queue: Iterator[str]) -> None:
        for example_id in queue:
            ex = self.examples[example_id]
            requests = requests_for(ex, self.config.top_k)
            letter = await self._ask(expert, ex, requests[0])
            cloze = await self._ask(expert, ex, requests[1])
            record = record_of(ex.id, expert, requests, (letter, cloze))
            self.store.append(record)
            self._count(record)

    def _count(self, record: ScoreRecord) -> None:
        if record.ok:
            self.collected += 1
        else:
            self.failed += 1
            assert record.error is not None
            log.warning(
                "pair_failed",
                example=record.example,
                expert=record.expert,
                code=record.error.code,
                error=record.error.message,
            )
        if self._bar is not None:
            self._bar.update(1)
            if self.failed:
                self._bar.set_postfix(failed=self.failed)

    async def _ask(self, expert: str, ex: McExample, score: wire.Score) -> wire.Scored | wire.Error:
        """The answer, after up to ``retries`` more tries on timeouts and transient errors."""
        subject, data = self.subjects.expert_score(expert), wire.encode(score)
        why = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                await anyio.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            answer, why = await self._request(subject, data)
            if isinstance(answer, wire.Scored) or (
                isinstance(answer, wire.Error) and answer.code not in RETRIED_CODES
            ):
                return answer
            log.info("score_retry", expert=expert, example=ex.id, attempt=attempt + 1, why=why)
        if isinstance(answer, wire.Error) and answer.code not in STOP_CODES:
            return answer
        raise Moe2Error(
            ErrorCode.TIMEOUT,
            f"expert {expert} gave no answer to the score request for {ex.id} in "
            f"{self.config.retries + 1} tries ({why}); the pairs collected so far are saved "
            f"in {self.store.directory}: run the same command again to resume",
        )

    async def _request(self, subject: str, data: bytes) -> tuple[wire.Message | None, str]:
        try:
            msg = await self.nc.request(subject, data, timeout=self.config.timeout_s)
        except nats.errors.NoRespondersError:
            return None, "no responders: the expert is not subscribed"
        except nats.errors.TimeoutError:
            return None, f"no reply within {self.config.timeout_s:g} s"
        try:
            return wire.decode(msg.data), ""
        except Moe2Error as exc:
            return wire.error_from(exc), ""


def new_meta(
    experts: Sequence[ExpertIdentity], dataset: DatasetSpec, top_k: int, source: str
) -> StoreMeta:
    """The meta of a new store; the expert axis is in id order."""
    return StoreMeta(
        experts=sorted(experts, key=lambda e: e.id),
        dataset=dataset,
        top_k=top_k,
        created=now_iso(),
        source=source,
    )


async def collect_live(
    url: str,
    examples: Sequence[McExample],
    out: Path,
    dataset: DatasetSpec,
    config: CollectConfig,
) -> CollectSummary:
    """Collect every pending pair of ``examples`` x live experts into the store at ``out``."""
    started = time.monotonic()
    async with nats_connection(url, name="moe2-gating-collect") as nc:
        wanted = config.experts or _experts_of_existing(out)
        live = await discover_experts(
            nc, Subjects(config.prefix), wanted, config.wait_s, config.settle_s
        )
        log.info("experts_found", experts=sorted(live), models=[hb.model for hb in live.values()])
        identities = [ExpertIdentity.of(hb) for hb in live.values()]
        meta = new_meta(identities, dataset, config.top_k, url)
        with OutputStore.create(out, meta, examples) as store:
            for earlier in config.reuse:
                reuse_records(store, OutputStore(earlier))
            before = len(store.done())
            collector = Collector(nc, store, examples, config)
            try:
                await collector.run()
            finally:
                _log_stopped(store, collector, before, started)
    return CollectSummary(
        directory=str(out),
        pairs=len(examples) * len(live),
        done_before=before,
        collected=collector.collected + collector.failed,
        failed=collector.failed,
        seconds=time.monotonic() - started,
    )


def reuse_records(store: OutputStore, earlier: OutputStore) -> int:
    """Copy into ``store`` the records of ``earlier`` that answer the same question (same id
    and content) from the same expert (same id, model and tokenizer) with the same ``top_k``,
    and are not in ``store`` yet; returns how many. Extends a collection without asking again."""
    if earlier.meta.top_k != store.meta.top_k:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"{earlier.directory} kept top-{earlier.meta.top_k}, this store top-{store.meta.top_k}",
        )
    same_expert = {
        e.id
        for e in store.meta.experts
        for old in earlier.meta.experts
        if (e.id, e.model, e.tokenizer) == (old.id, old.model, old.tokenizer)
    }
    wanted = {ex.id: ex for ex in store.examples}
    done = store.done()
    copied = 0
    for record in earlier.records():
        ex = wanted.get(record.example)
        if (
            ex is None
            or record.expert not in same_expert
            or (record.example, record.expert) in done
            or earlier.example(record.example) != ex
        ):
            continue
        store.append(record)
        copied += 1
    log.info("records_reused", source=str(earlier.directory), copied=copied)
    return copied


def _experts_of_existing(out: Path) -> tuple[str, ...] | None:
    """When resuming without --experts, wait for the experts the store was started with."""
    meta = read_meta(out) if (out / META).exists() else None
    return tuple(meta.expert_ids) if meta else None


def _log_stopped(store: OutputStore, collector: Collector, before: int, started: float) -> None:
    log.info(
        "collect_stopped",
        dir=str(store.directory),
        done_before=before,
        collected=collector.collected,
        failed=collector.failed,
        remaining=len(store.pending(collector.examples.values())),
        seconds=round(time.monotonic() - started, 2),
    )


# ---------------------------------------------------------------------------------------------
# The same store from a trace of a live collection.


RequestKey = bytes  # msgpack of (messages, targets)


def request_key(score: wire.Score) -> RequestKey:
    return msgspec.msgpack.encode((score.messages, score.targets))


@dataclass(slots=True)
class _Asked:
    expert: str
    matches: list[tuple[str, int]]  # (example id, 0 letter / 1 cloze)


@dataclass(slots=True)
class TraceScores:
    """Folds trace records, in order, into the answers to the Score requests for ``examples``:
    a request on ``…expert.<id>.score`` is paired with what was published on its reply inbox."""

    prefix: str
    index: dict[RequestKey, list[tuple[str, int]]] = field(default_factory=dict)
    requests: dict[tuple[str, int], wire.Score] = field(default_factory=dict)
    heartbeats: dict[str, wire.Heartbeat] = field(default_factory=dict)
    answers: dict[tuple[str, str, int], list[wire.Scored | wire.Error]] = field(
        default_factory=dict
    )
    top_ks: set[int] = field(default_factory=set)
    _asked: dict[str, _Asked] = field(default_factory=dict)  # reply subject -> request

    @classmethod
    def of(cls, examples: Sequence[McExample], prefix: str = DEFAULT_PREFIX) -> TraceScores:
        folded = cls(prefix)
        for ex in examples:
            for fmt, score in enumerate(requests_for(ex, 0)):
                folded.index.setdefault(request_key(score), []).append((ex.id, fmt))
                folded.requests[(ex.id, fmt)] = score
        return folded

    def add(self, record: TraceRecord) -> None:
        asked = self._asked.pop(record.subject, None)
        if asked is not None:
            self._answer(asked, record.data)
            return
        root = Subjects(self.prefix).root + "."
        if not record.subject.startswith(root):
            return
        parts = record.subject[len(root) :].split(".")
        if parts[0] == "members" and len(parts) == 2:
            self._heartbeat(parts[1], record.data)
        elif parts[0] == "expert" and len(parts) == 3 and parts[2] == "score" and record.reply:
            self._request(parts[1], record.reply, record.data)

    def _heartbeat(self, expert: str, data: bytes) -> None:
        try:
            hb = wire.decode(data)
        except Moe2Error:
            return
        if isinstance(hb, wire.Heartbeat) and hb.expert == expert:
            self.heartbeats[expert] = hb

    def _request(self, expert: str, reply: str, data: bytes) -> None:
        try:
            score = wire.decode(data)
        except Moe2Error:
            return
        if isinstance(score, wire.Score) and (matches := self.index.get(request_key(score))):
            self._asked[reply] = _Asked(expert, matches)
            self.top_ks.add(score.top_k)

    def _answer(self, asked: _Asked, data: bytes) -> None:
        try:
            answer = wire.decode(data)
        except Moe2Error as exc:
            answer = wire.error_from(exc)
        if isinstance(answer, wire.Scored | wire.Error):
            for example, fmt in asked.matches:
                self.answers.setdefault((example, asked.expert, fmt), []).append(answer)

    def experts(self) -> list[str]:
        return sorted({expert for _, expert, _ in self.answers})

    def record(self, example: str, expert: str) -> ScoreRecord | None:
        """The pair's record: the first Scored of each format, else an error that is not
        transient; None when the trace has no such answer (the pair stays to collect)."""
        chosen = [self._settled(example, expert, fmt) for fmt in (0, 1)]
        if chosen[0] is None or chosen[1] is None:
            return None
        requests = (self.requests[(example, 0)], self.requests[(example, 1)])
        return record_of(example, expert, requests, (chosen[0], chosen[1]))

    def _settled(self, example: str, expert: str, fmt: int) -> wire.Scored | wire.Error | None:
        answers = self.answers.get((example, expert, fmt), [])
        scored = [a for a in answers if isinstance(a, wire.Scored)]
        lasting = [a for a in answers if isinstance(a, wire.Error) and a.code not in RETRIED_CODES]
        return (scored or lasting or [None])[0]

    def identities(self, experts: Sequence[str]) -> dict[str, ExpertIdentity]:
        found = {}
        for e in experts:
            hb = self.heartbeats.get(e)
            if hb is None:
                log.warning("trace_no_heartbeat", expert=e)
                found[e] = ExpertIdentity(id=e, model="unknown", tokenizer="unknown")
            else:
                found[e] = ExpertIdentity.of(hb)
        return found


def store_from_trace(
    trace: Path,
    examples: Sequence[McExample],
    out: Path,
    dataset: DatasetSpec,
    *,
    experts: Sequence[str] | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> CollectSummary:
    """Build (or complete) the store at ``out`` from a trace: no live expert needed."""
    started = time.monotonic()
    _, records = read_trace(trace)
    folded = TraceScores.of(examples, prefix)
    for rec in records:
        folded.add(rec)
    chosen = _trace_experts(folded, experts, trace)
    if len(folded.top_ks) != 1:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, f"the trace's Score requests ask for top-k {folded.top_ks}"
        )
    identities = folded.identities(chosen)
    meta = new_meta(list(identities.values()), dataset, folded.top_ks.pop(), f"trace:{trace}")
    with OutputStore.create(out, meta, examples) as store:
        before = len(store.done())
        added = failed = 0
        for example, expert in store.pending(examples):
            record = folded.record(example, expert)
            if record is not None:
                store.append(record)
                added, failed = added + 1, failed + (not record.ok)
        missing = len(store.pending(examples))
    log.info("store_from_trace", trace=str(trace), added=added, failed=failed, missing=missing)
    return CollectSummary(
        directory=str(out),
        pairs=len(examples) * len(chosen),
        done_before=before,
        collected=added,
        failed=failed,
        seconds=time.monotonic() - started,
    )


def _trace_experts(folded: TraceScores, wanted: Sequence[str] | None, trace: Path) -> list[str]:
    found = folded.experts()
    if not found:
        raise Moe2Error(
            ErrorCode.NO_EXPERTS,
            f"{trace} holds no answered Score request for these examples: was it recorded "
            "(with `moe2 record`, all subjects) during a collection of the same --data?",
        )
    missing = sorted(set(wanted or ()) - set(found))
    if missing:
        raise Moe2Error(ErrorCode.NO_EXPERTS, f"the trace has no answers from {missing}: {found}")
    return sorted(wanted) if wanted else found
