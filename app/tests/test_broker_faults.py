"""G2/G3: the broker restarts or drops the listener mid-publish; nothing is lost.

Pub/sub and NOTIFY are at-most-once. The hub stores events first and its
listener fills the gap from storage after reconnecting, so a subscriber sees
every published id exactly once, in order. Publishers retry with an
Idempotency-Key, as the README tells users to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import _config_factory
from ssekit_testing.servers import Postgres, Redis, running

from ssehub import conf
from ssehub.brokers import BrokerUnavailable
from ssehub.hub import Hub

pytestmark = pytest.mark.asyncio

EVENTS = 60


async def publish_with_retries(hub: Hub, published: list[int]) -> None:
    for i in range(EVENTS):
        deadline = time.monotonic() + 20
        while True:
            try:
                published.append(await hub.broker.publish("g2", f"e{i}", idempotency_key=f"k{i}"))
                break
            except BrokerUnavailable:
                assert time.monotonic() < deadline, "broker did not come back"
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.02)


async def collect(hub: Hub, count: int, timeout: float = 30) -> list[int]:
    subscriber = await hub.subscribe(["g2"])
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            async with asyncio.timeout(0.5):
                await subscriber.wait()
        except TimeoutError:
            continue
        batch, subscriber.buf = subscriber.buf, []
        for item in batch:
            for event in getattr(item, "events", [item]):
                if getattr(event, "channel", None) == "g2":
                    got.append(event.id)
    return got


async def run_with_fault(hub: Hub, fault) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    published: list[int] = []
    receiver = asyncio.create_task(collect(hub, EVENTS))
    await asyncio.sleep(0.3)
    publisher = asyncio.create_task(publish_with_retries(hub, published))
    await asyncio.sleep(0.4)
    await asyncio.to_thread(fault)
    await publisher
    return published, await receiver


@contextlib.asynccontextmanager
async def hub_on(url: str) -> AsyncIterator[Hub]:
    hub = Hub(_config_factory(url)())
    await hub.start()
    try:
        yield hub
    finally:
        await hub.close()
        conf.reset()


async def test_g2_redis_restart_mid_publish_loses_nothing(tmp_path: Path) -> None:
    def restart() -> None:
        redis.stop()
        time.sleep(0.5)
        redis.start()

    with running(Redis(tmp_path)) as redis:
        async with hub_on(redis.url) as hub:
            published, received = await run_with_fault(hub, restart)
    assert len(published) == EVENTS and len(set(published)) == EVENTS
    assert received == published


async def test_g3_redis_kills_the_listener_connection(tmp_path: Path) -> None:
    with running(Redis(tmp_path)) as redis:
        async with hub_on(redis.url) as hub:
            published, received = await run_with_fault(
                hub, lambda: redis.cli("CLIENT", "KILL", "TYPE", "pubsub"))
    assert received == published


async def test_g2_h6_postgres_restart_mid_publish_loses_nothing(tmp_path: Path) -> None:
    def restart() -> None:
        pg.stop(keep=True)
        time.sleep(0.5)
        pg.start()

    pg = Postgres(tmp_path)
    pg.init()
    with running(pg):
        async with hub_on(pg.url) as hub:
            published, received = await run_with_fault(hub, restart)
    assert len(published) == EVENTS and len(set(published)) == EVENTS
    assert received == published
