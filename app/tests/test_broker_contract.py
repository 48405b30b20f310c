"""The broker contract, run against memory://, real Redis and real PostgreSQL.

Rows: I1 (exact replay, reset), H1/H2 (payload size, quotes and newlines),
G4 (one connection per process), F3 (interest released), seed compatibility.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import psycopg
import pytest
import redis
from conftest import _config_factory, take

from ssehub.hub import UNLISTEN_DELAY, Hub

pytestmark = pytest.mark.asyncio


async def test_publish_returns_increasing_ids_and_delivers_live(hub: Hub) -> None:
    subscriber = await hub.subscribe(["news"])
    ids = [await hub.broker.publish("news", f"n{i}") for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    events = await take(subscriber, 3)
    assert [e.id for e in events] == ids
    assert [e.data for e in events] == ["n0", "n1", "n2"]
    assert events[0].frame == f"id: {ids[0]}\ndata: n0\n\n".encode()


async def test_replay_is_exact_and_ordered_across_channels(hub: Hub) -> None:
    first = await hub.broker.publish("a", "1")
    await hub.broker.publish("b", "2")
    await hub.broker.publish("c", "skip")
    await hub.broker.publish("a", "3", event="update")
    replay = await hub.broker.replay(["a", "b"], first)
    assert not replay.reset
    assert [(e.channel, e.data, e.event) for e in replay.events] == [
        ("b", "2", None), ("a", "3", "update")]
    everything = await hub.broker.replay(["a", "b"], 0)
    assert [e.data for e in everything.events] == ["1", "2", "3"]


async def test_replay_pages_across_channels_hold_every_event_once_in_order(
        make_config) -> None:  # type: ignore[no-untyped-def]
    """Pages of at most ``limit`` events, read on from each page's last id, give the
    whole replay: channels of uneven traffic, a page boundary inside a burst."""
    hub = Hub(make_config(SSEHUB_RETENTION_EVENTS="100"))
    await hub.start()
    try:
        pattern = "aaabaaaacbbaaaaaaaaaabcaaaaaaaaaaab"  # 35 events, "a" mostly
        ids = [await hub.broker.publish(c, f"{c}{i}") for i, c in enumerate(pattern)]
        await hub.broker.publish("other", "not replayed")
        whole = await hub.broker.replay(["a", "b", "c"], 0)
        assert [e.id for e in whole.events] == ids and not whole.more
        for limit in (1, 2, 3, 4, 7, 34, 35):
            got, after, pages = [], 0, 0
            while True:
                page = await hub.broker.replay(["c", "b", "a"], after, limit)
                assert not page.reset and len(page.events) <= limit, (limit, len(page.events))
                got += page.events
                pages += 1
                if page.events:
                    after = page.events[-1].id or after
                if not page.more:
                    break
                assert pages < 100
            assert [e.id for e in got] == ids, limit
            assert [e.data for e in got] == [f"{c}{i}" for i, c in enumerate(pattern)]
        assert not (await hub.broker.replay(["a"], ids[-1], 5)).events
    finally:
        await hub.close()


async def test_i1_reset_when_id_older_than_retention(hub: Hub) -> None:
    ids = [await hub.broker.publish("r", str(i)) for i in range(8)]  # retention is 5
    kept = await hub.broker.replay(["r"], ids[2])
    assert not kept.reset and [e.data for e in kept.events] == ["3", "4", "5", "6", "7"]
    assert (await hub.broker.replay(["r"], ids[1])).reset


async def test_i1_reset_when_missed_events_are_older_than_retention_seconds(make_config) -> None:  # type: ignore[no-untyped-def]
    """Age retention holds on a channel that got no publish since (brokers trim
    by age on publish): the expired events are not replayed; the client resyncs."""
    hub = Hub(make_config(SSEHUB_RETENTION_SECONDS="1"))
    await hub.start()
    try:
        old = [await hub.broker.publish("aged", str(i)) for i in range(2)]
        assert [e.id for e in (await hub.replay(["aged"], 0)).events] == old
        await asyncio.sleep(1.2)
        expired = await hub.replay(["aged"], 0)
        assert expired.reset and expired.head == old[-1]
        fresh = await hub.broker.publish("aged", "new")
        assert [e.id for e in (await hub.replay(["aged"], old[-1])).events] == [fresh]
    finally:
        await hub.close()


async def test_i1_memory_broker_restart_resets_ids_from_before_it() -> None:
    """An id from before a memory-broker restart (``ssehub serve`` restarted) is
    one this hub never issued: a reset, never a replay of other events under it."""
    from ssehub import conf

    make = _config_factory("memory://")
    before = Hub(make())
    await before.start()
    old = [await before.broker.publish("m", f"before {i}") for i in range(3)]
    await before.close()
    after = Hub(make())
    await after.start()
    try:
        new = [await after.broker.publish("m", f"after {i}") for i in range(5)]
        assert min(new) > max(old)
        for stale in old:
            replay = await after.replay(["m"], stale)
            assert replay.reset and replay.head == new[-1], stale
        assert not (await after.replay(["m"], 0)).reset  # "everything" still works
    finally:
        await after.close()
        conf.reset()


async def test_i1_reset_for_an_id_never_issued(hub: Hub) -> None:
    last = await hub.broker.publish("r", "x")
    replay = await hub.broker.replay(["r"], last + 1000)
    assert replay.reset and replay.head == last


async def test_idempotency_key_stores_once(hub: Hub) -> None:
    first = await hub.broker.publish("i", "pay", idempotency_key="order-7")
    again = await hub.broker.publish("i", "pay", idempotency_key="order-7")
    other = await hub.broker.publish("i", "pay", idempotency_key="order-8")
    assert first == again != other
    assert [e.id for e in (await hub.broker.replay(["i"], 0)).events] == [first, other]
    # the repeat says so (ssehub_events_published_total counts only stored events)
    assert [getattr(i, "repeat", False) for i in (first, again, other)] == [False, True, False]


async def test_idempotency_key_of_another_channel_does_not_swallow_the_event(hub: Hub) -> None:
    """Keys were global: tenant B's publish with tenant A's key got A's id back and
    B's event was never stored. A key is scoped by its channel."""
    mine = await hub.broker.publish("tenantA.orders", "a", idempotency_key="order-42")
    theirs = await hub.broker.publish("tenantB.news", "b", idempotency_key="order-42")
    assert mine != theirs and not getattr(theirs, "repeat", False)
    assert [e.data for e in (await hub.broker.replay(["tenantB.news"], 0)).events] == ["b"]
    # where the channel ends and the key begins is never ambiguous
    colon = await hub.broker.publish("tenantA.orders:x", "c", idempotency_key="order-42")
    keyed = await hub.broker.publish("tenantA.orders", "d", idempotency_key="x:order-42")
    assert len({mine, theirs, colon, keyed}) == 4
    again = await hub.broker.publish("tenantA.orders", "a", idempotency_key="order-42")
    assert again == mine and again.repeat


@pytest.mark.parametrize("data", [
    "line one\nline two", "trailing newline\n", "\n", "", "it's \"quoted\"; DROP TABLE x; --",
    "paragraph\u2028separator", "x" * 60000,
], ids=["multiline", "trailing", "lf", "empty", "quotes", "u2028", "h1-60k"])
async def test_h1_h2_payloads_round_trip(hub: Hub, data: str) -> None:
    subscriber = await hub.subscribe(["p"])
    event_id = await hub.broker.publish("p", data)
    live = await take(subscriber, 1)
    stored = (await hub.broker.replay(["p"], event_id - 1)).events
    assert live[0].data == data and stored[0].data == data


async def test_many_subscribers_share_one_listener(hub: Hub) -> None:
    from prometheus_client import REGISTRY

    def delivered() -> float:
        return REGISTRY.get_sample_value("ssehub_events_delivered_total") or 0.0

    subscribers = [await hub.subscribe(["fan"]) for _ in range(200)]
    covered = await hub.subscribe(["fan"])
    covered.floor = 2**62  # as if its replay had already sent everything
    before = delivered()
    event_id = await hub.broker.publish("fan", "all")
    got = [(await take(subscriber, 1))[0] for subscriber in subscribers]
    assert [e.id for e in got] == [event_id] * 200
    # the same frame object, encoded once, reaches every subscriber
    assert len({id(e.frame) for e in got}) == 1 and len({id(e.chunk) for e in got}) == 1
    # counted once per subscriber that took it: not the one the replay covered
    assert delivered() - before == 200 and covered.buf == []
    for subscriber in [*subscribers, covered]:
        hub.unsubscribe(subscriber)


async def test_g4_redis_clients_do_not_grow_with_subscribers(redis_config, redis_server) -> None:  # type: ignore[no-untyped-def]
    config = redis_config()
    client = redis.Redis.from_url(redis_server.url)
    before = len(client.client_list())
    hub = Hub(config)
    await hub.start()
    subscribers = [await hub.subscribe([f"g4.{i % 50}"]) for i in range(1000)]
    await hub.broker.publish("g4.1", "x")
    assert len(await take(subscribers[1], 1)) == 1
    during = len(client.client_list())
    assert during - before <= 2, f"{during - before} redis connections for 1000 subscribers"
    for subscriber in subscribers:
        hub.unsubscribe(subscriber)
    await asyncio.sleep(UNLISTEN_DELAY + 0.5)
    numsub = client.pubsub_numsub(*[f"{config.redis_prefix}g4.{i}" for i in range(50)])
    assert all(count == 0 for _, count in numsub), numsub  # F3: interest released within 2 s
    await hub.close()


async def test_g4_postgres_connections_do_not_grow(pg_config, pg_server) -> None:  # type: ignore[no-untyped-def]
    config = pg_config()
    dbname = config.broker_url.rsplit("/", 1)[1]
    count_sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
    with psycopg.connect(pg_server.conninfo(), autocommit=True) as admin:
        hub = Hub(config)
        await hub.start()
        subscribers = [await hub.subscribe([f"g4.{i % 20}"]) for i in range(300)]
        await hub.broker.publish("g4.1", "x")
        assert len(await take(subscribers[1], 1)) == 1
        during = admin.execute(count_sql, (dbname,)).fetchone()[0]
        assert during <= 2, f"{during} postgres connections for 300 subscribers"
        for subscriber in subscribers:
            hub.unsubscribe(subscriber)
        await asyncio.sleep(UNLISTEN_DELAY + 0.5)
        async with await psycopg.AsyncConnection.connect(config.broker_url.replace(
                "postgres://", "postgresql://"), autocommit=True) as probe:
            await probe.execute("SELECT 1")
        await hub.close()
        await asyncio.sleep(0.3)
        after = admin.execute(count_sql, (dbname,)).fetchone()[0]
        assert after == 0, f"{after} connections left after close"


async def test_postgres_commit_out_of_id_order_is_not_skipped(pg_config, pg_server) -> None:  # type: ignore[no-untyped-def]
    """Two workers publish at once; the one with the lower id commits last (a
    trigger holds its transaction 0.5 s). The listener, which fetches ids above
    the last it delivered, must still deliver both, in id order: the publish lock
    makes a later id wait for the earlier commit."""
    config = pg_config()
    first, second = Hub(config), Hub(config)  # two workers, one database
    await first.start()
    await second.start()
    try:
        subscriber = await first.subscribe(["ooo"])
        await first.broker.publish("ooo", "warm")  # the schema exists from here on
        assert [e.data for e in await take(subscriber, 1)] == ["warm"]
        with psycopg.connect(config.broker_url.replace("postgres://", "postgresql://"),
                             autocommit=True) as admin:
            admin.execute("CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN IF NEW.data = 'slow' THEN PERFORM pg_sleep(0.5); END IF; "
                          "RETURN NEW; END $$")
            admin.execute("CREATE TRIGGER slow_commit AFTER INSERT ON ssehub_event "
                          "FOR EACH ROW EXECUTE FUNCTION slow_commit()")
        slow = asyncio.create_task(first.broker.publish("ooo", "slow"))
        await asyncio.sleep(0.15)  # the slow transaction holds its id (and the lock) now
        fast_id = await second.broker.publish("ooo", "fast")
        slow_id = await slow
        assert slow_id < fast_id
        got = await take(subscriber, 2)
        assert [(e.id, e.data) for e in got] == [(slow_id, "slow"), (fast_id, "fast")]
    finally:
        await first.close()
        await second.close()


async def test_f3_postgres_unlistens_within_2s(pg_config, pg_server) -> None:  # type: ignore[no-untyped-def]
    """F3 for LISTEN/NOTIFY: the listener's session runs UNLISTEN within 2 s of
    the last subscriber leaving (seen in pg_stat_activity, from another session)."""
    config = pg_config()
    dbname = config.broker_url.rsplit("/", 1)[1]
    hub = Hub(config)
    await hub.start()
    try:
        subscriber = await hub.subscribe(["f3.pg"])
        await hub.broker.publish("f3.pg", "x")
        assert len(await take(subscriber, 1)) == 1
        with psycopg.connect(pg_server.conninfo(), autocommit=True) as admin:
            def sessions() -> list[str]:
                rows = admin.execute("SELECT query FROM pg_stat_activity WHERE datname = %s",
                                     (dbname,)).fetchall()
                return [row[0] for row in rows]

            assert 'UNLISTEN "f3.pg"' not in sessions()
            left = time.monotonic()
            hub.unsubscribe(subscriber)
            while 'UNLISTEN "f3.pg"' not in sessions():
                assert time.monotonic() - left < 2.0, f"no UNLISTEN within 2 s: {sessions()}"
                await asyncio.sleep(0.05)
    finally:
        await hub.close()


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_raw_publish_from_outside_reaches_subscribers_live(
        kind: str, request: pytest.FixtureRequest) -> None:
    """Seed compatibility: redis-cli PUBLISH and psql NOTIFY still work, live only."""
    config = request.getfixturevalue(f"{'pg' if kind == 'postgres' else kind}_config")()
    hub = Hub(config)
    await hub.start()
    subscriber = await hub.subscribe(["lobby"])
    if config.broker_url.startswith("redis"):
        server = request.getfixturevalue("redis_server")
        server.cli("PUBLISH", f"{config.redis_prefix}lobby", "Hello from redis-cli")
        expected = "Hello from redis-cli"
    else:
        subprocess.run(["psql", config.broker_url, "-c", "NOTIFY lobby, 'Hello, it''s psql'"],
                       check=True, capture_output=True)
        expected = "Hello, it's psql"
    events = await take(subscriber, 1)
    assert events[0].data == expected and events[0].id is None
    assert events[0].frame == f"data: {expected}\n\n".encode()
    await hub.close()


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_raw_message_that_looks_like_ours_does_not_stop_the_listener(
        kind: str, request: pytest.FixtureRequest) -> None:
    """A raw PUBLISH/NOTIFY starting with the hub's marker byte but not in its
    format arrives live, and the listener goes on delivering stored events
    (it used to raise in the parser and stop for good, with /readyz still 200)."""
    config = request.getfixturevalue(f"{'pg' if kind == 'postgres' else kind}_config")()
    hub = Hub(config)
    await hub.start()
    try:
        subscriber = await hub.subscribe(["lobby"])
        if kind == "redis":
            server = request.getfixturevalue("redis_server")
            server.cli("PUBLISH", f"{config.redis_prefix}lobby", "\x1ehello")
        else:
            subprocess.run(["psql", config.broker_url, "-c", "NOTIFY lobby, E'\\x1ehello'"],
                           check=True, capture_output=True)
        raw = await take(subscriber, 1)
        assert raw[0].id is None and raw[0].data == "\x1ehello"
        stored = await hub.broker.publish("lobby", "after the odd one")
        assert [(e.id, e.data) for e in await take(subscriber, 1)] == [
            (stored, "after the odd one")]
    finally:
        await hub.close()


async def test_heartbeats_reach_idle_subscribers(hub: Hub) -> None:
    subscriber = await hub.subscribe(["quiet"])
    async with asyncio.timeout(2):
        await subscriber.wait()
    assert subscriber.buf[0].frame == b":\n\n"


async def test_a_stream_whose_heartbeat_fails_does_not_stop_the_others(hub: Hub) -> None:
    """The heartbeat task is the process's only one: a push that raised once ended it
    silently (an unawaited task), and every stream then went without heartbeats."""
    broken = await hub.subscribe(["quiet"])
    broken.cycle = object()  # its transport is gone: the direct write raises
    other = await hub.subscribe(["quiet"])
    for _ in range(3):  # three heartbeats (0.2 s apart) after the failure
        other.buf.clear()
        async with asyncio.timeout(2):
            await other.wait()
        assert other.buf[0].frame == b":\n\n"
    hub.unsubscribe(broken)


async def test_g1_slow_subscriber_is_dropped_not_buffered_forever(make_config) -> None:  # type: ignore[no-untyped-def]
    hub = Hub(make_config(SSEHUB_SUBSCRIBER_BUFFER="10"))
    await hub.start()
    slow = await hub.subscribe(["burst"])
    fast = await hub.subscribe(["burst"])
    ids = []
    for i in range(30):
        ids.append(await hub.broker.publish("burst", str(i)))
        fast.buf.clear()  # this one keeps up
        await asyncio.sleep(0)
    await asyncio.sleep(0.3)
    assert slow.dropped and slow.closed and not fast.dropped
    assert len(slow.buf) == 0
    replay = await hub.broker.replay(["burst"], 0)
    assert [e.id for e in replay.events] == ids  # its reconnect replays everything
    await hub.close()


async def test_bursts_reach_single_and_multi_channel_streams_in_id_order(hub: Hub) -> None:
    one = await hub.subscribe(["burst.a"])
    both = await hub.subscribe(["burst.a", "burst.b"])
    ids = await asyncio.gather(*(hub.broker.publish("burst.a" if i % 3 else "burst.b", str(i))
                                 for i in range(60)))
    a_ids = sorted(i for n, i in enumerate(ids) if n % 3)
    assert [e.id for e in await take(one, len(a_ids))] == a_ids
    assert [e.id for e in await take(both, 60)] == sorted(ids)
