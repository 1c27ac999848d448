"""A trained gating network on disk (safetensors + JSON) and ``LearnedGate``: the ``Gate`` that
the fusion agent calls once per prompt. Its values are renormalised on S by
``moe2.runtime.mixture`` (eq. 2, eq. 28, Algorithm 3)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from moe2.gating.embed import Embedder
from moe2.gating.model import GatingMLP, gating_values
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import ChatMessage

log = structlog.get_logger("moe2.gating")

FORMAT = "moe2.gating.v1"
WEIGHTS = "model.safetensors"
METADATA = "gating.json"


@dataclass(frozen=True, slots=True)
class ExpertModel:
    """What served an expert id: the heartbeat's model string (base model, adapter and context,
    each with its hash) and its tokenizer ("" when not known: not compared)."""

    model: str
    tokenizer: str = ""

    def differs(self, other: ExpertModel) -> bool:
        tokenizers = self.tokenizer and other.tokenizer and self.tokenizer != other.tokenizer
        return self.model != other.model or bool(tokenizers)

    def describe(self, other: ExpertModel) -> str:
        """The model string, with the tokenizer when it differs from ``other``'s."""
        same = self.tokenizer == other.tokenizer or not self.tokenizer or not other.tokenizer
        return self.model if same else f"{self.model} (tokenizer {self.tokenizer})"


class GatingArtifact:
    """A gating network over ``expert_ids`` (in that order) for ``embedder``'s ``dim``-d vectors.

    ``metadata`` is the whole ``gating.json``: besides the identity it holds ``architecture``,
    ``experts`` (what served each expert id in the training data, when recorded), ``data_hash``,
    ``config``, ``metrics``, ``split`` (``heldout``: example ids) and ``history``.
    """

    def __init__(
        self,
        model: GatingMLP,
        expert_ids: Sequence[str],
        embedder: str,
        metadata: dict[str, Any] | None = None,
        *,
        experts: Mapping[str, ExpertModel] | None = None,
    ) -> None:
        if model.n_experts != len(expert_ids):
            raise _invalid(f"{model.n_experts} gating outputs for {len(expert_ids)} experts")
        self.model = model.eval()
        self.expert_ids = list(expert_ids)
        self.embedder = embedder
        self.dim = model.dim
        self.metadata = {**(metadata or {}), **self._identity()}
        if experts is not None:
            self.metadata["experts"] = expert_records(self.expert_ids, experts)
        self.experts = _recorded_experts(self.metadata)

    def mismatches(
        self, serving: Mapping[str, ExpertModel]
    ) -> list[tuple[str, ExpertModel, ExpertModel]]:
        """(id, trained on, serving now) for each expert of ``serving`` whose model or tokenizer
        differs from what the gate was trained on; empty when none does or none was recorded."""
        return [
            (e, self.experts[e], now)
            for e, now in serving.items()
            if e in self.experts and self.experts[e].differs(now)
        ]

    def _identity(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "expert_ids": self.expert_ids,
            "embedder": {"name": self.embedder, "dim": self.dim},
            "architecture": self.model.architecture(),
        }

    @property
    def heldout_ids(self) -> list[str]:
        """The examples held out of training (evaluate on these), empty if not recorded."""
        return list(self.metadata.get("split", {}).get("heldout", []))

    def values(self, embeddings: np.ndarray) -> np.ndarray:
        """Gating values ``g(x)`` (E, N) float32, each row a softmax, for embeddings (E, dim)."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise _invalid(f"embeddings of shape {x.shape}, want (E, {self.dim})")
        return gating_values(self.model, x)

    def save(self, out: Path) -> None:
        """Write ``out/model.safetensors`` and ``out/gating.json``."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
        (out / METADATA).write_text(json.dumps(self.metadata, indent=2) + "\n")

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        expert_ids: Sequence[str] | None = None,
        embedder: str | None = None,
    ) -> GatingArtifact:
        """Load from a directory (or a file in it). With ``expert_ids`` / ``embedder`` given, a
        different expert set, expert order or embedder is refused with a clear error."""
        folder = path.parent if path.is_file() else path
        meta = _read_metadata(folder)
        try:
            _check_identity(folder, meta, expert_ids, embedder)
            model = _read_model(folder, meta)
            return cls(model, meta["expert_ids"], meta["embedder"]["name"], meta)
        except (KeyError, TypeError, ValueError) as e:
            raise _invalid(f"{folder / METADATA} is incomplete or malformed ({e!r})") from e


def expert_records(
    expert_ids: Sequence[str], experts: Mapping[str, ExpertModel]
) -> list[dict[str, str]]:
    """``gating.json``'s ``experts``: what served each of ``expert_ids``, in that order."""
    missing = [e for e in expert_ids if e not in experts]
    if missing:
        raise _invalid(f"no model recorded for experts {missing}: the gate must know what it gates")
    return [
        {"id": e, "model": experts[e].model, "tokenizer": experts[e].tokenizer} for e in expert_ids
    ]


def _recorded_experts(meta: dict[str, Any]) -> dict[str, ExpertModel]:
    """``gating.json``'s ``experts`` by id; empty for a gate trained before they were recorded."""
    records = meta.get("experts")
    if records is None:
        return {}
    experts = {
        str(r["id"]): ExpertModel(str(r["model"]), str(r.get("tokenizer", ""))) for r in records
    }
    if sorted(experts) != sorted(meta["expert_ids"]):
        raise ValueError(f"experts {sorted(experts)} recorded for expert_ids {meta['expert_ids']}")
    return experts


def _read_metadata(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / METADATA).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _invalid(f"cannot read {folder / METADATA}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _invalid(f"{folder / METADATA} is not a {FORMAT} gating artifact")
    return meta


def _read_model(folder: Path, meta: dict[str, Any]) -> GatingMLP:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    arch = meta["architecture"]
    model = GatingMLP(
        int(meta["embedder"]["dim"]),
        len(meta["expert_ids"]),
        hidden=int(arch["hidden"]),
        layers=int(arch["layers"]),
        dropout=float(arch["dropout"]),
    )
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise _invalid(f"cannot load the weights in {folder / WEIGHTS}: {e}") from e
    return model


def _check_identity(
    folder: Path, meta: dict[str, Any], expert_ids: Sequence[str] | None, embedder: str | None
) -> None:
    theirs, name = list(meta["expert_ids"]), meta["embedder"]["name"]
    if expert_ids is not None and set(expert_ids) != set(theirs):
        raise _invalid(
            f"gating artifact {folder} was trained for experts {theirs}, not {list(expert_ids)} "
            f"(missing from it: {sorted(set(expert_ids) - set(theirs))}, "
            f"not asked for: {sorted(set(theirs) - set(expert_ids))}); train one for this set"
        )
    if expert_ids is not None and list(expert_ids) != theirs:
        raise _invalid(
            f"gating artifact {folder} orders its experts {theirs}, not {list(expert_ids)}: "
            "the gating values would go to the wrong experts"
        )
    if embedder is not None and embedder != name:
        raise _invalid(
            f"gating artifact {folder} was trained on {name!r} embeddings, not {embedder!r}"
        )


def prompt_text(messages: Sequence[ChatMessage]) -> str:
    """What the gating embeds of a conversation: the last user message (else the last message)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return messages[-1].content if messages else ""


class LearnedGate:
    """``moe2.gating.base.Gate`` over a trained artifact: embed the prompt, gate, pick the values of
    the requested experts. Experts the artifact does not know get 0.0 (logged once each)."""

    def __init__(self, artifact: GatingArtifact, embedder: Embedder) -> None:
        if embedder.name != artifact.embedder or embedder.dim != artifact.dim:
            raise _invalid(
                f"the gating artifact wants {artifact.embedder!r} ({artifact.dim}-d) embeddings, "
                f"not {embedder.name!r} ({embedder.dim}-d)"
            )
        self.artifact, self.embedder = artifact, embedder
        self._index = {e: i for i, e in enumerate(artifact.expert_ids)}
        self._unknown: set[str] = set()
        self._noticed: set[tuple[str, ExpertModel]] = set()

    def notice_expert(self, expert: str, model: str, tokenizer: str = "") -> None:
        """A live expert's heartbeat: warn (once per expert and model) when it serves another
        model or tokenizer than the gate was trained on. A warning, not a refusal: a restarted
        expert may legitimately serve a new build, but its gating values were learned for the
        one recorded in the artifact."""
        now = ExpertModel(model, tokenizer)
        if (expert, now) in self._noticed:
            return
        self._noticed.add((expert, now))
        for _, trained, serving in self.artifact.mismatches({expert: now}):
            log.warning(
                "gating_expert_changed",
                expert=expert,
                trained_on=trained.describe(serving),
                serving=serving.describe(trained),
            )

    def gate(self, messages: Sequence[ChatMessage], experts: Sequence[str]) -> list[float]:
        values = self.artifact.values(self.embedder.embed([prompt_text(messages)]))[0]
        return [self._value(values, expert) for expert in experts]

    def _value(self, values: np.ndarray, expert: str) -> float:
        i = self._index.get(expert)
        if i is not None:
            return float(values[i])
        if expert not in self._unknown:
            self._unknown.add(expert)
            log.warning("gating_unknown_expert", expert=expert, known=self.artifact.expert_ids)
        return 0.0


def _invalid(message: str) -> Moe2Error:
    return Moe2Error(ErrorCode.INVALID_FIELD, message)
