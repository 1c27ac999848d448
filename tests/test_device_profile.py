"""A heartbeat's ``device`` is a typed, versioned profile: the expert refuses to start with a
declared profile it could not announce, and a receiver refuses a profile it cannot read, so no
expert is ever silently left uncosted by a misspelt key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from moe2.agents.expert.config import ExpertConfig
from moe2.runtime import wire
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.selection.live import heartbeat_cost

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
MEASURED = {
    "name": "pi5",
    "power_w": 7.5,
    "decode_s": 0.02,
    "prefill_s_per_token": 0.001,
    "max_context": 4096,
}


def heartbeat_bytes(device: object) -> bytes:
    """A heartbeat as any sender might encode it, ``device`` exactly as given."""
    return msgspec.msgpack.encode(
        {
            "type": "moe2.v1.heartbeat",
            "expert": "e",
            "model": "m",
            "tokenizer": "t:0123456789abcdef",
            "backend": "b",
            "vocab_size": 8,
            "eos_ids": [0],
            "device": device,
        }
    )


def refusal(device: object) -> str:
    with pytest.raises(Moe2Error) as info:
        wire.decode(heartbeat_bytes(device))
    assert info.value.code == ErrorCode.INVALID_FIELD
    return info.value.message


# --- the receiver ------------------------------------------------------------------------------


def test_a_profile_round_trips_as_the_documented_map() -> None:
    device = wire.DeviceProfile(**MEASURED, context="geo@1a2b3c4d", context_tokens=96)
    beat = wire.Heartbeat(
        expert="e", model="m", tokenizer="t", backend="b", vocab_size=8, eos_ids=[0], device=device
    )
    assert wire.decode(wire.encode(beat)) == beat
    raw = msgspec.msgpack.decode(wire.encode(beat))["device"]
    assert raw == {**MEASURED, "profile": 1, "context": "geo@1a2b3c4d", "context_tokens": 96}


def test_a_profile_as_moe2_experts_sent_it_before_it_was_typed_still_decodes() -> None:
    """Recorded heartbeats carry the old map: no ``profile`` key, and any declared extras."""
    beat = wire.decode(heartbeat_bytes({**MEASURED, "gpu_index": 0, "power_w": 7}))
    assert isinstance(beat, wire.Heartbeat) and beat.device is not None
    assert (beat.device.profile, beat.device.power_w, beat.device.decode_s) == (1, 7.0, 0.02)
    assert (beat.device.context, beat.device.context_tokens) == ("", 0)


@pytest.mark.parametrize(
    ("device", "names"),
    [
        ({**MEASURED, "decode_s": "0.02"}, "Expected `float`, got `str` - at `$.device.decode_s`"),
        ({**MEASURED, "max_context": 4096.0}, "at `$.device.max_context`"),
        ({**MEASURED, "name": None}, "at `$.device.name`"),
        ([1, 2], "Expected `object | null`, got `array` - at `$.device`"),
    ],
)
def test_a_field_of_the_wrong_type_is_invalid_and_named(device: object, names: str) -> None:
    assert names in refusal(device)


def test_a_renamed_key_is_an_error_not_an_uncosted_expert() -> None:
    renamed = {k: v for k, v in MEASURED.items() if k != "decode_s"} | {"decode_time_s": 0.02}
    assert "missing required field `decode_s` - at `$.device`" in refusal(renamed)


def test_another_profile_version_or_an_impossible_figure_is_invalid() -> None:
    assert "device profile v2; this agent reads v1" in refusal({**MEASURED, "profile": 2})
    assert "decode_s must be finite and >= 0" in refusal({**MEASURED, "decode_s": -1.0})
    assert "power_w must be finite" in refusal({**MEASURED, "power_w": float("nan")})


def test_a_heartbeat_without_a_profile_is_never_costed_from_it() -> None:
    beat = wire.decode(heartbeat_bytes(None))
    assert isinstance(beat, wire.Heartbeat) and beat.device is None
    assert heartbeat_cost(beat) is None


def test_the_selection_costs_an_expert_from_its_profile() -> None:
    beat = wire.decode(heartbeat_bytes(MEASURED))
    assert isinstance(beat, wire.Heartbeat)
    cost = heartbeat_cost(beat)
    assert cost is not None and cost.source == "heartbeat"
    fit = cost.compute
    assert (fit.decode_base_s, fit.prefill_per_token_s, fit.power_w) == (0.02, 0.001, 7.5)
    unmeasured = wire.decode(heartbeat_bytes({**MEASURED, "decode_s": 0.0}))
    assert isinstance(unmeasured, wire.Heartbeat) and heartbeat_cost(unmeasured) is None


def test_the_doc_names_every_field_of_the_profile() -> None:
    doc = DOC.read_text(encoding="utf-8")
    fields = [f.name for f in msgspec.structs.fields(wire.DeviceProfile)]
    assert [f for f in fields if f"| `{f}` |" not in doc] == []


# --- the sender --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "names"),
    [
        ({"name": "pi5", "powr_w": 7.5}, "unknown field `powr_w`"),
        ({"name": "pi5", "power_w": "7.5"}, "Expected `float`, got `str` - at `$.power_w`"),
        ({"name": "pi5"}, "missing required field `power_w`"),
        ({"name": "pi5", "power_w": 7.5, "gpu_index": True}, "at `$.gpu_index`"),
        ({"name": "pi5", "power_w": -1.0}, "power_w must be finite and >= 0"),
    ],
)
def test_an_expert_refuses_a_declared_profile_it_could_not_announce(
    device: dict[str, Any], names: str
) -> None:
    with pytest.raises(Moe2Error) as info:
        ExpertConfig(expert_id="e", device=device)
    assert info.value.code == ErrorCode.INVALID_FIELD
    assert info.value.message.startswith("device profile: ") and names in info.value.message


def test_a_declared_profile_is_read_as_typed_fields() -> None:
    config = ExpertConfig(expert_id="e", device={"name": "orin", "power_w": 15, "gpu_index": 1})
    assert (config.declared.name, config.declared.power_w, config.declared.gpu_index) == (
        "orin",
        15.0,
        1,
    )
    assert config.power_w == 15.0
    assert ExpertConfig(expert_id="e").declared.name == "cpu"


def test_the_expert_command_stops_before_loading_a_model_on_a_bad_profile() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "moe2", "expert", "--id", "e", "--power-w", "-3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "error [invalid_field]: device profile: power_w must be finite and >= 0" in run.stderr
