"""``ssehub.publish`` and ``ssehub.apublish`` outside the hub (scripts, Celery, WSGI).

Regression: the sync ``publish`` went through ``async_to_sync``, which makes a
new event loop per call outside an async context, so every call created a
broker client and a connection and never closed them.
"""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
from ssekit_testing.servers import Redis

import ssehub
from ssehub.hub import Hub


def connected_clients(redis: Redis) -> int:
    info = redis.cli("INFO", "clients")
    return int(next(line for line in info.splitlines()
                    if line.startswith("connected_clients:")).split(":")[1])


def test_sync_publish_outside_the_hub_keeps_one_connection(redis_config, redis_server) -> None:  # type: ignore[no-untyped-def]
    config = redis_config()
    ids = [ssehub.publish("api.sync", f"n{i}") for i in range(3)]
    baseline = connected_clients(redis_server)
    ids += [ssehub.publish("api.sync", {"n": i}, event="tick") for i in range(20)]
    # From other threads too (a WSGI server's): the same background client.
    threads = [threading.Thread(target=ssehub.publish, args=("api.sync", "t")) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    gc.collect()
    assert connected_clients(redis_server) == baseline
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    replay = asyncio.run(_replay(config, "api.sync"))
    assert [e.data for e in replay][-1] == "t" and len(replay) == len(ids) + 4
    assert replay[3].event == "tick" and replay[3].data == '{"n":0}'


async def _replay(config, channel: str) -> list:  # type: ignore[no-untyped-def]
    hub = Hub(config)
    try:
        return (await hub.broker.replay([channel], 0)).events
    finally:
        await hub.broker.close()


def test_sync_publish_rejects_bad_input_with_a_reason(redis_config) -> None:  # type: ignore[no-untyped-def]
    redis_config()
    with pytest.raises(ssehub.PublishError, match="CR or LF"):
        ssehub.publish("api.sync", "x", event="two\nlines")


@pytest.mark.asyncio
async def test_sync_publish_in_async_code_says_to_await_apublish(redis_config) -> None:  # type: ignore[no-untyped-def]
    redis_config()
    with pytest.raises(RuntimeError, match="apublish"):
        ssehub.publish("api.sync", "x")
    assert await ssehub.apublish("api.async", "y") > 0
