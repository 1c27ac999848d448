"""Device profiles as data: TOML files of devices, models, links, applications and experts.

Units are in the key names (``_s``, ``_ms``, ``_w``, ``_gbps``, ``_tflops``, ``_mbps``,
``_mhz``, ``_db``, ``_b`` for 10^9); an unknown key is an error, so a typo cannot pass silently.
Several files merge in order (a later table of the same name wins). An expert is costed from
``[experts.<id>.fit]`` when ``moe2 profile`` measured it, else from its device and model by eq. 4.
See deploy/profiles/README.md for the format.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.selection.costs import (
    Application,
    ComputeFit,
    CostTable,
    Device,
    ExpertCost,
    Link,
    ModelSpec,
    spec_fit,
)

SECTIONS = ("gating", "applications", "devices", "models", "links", "experts")
FIT_KEYS = {f.name for f in fields(ComputeFit)} | {"transmission_s"}


@dataclass(frozen=True)
class Profiles:
    """Everything problem (19) needs to know about costs, by name."""

    experts: dict[str, ExpertCost]
    applications: dict[str, Application]
    gating_s: float = 0.0

    def table(self, expert_ids: Iterable[str], *, slice_k: int = 32) -> CostTable:
        """The cost table of these experts (each must have a profile)."""
        ids = list(expert_ids)
        missing = [e for e in ids if e not in self.experts]
        if missing:
            raise _invalid(f"no profile for experts {missing}; profiled: {sorted(self.experts)}")
        costs = [self.experts[e] for e in ids]
        apps = list(self.applications.values())
        return CostTable(costs, apps, gating_s=self.gating_s, slice_k=slice_k)


def load_profiles(paths: Iterable[Path]) -> Profiles:
    """Read and merge profile files; every reference and unit is checked."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for path in paths:
        for section, body in _read(path).items():
            if section not in SECTIONS:
                raise _invalid(f"{path}: unknown section {section!r}; known: {list(SECTIONS)}")
            _known_keys(f"{path}: [{section}]", body, None)
            merged[section].update(body)
    return parse_profiles(merged)


def parse_profiles(data: Mapping[str, Any]) -> Profiles:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise _invalid(f"unknown profile sections {unknown}; known: {list(SECTIONS)}")
    devices = _each("devices", data.get("devices", {}), Device)
    models = _each("models", data.get("models", {}), ModelSpec)
    links = _each("links", data.get("links", {}), Link)
    apps = _each("applications", data.get("applications", {}), Application)
    if not apps:
        raise _invalid("the profiles define no [applications.<name>] (a prompt and answer length)")
    experts = {
        name: _expert(name, body, devices, models, links)
        for name, body in data.get("experts", {}).items()
    }
    gating = data.get("gating", {})
    _known_keys("[gating]", gating, {"delay_ms"})
    return Profiles(experts, apps, gating_s=float(gating.get("delay_ms", 0.0)) / 1e3)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise _invalid(f"cannot read profiles {path}: {exc}") from None


def _each(section: str, tables: Mapping[str, Any], cls: type[Any]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)} - {"name"}
    out: dict[str, Any] = {}
    _known_keys(f"[{section}]", tables, None)
    for name, body in tables.items():
        where = f"[{section}.{name}]"
        _known_keys(where, body, known)
        try:
            out[name] = cls(name=name, **body)
        except (TypeError, ValueError) as exc:
            raise _invalid(f"{where}: {exc}") from None
    return out


EXPERT_KEYS = {"device", "model", "link", "backend", "energy_source", "fit", "measured"}


def _expert(
    name: str,
    body: Mapping[str, Any],
    devices: Mapping[str, Device],
    models: Mapping[str, ModelSpec],
    links: Mapping[str, Link],
) -> ExpertCost:
    _known_keys(f"[experts.{name}]", body, EXPERT_KEYS)
    link = _ref(links, body.get("link"), f"experts.{name}.link") if "link" in body else Link()
    if "fit" in body:
        fit = dict(body["fit"])
        _known_keys(f"[experts.{name}.fit]", fit, FIT_KEYS)
        transmission = fit.pop("transmission_s", None)
        fit.setdefault("energy_source", body.get("energy_source", "declared"))
        if transmission is not None and "link" not in body:
            link = Link(name="measured", latency_ms=float(transmission) * 1e3)
        return ExpertCost(name, _fit(name, fit), link, source="measured")
    device = _ref(devices, body.get("device"), f"experts.{name}.device")
    model = _ref(models, body.get("model"), f"experts.{name}.model")
    return ExpertCost(name, spec_fit(device, model), link, source="spec")


def _fit(name: str, fit: dict[str, Any]) -> ComputeFit:
    try:
        compute = ComputeFit(**fit)
    except TypeError as exc:
        raise _invalid(f"[experts.{name}.fit]: {exc}") from None
    numbers = [getattr(compute, f.name) for f in fields(ComputeFit) if f.name != "energy_source"]
    if not all(isinstance(x, int | float) and x >= 0 for x in numbers):
        raise _invalid(f"[experts.{name}.fit]: delays and power must be numbers >= 0")
    return compute


def _ref(table: Mapping[str, Any], key: object, where: str) -> Any:
    if not isinstance(key, str) or key not in table:
        raise _invalid(f"{where} = {key!r} names nothing defined; known: {sorted(table)}")
    return table[key]


def _known_keys(where: str, body: Any, known: set[str] | None) -> None:
    """``body`` must be a table; with ``known``, of those keys only."""
    if not isinstance(body, Mapping):
        raise _invalid(f"{where} must be a table")
    if known is None:
        return
    unknown = sorted(set(body) - known)
    if unknown:
        raise _invalid(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


def _invalid(message: str) -> Moe2Error:
    return Moe2Error(ErrorCode.INVALID_FIELD, message)
