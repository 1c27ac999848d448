"""Process lifecycle: SIGTERM and SIGINT cancel the work, so every agent drains and exits 0."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
import structlog

log = structlog.get_logger("moe2.lifecycle")
T = TypeVar("T")


async def cancel_on_signals(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` at the first SIGTERM or SIGINT."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return


async def until_signalled(main: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``main``; a signal cancels it (cleanly, through its finally blocks) and gives None.

    An exception from ``main`` is raised as itself, not wrapped in an exception group.
    """
    result: list[T] = []
    failed: list[Exception] = []

    async def body(scope: anyio.CancelScope) -> None:
        try:
            result.append(await main())
        except Exception as exc:  # re-raised below, outside the task group
            failed.append(exc)
        scope.cancel()  # done: stop watching for signals

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_signals, tg.cancel_scope)
        tg.start_soon(body, tg.cancel_scope)
    if failed:
        raise failed[0]
    return result[0] if result else None


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], wait_s: float = 10.0) -> None:
    """Terminate every process still running at once, then wait for each (killing one that
    outlives ``wait_s``), so that their shutdowns overlap."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(wait_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
