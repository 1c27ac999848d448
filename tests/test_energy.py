"""Energy meters: RAPL over a fake sysfs of real files, NVML over a fake pynvml, declared maths."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

from moe2.agents.expert import energy
from moe2.agents.expert.energy import DeclaredMeter, NvmlMeter, RaplMeter, choose_meter
from moe2.runtime.errors import Moe2Error

MAX_UJ = 262_143_328_850  # a real package's max_energy_range_uj


def rapl_zone(root: Path, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone / "energy_uj"


def fake_pynvml(energy_mj: list[int], *, fail_init: bool = False) -> ModuleType:
    """A pynvml whose GPU 0 reports ``energy_mj[0]`` mJ, advanced by the test."""
    module = ModuleType("pynvml")

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"  # type: ignore[attr-defined]
    module.nvmlDeviceGetTotalEnergyConsumption = lambda handle: energy_mj[0]  # type: ignore[attr-defined]
    return module


# --- declared ------------------------------------------------------------------------------------


def test_declared_energy_is_power_times_the_measured_seconds() -> None:
    meter = DeclaredMeter(15.0)
    with meter.measure() as reading:
        sum(range(100_000))
    assert reading.compute_s > 0
    assert reading.energy_j == 15.0 * reading.compute_s
    assert meter.source == "declared"


def test_a_negative_declared_power_is_refused() -> None:
    with pytest.raises(ValueError, match="power_w must be >= 0"):
        DeclaredMeter(-1.0)


# --- RAPL ----------------------------------------------------------------------------------------


def test_rapl_sums_the_package_zones_and_ignores_sub_zones(tmp_path: Path) -> None:
    pkg0 = rapl_zone(tmp_path, "intel-rapl:0", 1_000_000)
    pkg1 = rapl_zone(tmp_path, "intel-rapl:1", 5_000_000)
    core = rapl_zone(tmp_path, "intel-rapl:0:0", 7)  # inside package 0: counted there already
    meter = RaplMeter(tmp_path)
    with meter.measure() as reading:
        pkg0.write_text("3500000\n")  # +2.5 J
        pkg1.write_text("5250000\n")  # +0.25 J
        core.write_text("999999999\n")
    assert reading.energy_j == pytest.approx(2.75)
    assert meter.source == "rapl"


def test_rapl_counts_across_a_wrap_around(tmp_path: Path) -> None:
    counter = rapl_zone(tmp_path, "intel-rapl:0", 1_000 - 300, max_uj=1_000)
    meter = RaplMeter(tmp_path)
    with meter.measure() as first:
        counter.write_text("200\n")  # 300 µJ up to the wrap, 200 after it
    with meter.measure() as second:
        counter.write_text("450\n")
    assert first.energy_j == pytest.approx(500e-6)
    assert second.energy_j == pytest.approx(250e-6)


def test_rapl_without_zones_or_with_an_unreadable_counter_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Moe2Error, match="no RAPL package zones") as none:
        RaplMeter(tmp_path)
    assert none.value.code == "no_energy_meter"
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000\n")
    (zone / "energy_uj").symlink_to(tmp_path / "gone")  # unreadable, even for root
    with pytest.raises(Moe2Error, match="cannot read the RAPL counters") as unreadable:
        RaplMeter(tmp_path)
    assert unreadable.value.code == "no_energy_meter"


# --- NVML ----------------------------------------------------------------------------------------


def test_nvml_turns_the_gpus_millijoule_counter_into_joules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = [120_000]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counter))
    meter = NvmlMeter()
    with meter.measure() as reading:
        counter[0] += 4_250
    assert reading.energy_j == pytest.approx(4.25)
    assert meter.source == "nvml"


def test_nvml_without_pynvml_or_a_gpu_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with pytest.raises(Moe2Error, match=r"pip install 'moe2\[gpu\]'") as missing:
        NvmlMeter()
    assert missing.value.code == "no_energy_meter"
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([0], fail_init=True))
    with pytest.raises(Moe2Error, match="NVML Shared Library Not Found"):
        NvmlMeter()


# --- choosing ------------------------------------------------------------------------------------


def test_the_best_meter_is_nvml_then_rapl_then_declared(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    device = {"name": "box", "power_w": 9.0}
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    declared = choose_meter(device)
    assert isinstance(declared, DeclaredMeter) and declared.power_w == 9.0
    rapl_zone(tmp_path, "intel-rapl:0", 10)
    assert choose_meter(device).source == "rapl"
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([0]))
    assert choose_meter(device).source == "nvml"
    assert choose_meter(device, "declared").source == "declared"


def test_an_explicit_meter_that_is_not_there_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path / "no-powercap")
    with pytest.raises(Moe2Error, match="energy source 'rapl' unavailable") as rapl:
        choose_meter({}, "rapl")
    assert rapl.value.code == "no_energy_meter"
    with pytest.raises(Moe2Error, match="unknown energy source 'joulemeter'") as unknown:
        choose_meter({}, "joulemeter")
    assert unknown.value.code == "invalid_field"
