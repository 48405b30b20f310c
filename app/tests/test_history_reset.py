"""A store that loses its history is never silent (issue 13, part 2).

Regression: after Redis lost its data (a restart that replayed nothing, a
FLUSHALL, a restore), the next publish got id 1; every listener had seen
higher ids, took the new events for duplicates and dropped them. Streams stayed
open on heartbeats while /readyz said 200, and a client reconnecting with an id
of the lost history was not told either. Now ids carry their history (a new
one starts at the clock in microseconds), and the listener checks epoch and
sequence when it connects and every HISTORY_CHECK_SECONDS: each stream gets
``event: reset``, delivery goes on with the new ids, and a metric and a log
line count it. The Redis cases run on the role's rendered Redis configuration;
the PostgreSQL broker keeps the same identity in ssehub_history, and the memory
broker's ids start at its process's start.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from conftest import _config_factory, received
from ssekit_testing.fixtures import fresh_database
from ssekit_testing.servers import DeployedRedis, Postgres, stop

from ssehub import conf, metrics
from ssehub.brokers import listener
from ssehub.conf import postgres_conninfo
from ssehub.hub import Hub
from ssehub.subscriber import Subscriber

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def deployed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> AsyncIterator[tuple[DeployedRedis, Hub]]:
    monkeypatch.setattr(listener, "HISTORY_CHECK_SECONDS", 0.5)
    redis = DeployedRedis(tmp_path)
    redis.start()
    hub = Hub(_config_factory(redis.url)(SSEHUB_REDIS_PREFIX="ssehub:"))
    await hub.start()
    try:
        yield redis, hub
    finally:
        await hub.close()
        conf.reset()
        redis.stop()


async def frames(subscriber: Subscriber, until: Any,
                 timeout: float = 10.0) -> list[tuple[str, str]]:
    """(event name, data) of the events and resets the stream gets, until ``until(got)``."""
    def named(items: list[Any]) -> list[tuple[str, str]]:
        got = []
        for item in items:
            if getattr(item, "channel", None) is not None:
                got.append((item.event or "message", item.data))
            elif b"event: reset" in getattr(item, "frame", b""):
                got.append(("reset", item.frame.decode().split("data: ", 1)[1].strip()))
        return got

    return named(await received(subscriber, lambda items: until(named(items)), timeout))


def counter(metric: Any) -> float:
    return float(metric._value.get())


def has(name: str, data: str | None = None) -> Any:
    return lambda got: any(n == name and (data is None or d == data) for n, d in got)


async def test_first_id_of_a_new_store_is_the_clock_in_microseconds(deployed) -> None:  # type: ignore[no-untyped-def]
    _, hub = deployed  # the hub started the store's history when it connected
    first = await hub.broker.publish("ids", "one")
    assert abs(first - time.time() * 1_000_000) < 30 * 1_000_000
    assert first < 2**53  # a JavaScript number holds it exactly
    assert await hub.broker.publish("ids", "two") == first + 1


async def test_flushall_resets_open_streams_and_delivery_goes_on(deployed, caplog) -> None:  # type: ignore[no-untyped-def]
    redis, hub = deployed
    subscriber = await hub.subscribe(["flush"])
    old = [await hub.broker.publish("flush", f"old{i}") for i in range(3)]
    await frames(subscriber, has("message", "old2"))
    resets = counter(metrics.HISTORY_RESETS)
    redis.cli("FLUSHALL")
    new = await hub.broker.publish("flush", "new0")
    got = await frames(subscriber, lambda g: has("reset")(g) and has("message", "new0")(g))
    assert ("message", "new0") in got, "the first event of the new history was dropped"
    assert json.loads(dict(got)["reset"])["reason"] == "history lost"
    assert new > max(old)
    assert counter(metrics.HISTORY_RESETS) == resets + 1
    assert "stored history lost" in caplog.text
    # A client that comes back with an id of the lost history is told, too.
    replay = await hub.replay(["flush"], old[1])
    assert replay.reset and replay.reason == "history lost"
    # ... and one that resumes from the reset's id gets the new history, exactly.
    assert [e.data for e in (await hub.replay(["flush"], new - 1)).events] == ["new0"]


async def test_redis_restart_that_lost_its_data_resets_and_delivers_what_came_after(
        deployed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The issue's silent dark: the store came back empty and ids started again."""
    redis, hub = deployed
    subscriber = await hub.subscribe(["wiped"])
    old = [await hub.broker.publish("wiped", f"old{i}") for i in range(5)]
    await frames(subscriber, has("message", "old4"))
    assert redis.process is not None
    stop(redis.process)
    shutil.rmtree(tmp_path / "appendonlydir")
    (tmp_path / "dump.rdb").unlink(missing_ok=True)
    redis.start()
    # published before the listener is back: the gap fill must deliver it
    published = []
    deadline = time.monotonic() + 10
    while not published:
        try:
            published.append(await hub.broker.publish("wiped", "after"))
        except Exception:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    got = await frames(subscriber, lambda g: has("reset")(g) and has("message", "after")(g))
    assert got.index(next(x for x in got if x[0] == "reset")) < got.index(("message", "after"))
    assert published[0] > max(old)
    assert (await hub.replay(["wiped"], old[-1])).reset


async def test_sequence_that_went_back_starts_a_new_history(deployed) -> None:  # type: ignore[no-untyped-def]
    """A replica that lagged, a truncated AOF: same epoch, lower sequence."""
    redis, hub = deployed
    subscriber = await hub.subscribe(["lag"])
    ids = [await hub.broker.publish("lag", f"e{i}") for i in range(5)]
    await frames(subscriber, has("message", "e4"))
    redis.cli("SET", "ssehub:seq", str(ids[1]))  # the last three are "lost"
    await frames(subscriber, has("reset"))
    after = await hub.broker.publish("lag", "after")
    assert after > max(ids), "an id was issued twice"
    await frames(subscriber, has("message", "after"))
    assert (await hub.replay(["lag"], ids[2])).reset


async def test_a_store_from_before_epochs_keeps_its_ids(deployed) -> None:  # type: ignore[no-untyped-def]
    redis, hub = deployed
    redis.cli("SET", "ssehub:seq", "3900")  # written by an earlier release
    subscriber = await hub.subscribe(["legacy"])
    first = await hub.broker.publish("legacy", "upgraded")
    assert first == 3901
    assert redis.cli("GET", "ssehub:epoch") == "0"
    await asyncio.sleep(1.2)  # two history checks
    assert await frames(subscriber, has("message", "upgraded")) == [("message", "upgraded")]
    assert not (await hub.replay(["legacy"], 3900)).reset


# The PostgreSQL broker: the same identity, in ssehub_history beside the sequence.

@pytest_asyncio.fixture
async def pg(pg_server: Postgres, monkeypatch: pytest.MonkeyPatch
             ) -> AsyncIterator[tuple[str, Hub]]:
    monkeypatch.setattr(listener, "HISTORY_CHECK_SECONDS", 0.5)
    url = fresh_database(pg_server)
    hub = Hub(_config_factory(url)())
    await hub.start()
    try:
        yield postgres_conninfo(url), hub
    finally:
        await hub.close()
        conf.reset()


def sql(conninfo: str, *statements: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


async def publish_when_back(hub: Hub, channel: str, data: str) -> int:
    deadline = time.monotonic() + 10
    while True:
        try:
            return await hub.broker.publish(channel, data)
        except Exception:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_postgres_first_id_of_a_new_store_is_the_clock_in_microseconds(pg) -> None:  # type: ignore[no-untyped-def]
    _, hub = pg
    first = await hub.broker.publish("ids", "one")
    assert abs(first - time.time() * 1_000_000) < 30 * 1_000_000
    assert await hub.broker.publish("ids", "two") == first + 1


async def test_postgres_tables_dropped_reset_open_streams_and_delivery_goes_on(
        pg, caplog) -> None:  # type: ignore[no-untyped-def]
    """An operator's DROP, a restore into a new database: the hub makes the tables
    again, with a new history, and tells every stream."""
    conninfo, hub = pg
    subscriber = await hub.subscribe(["drop"])
    old = [await hub.broker.publish("drop", f"old{i}") for i in range(3)]
    await frames(subscriber, has("message", "old2"))
    resets = counter(metrics.HISTORY_RESETS)
    sql(conninfo, "DROP TABLE ssehub_event, ssehub_floor, ssehub_idempotency, ssehub_history")
    new = await publish_when_back(hub, "drop", "new0")
    got = await frames(subscriber, lambda g: has("reset")(g) and has("message", "new0")(g))
    assert json.loads(dict(got)["reset"])["reason"] == "history lost"
    assert new > max(old)
    assert counter(metrics.HISTORY_RESETS) == resets + 1
    assert "stored history lost" in caplog.text
    replay = await hub.replay(["drop"], old[1])
    assert replay.reset and replay.reason == "history lost"
    assert [e.data for e in (await hub.replay(["drop"], new - 1)).events] == ["new0"]


async def test_postgres_restored_dump_whose_sequence_went_back_starts_a_new_history(
        pg) -> None:  # type: ignore[no-untyped-def]
    """A backup from before the last events, a replica that lagged: same epoch,
    a lower sequence. Before, the next ids were issued twice and dropped as seen."""
    conninfo, hub = pg
    subscriber = await hub.subscribe(["lag"])
    ids = [await hub.broker.publish("lag", f"e{i}") for i in range(5)]
    await frames(subscriber, has("message", "e4"))
    sql(conninfo, f"DELETE FROM ssehub_event WHERE id > {ids[1]}",
        f"SELECT setval('ssehub_event_id_seq', {ids[1]})")
    await frames(subscriber, has("reset"))
    after = await hub.broker.publish("lag", "after")
    assert after > max(ids), "an id was issued twice"
    await frames(subscriber, has("message", "after"))
    assert (await hub.replay(["lag"], ids[2])).reset


async def test_postgres_store_from_before_epochs_keeps_its_ids(
        pg_server: Postgres) -> None:
    url = fresh_database(pg_server)
    sql(postgres_conninfo(url),  # what an earlier release made, with one event
        "CREATE TABLE ssehub_event (id bigserial PRIMARY KEY, channel text NOT NULL, "
        "event text, data text NOT NULL, published_at double precision NOT NULL)",
        "INSERT INTO ssehub_event VALUES (3900, 'legacy', NULL, 'old', 0)",
        "SELECT setval('ssehub_event_id_seq', 3900)")
    hub = Hub(_config_factory(url)())
    await hub.start()
    try:
        subscriber = await hub.subscribe(["legacy"])
        assert await hub.broker.publish("legacy", "upgraded") == 3901
        await asyncio.sleep(1.2)
        assert await frames(subscriber, has("message", "upgraded")) == [("message", "upgraded")]
        assert not (await hub.replay(["legacy"], 3900)).reset
    finally:
        await hub.close()
        conf.reset()


async def test_memory_broker_restart_resets_a_client_of_the_old_process() -> None:
    first = Hub(_config_factory("memory://")())
    await first.start()
    old = await first.broker.publish("m", "before")
    await first.close()
    second = Hub(_config_factory("memory://")())
    await second.start()
    try:
        replay = await second.replay(["m"], old)
        assert replay.reset and replay.reason == "history lost"
        assert not (await second.replay(["m"], 0)).reset
    finally:
        await second.close()
        conf.reset()
