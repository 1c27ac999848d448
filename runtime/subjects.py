"""Every NATS subject moe2 uses, built in one place.

The publisher's identity is part of every subject it publishes on, so that server-side permissions
can confine an expert to its own subjects and a forged slice is refused by subject alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VERSION = "v1"
DEFAULT_PREFIX = "moe2"
FUSION_QUEUE = "moe2-fusion"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(kind: str, value: str) -> str:
    """Refuse ids that would break a subject (dots, wildcards, spaces)."""
    if not _TOKEN.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def valid_token(value: str) -> bool:
    """True if ``value`` may stand as one subject token (an expert or session id)."""
    return bool(_TOKEN.match(value))


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject builders under one prefix (default ``moe2``)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def root(self) -> str:
        return f"{self.prefix}.{VERSION}"

    @property
    def prompt(self) -> str:
        """Clients publish prompts here, with a reply inbox; fusion agents share it as a queue."""
        return f"{self.root}.prompt"

    def expert_open(self, expert: str) -> str:
        return f"{self.root}.expert.{expert}.open"

    def expert_step(self, expert: str) -> str:
        return f"{self.root}.expert.{expert}.step"

    def expert_close(self, expert: str) -> str:
        return f"{self.root}.expert.{expert}.close"

    def expert_score(self, expert: str) -> str:
        """Request/reply: teacher-forced scoring of targets (gating data collection)."""
        return f"{self.root}.expert.{expert}.score"

    def expert_inbox(self, expert: str) -> str:
        """What one expert subscribes to: its open, step, close and score subjects."""
        return f"{self.root}.expert.{expert}.*"

    def slice(self, session: str, expert: str) -> str:
        return f"{self.root}.session.{session}.slice.{expert}"

    def session_slices(self, session: str) -> str:
        return f"{self.root}.session.{session}.slice.*"

    def cancel(self, session: str) -> str:
        """Where a client cancels a session; the fusion agent running it listens."""
        return f"{self.root}.session.{session}.cancel"

    def member(self, expert: str) -> str:
        return f"{self.root}.members.{expert}"

    @property
    def members(self) -> str:
        return f"{self.root}.members.*"

    @property
    def selection(self) -> str:
        """Where fusion agents announce the subset S they chose."""
        return f"{self.root}.selection"

    @property
    def everything(self) -> str:
        return f"{self.root}.>"

    def expert_of_slice(self, subject: str) -> str:
        """The expert id at the end of a slice subject."""
        return subject.rsplit(".", 1)[-1]

    def verb_of_expert_subject(self, subject: str) -> str:
        """``open``, ``step``, ``close`` or ``score`` from an expert subject."""
        return subject.rsplit(".", 1)[-1]
