"""The byte path: fusing experts whose tokenizers differ (runtime/byte_fusion.py and the decode
loop's byte path), with no bus. docs/protocol.md §7."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.runtime import wire
from moe2.runtime.byte_fusion import EOS, PieceSlice, Vocabulary, candidate_values, fuse_bytes
from moe2.runtime.decoding import (
    Accepted,
    Action,
    Arrived,
    DecodeSettings,
    Decoding,
    Refused,
    SessionPlan,
    ToClient,
    ToExpert,
)
from moe2.runtime.fusion import ExpertSlice, fuse
from moe2.runtime.sampling import SamplingParams, TokenSampler

A = Vocabulary("a:0", 100, frozenset({0}))
B = Vocabulary("b:0", 1000, frozenset({1, 2}))


def piece_slice(
    vocab: Vocabulary, listed: dict[bytes | int, float], table: dict[bytes, int]
) -> PieceSlice:
    """A slice listing ``listed`` (piece or eos id -> probability); ids from ``table``."""
    ids, probs, pieces = [], [], []
    for key, p in listed.items():
        ids.append(key if isinstance(key, int) else table.setdefault(key, 10 + len(table)))
        pieces.append(b"" if isinstance(key, int) else key)
        probs.append(p)
    return PieceSlice(
        np.array(ids, np.uint32), np.array(probs), max(0.0, 1 - sum(probs)), pieces, vocab
    )


def values_by_candidate(slices: list[PieceSlice]) -> dict[bytes, list[float]]:
    candidates, values, _ = candidate_values(slices)
    return {c: values[:, j].tolist() for j, c in enumerate(candidates)}


def test_a_foreign_candidate_takes_the_probability_of_the_longest_listed_prefix() -> None:
    a = piece_slice(A, {b" Par": 0.5, b" P": 0.2, b" Lon": 0.1}, {})
    b = piece_slice(B, {b" Paris": 0.6, b" London": 0.2, b" Pa": 0.05}, {})
    got = values_by_candidate([a, b])
    ua, ub = a.unlisted, b.unlisted
    assert ua == pytest.approx(0.2 / 97) and ub == pytest.approx(0.15 / 997)
    assert got[b" Paris"] == pytest.approx([0.5, 0.6])  # a: " Par" is its longest prefix of it
    assert got[b" London"] == pytest.approx([0.1, 0.2])  # a: " Lon"
    assert got[b" Par"] == pytest.approx([0.5, 0.05])  # b: " Pa" begins " Par"
    assert got[b" P"] == pytest.approx([0.2, ub])  # b lists only longer pieces: unlisted
    assert got[b" Lon"] == pytest.approx([0.1, ub])
    assert got[b" Pa"] == pytest.approx([0.2, 0.05])  # a: " P"
    fused = fuse_bytes([a, b], [1.0, 1.0])
    at = TokenSampler(SamplingParams()).choose_index(fused)
    assert fused.candidates[at] == b" Paris"  # both experts back it
    assert fused.probs[at] == pytest.approx(0.55)


def test_a_whole_token_of_an_experts_own_vocabulary_is_never_valued_by_its_prefix() -> None:
    """a2 shares a1's tokenizer and did not list " Paris", which a1 did: a2's " Par" is not its
    first token of " Paris" (its tokenizer has " Paris"), so " Paris" is unlisted for a2."""
    table: dict[bytes, int] = {}
    a1 = piece_slice(A, {b" Paris": 0.4, b" Par": 0.1}, table)
    a2 = piece_slice(A, {b" Par": 0.7}, table)
    b = piece_slice(B, {b" Parisian": 0.5}, {})
    got = values_by_candidate([a1, a2, b])
    assert got[b" Paris"] == pytest.approx([0.4, a2.unlisted, b.unlisted])
    assert got[b" Parisian"] == pytest.approx([0.4, 0.7, 0.5])  # not a whole token of A's


def test_an_unlisted_candidate_gets_each_experts_rest_mass_spread_evenly() -> None:
    a = piece_slice(A, {b"x": 0.9}, {})
    b = piece_slice(B, {b"y": 0.5}, {})
    got = values_by_candidate([a, b])
    assert got[b"x"] == pytest.approx([0.9, 0.5 / 999])
    assert got[b"y"] == pytest.approx([0.1 / 99, 0.5])


def test_eos_is_one_candidate_worth_the_sum_of_an_experts_eos_ids() -> None:
    a = piece_slice(A, {0: 0.3, b"x": 0.5}, {})
    b = piece_slice(B, {1: 0.2, 2: 0.1, b"x": 0.6, 7: 0.05}, {})  # 7: a special, not eos
    candidates, values, tokens = candidate_values([a, b])
    assert candidates == [EOS, b"x"]  # EOS sorts first; the empty special is no candidate
    np.testing.assert_allclose(values[:, 0], [0.3, 0.3])
    assert tokens[0] == 0  # the id of the first slice that lists EOS
    only_b = values_by_candidate([piece_slice(A, {b"x": 0.5}, {}), b])
    assert only_b[EOS] == pytest.approx([0.5 / 99, 0.3])


def test_when_nothing_writable_is_listed_the_only_candidate_is_eos() -> None:
    a = piece_slice(A, {5: 0.9}, {})  # a special token that is not eos: no candidate
    candidates, values, tokens = candidate_values([a])
    assert (candidates, tokens) == ([EOS], [-1])
    assert values[0, 0] == pytest.approx(a.unlisted)


def test_pieces_of_0xff_bytes_bound_their_prefix_range() -> None:
    a = piece_slice(A, {b"\xff": 0.5, b"a\xff": 0.3}, {})
    b = piece_slice(B, {b"\xff\x01": 0.4, b"a\xff\xff": 0.2, b"b": 0.1, b"a": 0.1}, {})
    got = values_by_candidate([a, b])
    assert got[b"\xff\x01"][0] == pytest.approx(0.5)
    assert got[b"a\xff\xff"][0] == pytest.approx(0.3)
    assert got[b"b"][0] == pytest.approx(a.unlisted)
    assert got[b"a"][0] == pytest.approx(a.unlisted)  # "a" is a prefix of a's piece, not v.v.


def test_greedy_ties_go_to_the_lowest_bytes() -> None:
    a = piece_slice(A, {b"b": 0.4, b"a": 0.4}, {})
    fused = fuse_bytes([a], [1.0])
    assert fused.candidates == [b"a", b"b"]
    assert fused.candidates[TokenSampler(SamplingParams()).choose_index(fused)] == b"a"


# --- one tokenizer: the byte path values every candidate as the id path values its id -----------


@st.composite
def one_vocabulary_pool(draw: st.DrawFn) -> tuple[list[bytes], list[ExpertSlice], list[float]]:
    """Experts sharing a vocabulary whose pieces are short strings over a small alphabet (so
    many are prefixes of others); id 0 is eos, every other piece is distinct and non-empty."""
    alphabet = st.binary(min_size=1, max_size=4).map(lambda b: bytes(x % 4 + 97 for x in b))
    words = draw(st.lists(alphabet, min_size=3, max_size=60, unique=True))
    table = [b"", *words]
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    slices = []
    for _ in range(n):
        k = int(rng.integers(1, len(table) + 1))
        ids = rng.choice(len(table), size=k, replace=False)
        p = rng.dirichlet(np.ones(k + 1) * 0.5)[:k] + 1e-9
        order = np.argsort(-p, kind="stable")
        slices.append(
            ExpertSlice(ids[order].astype(np.uint32), np.log(p[order]).astype(np.float32), 0.0)
        )
    slices = [
        ExpertSlice(
            s.ids, s.logprobs, max(0.0, 1 - float(np.exp(s.logprobs.astype(np.float64)).sum()))
        )
        for s in slices
    ]
    weights = draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n))
    return table, slices, weights


@settings(max_examples=200, deadline=None)
@given(pool=one_vocabulary_pool())
def test_with_one_tokenizer_the_byte_path_values_and_chooses_as_the_id_path(
    pool: tuple[list[bytes], list[ExpertSlice], list[float]],
) -> None:
    table, slices, weights = pool
    vocab = Vocabulary("one:0", len(table), frozenset({0}))
    by_id = fuse(slices, weights, len(table))
    as_pieces = [
        PieceSlice(
            s.ids,
            np.exp(s.logprobs.astype(np.float64)),
            s.rest,
            [table[i] for i in s.ids.tolist()],
            vocab,
        )
        for s in slices
    ]
    by_bytes = fuse_bytes(as_pieces, weights)
    assert by_bytes.candidates == sorted(table[i] for i in by_id.ids.tolist())
    id_value = dict(zip(by_id.ids.tolist(), by_id.probs.tolist(), strict=True))
    for c, token, value in zip(by_bytes.candidates, by_bytes.tokens, by_bytes.probs, strict=True):
        assert table[token] == c
        assert value == pytest.approx(id_value[token], rel=1e-12, abs=1e-15)
    greedy = TokenSampler(SamplingParams())
    best = np.sort(by_id.probs)[::-1]
    if len(best) == 1 or best[0] - best[1] > 1e-12:  # a unique best: the same choice
        chosen = int(by_id.ids[greedy.choose_index(by_id)])
        assert by_bytes.candidates[greedy.choose_index(by_bytes)] == table[chosen]


# --- the decode loop's byte path ------------------------------------------------------------------

SESSION = "m" * 32


def mixed_plan(**prompt: object) -> SessionPlan:
    return SessionPlan(
        session=SESSION,
        prompt=wire.Prompt(messages=[wire.ChatMessage("user", "x")], **prompt),  # type: ignore[arg-type]
        experts=["a", "b"],
        weights=[0.5, 0.5],
        vocab_size=A.size,
        eos_ids=A.eos_ids,
        fusion_path="bytes",
        vocabularies={"a": A, "b": B},
    )


def slice_listing(expert: str, step: int, listed: dict[int, tuple[bytes, float]]) -> wire.Slice:
    ids = list(listed)
    return wire.make_slice(
        session=SESSION,
        expert=expert,
        step=step,
        ids=np.array(ids),
        logprobs=np.log(np.array([listed[i][1] for i in ids])),
        pieces=[listed[i][0] for i in ids],
    )


def sent_steps(actions: list[Action]) -> list[tuple[str, int, bytes | None]]:
    return [
        (a.expert, a.message.step, a.message.text)
        for a in actions
        if isinstance(a, ToExpert) and isinstance(a.message, wire.Step)
    ]


def test_a_mixed_session_sends_the_chosen_bytes_and_ends_on_the_eos_candidate() -> None:
    machine = Decoding(mixed_plan(), DecodeSettings(), started=0.0)
    out = machine.start(0.0)
    # step 0: a (short pieces) says " Par", b (longer pieces) says " Paris"
    a0 = slice_listing("a", 0, {40: (b" Par", 0.6), 41: (b" P", 0.2)})
    b0 = slice_listing("b", 0, {900: (b" Paris", 0.7), 901: (b" Pa", 0.1)})
    out += machine.apply(Arrived("a", a0), 0.1) + machine.apply(Arrived("b", b0), 0.2)
    assert sent_steps(out) == [("a", 1, b" Paris"), ("b", 1, b" Paris")]
    tokens = [
        a.message.token for a in out if isinstance(a, ToExpert) and isinstance(a.message, wire.Step)
    ]
    assert tokens == [-1, -1]  # so that an expert which does not read text refuses the step
    # step 1: a lists its eos id 0, b its eos id 2 and a special (7) with no bytes
    a1 = slice_listing("a", 1, {0: (b"", 0.5), 42: (b".", 0.3)})
    b1 = slice_listing("b", 1, {2: (b"", 0.4), 7: (b"", 0.3), 902: (b"!", 0.2)})
    out += machine.apply(Arrived("a", a1), 0.3) + machine.apply(Arrived("b", b1), 0.4)
    to_client = [a.message for a in out if isinstance(a, ToClient)]
    final = to_client[-1]
    assert isinstance(final, wire.Final)
    assert (final.text, final.finish_reason) == (" Paris", "eos")
    assert final.usage.completion_tokens == 2
    assert [c.tokens for c in to_client if isinstance(c, wire.Chunk)] == [[900]]  # b's id
    assert len(sent_steps(out)) == 2  # no Step after eos


def test_a_mixed_session_checks_each_slice_against_its_senders_own_vocabulary() -> None:
    machine = Decoding(mixed_plan(), DecodeSettings(), started=0.0)
    machine.start(0.0)
    big = slice_listing("b", 0, {500: (b"x", 0.9)})  # beyond a's V = 100, within b's 1000
    assert [type(a) for a in machine.apply(Arrived("b", big), 0.1)] == [Accepted]
    out = machine.apply(Arrived("a", slice_listing("a", 0, {500: (b"x", 0.9)})), 0.2)
    assert [(type(a), getattr(a, "code", None)) for a in out] == [(Refused, "invalid_field")]
