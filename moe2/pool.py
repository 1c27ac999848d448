"""An expert pool file (``deploy/pools/<name>/pool.toml``): which experts to run, what each
knows, which edge box it stands for and what it costs there, and the gate, outputs and budgets
that go with them. The cost sections are the profile format SMO reads (docs/selection.md); every
relative path is relative to the pool file. deploy/pools/README.md describes every key.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.selection.costs import Budgets, Constraints
from moe2.selection.profiles import EXPERT_KEYS, SECTIONS, Profiles, parse_profiles

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POOL = ROOT / "deploy" / "pools" / "default" / "pool.toml"
POOL_KEYS = {
    "name",
    "gate",
    "outputs",
    "sessions",
    "demo_experts",
    "experts_per_prompt",
    "energy_j",
}
RUN_KEYS = {"adapter", "domain"}  # an expert's keys besides the profile format's


@dataclass(frozen=True, slots=True)
class PoolExpert:
    """One expert of the pool: what to run, what it knows, and the box it stands for."""

    id: str
    model: str  # a built-in model name, a .gguf file or a HF directory
    adapter: Path | None  # a directory, or a shipped adapter's name (a relative path)
    domain: str
    device: str  # the device class it stands for ("" when its profile names none)

    def command(self, url: str) -> list[str]:
        """The ``moe2 expert`` process that serves it (one torch thread: boxes are shared)."""
        cmd = [sys.executable, "-m", "moe2", "expert", "--id", self.id, "--model", self.model]
        if self.adapter is not None:
            cmd += ["--adapter", str(self.adapter)]
        return [*cmd, "--nats", url, "--threads", "1"]


@dataclass(frozen=True, slots=True)
class Pool:
    path: Path
    name: str
    experts: list[PoolExpert]  # in the file's order: the demo starts the first ones
    profiles: Profiles
    gate: Path
    outputs: Path
    sessions: Path  # recorded sessions of chosen subsets: the cost side of ``moe2 eval``
    demo_experts: int
    experts_per_prompt: int | None
    energy_j: float | None

    def first(self, n: int) -> list[PoolExpert]:
        if not 1 <= n <= len(self.experts):
            raise _invalid(self.path, f"asked for {n} experts; the pool has {len(self.experts)}")
        return self.experts[:n]

    def budgets(
        self, tau_s: Mapping[str, float] | None = None, energy_j: float | None = None
    ) -> Budgets:
        """The pool's budgets (tau from its applications), overridden where given."""
        unknown = sorted(set(tau_s or {}) - set(self.profiles.applications))
        if unknown:
            known = sorted(self.profiles.applications)
            raise _invalid(self.path, f"delay limits for unknown applications {unknown}: {known}")
        return Budgets(dict(tau_s or {}), self.energy_j if energy_j is None else energy_j)

    def check_artifacts(self) -> None:
        """The gate and outputs must exist: refuse with the commands that build them."""
        missing = [
            (what, path)
            for what, path, marker in (
                ("outputs store", self.outputs, "meta.json"),
                ("gating artifact", self.gate, "gating.json"),
            )
            if not (path / marker).is_file()
        ]
        if missing:
            named = " and ".join(f"its {what} {shown(path)}" for what, path in missing)
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"pool {shown(self.path)} lacks {named}; with the pool's experts live "
                "(moe2 expert --id ... for each), build them:\n"
                f"  moe2 gating collect --data ../shared/data/mmlu/val "
                f"--data ../shared/data/arc/arc_challenge/dev.jsonl "
                f"--data ../shared/data/arc/arc_easy/dev.jsonl "
                f"--experts {','.join(e.id for e in self.experts)} --out {shown(self.outputs)}\n"
                f"  moe2 gating train --outputs {shown(self.outputs)} --out {shown(self.gate)}\n"
                "or give the demo a gate and outputs: --gate DIR --outputs DIR",
            )


def load_pool(path: Path) -> Pool:
    """Read and check a pool file: its keys, its experts' adapters and profiles."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _invalid(path, f"cannot read it: {exc}") from None
    unknown = sorted(set(data) - {"pool", *SECTIONS})
    if unknown:
        raise _invalid(path, f"unknown sections {unknown}; known: {['pool', *SECTIONS]}")
    head = _table(path, "[pool]", data.get("pool", {}), POOL_KEYS)
    bodies = _table(path, "[experts]", data.get("experts", {}), None)
    if not bodies:
        raise _invalid(path, "it defines no [experts.<id>]")
    experts = [_expert(path, e, _table(path, f"[experts.{e}]", b, None)) for e, b in bodies.items()]
    try:
        sections = {k: v for k, v in data.items() if k != "pool"}
        profiles = parse_profiles({**sections, "experts": _costs(bodies)})
    except Moe2Error as exc:
        raise _invalid(path, exc.message) from None
    folder = path.parent
    return Pool(
        path=path,
        name=str(head.get("name", folder.name)),
        experts=experts,
        profiles=profiles,
        gate=folder / str(head.get("gate", "gate")),
        outputs=folder / str(head.get("outputs", "outputs")),
        sessions=folder / str(head.get("sessions", "sessions")),
        demo_experts=_count(path, "demo_experts", head.get("demo_experts", len(experts))),
        experts_per_prompt=_optional_count(path, head.get("experts_per_prompt")),
        energy_j=_optional_float(path, "energy_j", head.get("energy_j")),
    )


# --- what the budgets do to a chosen S ---------------------------------------------------------

Limit = tuple[str, float, float]  # (constraint, value, limit): "tau[chat]" or "energy"


@dataclass(frozen=True, slots=True)
class BudgetReport:
    """S against the budgets, and what keeps each other candidate out of S."""

    used: list[Limit]  # S's delay per application and its energy, against their limits
    left_out: dict[str, list[Limit]]  # per candidate not in S: what S plus it would break

    @property
    def binding(self) -> list[str]:
        """The constraints that keep a candidate out, the one that keeps out most first."""
        counts: dict[str, int] = {}
        for broken in self.left_out.values():
            for name, _, _ in broken:
                counts[name] = counts.get(name, 0) + 1
        return sorted(counts, key=lambda name: -counts[name])

    @property
    def by_loss(self) -> list[str]:
        """Candidates that would fit the budgets: SMO left them out for the loss."""
        return [e for e, broken in self.left_out.items() if not broken]


def budget_report(
    profiles: Profiles, budgets: Budgets, candidates: Sequence[str], chosen: Sequence[str]
) -> BudgetReport:
    """Delay and energy of ``chosen`` against ``budgets``, and for each other candidate the
    constraints that ``chosen`` plus it would break (none: the loss, not a budget, left it out)."""
    constraints = Constraints(profiles.table(candidates), budgets)
    table = constraints.table

    def mask(experts: Sequence[str]) -> npt.NDArray[np.bool_]:
        return np.array([e in experts for e in candidates])

    s = mask(chosen)
    delays = table.delay_s(s)[0]
    used: list[Limit] = [
        (f"tau[{app.name}]", float(d), float(t))
        for app, d, t in zip(table.applications, delays, constraints.tau, strict=True)
    ]
    used.append(("energy", float(table.energy_j(s)[0]), constraints.energy))
    others = [e for e in candidates if e not in chosen]
    return BudgetReport(used, {e: constraints.violations(mask([*chosen, e])) for e in others})


def shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies under it (shorter messages)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _expert(path: Path, expert: str, body: Mapping[str, Any]) -> PoolExpert:
    unknown = sorted(set(body) - EXPERT_KEYS - RUN_KEYS)
    if unknown:
        known = sorted(EXPERT_KEYS | RUN_KEYS)
        raise _invalid(path, f"[experts.{expert}]: unknown keys {unknown}; known: {known}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid(path, f"[experts.{expert}] needs model = a built-in name or a model path")
    adapter = _adapter(path, expert, body.get("adapter"))
    return PoolExpert(
        id=expert,
        model=model,
        adapter=adapter,
        domain=str(body.get("domain", "")),
        device=str(body.get("device", "")),
    )


def _adapter(path: Path, expert: str, value: Any) -> Path | None:
    """A LoRA adapter directory (relative to the pool file), or a shipped adapter's name
    (``cluster-1``: ``moe2 expert --adapter`` finds it for the expert's model)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _invalid(path, f"[experts.{expert}]: adapter must be a directory or a name")
    directory = (path.parent / value).resolve()
    if (directory / "adapter_config.json").is_file():
        return directory
    if "/" not in value and not directory.exists():
        return Path(value)  # a name; the expert process says if there is no such adapter
    raise _invalid(path, f"[experts.{expert}]: no LoRA adapter at {directory}")


def _costs(bodies: Mapping[str, Any]) -> dict[str, Any]:
    """The experts' profile tables: their profile keys only. An expert with a measured fit
    names its device class as a label, which the profile format does not resolve."""
    out = {}
    for expert, body in bodies.items():
        keys = EXPERT_KEYS - {"device"} if "fit" in body else EXPERT_KEYS
        out[expert] = {k: v for k, v in body.items() if k in keys}
    return out


def _table(path: Path, where: str, body: Any, known: set[str] | None) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise _invalid(path, f"{where} must be a table")
    unknown = sorted(set(body) - known) if known is not None else []
    if unknown:
        raise _invalid(path, f"{where}: unknown keys {unknown}; known: {sorted(known or ())}")
    return dict(body)


def _count(path: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(path, f"[pool] {key} must be an integer >= 1, not {value!r}")
    return value


def _optional_count(path: Path, value: Any) -> int | None:
    return None if value is None else _count(path, "experts_per_prompt", value)


def _optional_float(path: Path, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _invalid(path, f"[pool] {key} must be a number > 0, not {value!r}")
    return float(value)


def _invalid(path: Path, message: str) -> Moe2Error:
    return Moe2Error(ErrorCode.INVALID_FIELD, f"pool file {path}: {message}")
