"""Expert pools for gating before domain experts exist: one few-shot context per MMLU group.

Each expert is the same small model holding a different context: a system prompt naming its
domain and five worked examples (question with lettered options -> the answer's letter alone,
"B", which is exactly the letter-format target the collection scores first)
drawn from the MMLU dev subjects of one group of the standard MMLU categories (STEM,
humanities, social sciences, other; Hendrycks et al., ``categories.py``). The choice of the five
examples is seeded: five different subjects of the group, one dev question from each.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from moe2.gating.data import LETTERS, McExample, letter_messages
from moe2.runtime.contexts import ExpertContext, save_context
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.wire import ChatMessage

# subject -> subcategory, as in the MMLU release's categories.py
MMLU_SUBCATEGORIES: Final[dict[str, str]] = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics",
    "business_ethics": "business", "clinical_knowledge": "health", "college_biology": "biology",
    "college_chemistry": "chemistry", "college_computer_science": "computer science",
    "college_mathematics": "math", "college_medicine": "health", "college_physics": "physics",
    "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering",
    "elementary_mathematics": "math", "formal_logic": "philosophy", "global_facts": "other",
    "high_school_biology": "biology", "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics", "high_school_mathematics": "math",
    "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math",
    "high_school_us_history": "history", "high_school_world_history": "history",
    "human_aging": "health", "human_sexuality": "culture", "international_law": "law",
    "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy",
    "prehistory": "history", "professional_accounting": "other", "professional_law": "law",
    "professional_medicine": "health", "professional_psychology": "psychology",
    "public_relations": "politics", "security_studies": "politics", "sociology": "culture",
    "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}  # fmt: skip

# group (the expert id) -> (subcategories, what the system prompt calls the domain)
MMLU_GROUPS: Final[dict[str, tuple[frozenset[str], str]]] = {
    "stem": (
        frozenset({"physics", "chemistry", "biology", "computer science", "math", "engineering"}),
        "science, technology, engineering and mathematics",
    ),
    "humanities": (frozenset({"history", "philosophy", "law"}), "history, philosophy and law"),
    "social_sciences": (
        frozenset({"politics", "culture", "economics", "geography", "psychology"}),
        "the social sciences: politics, culture, economics, geography and psychology",
    ),
    "other": (frozenset({"other", "business", "health"}), "business, health and general knowledge"),
}

SHOTS: Final = 5


@dataclass(frozen=True, slots=True)
class PoolMember:
    context: ExpertContext
    subjects: list[str]  # every MMLU subject of the group
    shots: list[str]  # the example ids of the worked examples


def mmlu_group(subject: str) -> str:
    """The group of an MMLU subject; unknown subjects are refused."""
    sub = MMLU_SUBCATEGORIES.get(subject)
    for group, (subcategories, _) in MMLU_GROUPS.items():
        if sub in subcategories:
            return group
    raise Moe2Error(ErrorCode.INVALID_FIELD, f"{subject!r} is not an MMLU subject")


def worked_example(ex: McExample) -> list[ChatMessage]:
    """A user turn as the letter format asks it, and the answer's letter alone.

    The letter format scores the letter as the assistant's first token; a worked answer that
    began "The answer is" would teach the model a format that scoring never asks for.
    """
    return [*letter_messages(ex), ChatMessage("assistant", LETTERS[ex.answer])]


def system_prompt(domain: str) -> str:
    return (
        f"You are an expert in {domain}. You answer multiple-choice questions carefully and "
        "give the correct option."
    )


def choose_shots(
    examples: Sequence[McExample], group: str, seed: int, shots: int
) -> list[McExample]:
    """``shots`` examples of the group: distinct subjects (seeded), one seeded example each."""
    rng = random.Random(f"{seed}:{group}")
    by_subject: dict[str, list[McExample]] = {}
    for ex in sorted(examples, key=lambda e: e.id):
        by_subject.setdefault(ex.subject, []).append(ex)
    if len(by_subject) < shots:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"group {group} has {len(by_subject)} subjects here; {shots} are needed",
        )
    subjects = rng.sample(sorted(by_subject), shots)
    return [rng.choice(by_subject[s]) for s in subjects]


def build_pool(
    examples: Sequence[McExample], *, seed: int = 0, shots: int = SHOTS
) -> dict[str, PoolMember]:
    """One context per MMLU group from MMLU examples (the dev split: five per subject)."""
    mmlu = [ex for ex in examples if ex.source == "mmlu"]
    if not mmlu:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "no MMLU examples: point --mmlu at MMLU dev/")
    pool = {}
    for group, (_, domain) in MMLU_GROUPS.items():
        members = [ex for ex in mmlu if mmlu_group(ex.subject) == group]
        chosen = choose_shots(members, group, seed, shots)
        messages = [ChatMessage("system", system_prompt(domain))]
        messages += [m for ex in chosen for m in worked_example(ex)]
        pool[group] = PoolMember(
            context=ExpertContext(name=group, messages=tuple(messages)),
            subjects=sorted({ex.subject for ex in members}),
            shots=[ex.id for ex in chosen],
        )
    return pool


def write_pool(pool: dict[str, PoolMember], out: Path, *, source: str, seed: int) -> list[Path]:
    """``out/<group>.json`` per expert (its context); ``out/pool.json`` records the choice."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for group, member in pool.items():
        path = out / f"{group}.json"
        save_context(member.context, path)
        paths.append(path)
    manifest = {
        "pool": "mmlu-groups-fewshot",
        "source": source,
        "seed": seed,
        "experts": {
            g: {"context": f"{g}.json", "subjects": m.subjects, "shots": m.shots}
            for g, m in pool.items()
        },
    }
    (out / "pool.json").write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2))
    return paths
