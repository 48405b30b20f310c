"""Redis broker: one Redis Stream per channel for storage, pub/sub for delivery.

Design choices:
- One Lua script publishes: INCR a global sequence (ids order events across
  channels), XADD to the channel's stream with that id, trim by count and age,
  PUBLISH a small message carrying the id, and record the Idempotency-Key.
  Being one script, store-then-announce is atomic and ids reach pub/sub in order.
- A process holds two connections: the pub/sub listener and one for commands.
  The listener SUBSCRIBEs only to channels that have local subscribers (and
  one of its own, so it always reads and notices a lost connection), and
  ``listen`` waits for Redis to confirm, so a replay after it cannot miss.
- Pub/sub is at-most-once. The listener remembers the last id it saw per
  channel; after a reconnect it reads the gap from the streams (G2/G3). Ids at
  or below that mark are dropped, which also removes duplicates of the gap fill.
- Half-open sockets: TCP keepalive plus a PING when the connection is idle; no
  answer within a few seconds means reconnect (G3).
- Reset detection uses the stream's ``max-deleted-entry-id`` (Redis 7): an
  ``after`` below it means the client missed an event that is gone.
- A channel quiet for the retention holds nothing: each publish sets the
  stream's TTL to the retention (idempotency keys have it too), so one-shot
  channels cannot fill maxmemory. An expired stream takes its
  ``max-deleted-entry-id`` with it, so the script also keeps ticks (``{prefix}clock``,
  at most a thousand a retention, on Redis's clock): replay finds the ids issued
  before the retention from them, and a client whose id is below that, on a
  channel that holds nothing above its id, gets a reset. It cannot tell a
  channel that expired from one that never had an event, so an id older than
  the retention gets a reset there too (the contract's "older than retention").
- History identity: ``{prefix}epoch`` sits beside the sequence. A store that
  has neither (new, or wiped: FLUSHALL, a lost AOF) starts a new history
  whose ids begin at the clock in microseconds (as the memory broker's), so
  they are above every id an earlier history issued and an id from a lost
  history is told apart forever: ``0 < after < epoch`` gets a reset. The
  listener reads epoch and sequence when it connects and every
  ``HISTORY_CHECK_SECONDS`` (never per event); a changed epoch, or a sequence
  below the ids it has seen (a lagging replica, a truncated AOF: it then starts
  a new history itself), sends ``event: reset`` to every stream of its
  channels and goes on with the new ids. A store from before epochs (sequence,
  no epoch) keeps its ids under epoch 0.
- Raw ``PUBLISH ssehub:NAME text`` from outside arrives without our marker and
  is delivered live only, with no id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, NoScriptError, RedisError

from ..channels import scoped_key
from ..conf import Config
from ..sse import Event
from . import ABOVE_EVERY_ID, BrokerUnavailable, Page, Published, Replay, new_history_base
from .listener import MARKER, ListenerBroker

log = logging.getLogger(__name__)

# MARKER as the listener reads it: a message's first byte.
MARKER_BYTE = MARKER.encode()
IDLE_PING_SECONDS = 5.0
DEAD_AFTER_SECONDS = 12.0
# A command connection that stops answering (a dropped route, a stuck Redis) fails
# the publish with 503 after this long instead of holding it (G3).
COMMAND_TIMEOUT_SECONDS = 5.0
MAX_BATCH = 256
# The publish script records which ids were issued by when this many times a
# retention (at most once a millisecond): replay's view of an expired stream is
# exact but for one such step (86 s at the default day).
TICKS_PER_RETENTION = 1000
# A publish waiting for the next pipeline: KEYS, ARGV and the caller's future.
Queued = tuple[list[str], list[Any], asyncio.Future[int]]

# KEYS: seq, stream, epoch, tick, clock[, idempotency key] (no sixth key without
# one: an ACL that allows only ~ssehub:* refuses an empty key name)
# Ages are trimmed 16 entries at a time; the Lua escape 30 is MARKER (record separator).
# Ids pass through string.format('%d'): Lua's tostring prints 15 digits or more
# in exponent form.
# ARGV: pubsub channel, event, data, published_at, maxlen, retention ms, age cutoff,
#       new history base, tick ms, clock length
PUBLISH_SCRIPT = """
if KEYS[6] then
  local known = redis.call('GET', KEYS[6])
  if known then return -tonumber(known) end  -- negative: an earlier event's id
end
if not redis.call('GET', KEYS[3]) then
  if redis.call('GET', KEYS[1]) then
    redis.call('SET', KEYS[3], '0')  -- a store from before epochs keeps its ids
  else
    redis.call('SET', KEYS[1], ARGV[8])  -- a new history
    redis.call('SET', KEYS[3], ARGV[8])
  end
end
local id = string.format('%d', redis.call('INCR', KEYS[1]))
redis.call('XADD', KEYS[2], id .. '-0', 'e', ARGV[2], 'd', ARGV[3], 't', ARGV[4])
-- XDEL rather than MAXLEN: only XDEL advances max-deleted-entry-id, which replay
-- reads to tell a client that it missed trimmed events.
local excess = redis.call('XLEN', KEYS[2]) - tonumber(ARGV[5])
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', math.max(excess, 0) + 16)
for i, entry in ipairs(oldest) do
  if i <= excess or tonumber(entry[2][6]) < tonumber(ARGV[7]) then
    redis.call('XDEL', KEYS[2], entry[1])
  else
    break
  end
end
-- A channel quiet for the retention holds nothing: its stream expires.
redis.call('PEXPIRE', KEYS[2], ARGV[6])
-- A tick at most every ARGV[9] ms records, on Redis's clock, that every id below
-- this one was issued before now: replay tells from the ticks whether an expired
-- stream may have held an event after a client's id.
if redis.call('SET', KEYS[4], '1', 'PX', ARGV[9], 'NX') then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[10], '*', 's', string.format('%d', id - 1))
  redis.call('PEXPIRE', KEYS[5], ARGV[6])
end
local nl = '\\n'
redis.call('PUBLISH', ARGV[1], '\\30' .. id .. nl .. ARGV[2] .. nl .. ARGV[4] .. nl .. ARGV[3])
if KEYS[6] then redis.call('SET', KEYS[6], id, 'PX', ARGV[6]) end
return tonumber(id)
"""

# The listener makes sure the store has a history it can recognise: none yet (a
# new or wiped store) or a sequence below the ids it has seen (a replica that
# lagged, a truncated AOF) starts a new one above every id seen; a store from
# before epochs (sequence, no epoch) keeps its ids under epoch 0. Atomic, so of
# several hubs one starts the history and the others adopt it.
# KEYS: seq, epoch; ARGV: the highest id seen, new history base. Returns the epoch.
HISTORY_SCRIPT = """
local epoch = redis.call('GET', KEYS[2])
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local high = tonumber(ARGV[1])
if epoch and seq >= high then return epoch end
if not epoch and seq > 0 and seq >= high then
  redis.call('SET', KEYS[2], '0')
  return '0'
end
local base = string.format('%d', math.max(high, tonumber(ARGV[2])))
redis.call('SET', KEYS[1], base)
redis.call('SET', KEYS[2], base)
return base
"""


def _stream_id(raw: bytes | str) -> int:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return int(text.split("-", 1)[0])


def _event_from_entry(channel: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    name = fields.get(b"e", b"").decode()
    return Event(channel, fields.get(b"d", b"").decode(), name or None,
                 _stream_id(entry_id), float(fields.get(b"t", b"0")))


class RedisBroker(ListenerBroker[aioredis.Redis]):
    kind = "redis"
    task_name = "ssehub-redis-listener"
    connection_errors = (RedisError, OSError, TimeoutError)

    def __init__(self, url: str, config: Config) -> None:
        super().__init__(url, config)
        self.prefix: str = config.redis_prefix
        # RESP2: with redis-py 8.1's default RESP3 a pooled connection that Redis
        # closed (a restart) passes the pool's checkout check, and the first command
        # after every restart failed (redis/redis-py#4252). No retries inside redis-py
        # for either connection: the listener reconnects itself, so that every
        # reconnect checks the history and fills the gap (a resubscribe inside
        # redis-py skipped both), and a publish is never sent twice (below).
        options: dict[str, Any] = {"socket_keepalive": True, "socket_connect_timeout": 5,
                                   "health_check_interval": 0, "protocol": 2,
                                   "retry": Retry(NoBackoff(), 0)}
        # One command connection, shared: callers queue for it rather than opening more
        # (G4: a worker holds two connections in all, whatever the load). An explicit
        # timeout (redis-py's default differs between releases) and no resending
        # inside redis-py: a publish whose reply was lost may have been stored, so
        # the caller gets 503 and retries with its Idempotency-Key instead.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=1, timeout=5, socket_timeout=COMMAND_TIMEOUT_SECONDS,
            **options)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._listener_client = aioredis.Redis.from_url(url, **options)
        self._script = self.redis.register_script(PUBLISH_SCRIPT)
        self._history_script = self.redis.register_script(HISTORY_SCRIPT)
        self._script_ready = False
        self._queue: list[Queued] = []
        self._flusher: asyncio.Task[None] | None = None
        self._confirm: dict[str, deque[asyncio.Future[None]]] = {}
        self._pubsub: Any = None

    # keys
    def _stream_key(self, channel: str) -> str:
        return f"{self.prefix}s:{channel}"

    def _pubsub_channel(self, channel: str) -> str:
        return f"{self.prefix}{channel}"

    @property
    def _own_channel(self) -> str:
        # Always subscribed, so the listener always reads its connection and a lost
        # one shows at once, also while no stream of this process listens to
        # anything. No channel name starts with "~": nothing is delivered from it.
        return f"{self.prefix}~listener"

    @property
    def _seq_key(self) -> str:
        return f"{self.prefix}seq"

    @property
    def _epoch_key(self) -> str:
        return f"{self.prefix}epoch"

    @property
    def _tick_key(self) -> str:  # present while the last tick is recent
        return f"{self.prefix}tick"

    @property
    def _clock_key(self) -> str:  # the ticks: Redis's time -> the ids issued before it
        return f"{self.prefix}clock"

    async def close(self) -> None:
        await super().close()
        await self._disconnect()
        await self._listener_client.aclose()
        await self.redis.aclose(close_connection_pool=True)

    async def _disconnect(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None

    # interest
    async def listen(self, channel: str) -> None:
        if channel not in self._last_id:
            # The gap fill after a reconnect starts here: read before SUBSCRIBE so no
            # event that arrives live is mistaken for one already seen.
            try:
                self._last_id[channel] = int(await self.redis.get(self._seq_key) or 0)
            except (RedisError, OSError) as exc:
                raise BrokerUnavailable(f"redis: {exc}") from exc
        self._channels.add(channel)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(channel, deque()).append(waiter)
        if self._pubsub is not None and self._up:
            try:
                await self._pubsub.subscribe(self._pubsub_channel(channel))
            except (RedisError, OSError):
                pass  # the listener reconnects and subscribes every wanted channel
        await waiter

    async def unlisten(self, channel: str) -> None:
        self._forget(channel)
        if self._pubsub is not None and self._up:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(self._pubsub_channel(channel))

    # listener
    async def _connect_and_read(self) -> None:
        pubsub = self._listener_client.pubsub()
        self._pubsub = pubsub
        await pubsub.connect()  # type: ignore[no-untyped-call]
        # Before subscribing: a lost history resets the gap fill's starting points.
        await self._check_history(self.redis)
        wanted = sorted(self._channels)
        await pubsub.subscribe(self._own_channel, *(self._pubsub_channel(c) for c in wanted))
        self._up = self._was_connected = True
        late = sorted(self._channels.difference(wanted))  # listen() ran meanwhile
        if late:
            await pubsub.subscribe(*(self._pubsub_channel(c) for c in late))
        await self._fill_gaps(self.redis, wanted)
        last_seen = time.monotonic()
        next_check = self._history_check_due()
        pinged = False
        while True:
            if time.monotonic() >= next_check:
                next_check = await self._recheck_history(self.redis)
            message = await pubsub.get_message(timeout=IDLE_PING_SECONDS)
            now = time.monotonic()
            if message is None:
                if now - last_seen > DEAD_AFTER_SECONDS:
                    raise TimeoutError("no answer from redis pub/sub")
                if not pinged:
                    await pubsub.ping()
                    pinged = True
                continue
            last_seen = now
            pinged = False
            # Take the whole burst that is already buffered, and hand it over at once.
            events: list[Event] = []
            while message is not None:
                event = self._handle(message)
                if event is not None:
                    events.append(event)
                if len(events) >= MAX_BATCH:
                    break
                message = await pubsub.get_message(timeout=0)
            if events:
                self.on_events(events)

    def _handle(self, message: dict[str, Any]) -> Event | None:
        kind = message["type"]
        if kind == "message":
            channel = message["channel"].decode()[len(self.prefix):]
            payload: bytes = message["data"]
            if payload[:1] == MARKER_BYTE:
                try:
                    head, event, published, data = payload[1:].split(b"\n", 3)
                    event_id, stamp = int(head), float(published)
                    name, text = event.decode(), data.decode()
                except ValueError:
                    # Not our script's message (a raw PUBLISH that happens to start
                    # with the marker): live only, like any raw message.
                    return Event(channel, payload.decode(errors="replace"))
                if event_id <= self._last_id.get(channel, 0):
                    return None
                self._last_id[channel] = event_id
                return Event(channel, text, name or None, event_id, stamp)
            return Event(channel, payload.decode(errors="replace"))
        elif kind == "subscribe":
            channel = message["channel"].decode()[len(self.prefix):]
            waiters = self._confirm.get(channel)
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
            if waiters is not None and not waiters:
                del self._confirm[channel]
        return None

    async def _read_history(self, store: aioredis.Redis) -> tuple[int, int | None]:
        async with store.pipeline(transaction=False) as pipe:
            pipe.get(self._epoch_key)
            pipe.get(self._seq_key)
            raw_epoch, raw_seq = await pipe.execute()
        return int(raw_seq or 0), None if raw_epoch is None else int(raw_epoch)

    async def _start_history(self, store: aioredis.Redis, high: int) -> int:
        return int(await self._history_script(
            keys=[self._seq_key, self._epoch_key],
            args=[high, new_history_base(time.time())], client=store))

    async def _read_after(self, store: aioredis.Redis, channel: str, after: int) -> list[Event]:
        return await self._range(channel, after)

    # commands
    async def _range(self, channel: str, after: int, end: int | None = None,
                     count: int | None = None) -> list[Event]:
        entries: Any = await self.redis.xrange(self._stream_key(channel), f"({after}-0",
                                               "+" if end is None else str(end), count=count)
        return [_event_from_entry(channel, entry_id, fields) for entry_id, fields in entries]

    async def publish(self, channel: str, data: str, event: str | None = None,
                      idempotency_key: str | None = None) -> int:
        """Queue the publish for the next pipeline and wait for its id.

        Group commit: publishes that arrive while a pipeline is in flight go out
        together in the next one, so one connection carries many publishers
        without a round trip each (measured: 8 publishers on one connection were
        bound by round trips, not CPU).
        """
        now = time.time()
        keys = [self._seq_key, self._stream_key(channel), self._epoch_key,
                self._tick_key, self._clock_key]
        if idempotency_key is not None:
            keys.append(f"{self.prefix}idem:{scoped_key(channel, idempotency_key)}")
        retention_ms = self.config.retention_seconds * 1000
        tick_ms = max(1, retention_ms // TICKS_PER_RETENTION)
        args = [self._pubsub_channel(channel), event or "", data, repr(now),
                self.config.retention_events, retention_ms,
                repr(now - self.config.retention_seconds), new_history_base(now),
                tick_ms, TICKS_PER_RETENTION + 2]
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, waiter))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # Bounded whatever happens below: a caller that gives up here is 503 like a
        # lost reply (it may have been stored; it retries with its Idempotency-Key).
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                return await waiter
        except TimeoutError:
            raise BrokerUnavailable(
                f"redis: no answer within {COMMAND_TIMEOUT_SECONDS:g}s") from None

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._flush_batch(batch)
            except Exception as exc:
                # A bug, or input the API let through: the batch gets 503 and the
                # flusher goes on. Dying here left every caller of the batch waiting.
                log.exception("redis publish batch failed")
                for _, _, waiter in batch:
                    if not waiter.done():
                        waiter.set_exception(BrokerUnavailable(f"redis: {exc!r}"))

    async def _flush_batch(self, batch: list[Queued]) -> None:
        try:
            await self._script_loaded()
            # A caller that timed out before its pipeline was built was told 503:
            # it is not sent.
            batch = [item for item in batch if not item[2].done()]
            if not batch:
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args, _ in batch:
                    pipe.evalsha(self._script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            results = [exc] * len(batch)
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis restarted and lost its script cache: nothing ran; load it, resend.
            self._script_ready = False
            self._queue = batch + self._queue
            return
        for (_, _, waiter), result in zip(batch, results, strict=True):
            if waiter.done():
                continue
            if isinstance(result, BaseException):
                waiter.set_exception(BrokerUnavailable(f"redis: {result}"))
            elif int(result) < 0:
                waiter.set_result(Published.earlier(-int(result)))
            else:
                waiter.set_result(int(result))

    async def _script_loaded(self) -> None:
        if not self._script_ready:
            await self.redis.script_load(PUBLISH_SCRIPT)
            self._script_ready = True

    async def replay(self, channels: Sequence[str], after: int,
                     limit: int | None = None) -> Replay:
        try:
            try:
                return await self._replay(channels, after, limit)
            except ConnectionError:
                # The pooled connection died with a Redis restart and this was the
                # first command to find out. A read is safe to resend (a publish is not).
                log.info("redis command connection was closed; reading the replay again")
                return await self._replay(channels, after, limit)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc}") from exc

    async def _replay(self, channels: Sequence[str], after: int, limit: int | None) -> Replay:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self._seq_key)
            pipe.get(self._epoch_key)
            for channel in channels:
                pipe.xinfo_stream(self._stream_key(channel))
            pipe.time()  # after the streams: one found gone had expired by this time
            results = await pipe.execute(raise_on_error=False)
        for result in (*results[:2], results[-1]):
            if isinstance(result, Exception):
                raise result
        head = int(results[0] or 0)
        epoch = int(results[1] or 0)
        if after > head:
            return Replay(reset=True, head=head)
        if 0 < after < epoch:
            return Replay(reset=True, head=head, reason="history lost")
        # Ids from here up may have been held by a stream that expired (0: every id
        # of this history, which starts above its epoch).
        lowest = max(after, epoch)
        expired_may_hold = False
        for info in results[2:-1]:
            first = ABOVE_EVERY_ID  # no such stream: none yet, or it expired
            if not isinstance(info, Exception):
                deleted = info.get("max-deleted-entry-id") or b"0-0"
                if after < _stream_id(deleted):
                    return Replay(reset=True, head=head)
                if info.get("first-entry"):
                    first = _stream_id(info["first-entry"][0])
            # Below its first entry, a stream holds what an earlier one of the same
            # name held before it expired (all of it older than the retention).
            expired_may_hold |= lowest < first - 1
        if expired_may_hold and lowest < await self._issued_before_retention(results[-1], head):
            return Replay(reset=True, head=head)
        page = Page(limit)
        for channel in channels:
            page.add(await self._range(channel, after, page.end, limit))
        return Replay(page.events, head=head, more=page.more)

    async def _issued_before_retention(self, now: tuple[int, int], head: int) -> int:
        """An id at or above every id issued before the retention (by Redis's clock
        ``now``, as TIME gave it): what an expired stream can have held.

        The first tick at or after the cutoff; without one (no publish since), head.
        """
        cutoff_ms = now[0] * 1000 + now[1] // 1000 - self.config.retention_seconds * 1000
        ticks: Any = await self.redis.xrange(self._clock_key, str(max(cutoff_ms, 0)), "+",
                                             count=1)
        return int(ticks[0][1][b"s"]) if ticks else head

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc}") from exc
