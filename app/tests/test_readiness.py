"""``/readyz`` answers 503 with the reason while the hub drains or its database is
down (the proxy's health checks and the deploy's wait read it); ``/healthz``
stays 200 (the process is up)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def client(django_db):  # type: ignore[no-untyped-def]
    from django.test import AsyncClient, override_settings

    from ssehub import conf
    from ssehub.hub import shutdown_hub

    conf.reset()
    with override_settings(ALLOWED_HOSTS=["testserver"]):  # Django's test client's host
        yield AsyncClient()
    await shutdown_hub()
    conf.reset()


async def test_ready_then_503_while_draining(client) -> None:  # type: ignore[no-untyped-def]
    from ssehub.hub import ensure_hub

    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    (await ensure_hub()).drain()
    draining = await client.get("/readyz")
    assert draining.status_code == 503 and "draining" in draining.json()["error"]
    assert draining["Retry-After"] == "1"
    assert (await client.get("/healthz")).status_code == 200


async def test_503_names_the_database_when_it_is_unreachable(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from asgiref.sync import sync_to_async
    from django.db import connections

    # The view checks the database in Django's sync thread: point that thread's
    # connection at a path SQLite cannot open, then back.
    def point_at(name: str | None) -> str:
        connection = connections["default"]
        connection.close()
        previous = str(connection.settings_dict["NAME"])
        connection.settings_dict["NAME"] = name or previous
        return previous

    good = await sync_to_async(point_at)(str(tmp_path / "missing" / "db.sqlite3"))
    try:
        down = await client.get("/readyz")
        assert down.status_code == 503 and "database" in down.json()["error"], down.content
    finally:
        await sync_to_async(point_at)(good)
    assert (await client.get("/readyz")).status_code == 200


async def test_503_while_the_broker_listener_has_no_connection(client, pg_config) -> None:  # type: ignore[no-untyped-def]
    """Publishes still store, but nothing is delivered live: not ready. (A wrong
    SSEHUB_PG_LISTEN_URL used to leave /readyz at 200 while every stream got 503.)"""
    from ssekit_testing.servers import free_port

    pg_config(SSEHUB_PG_LISTEN_URL=f"postgres://127.0.0.1:{free_port()}/nowhere")
    for _ in range(3):  # the listener keeps retrying; readiness stays red meanwhile
        down = await client.get("/readyz")
        assert down.status_code == 503, down.content
        assert "listener not connected" in down.json()["error"]


async def test_ready_once_the_listener_is_connected(client, pg_config) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import time

    pg_config()
    deadline = time.monotonic() + 10
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        await asyncio.sleep(0.1)
