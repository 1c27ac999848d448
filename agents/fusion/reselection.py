"""Live re-selection: the fusion agent's task that keeps S fresh and announces it.

Every ``check_s`` it hands the live experts (heartbeats) to :class:`LiveSelection`; when an
expert joined, left or drifted it runs SMO in a worker thread and publishes the new S on
``<prefix>.v1.selection``. It repeats the latest choice every ``republish_s`` for late watchers.
"""

from __future__ import annotations

import math
import time

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from moe2.agents.fusion.membership import Membership
from moe2.runtime import wire
from moe2.runtime.subjects import Subjects
from moe2.selection.live import Choice, LiveSelection, as_wire_fields

log = structlog.get_logger("moe2.fusion")


class Reselector:
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        membership: Membership,
        selection: LiveSelection,
        agent_id: str,
        *,
        check_s: float = 0.2,
        republish_s: float = 10.0,
    ) -> None:
        self.nc, self.subjects, self.membership = nc, subjects, membership
        self.selection = selection
        self.agent_id = agent_id
        self.check_s = check_s
        self.republish_s = republish_s
        self._published = -math.inf

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.tick()  # the first S before the agent takes prompts
        task_status.started()
        while True:
            await anyio.sleep(self.check_s)
            await self.tick()

    async def tick(self) -> None:
        now = time.monotonic()
        self.membership.expire(now)
        self.selection.update_members(self.membership.live(now))
        if self.selection.stale:
            choice = await anyio.to_thread.run_sync(self.selection.solve)
            await self.publish(choice)
        elif now - self._published >= self.republish_s:
            await self.publish(self.selection.choice)

    async def publish(self, choice: Choice) -> None:
        self._published = time.monotonic()
        message = wire.SubsetAnnouncement(agent=self.agent_id, **as_wire_fields(choice))
        try:
            await self.nc.publish(self.subjects.selection, wire.encode(message))
        except Exception as exc:  # disconnected: the next tick publishes again
            log.warning("publish_failed", subject=self.subjects.selection, error=repr(exc))
