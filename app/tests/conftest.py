"""The app's fixtures: in-process hubs over each broker, Django on SQLite, and
helpers that read what a subscriber gets. The real servers' fixtures (Redis,
PostgreSQL, the served ``stack``, Caddy, ``proxy``, ``client``) come from the
harness, ssekit_testing.fixtures (loaded by ``-p`` in app/pyproject.toml)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import pytest
from ssekit_testing.fixtures import base_env, fresh_database
from ssekit_testing.servers import Postgres, Redis

if TYPE_CHECKING:
    from ssehub.subscriber import Subscriber

_counter = itertools.count()  # Redis key prefixes of the in-process hubs


@pytest.fixture(params=["memory", "redis", "postgres"])
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "redis":
        server: Redis = request.getfixturevalue("redis_server")
        return server.url
    pg: Postgres = request.getfixturevalue("pg_server")
    return fresh_database(pg)


def _config_factory(broker_url: str):  # type: ignore[no-untyped-def]
    from ssehub import conf

    def make(**overrides: str) -> conf.Config:
        env = base_env(SSEHUB_BROKER_URL=broker_url,
                       **{"SSEHUB_REDIS_PREFIX": f"t{next(_counter)}:", **overrides})
        config = conf.load(env)
        conf._current = config
        return config

    return make


@pytest.fixture
def make_config(broker_url: str):  # type: ignore[no-untyped-def]
    from ssehub import conf

    yield _config_factory(broker_url)
    conf.reset()


@pytest.fixture
def redis_config(redis_server: Redis):  # type: ignore[no-untyped-def]
    from ssehub import conf

    yield _config_factory(redis_server.url)
    conf.reset()


@pytest.fixture
def pg_config(pg_server: Postgres):  # type: ignore[no-untyped-def]
    from ssehub import conf

    yield _config_factory(fresh_database(pg_server))
    conf.reset()


@pytest.fixture
async def hub(make_config) -> AsyncIterator:  # type: ignore[no-untyped-def]
    from ssehub.hub import Hub

    instance = Hub(make_config(SSEHUB_RETENTION_EVENTS="5", SSEHUB_HEARTBEAT="0.2"))
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture(scope="session")
def django_db(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """In-process Django on a throwaway SQLite database."""
    import django
    from django.conf import settings
    from django.core.management import call_command

    django.setup()
    settings.DATABASES["default"]["NAME"] = str(tmp_path_factory.mktemp("db") / "t.sqlite3")
    call_command("migrate", verbosity=0)
    return settings


async def received(subscriber: Subscriber, done: Callable[[list], bool],
                   timeout: float = 5.0) -> list:
    """What the stream gets (a Batch, a burst of one channel, as its events; frames
    such as heartbeats and resets as they are) until ``done(got)`` holds."""
    got: list = []
    deadline = time.monotonic() + timeout
    while not done(got):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the stream got only {got}")
        try:
            async with asyncio.timeout(remaining):
                await subscriber.wait()
        except TimeoutError:
            continue
        batch, subscriber.buf = subscriber.buf, []
        for item in batch:
            got.extend(getattr(item, "events", [item]))
    return got


def _events(got: list) -> list:
    return [e for e in got if getattr(e, "channel", None) is not None]


async def take(subscriber: Subscriber, count: int, timeout: float = 5.0) -> list:
    """Wait for ``count`` events with ids (heartbeats are skipped)."""
    return _events(await received(subscriber, lambda got: len(_events(got)) >= count, timeout))
