"""In-process broker: the embedded default for development and tests.

Ids start at the process's start time in microseconds, so an id handed out
before a restart is older than anything this process holds and gets a reset,
never a wrong replay. Nothing crosses processes: ``ssehub serve`` runs a single
process with this broker.

A channel quiet for longer than the retention holds nothing, as on Redis and
PostgreSQL: channels are kept in the order they last published, so each publish
and replay drops the quiet ones from the front (at most ``EXPIRE_PER_CALL`` a
call, once a second; replay never serves a quiet channel's events meanwhile),
and idempotency keys likewise. What an expired channel held is remembered as one number, the
highest id any expired channel held: a client below it, on a channel that holds
nothing after its id, gets a reset (it cannot be told from a channel that
never had an event; the contract's "older than retention").
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Sequence

from ..channels import scoped_key
from ..conf import Config
from ..sse import Event
from . import Broker, Page, Published, Replay, new_history_base

# Quiet channels and expired idempotency keys dropped by one publish or replay:
# bounded work a call, and far more than a call adds. A call looks for them at
# most once a second (a hundredth of the retention when that is shorter), so a
# publish pays one comparison.
EXPIRE_PER_CALL = 1000


class MemoryBroker(Broker):
    def __init__(self, url: str, config: Config) -> None:
        super().__init__(url, config)
        self._start_id = new_history_base(time.time())
        self._head = self._start_id
        # Oldest publish first (a publish moves its channel to the end).
        self._streams: OrderedDict[str, deque[Event]] = OrderedDict()
        self._floors: dict[str, int] = {}
        # Oldest first: each key expires a retention after it was stored.
        self._idempotency: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # The highest id an expired channel held (0: none expired).
        self._expired_high = 0
        self._expire_at = 0.0
        self._expire_every = min(1.0, self.config.retention_seconds / 100)
        self._listening: set[str] = set()
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        self._listening.clear()

    async def listen(self, channel: str) -> None:
        self._listening.add(channel)

    async def unlisten(self, channel: str) -> None:
        self._listening.discard(channel)

    def _expire(self, now: float) -> None:
        """Drop channels quiet for longer than the retention, and expired keys."""
        if now < self._expire_at:
            return
        self._expire_at = now + self._expire_every
        cutoff = now - self.config.retention_seconds
        streams, keys = self._streams, self._idempotency
        for _ in range(EXPIRE_PER_CALL):
            channel = next(iter(streams), None)
            if channel is None or not self._quiet(streams[channel], cutoff):
                break
            self._drop(channel)
        for _ in range(EXPIRE_PER_CALL):
            key = next(iter(keys), None)
            if key is None or keys[key][1] > now:
                break
            del keys[key]

    @staticmethod
    def _quiet(stream: deque[Event], cutoff: float) -> bool:
        return not stream or (stream[-1].published_at or cutoff) < cutoff

    def _drop(self, channel: str) -> None:
        stream = self._streams.pop(channel)
        newest = stream[-1].id if stream else None
        self._expired_high = max(self._expired_high, newest or 0,
                                 self._floors.pop(channel, 0))

    def _trim(self, channel: str, stream: deque[Event], now: float) -> None:
        cutoff = now - self.config.retention_seconds
        while stream and (len(stream) > self.config.retention_events
                          or (stream[0].published_at or now) < cutoff):
            dropped = stream.popleft()
            assert dropped.id is not None
            self._floors[channel] = dropped.id

    async def publish(self, channel: str, data: str, event: str | None = None,
                      idempotency_key: str | None = None) -> int:
        now = time.time()
        self._expire(now)
        if idempotency_key is not None:
            idempotency_key = scoped_key(channel, idempotency_key)
            known = self._idempotency.get(idempotency_key)
            if known and known[1] > now:
                return Published.earlier(known[0])
        self._head += 1
        item = Event(channel, data, event, self._head, now)
        stream = self._streams.setdefault(channel, deque())
        self._streams.move_to_end(channel)
        stream.append(item)
        self._trim(channel, stream, now)
        if idempotency_key is not None:
            self._idempotency.pop(idempotency_key, None)  # an expired one: to the end
            self._idempotency[idempotency_key] = (self._head, now + self.config.retention_seconds)
        if channel in self._listening:
            asyncio.get_running_loop().call_soon(self.on_events, [item])
        return self._head

    async def replay(self, channels: Sequence[str], after: int,
                     limit: int | None = None) -> Replay:
        if after > self._head:
            return Replay(reset=True, head=self._head)
        if 0 < after < self._start_id:  # an id of an earlier process: that history is gone
            return Replay(reset=True, head=self._head, reason="history lost")
        now = time.time()
        self._expire(now)
        cutoff = now - self.config.retention_seconds
        for channel in channels:
            stream = self._streams.get(channel)
            if stream is not None and self._quiet(stream, cutoff):
                self._drop(channel)  # beyond this call's EXPIRE_PER_CALL
                stream = None
            if after < self._floors.get(channel, 0):
                return Replay(reset=True, head=self._head)
            # Below its first event, a channel holds what it held before it expired.
            first = (stream[0].id or 0) if stream else None
            if after < self._expired_high and (first is None or after < first - 1):
                return Replay(reset=True, head=self._head)
        page = Page(limit)
        for channel in channels:
            end = page.end
            newer = (e for e in self._streams.get(channel, ())
                     if e.id and e.id > after and (end is None or e.id <= end))
            page.add(list(itertools.islice(newer, limit)))
        return Replay(page.events, head=self._head, more=page.more)

    async def ping(self) -> None:
        return None
