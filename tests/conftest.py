"""Shared fixtures: a real nats-server per test module, anyio on asyncio."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from moe2.runtime.server import NatsServer

if TYPE_CHECKING:
    from moe2.agents.expert.backends.transformers_backend import TransformersBackend


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


@pytest.fixture(scope="session")
def smollm2() -> Iterator[TransformersBackend]:
    """The real SmolLM2-135M-Instruct, loaded once for the whole run (through the cache)."""
    from moe2.agents.expert.backends import load_backend
    from moe2.agents.expert.backends.transformers_backend import TransformersBackend
    from moe2.agents.expert.models import resolve_model

    loaded = load_backend("transformers", resolve_model())
    assert isinstance(loaded, TransformersBackend)
    yield loaded
