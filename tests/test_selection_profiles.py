"""Profile TOML files: spec-based and measured experts, merging, and the errors a typo gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.selection.costs import Device, ModelSpec, slice_bytes, spec_fit
from moe2.selection.profiles import Profiles, load_profiles

BASE = """
[gating]
delay_ms = 20.0

[applications.chat]
prompt_tokens = 128
answer_tokens = 64
share = 0.6
tau_s = 0.5

[applications.code]
prompt_tokens = 512
answer_tokens = 256
share = 0.4

[devices.rtx4090]
compute_tflops = 82.6
bandwidth_gbps = 1008
power_w = 320
overhead_ms = 4.0

[models.llm-7b-q4]
params_b = 7.0
bits = 4.8
kv_kib_per_token = 512

[links.wifi]
latency_ms = 3.0
bandwidth_mhz = 20
snr_db = 20
tx_power_w = 1.0

[experts.spec-7b]
device = "rtx4090"
model = "llm-7b-q4"
link = "wifi"
"""

# the shape `moe2 profile` writes (selection/profiling.py: profile_toml)
MEASURED = """
[experts.orin-3b]
model = "llama-3.2-3b-q4"
backend = "llama.cpp"
device = "NVIDIA Jetson AGX Orin"
energy_source = "nvml"  # nvml | rapl | declared: which meter produced the joules

[experts.orin-3b.fit]
prefill_base_s = 0.012
prefill_per_token_s = 0.0004
decode_base_s = 0.035
decode_per_context_token_s = 2e-06
power_w = 41.5
transmission_s = 0.0015  # median per-step round trip minus compute

[experts.orin-3b.measured]  # the raw points, for plots and re-fits
prompt_tokens = [32, 128, 512]
prefill_s = [0.025, 0.063, 0.217]
prefill_j = [1.0, 2.6, 9.0]
decode_s = [0.0351, 0.0353, 0.0361]
decode_j = [1.46, 1.47, 1.5]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, *texts: str) -> Profiles:
    return load_profiles([write(tmp_path, f"p{i}.toml", t) for i, t in enumerate(texts)])


def invalid(tmp_path: Path, *texts: str) -> str:
    """The message of the invalid_field error loading these files gives."""
    with pytest.raises(Moe2Error) as caught:
        load(tmp_path, *texts)
    assert caught.value.code is ErrorCode.INVALID_FIELD
    return caught.value.message


def test_a_spec_based_expert_is_costed_by_eq_4_from_its_device_and_model(
    tmp_path: Path,
) -> None:
    profiles = load(tmp_path, BASE)
    assert sorted(profiles.applications) == ["chat", "code"]
    assert profiles.applications["chat"].tau_s == 0.5
    assert profiles.gating_s == pytest.approx(0.02)
    expert = profiles.experts["spec-7b"]
    assert expert.source == "spec"
    device = Device("rtx4090", 82.6, 1008, 320, 4.0)
    assert expert.compute == spec_fit(device, ModelSpec("llm-7b-q4", 7.0, 4.8, 512))
    assert expert.link.rate_bps() == pytest.approx(133.164e6, rel=1e-5)  # Shannon, eq. 6
    assert expert.link.tx_power_w == 1.0


def test_a_measured_expert_is_costed_from_its_fit_table(tmp_path: Path) -> None:
    profiles = load(tmp_path, BASE + MEASURED)
    expert = profiles.experts["orin-3b"]
    assert expert.source == "measured"
    fit = expert.compute
    assert (fit.prefill_base_s, fit.prefill_per_token_s) == (0.012, 0.0004)
    assert (fit.decode_base_s, fit.decode_per_context_token_s) == (0.035, 2e-06)
    assert (fit.power_w, fit.energy_source) == (41.5, "nvml")
    # transmission_s is the per-step cost of sending, whatever the slice's size
    assert expert.link.transmit_s(slice_bytes(32)) == pytest.approx(0.0015)
    table = profiles.table(["orin-3b", "spec-7b"])
    assert table.expert_ids == ["orin-3b", "spec-7b"]
    assert table.gating_s == pytest.approx(0.02)
    delays = table.delay_s(np.array([[True, False]]))[0]
    # chat: (prefill(128) + 63 decodes at contexts 129..191) / 64 + transmission + gating
    prefill = 0.012 + 0.0004 * 128
    decodes = sum(0.035 + 2e-6 * (128 + t) for t in range(1, 64))
    assert delays[0] == pytest.approx((prefill + decodes) / 64 + 0.0015 + 0.02)


def test_a_table_for_an_unprofiled_expert_is_an_error(tmp_path: Path) -> None:
    profiles = load(tmp_path, BASE)
    with pytest.raises(Moe2Error, match=r"no profile for experts \['ghost'\]") as caught:
        profiles.table(["spec-7b", "ghost"])
    assert caught.value.code is ErrorCode.INVALID_FIELD


def test_later_files_add_tables_and_replace_those_of_the_same_name(tmp_path: Path) -> None:
    override = """
[devices.rtx4090]
compute_tflops = 41.3
bandwidth_gbps = 504
power_w = 160

[applications.qa]
prompt_tokens = 384
answer_tokens = 8
"""
    profiles = load(tmp_path, BASE, MEASURED, override)
    assert sorted(profiles.experts) == ["orin-3b", "spec-7b"]
    assert sorted(profiles.applications) == ["chat", "code", "qa"]
    # the whole [devices.rtx4090] table is the later one: overhead_ms falls back to its default
    halved = Device("rtx4090", 41.3, 504, 160)
    spec = ModelSpec("llm-7b-q4", 7.0, 4.8, 512)
    assert profiles.experts["spec-7b"].compute == spec_fit(halved, spec)
    assert profiles.gating_s == pytest.approx(0.02)  # the first file's [gating] stays


@pytest.mark.parametrize(
    ("section", "entry"),
    [
        ("devices", "rtx4090"),
        ("models", "llm-7b-q4"),
        ("links", "wifi"),
        ("applications", "chat"),
        ("experts", "spec-7b"),
        ("experts", "orin-3b.fit"),
    ],
)
def test_an_unknown_key_is_an_error_naming_it_and_its_table(
    tmp_path: Path, section: str, entry: str
) -> None:
    typo = f"\n[{section}.{entry}]\nmisspelt_ms = 1.0\n"
    message = invalid(tmp_path, BASE + MEASURED, typo)
    assert "unknown keys ['misspelt_ms']" in message
    assert entry.split(".")[0] in message


@pytest.mark.parametrize("section", ["devices", "models"])
def test_an_unknown_key_names_the_table_as_the_file_spells_it(tmp_path: Path, section: str) -> None:
    entry = {"devices": "rtx4090", "models": "llm-7b-q4"}[section]
    message = invalid(tmp_path, BASE, f"\n[{section}.{entry}]\nmisspelt_ms = 1.0\n")
    assert f"[{section}.{entry}]" in message


def test_an_unknown_key_in_gating_is_an_error(tmp_path: Path) -> None:
    message = invalid(tmp_path, BASE.replace("delay_ms = 20.0", "delay_s = 0.02"))
    assert "[gating]: unknown keys ['delay_s']" in message


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("device", "rtx5090", "experts.spec-7b.device = 'rtx5090'"),
        ("model", "llm-70b", "experts.spec-7b.model = 'llm-70b'"),
        ("link", "5g", "experts.spec-7b.link = '5g'"),
    ],
)
def test_a_reference_to_nothing_defined_is_an_error(
    tmp_path: Path, field: str, value: str, where: str
) -> None:
    line = {"device": 'device = "rtx4090"', "model": 'model = "llm-7b-q4"', "link": 'link = "wifi"'}
    message = invalid(tmp_path, BASE.replace(line[field], f'{field} = "{value}"'))
    assert where in message
    assert "names nothing defined" in message


def test_profiles_without_applications_are_an_error(tmp_path: Path) -> None:
    no_apps = BASE.split("[devices.rtx4090]")[1]
    message = invalid(tmp_path, "[devices.rtx4090]" + no_apps)
    assert "no [applications.<name>]" in message


def test_an_incomplete_fit_and_a_negative_delay_are_errors(tmp_path: Path) -> None:
    missing = invalid(tmp_path, BASE, MEASURED.replace("power_w = 41.5\n", ""))
    assert "[experts.orin-3b.fit]" in missing and "power_w" in missing
    negative = invalid(
        tmp_path, BASE, MEASURED.replace("decode_base_s = 0.035", "decode_base_s = -1")
    )
    assert "[experts.orin-3b.fit]: delays and power must be numbers >= 0" in negative
    power = invalid(tmp_path, BASE, MEASURED.replace("power_w = 41.5", "power_w = -41.5"))
    assert "delays and power must be numbers >= 0" in power


def test_an_application_without_tokens_is_an_error(tmp_path: Path) -> None:
    message = invalid(tmp_path, BASE.replace("answer_tokens = 64", "answer_tokens = 0"))
    assert "chat" in message and ">= 1 token" in message


def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    broken = write(tmp_path, "broken.toml", "[devices.x\n")
    with pytest.raises(Moe2Error, match=r"cannot read profiles .*broken\.toml") as caught:
        load_profiles([broken])
    assert caught.value.code is ErrorCode.INVALID_FIELD


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("\n[devics.rtx4090]\npower_w = 1\n", "devics"),
        ("gating_delay_ms = 3\n", "gating_delay_ms"),
        ("devices = 3\n", "devices"),
    ],
)
def test_an_unknown_or_malformed_section_is_an_invalid_field_error(
    tmp_path: Path, text: str, named: str
) -> None:
    message = invalid(tmp_path, BASE, text)
    assert named in message
