"""Wire messages: round trips, packed arrays, and a stable error code for each kind of bad bytes."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from moe2.runtime import wire
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import Subjects, check_token


def a_slice(**overrides: object) -> wire.Slice:
    s = wire.make_slice(
        session="s1",
        expert="e1",
        step=3,
        ids=np.array([7, 3, 9]),
        logprobs=np.log(np.array([0.5, 0.25, 0.125])),
        pieces=[b"a", b"b", b"\xe2"],
    )
    return msgspec.structs.replace(s, **overrides)


def test_slice_round_trip_packs_little_endian_arrays() -> None:
    s = a_slice()
    raw = msgspec.msgpack.decode(wire.encode(s))
    assert raw["type"] == "moe2.v1.slice"
    assert raw["ids"] == b"\x07\x00\x00\x00\x03\x00\x00\x00\x09\x00\x00\x00"
    back = wire.decode(wire.encode(s))
    assert back == s
    assert back.ids_array().tolist() == [7, 3, 9]  # type: ignore[union-attr]
    assert s.rest == pytest.approx(0.125)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xc1\x00", ErrorCode.MALFORMED),
        (msgspec.msgpack.encode([1, 2]), ErrorCode.MALFORMED),
        (msgspec.msgpack.encode({"session": "x"}), ErrorCode.INVALID_FIELD),
        (
            msgspec.msgpack.encode({"type": "moe2.v2.step", "session": "x"}),
            ErrorCode.UNSUPPORTED_VERSION,
        ),
        (msgspec.msgpack.encode({"type": "moe2.v1.nope"}), ErrorCode.UNKNOWN_TYPE),
        (msgspec.msgpack.encode({"type": "moe2.v1.step", "session": "x"}), ErrorCode.INVALID_FIELD),
        (
            msgspec.msgpack.encode(
                {"type": "moe2.v1.step", "session": "x", "step": "1", "token": 1}
            ),
            ErrorCode.INVALID_FIELD,
        ),
    ],
)
def test_bad_bytes_get_a_stable_code(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(Moe2Error) as caught:
        wire.decode(data)
    assert caught.value.code == code
    assert caught.value.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.5])
def test_check_slice_refuses_nan_inf_and_positive_logprobs(value: float) -> None:
    lp = np.array([-0.1, value, -3.0], dtype="<f4").tobytes()
    with pytest.raises(Moe2Error) as caught:
        wire.check_slice(a_slice(logprobs=lp))
    assert caught.value.code == ErrorCode.BAD_LOGPROBS


def test_check_slice_refuses_arrays_that_disagree_and_ids_beyond_the_vocabulary() -> None:
    with pytest.raises(Moe2Error, match="equal"):
        wire.check_slice(a_slice(ids=b"\x00\x00\x00\x00"))
    with pytest.raises(Moe2Error, match="pieces"):
        wire.check_slice(a_slice(pieces=[b"a"]))
    with pytest.raises(Moe2Error, match="twice"):
        wire.check_slice(a_slice(ids=np.array([7, 7, 9], dtype="<u4").tobytes()))
    with pytest.raises(Moe2Error, match="vocabulary"):
        wire.check_slice(a_slice(), vocab_size=8)
    wire.check_slice(a_slice(), vocab_size=10)


def test_subjects_carry_the_publishers_identity() -> None:
    s = Subjects("site1")
    assert s.slice("abc", "e1") == "site1.v1.session.abc.slice.e1"
    assert s.expert_of_slice(s.slice("abc", "e1")) == "e1"
    assert s.member("e1") == "site1.v1.members.e1"
    assert s.expert_inbox("e1") == "site1.v1.expert.e1.*"
    for bad in ["a.b", "a*", ">", "", "a b"]:
        with pytest.raises(ValueError):
            check_token("expert id", bad)


_BEAT = {
    "type": "moe2.v1.heartbeat",
    "expert": "e1",
    "model": "m",
    "tokenizer": "t:0123456789abcdef",
    "backend": "b",
    "vocab_size": 10,
    "eos_ids": [0],
}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"interval_s": 1e9}, "interval_s"),
        ({"interval_s": float("inf")}, "interval_s"),
        ({"interval_s": 0.0}, "interval_s"),
        ({"vocab_size": -5, "eos_ids": []}, "vocab_size"),
        ({"eos_ids": [10]}, "eos id"),
        ({"sessions": -3}, "sessions"),
    ],
    ids=["huge-interval", "inf-interval", "zero-interval", "vocab", "eos", "sessions"],
)
def test_a_heartbeat_no_expert_can_mean_is_invalid(fields: dict[str, object], words: str) -> None:
    """One forged heartbeat must not keep an expert a member for ever, nor give a session an
    impossible vocabulary."""
    assert isinstance(wire.decode(msgspec.msgpack.encode(_BEAT)), wire.Heartbeat)
    with pytest.raises(Moe2Error) as caught:
        wire.decode(msgspec.msgpack.encode({**_BEAT, **fields}))
    assert caught.value.code == ErrorCode.INVALID_FIELD and words in caught.value.message


def test_a_version_of_thousands_of_digits_is_an_unknown_type_not_a_crash() -> None:
    tag = "moe2.v" + "9" * 5000 + ".slice"
    with pytest.raises(Moe2Error) as caught:
        wire.decode(msgspec.msgpack.encode({"type": tag}))
    assert caught.value.code == ErrorCode.UNKNOWN_TYPE
