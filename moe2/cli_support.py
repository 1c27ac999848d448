"""What every ``moe2`` command shares: how an error reaches the user, and how async work runs."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import anyio
import structlog
import typer

from moe2.runtime.errors import Moe2Error
from moe2.runtime.lifecycle import until_signalled

T = TypeVar("T")
log = structlog.get_logger("moe2.cli")


def fail(code: str, message: str, status: int = 1) -> NoReturn:
    """``error [code]: message`` on stderr, then exit with ``status``."""
    typer.echo(f"error [{code}]: {message}", err=True)
    raise typer.Exit(status)


def run_async(main: Callable[[], Awaitable[T]]) -> T | None:
    """Run a coroutine until done or SIGTERM/SIGINT; a Moe2Error is a message and exit 1."""
    try:
        return anyio.run(until_signalled, main)
    except Moe2Error as exc:
        fail(exc.code, exc.message)
    except BaseExceptionGroup as group:  # from a nested task group
        first = _first_moe2_error(group)
        if first is None:
            raise
        fail(first.code, first.message)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def exit_dropping_abandoned_work() -> None:
    """Exit now if a worker thread is still inside a model call that the stopped agent has
    abandoned (a forward pass cannot be interrupted, and the interpreter would wait for it):
    nobody is waiting for its result, so stopping stays bounded."""
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if busy:
        log.info("abandoned_work_dropped", threads=len(busy))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _first_moe2_error(group: BaseExceptionGroup[BaseException]) -> Moe2Error | None:
    for exc in group.exceptions:
        if isinstance(exc, Moe2Error):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_moe2_error(exc)):
            return found
    return None
