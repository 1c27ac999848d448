"""What every ``moe2`` command shares: how an error reaches the user, and how async work runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import anyio
import typer

from moe2.runtime.errors import Moe2Error
from moe2.runtime.lifecycle import until_signalled

T = TypeVar("T")


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


def _first_moe2_error(group: BaseExceptionGroup[BaseException]) -> Moe2Error | None:
    for exc in group.exceptions:
        if isinstance(exc, Moe2Error):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_moe2_error(exc)):
            return found
    return None
