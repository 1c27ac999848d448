"""What gating training and evaluation consume: per example and per expert, the log-probabilities
of the gold target's tokens (teacher forced), and the text the gating network embeds; optionally
every option's, for training on the options' discrimination (``TrainConfig.cloze_weight``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe2.runtime.errors import ErrorCode, Moe2Error


@dataclass(frozen=True)
class OptionScores:
    """One example's options as cloze evaluation scores them (``ExampleScores.cloze``):
    ``logprobs[o]`` (N, T_o) per expert and unit, ``lengths[o]`` option o's length in units
    (tokens, or UTF-8 bytes on a mixed pool), ``answer`` the gold option's index."""

    logprobs: list[np.ndarray]
    lengths: list[int]
    answer: int

    def with_experts(self, cols: Sequence[int]) -> OptionScores:
        return OptionScores([lp[list(cols)] for lp in self.logprobs], self.lengths, self.answer)


@dataclass(frozen=True)
class GatingData:
    """``gold_logprobs[i][n, t] = log f_{n,y_t}``: example i, expert ``expert_ids[n]``, token t."""

    expert_ids: list[str]  # the order of the N axis everywhere
    example_ids: list[str]
    texts: list[str]  # embed_text of each example
    gold_logprobs: list[np.ndarray]  # per example (N, T_x) float32
    subjects: list[str]
    options: list[OptionScores] | None = None  # every option's scores, when asked for

    def __post_init__(self) -> None:
        n = len(self.example_ids)
        if not len(self.texts) == len(self.gold_logprobs) == len(self.subjects) == n:
            raise _invalid("example_ids, texts, gold_logprobs and subjects differ in length")
        if len(set(self.expert_ids)) != len(self.expert_ids) or not self.expert_ids:
            raise _invalid(f"expert ids must be distinct and non-empty: {self.expert_ids}")
        if len(set(self.example_ids)) != n:
            raise _invalid("example ids are not unique")
        for ex_id, lp in zip(self.example_ids, self.gold_logprobs, strict=True):
            _check_logprobs(ex_id, lp, len(self.expert_ids))
        if self.options is not None:
            if len(self.options) != n:
                raise _invalid("options and example_ids differ in length")
            for ex_id, opts in zip(self.example_ids, self.options, strict=True):
                _check_options(ex_id, opts, len(self.expert_ids))

    def __len__(self) -> int:
        return len(self.example_ids)

    def subset(self, idx: Sequence[int] | np.ndarray) -> GatingData:
        """The examples at ``idx``, in that order."""
        pick = [int(i) for i in idx]
        return GatingData(
            list(self.expert_ids),
            [self.example_ids[i] for i in pick],
            [self.texts[i] for i in pick],
            [self.gold_logprobs[i] for i in pick],
            [self.subjects[i] for i in pick],
            None if self.options is None else [self.options[i] for i in pick],
        )

    def by_ids(self, example_ids: Sequence[str]) -> GatingData:
        """The examples with these ids, in that order (e.g. an artifact's held-out ids)."""
        where = {ex_id: i for i, ex_id in enumerate(self.example_ids)}
        missing = [ex_id for ex_id in example_ids if ex_id not in where]
        if missing:
            raise _invalid(f"{len(missing)} example ids not in the data, e.g. {missing[:3]}")
        return self.subset([where[ex_id] for ex_id in example_ids])

    def with_experts(self, expert_ids: Sequence[str]) -> GatingData:
        """The same examples over the experts ``expert_ids`` only (a subset S), in that order."""
        unknown = sorted(set(expert_ids) - set(self.expert_ids))
        if unknown:
            raise _invalid(f"experts {unknown} are not in the data ({self.expert_ids})")
        cols = [self.expert_ids.index(e) for e in expert_ids]
        lps = [lp[cols] for lp in self.gold_logprobs]
        opts = None if self.options is None else [o.with_experts(cols) for o in self.options]
        return GatingData(list(expert_ids), self.example_ids, self.texts, lps, self.subjects, opts)

    def split(self, seed: int = 0, holdout: float = 0.2) -> tuple[GatingData, GatingData]:
        """(train, held out): a seeded ``holdout`` share of the examples is held out."""
        train, held = split_indices(len(self), seed, holdout)
        return self.subset(train), self.subset(held)

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(logprobs (E, N, T_max) float32, mask (E, T_max) bool): zero-padded after each target."""
        return pad_logprobs(self.gold_logprobs, len(self.expert_ids))

    def data_hash(self) -> str:
        """sha256 over expert ids, example ids, texts and log-probabilities (order matters); the
        options too when present (data without them hashes as before they existed)."""
        h = hashlib.sha256()
        for part in (self.expert_ids, self.example_ids, self.texts, self.subjects):
            h.update("\x1f".join(part).encode() + b"\x1e")
        for lp in self.gold_logprobs:
            _hash_array(h, lp)
        for opts in self.options or []:
            h.update(np.asarray([opts.answer, *opts.lengths], dtype="<i8").tobytes())
            for lp in opts.logprobs:
                _hash_array(h, lp)
        return h.hexdigest()


def split_indices(n: int, seed: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices, each sorted: a seeded permutation's first ``round(n * holdout)``
    (at least one) are held out. Needs ``0 < holdout < 1`` and two examples or more."""
    if not 0.0 < holdout < 1.0:
        raise _invalid(f"holdout must lie in (0, 1), got {holdout}")
    if n < 2:
        raise _invalid(f"need two examples or more to split, got {n}")
    n_held = min(n - 1, max(1, round(n * holdout)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def split_three(
    n: int, seed: int, holdout: float, validation: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, held-out) indices, disjoint and each sorted. The held-out ones are
    exactly ``split_indices``'s (the same seeded permutation's first ``round(n * holdout)``);
    the next ``round(n * validation)`` (at least one) are for early stopping; the rest train."""
    if not 0.0 < validation < 1.0:
        raise _invalid(f"validation must lie in (0, 1), got {validation}")
    if n < 3:
        raise _invalid(f"need three examples or more for three splits, got {n}")
    n_held = min(n - 2, max(1, round(n * holdout)))
    n_val = min(n - n_held - 1, max(1, round(n * validation)))
    perm = np.random.default_rng(seed).permutation(n)
    held, val, train = perm[:n_held], perm[n_held : n_held + n_val], perm[n_held + n_val :]
    return np.sort(train), np.sort(val), np.sort(held)


def pad_logprobs(
    gold_logprobs: Sequence[np.ndarray], n_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-example (N, T_x) arrays into (E, N, T_max), with an (E, T_max) mask of tokens."""
    t_max = max((lp.shape[1] for lp in gold_logprobs), default=0)
    out = np.zeros((len(gold_logprobs), n_experts, t_max), dtype=np.float32)
    mask = np.zeros((len(gold_logprobs), t_max), dtype=bool)
    for i, lp in enumerate(gold_logprobs):
        out[i, :, : lp.shape[1]] = lp
        mask[i, : lp.shape[1]] = True
    return out, mask


def pad_options(
    options: Sequence[OptionScores], n_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stack examples' options: log-probabilities (E, O_max, N, T_max) float32 zero-padded, the
    mask of units (E, O_max, T_max), lengths in units (E, O_max) float32 (0 for absent options),
    the mask of options (E, O_max) and the gold options (E,) int64."""
    o_max = max((len(x.logprobs) for x in options), default=0)
    t_max = max((lp.shape[1] for x in options for lp in x.logprobs), default=0)
    lps = np.zeros((len(options), o_max, n_experts, t_max), dtype=np.float32)
    units = np.zeros((len(options), o_max, t_max), dtype=bool)
    lengths = np.zeros((len(options), o_max), dtype=np.float32)
    for i, x in enumerate(options):
        for o, lp in enumerate(x.logprobs):
            lps[i, o, :, : lp.shape[1]] = lp
            units[i, o, : lp.shape[1]] = True
            lengths[i, o] = x.lengths[o]
    present = np.asarray(units.any(axis=2), dtype=bool)
    answers = np.array([x.answer for x in options], dtype=np.int64)
    return lps, units, lengths, present, answers


def _hash_array(h: Any, lp: np.ndarray) -> None:
    h.update(np.asarray(lp.shape, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(lp, dtype="<f4").tobytes())


def _check_options(ex_id: str, opts: OptionScores, n_experts: int) -> None:
    if len(opts.logprobs) != len(opts.lengths) or not 0 <= opts.answer < len(opts.logprobs):
        raise _invalid(f"{ex_id}: options need one length each and the answer among them")
    for lp in opts.logprobs:
        _check_logprobs(ex_id, lp, n_experts)


def _check_logprobs(ex_id: str, lp: np.ndarray, n_experts: int) -> None:
    if lp.ndim != 2 or lp.shape[0] != n_experts or lp.shape[1] < 1:
        raise _invalid(
            f"{ex_id}: gold log-probabilities of shape {lp.shape}, want ({n_experts}, T>0)"
        )
    if not np.all(np.isfinite(lp)) or np.any(lp > 1e-4):
        raise _invalid(f"{ex_id}: gold log-probabilities must be finite and <= 0")


def _invalid(message: str) -> Moe2Error:
    return Moe2Error(ErrorCode.INVALID_FIELD, f"gating data: {message}")
