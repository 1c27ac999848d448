"""Shared fixtures: a real nats-server per test module, anyio on asyncio."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from moe2.runtime.auth import AuthDir
from moe2.runtime.server import NatsServer

if TYPE_CHECKING:
    from moe2.agents.expert.backends.transformers_backend import TransformersBackend


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# The tests' nats-server has the shipped per-role users (runtime/auth.py, docs/security.md) and
# one more: TEST_SUPERUSER, allowed every subject, whose name and password ``nats_server.url`` and
# ``nats_url`` carry, so that a test playing several roles on one connection (a client, a fusion
# agent and scripted experts) works as before. tests/test_security.py connects with the roles'
# own credentials to ``nats_server.plain_url``.
TEST_SUPERUSER = "moe2-test"
TEST_EXPERTS = ("a", "b", "c")  # experts with credentials from the start


@pytest.fixture(scope="module")
def nats_auth(tmp_path_factory: pytest.TempPathFactory) -> AuthDir:
    auth = AuthDir(tmp_path_factory.mktemp("nats") / "auth")
    auth.init(TEST_EXPERTS)
    return auth


@pytest.fixture(scope="module")
def nats_server(nats_auth: AuthDir) -> Iterator[NatsServer]:
    with NatsServer(
        max_payload=256 * 1024,
        auth=nats_auth,
        superusers={TEST_SUPERUSER: secrets.token_urlsafe(16)},
        url_user=TEST_SUPERUSER,
    ) as server:
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
