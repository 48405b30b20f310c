"""In-process broker: the embedded default for development and tests.

Ids start at the process's start time in microseconds, so an id handed out
before a restart is older than anything this process holds and gets a reset,
never a wrong replay. Nothing crosses processes: ``ssehub serve`` runs a single
process with this broker.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Sequence

from ..channels import scoped_key
from ..conf import Config
from ..sse import Event
from . import Broker, Page, Published, Replay, new_history_base


class MemoryBroker(Broker):
    def __init__(self, url: str, config: Config) -> None:
        super().__init__(url, config)
        self._start_id = new_history_base(time.time())
        self._head = self._start_id
        self._streams: dict[str, deque[Event]] = {}
        self._floors: dict[str, int] = {}
        self._idempotency: dict[str, tuple[int, float]] = {}
        self._listening: set[str] = set()
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        self._listening.clear()

    async def listen(self, channel: str) -> None:
        self._listening.add(channel)

    async def unlisten(self, channel: str) -> None:
        self._listening.discard(channel)

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
        if idempotency_key is not None:
            idempotency_key = scoped_key(channel, idempotency_key)
            known = self._idempotency.get(idempotency_key)
            if known and known[1] > now:
                return Published.earlier(known[0])
        self._head += 1
        item = Event(channel, data, event, self._head, now)
        stream = self._streams.setdefault(channel, deque())
        stream.append(item)
        self._trim(channel, stream, now)
        if idempotency_key is not None:
            self._idempotency[idempotency_key] = (self._head, now + self.config.retention_seconds)
            if len(self._idempotency) > 100_000:
                self._idempotency = {k: v for k, v in self._idempotency.items() if v[1] > now}
        if channel in self._listening:
            asyncio.get_running_loop().call_soon(self.on_events, [item])
        return self._head

    async def replay(self, channels: Sequence[str], after: int,
                     limit: int | None = None) -> Replay:
        if after > self._head:
            return Replay(reset=True, head=self._head)
        if 0 < after < self._start_id:  # an id of an earlier process: that history is gone
            return Replay(reset=True, head=self._head, reason="history lost")
        page = Page(limit)
        for channel in channels:
            if after < self._floors.get(channel, 0):
                return Replay(reset=True, head=self._head)
            end = page.end
            newer = (e for e in self._streams.get(channel, ())
                     if e.id and e.id > after and (end is None or e.id <= end))
            page.add(list(itertools.islice(newer, limit)))
        return Replay(page.events, head=self._head, more=page.more)

    async def ping(self) -> None:
        return None
