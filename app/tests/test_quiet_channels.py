"""Storage grows with every distinct channel (issue 10, low): a channel quiet for
longer than the retention holds nothing, on Redis, PostgreSQL and memory.

Before, a channel published once kept its events for ever: Redis stream keys had
no TTL and PostgreSQL trimmed by age only the channel it published to, so job or
per-user channels filled Redis's maxmemory (then every publish got 503 under
noeviction) and the event table. Now the publish script gives the stream the
retention as its TTL, and PostgreSQL's periodic clean-up deletes what is older
than the retention in every channel. The memory broker kept every channel for
the process's life; it now drops quiet ones as it publishes and replays. Replay
stays exact: a client that missed an event of an expired channel gets a reset,
one whose id is within the retention does not.

``SSEHUB_ONE_SHOT_CHANNELS`` (default 2,000) and ``SSEHUB_ONE_SHOT_RETENTION``
(seconds, default 1) set how many one-shot channels the storage test publishes to
and their retention; it prints the figures. The README's: 100,000 and 150 s
(longer than the publishing takes, so that every channel is stored at once).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
import redis
from conftest import _config_factory
from ssekit_testing.fixtures import fresh_database
from ssekit_testing.servers import Postgres, Redis

from ssehub import conf
from ssehub.brokers import Broker, create
from ssehub.brokers.memory import MemoryBroker
from ssehub.hub import Hub

pytestmark = pytest.mark.asyncio

RETENTION = 1  # seconds: SSEHUB_RETENTION_SECONDS is whole seconds
ONE_SHOT_CHANNELS = int(os.environ.get("SSEHUB_ONE_SHOT_CHANNELS", "2000"))
ONE_SHOT_RETENTION = int(os.environ.get("SSEHUB_ONE_SHOT_RETENTION", str(RETENTION)))
PUBLISHERS = 64  # concurrent publishes, over 8 brokers


class Store:
    """What a store holds, read around the hub (the test server has no ACL)."""

    def __init__(self, kind: str, url: str, prefix: str) -> None:
        self.kind, self.url, self.prefix = kind, url, prefix
        self.memory: list[MemoryBroker] = []  # memory://: the brokers are the store

    def watch(self, *brokers: Broker) -> None:
        self.memory.extend(b for b in brokers if isinstance(b, MemoryBroker))

    def holds(self, channel: str) -> list[str]:
        """Everything stored for ``channel``: events, floors, idempotency keys."""
        if self.kind == "memory":
            return sorted([f"events {channel}" for b in self.memory if channel in b._streams]
                          + [f"floor {channel}" for b in self.memory if channel in b._floors]
                          + [f"key {k}" for b in self.memory for k in b._idempotency
                             if k.startswith(f"{channel}/")])
        if self.kind == "redis":
            with redis.Redis.from_url(self.url) as r:
                return sorted(k.decode() for pattern in (f"s:{channel}", f"idem:{channel}/*")
                              for k in r.keys(self.prefix + pattern))
        with psycopg.connect(self.url) as conn:
            rows = conn.execute(
                "SELECT 'event ' || id FROM ssehub_event WHERE channel = %(c)s "
                "UNION ALL SELECT 'floor ' || floor FROM ssehub_floor WHERE channel = %(c)s "
                "UNION ALL SELECT 'key ' || key FROM ssehub_idempotency "
                "WHERE key LIKE %(c)s || '/%%'", {"c": channel}).fetchall()
            return [r[0] for r in rows]

    def size(self) -> dict[str, int]:
        """The store's size, and what it holds of the one-shot channels ("jobs")."""
        if self.kind == "memory":
            return {"channels": sum(len(b._streams) for b in self.memory),
                    "jobs": sum(c.startswith("job.") for b in self.memory for c in b._streams)}
        if self.kind == "redis":
            with redis.Redis.from_url(self.url) as r:
                info: Any = r.info("memory")
                # Keys under this test's prefix: the session's Redis also holds other
                # tests' keys, which come and go meanwhile (dbsize grew by 8 once).
                return {"used_memory": int(info["used_memory"]),
                        "keys": len(r.keys(f"{self.prefix}*")),
                        "jobs": len(r.keys(f"{self.prefix}s:job.*"))}
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("VACUUM ssehub_event, ssehub_floor, ssehub_idempotency")
            row = conn.execute(
                "SELECT (SELECT count(*) FROM ssehub_event), "
                "(SELECT count(*) FROM ssehub_event WHERE channel LIKE 'job.%%'), "
                "pg_total_relation_size('ssehub_event') + pg_total_relation_size('ssehub_floor')"
                " + pg_total_relation_size('ssehub_idempotency')").fetchone()
            assert row is not None
            return {"rows": int(row[0]), "jobs": int(row[1]), "bytes": int(row[2])}


@pytest.fixture(params=["redis", "postgres", "memory"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Callable[..., Any], Store]]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "redis":
        server: Redis = request.getfixturevalue("redis_server")
        url = server.url
    else:
        pg: Postgres = request.getfixturevalue("pg_server")
        url = fresh_database(pg)
    make = _config_factory(url)
    prefix = make().redis_prefix  # the next config gets its own prefix: read it there

    def config(**overrides: str) -> conf.Config:
        return make(**{"SSEHUB_REDIS_PREFIX": prefix,
                       "SSEHUB_RETENTION_SECONDS": str(RETENTION), **overrides})

    yield config, Store(request.param, url, prefix)
    conf.reset()


async def test_a_channel_quiet_longer_than_the_retention_holds_nothing(store) -> None:  # type: ignore[no-untyped-def]
    config, stored = store
    hub = Hub(config(SSEHUB_RETENTION_EVENTS="2"))
    await hub.start()
    stored.watch(hub.broker)
    try:
        await hub.broker.publish("once", "x", idempotency_key="job-1")
        for i in range(3):  # trimmed by count: a floor, a max-deleted-entry-id
            await hub.broker.publish("trimmed", str(i))
        assert stored.holds("once") and stored.holds("trimmed")
        await asyncio.sleep(RETENTION + 0.3)
        await hub.broker.publish("other", "y")  # PostgreSQL cleans up as it publishes
        assert stored.holds("once") == [] and stored.holds("trimmed") == []
        assert stored.holds("other")
    finally:
        await hub.close()


async def test_a_client_behind_an_expired_channel_gets_a_reset(store) -> None:  # type: ignore[no-untyped-def]
    config, stored = store
    hub = Hub(config())
    await hub.start()
    stored.watch(hub.broker)
    try:
        seen = await hub.broker.publish("gone", "seen")
        await hub.broker.publish("gone", "missed")
        await asyncio.sleep(RETENTION + 0.3)
        recent = await hub.broker.publish("other", "y")
        assert stored.holds("gone") == []
        assert (await hub.replay(["gone"], seen)).reset  # not a silent skip
        assert (await hub.replay(["gone"], 0)).reset
        # An id within the retention missed nothing there, nor where nothing was.
        for channels in (["gone"], ["never"], ["gone", "never", "other"]):
            replay = await hub.replay(channels, recent)
            assert not replay.reset and replay.events == [], channels
        # The channel again: what the expired one held is still missed, the new is not.
        again = await hub.broker.publish("gone", "again")
        assert (await hub.replay(["gone"], seen)).reset
        replay = await hub.replay(["gone"], recent)
        assert not replay.reset and [e.id for e in replay.events] == [again]
    finally:
        await hub.close()


async def _publish_one_shot(brokers: list[Broker], count: int) -> None:
    async def publisher(start: int) -> None:
        broker = brokers[start % len(brokers)]
        for n in range(start, count, PUBLISHERS):
            await broker.publish(f"job.{n}", "done")

    await asyncio.gather(*(publisher(i) for i in range(PUBLISHERS)))


async def test_storage_after_one_shot_channels_goes_back_to_nothing(store) -> None:  # type: ignore[no-untyped-def]
    config, stored = store
    # Publishers as backends use them: ssehub.publish's brokers, not a hub's listener.
    retention = {"SSEHUB_RETENTION_SECONDS": str(ONE_SHOT_RETENTION)}
    # memory:// is one process's store: one broker.
    brokers = [create(config(**retention)) for _ in range(1 if stored.kind == "memory" else 8)]
    stored.watch(*brokers)
    try:
        await brokers[0].publish("tick", "t")  # the tables, on PostgreSQL
        before = stored.size()
        started = time.monotonic()
        await _publish_one_shot(brokers, ONE_SHOT_CHANNELS)
        took = time.monotonic() - started
        full = stored.size()
        ended = time.monotonic()
        await asyncio.sleep(ONE_SHOT_RETENTION + 0.3)
        deadline = time.monotonic() + 60  # Redis expires keys in the background
        after = stored.size()
        while time.monotonic() < deadline and after["jobs"]:
            await brokers[0].publish("tick", "t")  # PostgreSQL's clean-up: a batch a run
            await asyncio.sleep(0.2)
            after = stored.size()
        waited = time.monotonic() - ended
        print(f"\n{stored.kind}: {ONE_SHOT_CHANNELS} one-shot channels in {took:.1f} s; "
              f"before {before}, right after {full}, {waited:.1f} s later {after}")
        assert after["jobs"] == 0
        if stored.kind == "redis":  # Redis's clock and tick, "tick"'s stream may stay
            assert after["keys"] <= before["keys"] + 3
            assert after["used_memory"] - before["used_memory"] < 1_000_000
    finally:
        for broker in brokers:
            await broker.close()


async def test_a_failed_clean_up_does_not_fail_the_publish_it_follows(  # type: ignore[no-untyped-def]
        pg_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event is stored and announced before the clean-up runs: a 503 then would
    make its publisher send it again (a duplicate without an Idempotency-Key)."""
    from ssehub.brokers import postgres

    monkeypatch.setattr(postgres, "EXPIRE", "SELECT * FROM no_such_table")
    broker = create(pg_config())
    try:
        first = await broker.publish("jobs", "stored")  # the first publish cleans up
        assert (await broker.replay(["jobs"], 0)).events[0].id == first
    finally:
        await broker.close()
