"""Shared fixtures: a real nats-server per test module, anyio on asyncio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moe2.runtime.server import NatsServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer(max_payload=256 * 1024) as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url
