"""Connecting to NATS: reconnects while running, drain on shutdown, a clear error if unreachable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import nats
import structlog
from nats.aio.client import Client as NATS

from moe2.runtime.auth import NatsAuth
from moe2.runtime.errors import ErrorCode, Moe2Error

log = structlog.get_logger("moe2.connection")


def server_urls(url: str | Sequence[str]) -> list[str]:
    """The servers of a ``--nats`` value: one URL, several separated by commas
    (``nats://hub-1:4222,nats://hub-2:4222``), or a list; blanks dropped."""
    parts = url.split(",") if isinstance(url, str) else [u for s in url for u in s.split(",")]
    urls = [u.strip() for u in parts if u.strip()]
    if not urls:
        raise Moe2Error(ErrorCode.INVALID_FIELD, "no NATS server URL given")
    return urls


async def connect_nats(
    url: str | Sequence[str],
    *,
    name: str,
    connect_timeout: float = 2.0,
    auth: NatsAuth | None = None,
) -> NATS:
    """Connect, or raise Moe2Error(UNREACHABLE) naming the URL.

    ``url``: one server, or several (comma-separated, or a list): the servers of one cluster.
    It connects to one of them and, when that one goes away, reconnects to another (and to
    those the cluster announces), for ever once connected (docs/deploy.md).
    ``auth``: the credentials and TLS (runtime/auth.py); default the ``MOE2_NATS_*`` environment.
    Credentials in the URL win. A server that asks for none gets a warning in the log: anyone on
    it may read every prompt and answer in anyone's name (docs/security.md).
    """
    auth = auth if auth is not None else NatsAuth.from_env()
    servers = server_urls(url)
    url = ",".join(servers)  # how the log lines and errors name it
    options = auth.connect_options(servers[0])

    holder: list[NATS] = []

    async def on_disconnect() -> None:
        if holder and not (holder[0].is_closed or holder[0].is_draining):
            log.warning("nats_disconnected", name=name, url=url)

    async def on_reconnect() -> None:
        now = holder[0].connected_url if holder else None
        server = f"{now.hostname}:{now.port}" if now else None  # no credentials in the log
        log.info("nats_reconnected", name=name, url=url, server=server)

    connected = False

    early: list[Exception] = []  # what the server said while connecting (a refused login)

    async def on_error(exc: Exception) -> None:
        if connected:
            log.warning("nats_error", name=name, error=str(exc))
        else:
            early.append(exc)

    try:
        nc = await nats.connect(
            servers,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=1,  # fail fast at start; forever once connected (below)
            reconnect_time_wait=0.5,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
            **options,
        )
    except Exception as exc:  # nats-py raises several types here; all mean the same to a user
        refused = next(filter(None, map(_auth_refusal, [*early, exc])), "")
        if refused:
            raise Moe2Error(
                ErrorCode.UNREACHABLE, f"NATS at {url} refused {name}: {refused}"
            ) from None
        raise Moe2Error(
            ErrorCode.UNREACHABLE, f"no NATS server reachable at {url} ({type(exc).__name__})"
        ) from None
    connected = True
    if not nc._server_info.get("auth_required"):
        log.warning(
            "nats_without_authentication",
            name=name,
            url=url,
            warning="this NATS server has no users: anyone on it can read every prompt and "
            "answer in any expert's name; run `moe2 server` (per-role users) or see "
            "docs/security.md",
        )
    holder.append(nc)
    nc.options["max_reconnect_attempts"] = -1  # nats-py reads this option at each reconnect
    return nc


def _auth_refusal(exc: Exception) -> str:
    """The server's words when it refused the credentials (``""``: another failure)."""
    text = str(exc)
    if "authorization" in text.lower() or "authentication" in text.lower():
        return text.strip().strip("'") or type(exc).__name__
    return ""


async def close_nats(nc: NATS, limit_s: float = 2.0) -> None:
    """Drain (deliver what is in flight), bounded and shielded from cancellation."""
    with anyio.move_on_after(limit_s, shield=True):
        if not nc.is_closed:
            try:
                await nc.drain()
            except Exception:  # already closing or the server is gone: close below
                log.debug("nats_drain_failed", exc_info=True)
    if not nc.is_closed:
        with anyio.move_on_after(limit_s, shield=True):
            await nc.close()


async def publish_or_log(
    nc: NATS, subject: str, data: bytes, *, reply: str = "", logger: Any = log
) -> bool:
    """Publish; on failure (disconnected, closing, over max_payload) log it and return False
    instead of raising: the bus failed, not the agent, and its other work goes on."""
    try:
        await nc.publish(subject, data, reply=reply)
    except Exception as exc:
        logger.warning("publish_failed", subject=subject, error=repr(exc))
        return False
    return True


async def flush_subscriptions(nc: NATS) -> None:
    """Return once the server has every subscription made so far on ``nc``.

    nats-py 2.16's ``flush`` can send its PING ahead of a SUB still waiting to be written, so
    one PONG does not prove the server has the SUB; the second PING follows it.
    """
    await nc.flush()
    await nc.flush()


@asynccontextmanager
async def nats_connection(
    url: str, *, name: str, auth: NatsAuth | None = None
) -> AsyncIterator[NATS]:
    nc = await connect_nats(url, name=name, auth=auth)
    try:
        yield nc
    finally:
        await close_nats(nc)
