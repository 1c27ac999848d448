"""Fusion of experts whose tokenizers differ: the union of their top-k pieces, compared as bytes.

After UniTE ("Determine-Then-Ensemble", Yao et al., ICLR 2025): each expert proposes its top-k
tokens; the candidates are the union of their *pieces* (the raw bytes each id decodes to), and
every expert values every candidate. The fusion agent holds no tokenizer, so UniTE's "tokenise
the candidate with the other model's tokenizer and take the probability of its first token" is
done in bytes. Expert n values candidate c (``candidate_values``), first rule that applies:

1. **exact**: n listed ids whose piece is c: the sum of their probabilities;
2. **a whole token of n's vocabulary** that n did not list (an expert with n's tokenizer
   identity listed c): ``r_n / (V_n - K_n)``, the unlisted value of the id path;
3. **prefix**: n listed a proper prefix of c: the probability of the longest such piece (n's
   first token of c, as a greedy longest match over what n listed would cut it);
4. **unlisted**: ``r_n / (V_n - K_n)``.

End of sequence is one distinguished candidate, ``EOS`` (the empty bytes, so it sorts first): its
value for n is the sum of n's listed eos ids' probabilities, or n's unlisted value. Other ids with
empty pieces (special tokens that are not eos, logit rows with no token) are no candidates: no
text can carry them to the other experts (if no expert lists anything else, ``EOS`` is the only
candidate, valued by the rest mass: the answer ends). When every expert shares one tokenizer,
rules 3 and 4 never apply and the values are the id path's (``fusion.fuse``), except that ids
with equal bytes are one candidate. The fused value is eq. 29 over the candidates
(``fusion.fuse_full``, weights renormalised by eq. 28). docs/protocol.md §7 says why these rules.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moe2.runtime.fusion import fuse_full

EOS = b""  # the end-of-sequence candidate; no other candidate is empty

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """What a session knows of an expert's tokenizer, from its heartbeat."""

    tokenizer: str  # the identity, docs/protocol.md §10
    size: int  # V
    eos_ids: frozenset[int]


@dataclass(frozen=True, slots=True)
class PieceSlice:
    """One expert's top-k at one step, with the bytes of each id and its vocabulary."""

    ids: npt.NDArray[np.uint32]
    probs: F64
    rest: float
    pieces: Sequence[bytes]
    vocabulary: Vocabulary

    @property
    def unlisted(self) -> float:
        """The value of an id this expert did not list: its rest mass spread evenly."""
        return self.rest / max(self.vocabulary.size - len(self.ids), 1)

    def listed(self) -> dict[bytes, tuple[float, int]]:
        """Candidate -> (the summed probability of the ids listed with it, the first such id)."""
        out: dict[bytes, tuple[float, int]] = {}
        eos = self.vocabulary.eos_ids
        for token, p, piece in zip(
            self.ids.tolist(), self.probs.tolist(), self.pieces, strict=True
        ):
            key = EOS if token in eos else piece
            if key or token in eos:
                total, first = out.get(key, (0.0, token))
                out[key] = (total + p, first)
        return out


@dataclass(frozen=True, slots=True)
class ByteDistribution:
    """The fused values of the candidates, sorted by bytes (``EOS`` first when present)."""

    candidates: list[bytes]
    probs: F64
    tokens: list[int]  # per candidate: its id in the first slice (session order) that lists it
    values: F64  # (N, C): each expert's value of each candidate

    def is_eos(self, at: int) -> bool:
        return self.candidates[at] == EOS


def candidate_values(slices: Sequence[PieceSlice]) -> tuple[list[bytes], F64, list[int]]:
    """The union of the slices' candidates (sorted), each expert's value of each (N, C), and
    each candidate's id in the first slice that lists it."""
    listed = [s.listed() for s in slices]
    candidates = sorted(set().union(*listed)) or [EOS]  # nothing writable listed: the end
    column = {c: j for j, c in enumerate(candidates)}
    known: dict[str, set[bytes]] = {}
    for s, mine in zip(slices, listed, strict=True):
        known.setdefault(s.vocabulary.tokenizer, set()).update(c for c in mine if c != EOS)
    values = np.empty((len(slices), len(candidates)))
    for n, (s, mine) in enumerate(zip(slices, listed, strict=True)):
        row = values[n]
        row[:] = s.unlisted
        for piece, p in sorted(_prefixes(candidates, column, mine), key=lambda x: len(x[0])):
            row[column[piece] + 1 : _prefix_end(candidates, piece)] = p  # rule 3, longest last
        whole = known[s.vocabulary.tokenizer].difference(mine)
        if whole:
            row[[column[c] for c in whole]] = s.unlisted  # rule 2
        row[[column[c] for c in mine]] = [p for p, _ in mine.values()]  # rule 1
    first: dict[bytes, int] = {}
    for mine in listed:
        for c, (_, token) in mine.items():
            first.setdefault(c, token)
    return candidates, values, [first.get(c, -1) for c in candidates]


def _prefixes(
    candidates: list[bytes], column: dict[bytes, int], mine: dict[bytes, tuple[float, int]]
) -> list[tuple[bytes, float]]:
    """The listed pieces that begin some other candidate (which then directly follows them in
    sorted order), with their probabilities."""
    out = []
    for piece, (p, _) in mine.items():
        after = column[piece] + 1
        if piece and after < len(candidates) and candidates[after].startswith(piece):
            out.append((piece, p))
    return out


def _prefix_end(candidates: list[bytes], piece: bytes) -> int:
    """One past the last of the sorted ``candidates`` that start with ``piece``."""
    stem = piece.rstrip(b"\xff")
    if not stem:
        return len(candidates)
    return bisect_left(candidates, stem[:-1] + bytes([stem[-1] + 1]))


def fuse_bytes(slices: Sequence[PieceSlice], weights: Sequence[float]) -> ByteDistribution:
    """Eq. 29 over the candidates: ``F(c) = Σ_n ω̃_n v_n(c)``, ω̃ renormalised over the slices
    present (eq. 28). F is a score over the candidates, not a distribution: a piece listed by n
    stands in for every longer candidate it begins (rule 3), so sampling normalises over them."""
    if not slices:
        raise ValueError("fuse_bytes needs at least one slice")
    candidates, values, tokens = candidate_values(slices)
    return ByteDistribution(candidates, fuse_full(values, weights), tokens, values)
