"""Redis broker: one Redis Stream per channel for storage, pub/sub for delivery.

Design choices:
- One Lua script publishes: INCR a global sequence (ids order events across
  channels), XADD to the channel's stream with that id, trim by count and age,
  PUBLISH a small message carrying the id, and record the Idempotency-Key.
  Being one script, store-then-announce is atomic and ids reach pub/sub in order.
- A process holds two connections: the pub/sub listener and one for commands.
  The listener SUBSCRIBEs only to channels that have local subscribers, and
  ``listen`` waits for Redis to confirm, so a replay after it cannot miss.
- Pub/sub is at-most-once. The listener remembers the last id it saw per
  channel; after a reconnect it reads the gap from the streams (G2/G3). Ids at
  or below that mark are dropped, which also removes duplicates of the gap fill.
- Half-open sockets: TCP keepalive plus a PING when the connection is idle; no
  answer within a few seconds means reconnect (G3).
- Reset detection uses the stream's ``max-deleted-entry-id`` (Redis 7): an
  ``after`` below it means the client missed an event that is gone.
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

from ..sse import Event
from . import Broker, BrokerUnavailable, Published, Replay

log = logging.getLogger(__name__)

MARKER = "\x1e"
IDLE_PING_SECONDS = 5.0
DEAD_AFTER_SECONDS = 12.0
# A command connection that stops answering (a dropped route, a stuck Redis) fails
# the publish with 503 after this long instead of holding it (G3).
COMMAND_TIMEOUT_SECONDS = 5.0
RECONNECT_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0)
MAX_BATCH = 256

# KEYS: seq, stream[, idempotency key] (no third key without one: an ACL that
# allows only ~ssehub:* refuses an empty key name)
# Ages are trimmed 16 entries at a time; the Lua escape 30 is MARKER (record separator).
# ARGV: pubsub channel, event, data, published_at, maxlen, idempotency ttl ms, age cutoff
PUBLISH_SCRIPT = """
if KEYS[3] then
  local known = redis.call('GET', KEYS[3])
  if known then return -tonumber(known) end  -- negative: an earlier event's id
end
local id = redis.call('INCR', KEYS[1])
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
local nl = '\\n'
redis.call('PUBLISH', ARGV[1], '\\30' .. id .. nl .. ARGV[2] .. nl .. ARGV[4] .. nl .. ARGV[3])
if KEYS[3] then redis.call('SET', KEYS[3], id, 'PX', ARGV[6]) end
return id
"""


def _stream_id(raw: bytes | str) -> int:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return int(text.split("-", 1)[0])


def _event_from_entry(channel: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    name = fields.get(b"e", b"").decode()
    return Event(channel, fields.get(b"d", b"").decode(), name or None,
                 _stream_id(entry_id), float(fields.get(b"t", b"0")))


class RedisBroker(Broker):
    def __init__(self, url: str, config: Any) -> None:
        super().__init__(url, config)
        self.prefix: str = config.redis_prefix
        options: dict[str, Any] = {"socket_keepalive": True, "socket_connect_timeout": 5,
                                   "health_check_interval": 0}
        # One command connection, shared: callers queue for it rather than opening more
        # (G4: a worker holds two connections in all, whatever the load). An explicit
        # timeout (redis-py's default differs between releases) and no resending
        # inside redis-py: a publish whose reply was lost may have been stored, so
        # the caller gets 503 and retries with its Idempotency-Key instead.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=1, timeout=5, socket_timeout=COMMAND_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0), **options)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._listener_client = aioredis.Redis.from_url(url, **options)
        self._script = self.redis.register_script(PUBLISH_SCRIPT)
        self._script_ready = False
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._channels: set[str] = set()
        self._confirm: dict[str, deque[asyncio.Future[None]]] = {}
        self._last_id: dict[str, int] = {}
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()

    # keys
    def _stream_key(self, channel: str) -> str:
        return f"{self.prefix}s:{channel}"

    def _pubsub_channel(self, channel: str) -> str:
        return f"{self.prefix}{channel}"

    async def start(self, on_events: Any) -> None:
        await super().start(on_events)
        self._task = asyncio.create_task(self._run(), name="ssehub-redis-listener")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._close_pubsub()
        await self._listener_client.aclose()
        await self.redis.aclose(close_connection_pool=True)

    async def _close_pubsub(self) -> None:
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
                self._last_id[channel] = int(await self.redis.get(f"{self.prefix}seq") or 0)
            except (RedisError, OSError) as exc:
                raise BrokerUnavailable(f"redis: {exc}") from exc
        self._channels.add(channel)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(channel, deque()).append(waiter)
        if self._pubsub is not None and self._connected.is_set():
            try:
                await self._pubsub.subscribe(self._pubsub_channel(channel))
            except (RedisError, OSError):
                pass  # the listener reconnects and subscribes every wanted channel
        self._wake.set()
        await waiter

    async def unlisten(self, channel: str) -> None:
        self._channels.discard(channel)
        self._last_id.pop(channel, None)
        if self._pubsub is not None and self._connected.is_set():
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(self._pubsub_channel(channel))

    # listener
    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect_and_read()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Connection trouble, or a bug on the delivery path: either way the
                # listener must not die (every stream of the worker would go silent
                # while /readyz says 200). Reconnect; the gap fill redelivers.
                if not isinstance(exc, (RedisError, OSError, TimeoutError)):
                    log.exception("redis listener failed; reconnecting")
                self._connected.clear()
                await self._close_pubsub()
                delay = RECONNECT_BACKOFF[min(attempt, len(RECONNECT_BACKOFF) - 1)]
                attempt += 1
                log.warning("redis listener lost its connection (%s); retrying in %.2fs",
                            exc, delay)
                await asyncio.sleep(delay)

    async def _connect_and_read(self) -> None:
        pubsub = self._listener_client.pubsub()
        self._pubsub = pubsub
        await pubsub.connect()  # type: ignore[no-untyped-call]
        wanted = sorted(self._channels)
        if wanted:
            await pubsub.subscribe(*(self._pubsub_channel(c) for c in wanted))
        self._connected.set()
        await self._fill_gaps(wanted)
        last_seen = time.monotonic()
        pinged = False
        while True:
            if not pubsub.subscribed:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_PING_SECONDS)
                if not pubsub.subscribed:
                    await self.redis.ping()
                    continue
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
            if payload[:1] == b"\x1e":
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

    async def _fill_gaps(self, channels: Sequence[str]) -> None:
        """After a (re)connect, deliver what was published while we were away."""
        for channel in channels:
            after = self._last_id.get(channel)
            if after is None:
                continue
            fresh = []
            for event in await self._range(channel, after):
                assert event.id is not None
                if event.id > self._last_id.get(channel, 0):
                    self._last_id[channel] = event.id
                    fresh.append(event)
            if fresh:
                self.on_events(fresh)

    # commands
    async def _range(self, channel: str, after: int) -> list[Event]:
        entries: Any = await self.redis.xrange(self._stream_key(channel), f"({after}-0", "+")
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
        keys = [f"{self.prefix}seq", self._stream_key(channel)]
        if idempotency_key is not None:
            keys.append(f"{self.prefix}idem:{idempotency_key}")
        args = [self._pubsub_channel(channel), event or "", data, repr(now),
                self.config.retention_events, self.config.retention_seconds * 1000,
                repr(now - self.config.retention_seconds)]
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, waiter))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await waiter

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._script_loaded()
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
                continue
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

    async def replay(self, channels: Sequence[str], after: int) -> Replay:
        try:
            try:
                return await self._replay(channels, after)
            except ConnectionError:
                # The pooled connection died with a Redis restart and this was the
                # first command to find out. A read is safe to resend (a publish is not).
                log.info("redis command connection was closed; reading the replay again")
                return await self._replay(channels, after)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc}") from exc

    async def _replay(self, channels: Sequence[str], after: int) -> Replay:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(f"{self.prefix}seq")
            for channel in channels:
                pipe.xinfo_stream(self._stream_key(channel))
            results = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], Exception):
            raise results[0]
        head = int(results[0] or 0)
        if after > head:
            return Replay(reset=True, head=head)
        for info in results[1:]:
            if isinstance(info, Exception):
                continue  # no such stream: nothing retained, nothing deleted
            deleted = info.get("max-deleted-entry-id") or b"0-0"
            if after < _stream_id(deleted):
                return Replay(reset=True, head=head)
        events: list[Event] = []
        for channel in channels:
            events.extend(await self._range(channel, after))
        events.sort(key=lambda e: e.id or 0)
        return Replay(events, head=head)

    @property
    def listener_up(self) -> bool:
        return self._connected.is_set()

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc}") from exc
