"""The byte path's tokenisation of an answer in an expert's own vocabulary (no model):
agents/expert/answer_tokens.py. The real tokenizers are tested in tests/test_mixed_end_to_end.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.agents.expert.answer_tokens import AnswerTokenizer, utf8_runs
from moe2.runtime.errors import Moe2Error

# a toy vocabulary: a special token, every single byte, then some words (one is a prefix of another)
TABLE = [b"", *(bytes([b]) for b in range(256)), b" Par", b" Paris", b"is", "é".encode()]


def greedy_encode(text: str) -> list[int]:
    """A stand-in tokenizer: greedy longest match over TABLE (valid text only)."""
    data, out, at = text.encode(), [], 0
    index = {piece: i for i, piece in enumerate(TABLE) if piece}
    while at < len(data):
        size = max(n for n in range(1, 7) if data[at : at + n] in index)
        out.append(index[data[at : at + size]])
        at += size
    return out


def test_utf8_runs_split_text_from_bytes_that_are_no_character_yet() -> None:
    euro = "€".encode()
    assert utf8_runs(b"") == []
    assert utf8_runs(b"plain") == ["plain"]
    assert utf8_runs(b"a" + euro[:2]) == ["a", euro[:2]]  # half a character: bytes, for now
    assert utf8_runs(b"a" + euro) == ["a€"]
    assert utf8_runs(b"x\xffy\xc3") == ["x", b"\xff", "y", b"\xc3"]


def test_text_goes_through_the_tokenizer_and_broken_characters_through_byte_tokens() -> None:
    tokens = AnswerTokenizer(greedy_encode, TABLE)
    assert tokens.ids(b" Paris") == [TABLE.index(b" Paris")]
    assert tokens.ids(b" Par") == [TABLE.index(b" Par")]
    half = "é".encode()[:1]
    assert tokens.ids(b" Par" + half) == [TABLE.index(b" Par"), TABLE.index(half)]
    assert tokens.ids(" Paré".encode()) == [TABLE.index(b" Par"), TABLE.index("é".encode())]


def test_a_tokenizer_that_changes_the_text_is_replaced_by_a_longest_match() -> None:
    """E.g. a sentencepiece model that adds a dummy-prefix space: its ids would not give the
    committed bytes back, so they are not used."""
    tokens = AnswerTokenizer(lambda text: greedy_encode(" " + text), TABLE)
    ids = tokens.ids(b"Paris is")
    assert tokens.bytes_of(ids) == b"Paris is"


def test_a_byte_no_token_holds_is_refused() -> None:
    tokens = AnswerTokenizer(lambda text: [], [b"", b"a"])
    with pytest.raises(Moe2Error) as caught:
        tokens.ids(b"\xff")
    assert caught.value.code == "invalid_field"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=40) | st.text(max_size=20).map(str.encode))
def test_the_ids_always_give_back_exactly_the_bytes(data: bytes) -> None:
    tokens = AnswerTokenizer(greedy_encode, TABLE)
    assert tokens.bytes_of(tokens.ids(data)) == data
