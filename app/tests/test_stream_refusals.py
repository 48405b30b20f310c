"""``GET /events/`` answers 503 with Retry-After while the worker drains or the
broker cannot confirm interest, and a Last-Event-ID older than retention gets
``event: reset`` on the stream itself (the ASGI app called directly)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import _config_factory
from ssekit_testing.servers import free_port

from ssehub import conf
from ssehub import hub as hub_module
from ssehub.hub import ensure_hub, shutdown_hub
from ssehub.stream import stream_app

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def fresh() -> AsyncIterator[None]:
    yield
    await shutdown_hub()
    conf.reset()


def scope(query: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/events/", "query_string": query.encode(),
            "headers": headers or [], "http_version": "1.1"}


async def call(query: str, headers: list[tuple[bytes, bytes]] | None = None,
               until: bytes | None = None, timeout: float = 10) -> tuple[dict, bytes]:
    sent: list[dict[str, Any]] = []
    seen = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if until is None or until in b"".join(m.get("body", b"") for m in sent):
            seen.set()

    async def receive() -> dict[str, Any]:
        await seen.wait()
        return {"type": "http.disconnect"}

    await asyncio.wait_for(stream_app(scope(query, headers), receive, send), timeout)
    return sent[0], b"".join(m.get("body", b"") for m in sent[1:])


async def test_503_with_retry_after_while_draining(fresh) -> None:  # type: ignore[no-untyped-def]
    _config_factory("memory://")(SSEHUB_PUBLIC_CHANNELS="*")
    (await ensure_hub()).drain()
    start, body = await call("channel=d")
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert "draining" in json.loads(body)["error"]


async def test_503_with_retry_after_when_the_broker_cannot_listen(fresh, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(hub_module, "LISTEN_TIMEOUT", 0.5)
    _config_factory(f"redis://127.0.0.1:{free_port()}/0")(SSEHUB_PUBLIC_CHANNELS="*")
    start, body = await call("channel=d")
    assert start["status"] == 503 and (b"retry-after", b"2") in start["headers"]
    assert "broker unavailable" in json.loads(body)["error"]


async def test_an_id_older_than_retention_gets_a_reset_on_the_stream(fresh) -> None:  # type: ignore[no-untyped-def]
    _config_factory("memory://")(SSEHUB_PUBLIC_CHANNELS="*", SSEHUB_RETENTION_EVENTS="2")
    hub = await ensure_hub()
    ids = [await hub.broker.publish("r", f"n{i}") for i in range(5)]
    start, body = await call("channel=r", [(b"last-event-id", str(ids[0]).encode())],
                             until=b"event: reset")
    assert start["status"] == 200
    (reset,) = [frame for frame in body.split(b"\n\n") if b"event: reset" in frame]
    fields = dict(line.split(b": ", 1) for line in reset.splitlines())
    assert json.loads(fields[b"data"])["reason"] and fields[b"id"] == str(ids[-1]).encode()
