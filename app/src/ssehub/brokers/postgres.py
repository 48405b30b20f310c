"""PostgreSQL broker: a table for storage, LISTEN/NOTIFY for delivery.

Design choices (H1-H5 in docs/failure-modes.md):
- Notifications carry ids, never payloads: NOTIFY's 8000-byte limit and queue
  never see user data. The listener reads the rows by id.
- Always ``pg_notify(%s, %s)`` with parameters: no SQL is built from a channel
  name or payload (the seed's f-string NOTIFY broke on a quote). Channel names
  are at most 63 characters, PostgreSQL's identifier limit.
- NOTIFY is delivered at commit, so a rolled-back publish announces nothing.
- Publishes take a transaction-level advisory lock, so ids commit in id order
  and a replay ``WHERE id > after`` can never skip an id that commits late.
  This serialises publishes across the cluster (measured: fine for thousands
  of events per second); the Redis broker has no such lock.
- The listener uses its own direct connection (``SSEHUB_PG_LISTEN_URL`` when
  the main URL goes through pgbouncer, whose transaction mode drops LISTEN).
- A process holds two connections: the listener and one for commands.
- ``psql``'s ``NOTIFY lobby, 'Hello'`` reaches subscribers of ``lobby`` live
  (no id); quoted identifiers keep case, so ``NOTIFY "Lobby"`` for mixed case.
- History identity, as in the Redis broker: ``ssehub_history`` holds an epoch
  beside the id sequence. A new (or wiped) store starts a history whose ids
  begin at the clock in microseconds, above every id an earlier history issued;
  a store from before epochs (events, no epoch) keeps its ids under epoch 0.
  The listener reads epoch and sequence when it connects and every
  ``HISTORY_CHECK_SECONDS`` (never per event): another epoch (the tables were
  dropped and made again), or a sequence below the ids it has seen (a restored
  dump, a failover to a replica that lagged: it then starts a new history
  itself, above them), sends ``event: reset`` to every stream of its channels.
  A replay from ``0 < after < epoch`` is a reset too.
- A channel quiet for the retention holds nothing: a publish trims its own
  channel, and a clean-up (at least once a minute and every 1000th publish of
  a hub, a bounded batch through the ``published_at`` index) deletes what is
  older than the retention in every channel. It keeps one floor for all (the
  highest id it deleted) instead of one per channel: a channel whose oldest
  retained id is above a client's id, or that holds nothing, gets a reset for an
  id below it, as on Redis. A store with no publish cleans up at the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ..channels import scoped_key
from ..conf import Config, postgres_conninfo
from ..sse import Event
from . import (
    ABOVE_EVERY_ID,
    BrokerUnavailable,
    EventCallback,
    Published,
    Replay,
    ResetCallback,
    new_history_base,
)
from .listener import MARKER, ListenerBroker

log = logging.getLogger(__name__)

LOCK_ID = 0x55E_4B1D  # pg_advisory_xact_lock key for publishes
POLL_SECONDS = 1.0
IDLE_CHECK_SECONDS = 5.0
# The idle health check must answer within this, or the listener reconnects (G3:
# a silent route never closes the socket, so only our own check can notice).
DEAD_AFTER_SECONDS = 10.0
# Kernel-level detection of half-open sockets on every connection: keepalive
# probes when idle, and tcp_user_timeout when sent data is never acknowledged.
TCP_OPTIONS: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 10,
                               "keepalives_interval": 5, "keepalives_count": 3,
                               "tcp_user_timeout": 20_000}

SCHEMA = """
CREATE TABLE IF NOT EXISTS ssehub_event (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,
    event text,
    data text NOT NULL,
    published_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS ssehub_event_channel_id ON ssehub_event (channel, id);
CREATE INDEX IF NOT EXISTS ssehub_event_published_at ON ssehub_event (published_at);
CREATE TABLE IF NOT EXISTS ssehub_floor (
    channel text PRIMARY KEY,
    floor bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS ssehub_idempotency (
    key text PRIMARY KEY,
    event_id bigint NOT NULL,
    expires double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS ssehub_history (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    epoch bigint NOT NULL
);
"""

# The newest id issued (0: none) and the history's epoch (NULL: none yet).
HEAD = """
SELECT (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM ssehub_event_id_seq),
       (SELECT epoch FROM ssehub_history)
"""

TRIM = """
WITH gone AS (
    DELETE FROM ssehub_event
    WHERE channel = %(channel)s
      AND (published_at < %(cutoff)s
           OR id <= COALESCE((SELECT id FROM ssehub_event WHERE channel = %(channel)s
                              ORDER BY id DESC OFFSET %(keep)s LIMIT 1), 0))
    RETURNING id)
INSERT INTO ssehub_floor (channel, floor)
SELECT %(channel)s, max(id) FROM gone HAVING max(id) IS NOT NULL
ON CONFLICT (channel) DO UPDATE SET floor = GREATEST(ssehub_floor.floor, EXCLUDED.floor)
"""

# The clean-up's share of the age limit, across channels: a channel that got no
# publish for longer than the retention holds nothing. One bounded batch at a time,
# oldest first (the published_at index), so a publish never waits behind a long one.
EXPIRE = """
WITH gone AS (
    DELETE FROM ssehub_event WHERE id IN (
        SELECT id FROM ssehub_event WHERE published_at < %(cutoff)s
        ORDER BY published_at LIMIT %(batch)s)
    RETURNING id)
SELECT count(*), max(id) FROM gone
"""
# The highest id the clean-up deleted, under a channel name no channel has; a
# channel's own floor at or below it says nothing more, and goes too.
EXPIRED = ""
EXPIRED_FLOOR = """
INSERT INTO ssehub_floor (channel, floor) VALUES (%(expired)s, %(floor)s)
ON CONFLICT (channel) DO UPDATE SET floor = GREATEST(ssehub_floor.floor, EXCLUDED.floor)
"""
# For replay: the channels' floors, the clean-up's, and the highest of the channels'
# oldest retained ids (ABOVE_EVERY_ID for a channel that holds none).
FLOORS = """
SELECT (SELECT COALESCE(max(floor), 0) FROM ssehub_floor WHERE channel = ANY(%(channels)s)),
       (SELECT floor FROM ssehub_floor WHERE channel = %(expired)s),
       (SELECT max(COALESCE((SELECT min(id) FROM ssehub_event e WHERE e.channel = c),
                            %(above)s))
        FROM unnest(%(channels)s::text[]) AS c)
"""
# How often a hub's publishes run the clean-up (at most; at least every 1000th
# publish), and the most events one run deletes.
CLEAN_UP_SECONDS = 60.0
CLEAN_UP_BATCH = 10_000


class PostgresBroker(ListenerBroker[psycopg.AsyncConnection[Any]]):
    kind = "postgres"
    task_name = "ssehub-pg-listener"
    connection_errors = (psycopg.Error, OSError)

    def __init__(self, url: str, config: Config) -> None:
        super().__init__(url, config)
        self.conninfo = postgres_conninfo(url)
        self.listen_conninfo = postgres_conninfo(config.pg_listen_url or url)
        self.pool = AsyncConnectionPool(self.conninfo, min_size=1, max_size=1, open=False,
                                        kwargs={"autocommit": True, **TCP_OPTIONS},
                                        timeout=10)
        self._pending: list[tuple[str, bool, asyncio.Future[None] | None]] = []
        self._schema_ready = False
        self._publishes = 0
        self._next_clean_up = 0.0
        # A private channel that wakes the listener out of its wait when interest changes.
        self._wake_channel = f"ssehub_wake_{os.getpid()}_{id(self):x}"
        self._waiting = False

    async def start(self, on_events: EventCallback,
                    on_reset: ResetCallback | None = None) -> None:
        await self.pool.open(wait=False)
        await super().start(on_events, on_reset)

    async def close(self) -> None:
        await super().close()
        await self.pool.close()

    async def ensure_schema(self) -> None:
        if self.pool.closed:  # a publish-only client (ssehub.publish outside the hub)
            await self.pool.open(wait=False)
        if self._schema_ready:
            return
        async with self.pool.connection() as conn:
            await self._ensure_schema_on(conn)

    # interest
    async def listen(self, channel: str) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, True, waiter))
        await self._wake()
        await waiter

    async def unlisten(self, channel: str) -> None:
        self._pending.append((channel, False, None))
        await self._wake()

    async def _wake(self) -> None:
        if not self._waiting:
            return
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            async with self.pool.connection(timeout=2) as conn:
                await conn.execute("SELECT pg_notify(%s, '')", (self._wake_channel,))

    # listener
    async def _connect_and_read(self) -> None:
        async with await psycopg.AsyncConnection.connect(
                self.listen_conninfo, autocommit=True, **TCP_OPTIONS) as conn:
            self._was_connected = True
            await self._listen_loop(conn)

    async def _listen_loop(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._ensure_schema_on(conn)
        await self._check_history(conn)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._wake_channel)))
        for channel in sorted(self._channels):
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        await self._fill_gaps(conn, sorted(self._channels))
        self._up = True
        idle_since = time.monotonic()
        next_check = self._history_check_due()
        while True:
            if time.monotonic() >= next_check:
                next_check = await self._recheck_history(conn)
            await self._apply_pending(conn)
            batch = []
            self._waiting = True
            try:
                async with contextlib.aclosing(
                        conn.notifies(timeout=POLL_SECONDS, stop_after=1)) as notifies:
                    async for notify in notifies:
                        batch.append(notify)
            finally:
                self._waiting = False
            if batch:
                idle_since = time.monotonic()
                await self._deliver(conn, batch)
            elif time.monotonic() - idle_since > IDLE_CHECK_SECONDS:
                # A socket that went silent (G3) never fails on its own.
                await asyncio.wait_for(conn.execute("SELECT 1"), DEAD_AFTER_SECONDS)
                idle_since = time.monotonic()

    async def _ensure_schema_on(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The tables, and a history in them (a new one in a new store)."""
        if not self._schema_ready:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID + 1,))
                await conn.execute(SCHEMA)
            await self._start_history(conn, 0)
            self._schema_ready = True

    @staticmethod
    async def _head(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int | None]:
        """The newest id issued and the history's epoch (None: the store has none)."""
        cur = await conn.execute(HEAD)
        row = await cur.fetchone()
        assert row is not None
        return int(row[0]), None if row[1] is None else int(row[1])

    async def _start_history(self, conn: psycopg.AsyncConnection[Any], high: int) -> int:
        """Make sure the store has a history that holds every id seen; return its epoch.

        None yet (a new or wiped store), or a sequence below ``high`` (a restored
        dump, a replica that lagged): a new history whose ids start above
        ``high`` and the clock. Events but no epoch: a store from before epochs
        keeps its ids under epoch 0. Under the publish lock, so no id is issued
        meanwhile, and of several hubs one starts the history and the others adopt it.
        """
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
            seq, epoch = await self._head(conn)
            if epoch is not None and seq >= high:
                return epoch
            if epoch is None and seq > 0 and seq >= high:
                epoch = 0
            else:
                epoch = max(high, new_history_base(time.time()))
                await conn.execute("SELECT setval('ssehub_event_id_seq', %s)", (epoch,))
            await conn.execute(
                "INSERT INTO ssehub_history (epoch) VALUES (%s) "
                "ON CONFLICT (one) DO UPDATE SET epoch = EXCLUDED.epoch", (epoch,))
            return epoch

    async def _read_history(self, store: psycopg.AsyncConnection[Any]) -> tuple[int, int | None]:
        try:
            return await self._head(store)
        except psycopg.errors.UndefinedTable:  # the tables were dropped: a new store
            self._schema_ready = False
            await self._ensure_schema_on(store)
            return await self._head(store)

    async def _read_after(self, store: psycopg.AsyncConnection[Any], channel: str,
                          after: int) -> list[Event]:
        return await self._range(store, [channel], after)

    async def _apply_pending(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while self._pending:
            channel, wanted, waiter = self._pending.pop(0)
            if wanted:
                if channel not in self._last_id:
                    cur = await conn.execute(
                        "SELECT COALESCE(max(id), 0) FROM ssehub_event WHERE channel = %s",
                        (channel,))
                    row = await cur.fetchone()
                    self._last_id[channel] = int(row[0]) if row else 0
                if channel not in self._channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self._channels.add(channel)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif channel in self._channels:
                await conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
                self._forget(channel)

    async def _deliver(self, conn: psycopg.AsyncConnection[Any], batch: list[Any]) -> None:
        ids: list[int] = []
        raw: list[Event] = []
        for notify in batch:
            if notify.channel not in self._channels:
                continue
            if notify.payload.startswith(MARKER) and notify.payload[1:].isascii() \
                    and notify.payload[1:].isdigit():
                ids.append(int(notify.payload[1:]))
            else:
                raw.append(Event(notify.channel, notify.payload))
        if raw:
            self.on_events(raw)
        if ids:
            cur = await conn.execute(
                "SELECT id, channel, event, data, published_at FROM ssehub_event "
                "WHERE id = ANY(%s) ORDER BY id", (ids,))
            self._deliver_new([Event(r[1], r[3], r[2], int(r[0]), float(r[4]))
                               for r in await cur.fetchall()])

    # commands
    @staticmethod
    async def _range(conn: psycopg.AsyncConnection[Any], channels: Sequence[str],
                     after: int, limit: int | None = None) -> list[Event]:
        cur = await conn.execute(
            "SELECT id, channel, event, data, published_at FROM ssehub_event "
            "WHERE channel = ANY(%s) AND id > %s ORDER BY id LIMIT %s",
            (list(channels), after, limit))
        return [Event(r[1], r[3], r[2], int(r[0]), float(r[4])) for r in await cur.fetchall()]

    async def publish(self, channel: str, data: str, event: str | None = None,
                      idempotency_key: str | None = None) -> int:
        now = time.time()
        if idempotency_key is not None:
            idempotency_key = scoped_key(channel, idempotency_key)
        try:
            await self.ensure_schema()
            async with self.pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
                if idempotency_key is not None:
                    cur = await conn.execute(
                        "SELECT event_id FROM ssehub_idempotency WHERE key = %s AND expires > %s",
                        (idempotency_key, now))
                    known = await cur.fetchone()
                    if known:
                        return Published.earlier(int(known[0]))
                cur = await conn.execute(
                    "INSERT INTO ssehub_event (channel, event, data, published_at) "
                    "VALUES (%s, %s, %s, %s) RETURNING id", (channel, event, data, now))
                row = await cur.fetchone()
                assert row is not None
                event_id = int(row[0])
                if idempotency_key is not None:
                    await conn.execute(
                        "INSERT INTO ssehub_idempotency (key, event_id, expires) "
                        "VALUES (%s, %s, %s) ON CONFLICT (key) DO UPDATE "
                        "SET event_id = EXCLUDED.event_id, expires = EXCLUDED.expires",
                        (idempotency_key, event_id, now + self.config.retention_seconds))
                await conn.execute(TRIM, {"channel": channel,
                                          "cutoff": now - self.config.retention_seconds,
                                          "keep": self.config.retention_events})
                await conn.execute("SELECT pg_notify(%s, %s)", (channel, f"{MARKER}{event_id}"))
            self._publishes += 1
            if self._publishes % 1000 == 0 or now >= self._next_clean_up:
                try:
                    await self._clean_up(now)
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    # The event is stored and announced: a 503 would have its
                    # publisher send it again. The next clean-up deletes what this left.
                    log.warning("postgres clean-up failed (%s); the next one retries", exc)
            return event_id
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def _clean_up(self, now: float) -> None:
        """Delete what is older than the retention in every channel, and expired
        Idempotency-Keys; remember the highest id deleted (replay's EXPIRED floor)."""
        retention = self.config.retention_seconds
        self._next_clean_up = now + min(CLEAN_UP_SECONDS, retention / 4)
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM ssehub_idempotency WHERE expires < %s", (now,))
            cur = await conn.execute(EXPIRE, {"cutoff": now - retention,
                                              "batch": CLEAN_UP_BATCH})
            row = await cur.fetchone()
            if row is None or row[1] is None:
                return
            if int(row[0]) >= CLEAN_UP_BATCH:
                self._next_clean_up = now  # more to delete: again at the next publish
            async with conn.transaction():
                await conn.execute(EXPIRED_FLOOR, {"expired": EXPIRED, "floor": int(row[1])})
                await conn.execute(
                    "DELETE FROM ssehub_floor WHERE channel <> %s AND floor <= %s",
                    (EXPIRED, int(row[1])))

    async def replay(self, channels: Sequence[str], after: int,
                     limit: int | None = None) -> Replay:
        try:
            await self.ensure_schema()
            async with self.pool.connection() as conn:
                head, epoch = await self._head(conn)
                if after > head:
                    return Replay(reset=True, head=head)
                if 0 < after < (epoch or 0):
                    return Replay(reset=True, head=head, reason="history lost")
                cur = await conn.execute(FLOORS, {"channels": list(channels),
                                                  "expired": EXPIRED,
                                                  "above": ABOVE_EVERY_ID - 1})  # a bigint
                row = await cur.fetchone()
                assert row is not None
                if after < int(row[0]):
                    return Replay(reset=True, head=head)
                # The clean-up deleted ids up to its floor, in any channel: a channel
                # whose oldest retained id is above the client's next one may have
                # lost events it missed (every id of the history from 0).
                lowest = max(after, epoch or 0)
                if row[1] is not None and lowest < int(row[1]) and lowest < int(row[2] or 0) - 1:
                    return Replay(reset=True, head=head)
                events = await self._range(conn, channels, after, limit)
                more = limit is not None and len(events) >= limit
                return Replay(events, head=head, more=more)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        if isinstance(exc, psycopg.errors.UndefinedTable):
            self._schema_ready = False  # the tables were dropped: make them again
        return BrokerUnavailable(f"postgres: {exc}")

    async def ping(self) -> None:
        try:
            await self.ensure_schema()
            async with self.pool.connection(timeout=3) as conn:
                await conn.execute("SELECT 1")
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
