"""Energy meters: the joules of one compute call, from NVML, RAPL or a declared power draw.

Every meter has a ``source`` (``nvml``, ``rapl`` or ``declared``: what the heartbeat's
``energy_source`` says) and ``measure()``, a context manager around one compute call that fills a
``Reading`` with the call's seconds and joules when it ends.

- ``NvmlMeter``: the GPU's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ).
  pynvml (PyPI ``nvidia-ml-py``, the ``gpu`` extra) is imported only when NVML is asked for.
- ``RaplMeter``: the package counters under ``/sys/class/powercap/intel-rapl:<n>/energy_uj`` (µJ),
  which wrap at ``max_energy_range_uj``. Most kernels let only root read them.
- ``DeclaredMeter``: ``power_w`` times the call's measured seconds.

Counters measure the whole GPU or CPU package, so another process busy on the same box counts
toward an expert's joules. ``choose_meter`` picks NVML if an NVIDIA GPU is visible, else RAPL if
it is readable, else the declared power.
"""

from __future__ import annotations

import importlib
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Final, Protocol

from moe2.runtime.errors import ErrorCode, Moe2Error

SOURCES: Final = ("nvml", "rapl", "declared")
RAPL_ROOT: Final = Path("/sys/class/powercap")
_PACKAGE_ZONE: Final = re.compile(r"^intel-rapl:\d+$")  # packages; sub-zones have two colons


@dataclass(slots=True)
class Reading:
    """One compute call: filled in when its ``measure()`` block ends."""

    compute_s: float = 0.0
    energy_j: float = 0.0


class EnergyMeter(Protocol):
    """Measures the seconds and joules of one compute call at a time."""

    @property
    def source(self) -> str: ...

    def measure(self) -> AbstractContextManager[Reading]: ...


class DeclaredMeter:
    """A declared power model: ``power_w`` times the measured compute seconds."""

    source: Final = "declared"

    def __init__(self, power_w: float) -> None:
        if power_w < 0:
            raise ValueError(f"power_w must be >= 0, got {power_w}")
        self.power_w = power_w

    @contextmanager
    def measure(self) -> Iterator[Reading]:
        reading = Reading()
        started = time.perf_counter()
        try:
            yield reading
        finally:
            reading.compute_s = time.perf_counter() - started
            reading.energy_j = self.power_w * reading.compute_s


class CounterMeter(ABC):
    """A meter over a cumulative hardware energy counter (``read_j``)."""

    source: ClassVar[str]

    @abstractmethod
    def read_j(self) -> float:
        """Joules counted since some fixed origin; never decreases."""

    @contextmanager
    def measure(self) -> Iterator[Reading]:
        reading = Reading()
        before = self.read_j()
        started = time.perf_counter()
        try:
            yield reading
        finally:
            reading.compute_s = time.perf_counter() - started
            reading.energy_j = max(0.0, self.read_j() - before)


class NvmlMeter(CounterMeter):
    """One NVIDIA GPU's total-energy counter (millijoules since the driver loaded)."""

    source = "nvml"

    def __init__(self, index: int = 0) -> None:
        self._nvml = _load_pynvml()
        try:
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            self.read_j()  # a GPU older than Volta has no energy counter: fail here, not later
        except Exception as exc:  # pynvml raises its own NVMLError subclasses
            raise _unavailable("nvml", f"NVML cannot read GPU {index}'s energy ({exc})") from None

    def read_j(self) -> float:
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) / 1000.0


@dataclass(slots=True)
class _RaplZone:
    energy: Path
    range_uj: int
    last_uj: int


class RaplMeter(CounterMeter):
    """The sum of the CPU package counters under ``root`` (``intel-rapl:<n>``), wraps included.

    ``read_j`` accumulates each zone's increase since the previous read, so a counter that wraps
    once between two reads (minutes at the least) is still counted right.
    """

    source = "rapl"

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        self._zones = rapl_zones(root)
        self._total_uj = 0

    def read_j(self) -> float:
        for zone in self._zones:
            now = _read_int(zone.energy)
            delta = now - zone.last_uj
            self._total_uj += delta if delta >= 0 else delta + zone.range_uj
            zone.last_uj = now
        return self._total_uj / 1e6


def rapl_zones(root: Path = RAPL_ROOT) -> list[_RaplZone]:
    """The package zones under ``root``, each read once; Moe2Error if any cannot be read."""
    paths = sorted(p for p in root.glob("intel-rapl:*") if _PACKAGE_ZONE.match(p.name))
    if not paths:
        raise _unavailable("rapl", f"no RAPL package zones under {root}")
    try:
        return [_primed(p) for p in paths]
    except (OSError, ValueError) as exc:
        raise _unavailable("rapl", f"cannot read the RAPL counters under {root} ({exc})") from None


def _primed(zone_dir: Path) -> _RaplZone:
    energy = zone_dir / "energy_uj"
    return _RaplZone(energy, _read_int(zone_dir / "max_energy_range_uj"), _read_int(energy))


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _load_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise _unavailable(
            "nvml", "pynvml is not installed (pip install 'moe2[gpu]', i.e. nvidia-ml-py)"
        ) from None


def _unavailable(source: str, why: str) -> Moe2Error:
    return Moe2Error(ErrorCode.NO_ENERGY_METER, f"energy source {source!r} unavailable: {why}")


def choose_meter(device: Mapping[str, Any], prefer: str | None = None) -> EnergyMeter:
    """``prefer`` if given (Moe2Error if it cannot be read here), else the best one available.

    ``device`` is the expert's declared profile: ``power_w`` for the declared meter, and
    ``gpu_index`` (default 0) for NVML.
    """
    if prefer is not None and prefer not in SOURCES:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"unknown energy source {prefer!r}; known: {', '.join(SOURCES)}",
        )
    if prefer == "declared":
        return DeclaredMeter(float(device.get("power_w", 0.0)))
    if prefer == "nvml":
        return NvmlMeter(int(device.get("gpu_index", 0)))
    if prefer == "rapl":
        return RaplMeter(RAPL_ROOT)  # looked up now, so a test can point it elsewhere
    return _best_meter(device)


def _best_meter(device: Mapping[str, Any]) -> EnergyMeter:
    for source in ("nvml", "rapl"):
        try:
            return choose_meter(device, source)
        except Moe2Error:
            continue
    return DeclaredMeter(float(device.get("power_w", 0.0)))
