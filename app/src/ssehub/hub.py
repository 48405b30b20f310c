"""Per-process fan-out: one broker listener, many subscribers.

Owns: which subscribers follow which channel, the broker's interest in each
channel, the fan-out of what the broker reads (``_on_events``: the hot path),
heartbeats and the write timeout (``_beat``), drain and lost histories, and the
age limit on a replay's pages (``replay``). A subscriber's own state and writes
are subscriber.py's; the HTTP side of a stream is stream.py's, its replay
replay.py's.

Must not: per event and subscriber, do anything but ``Subscriber.push`` (no
encoding, no I/O of its own, no token check, no metric, no await), nor talk
HTTP.

Design choices (read before "simplifying"):
- One Hub per worker process. The broker calls ``_on_events`` with the events
  it read at once; each event's frame was encoded once, and a burst on one
  channel is joined once (``Batch``); each stream gets the same bytes, written
  straight to its socket when it is idle and writable (one syscall per stream
  per burst), else appended to its buffer for its own task. No per-subscriber
  encoding, I/O, token check or metric update happens per event: metrics are
  updated once per burst with the delivery count.
- Each subscriber has a bounded buffer. A subscriber whose buffer is full is
  slow: it is closed and counted (G1); its reconnect replays from storage, so
  memory stays bounded and nothing is lost.
- Interest in a channel is registered with the broker once per process, when
  its first local subscriber arrives; it is dropped ``UNLISTEN_DELAY`` seconds
  after the last one leaves (F3: released well within 2 s; the delay avoids
  SUBSCRIBE/UNSUBSCRIBE churn when a client reconnects at once).
- Heartbeats come from one task per process, not a timer per stream.
- ``drain()`` (SIGTERM) closes every stream with a final comment so clients
  reconnect through the proxy to another app server (E2).
- When the broker finds its stored history gone (``_on_history_lost``), every
  stream of those channels gets ``event: reset`` with the id to resume from,
  its replay floor is cleared (the new ids may be lower than the old), and a
  metric and a log line say so: a loss is never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from . import metrics, sse
from .brokers import Broker, BrokerUnavailable, Replay, create
from .conf import Config
from .sse import Event
from .subscriber import Subscriber

log = logging.getLogger(__name__)

UNLISTEN_DELAY = 1.0
LISTEN_TIMEOUT = 5.0


class Frame:
    """A fixed frame with no id (heartbeats, the drain comment)."""

    __slots__ = ("chunk", "frame", "id")

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.chunk = sse.chunked(frame)
        self.id: int | None = None


class Batch:
    """Consecutive events of one channel that arrived together, written as one."""

    __slots__ = ("chunk", "events", "frame", "id")

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.frame = b"".join([event.frame for event in events])
        self.chunk = sse.chunked(self.frame)
        self.id = events[-1].id


HEARTBEAT = Frame(sse.HEARTBEAT)
DRAINING = Frame(sse.DRAINING)


class Hub:
    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.broker = broker or create(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.drained = asyncio.Event()  # set by drain(): custom @sse_stream views end too
        self._by_channel: dict[str, set[Subscriber]] = {}
        self._interest: dict[str, asyncio.Task[None]] = {}
        self._unlisten: dict[str, asyncio.TimerHandle] = {}
        self._subscribers: set[Subscriber] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._started = False
        self._background: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.loop = asyncio.get_running_loop()
        await self.broker.start(self._on_events, self._on_history_lost)
        self._heartbeat = asyncio.create_task(self._beat(), name="ssehub-heartbeat")

    async def close(self) -> None:
        if self._heartbeat:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        for handle in self._unlisten.values():
            handle.cancel()
        await self.broker.close()

    # the hot path
    def _on_events(self, events: list[Event]) -> None:
        """Fan out what the broker read at once: one write per stream per channel burst."""
        newest = events[-1]
        if newest.published_at is not None:
            metrics.BROKER_LAG.set(max(0.0, time.time() - newest.published_at))
        if len(events) == 1:
            subscribers = self._by_channel.get(newest.channel)
            if subscribers:
                taken = 0
                for subscriber in subscribers:
                    if subscriber.push(newest):
                        taken += 1
                metrics.DELIVERED.inc(taken)
            return
        by_channel: dict[str, list[Event]] = {}
        for event in events:
            by_channel.setdefault(event.channel, []).append(event)
        delivered = 0
        mixed: set[Subscriber] = set()
        for channel, group in by_channel.items():
            subscribers = self._by_channel.get(channel)
            if not subscribers:
                continue
            item = group[0] if len(group) == 1 else Batch(group)
            for subscriber in subscribers:
                if len(subscriber.channels) > 1:
                    mixed.add(subscriber)
                elif subscriber.push(item):
                    delivered += len(group)  # (a Batch the floor cut counts whole)
        # Streams of several channels get the burst event by event, in id order.
        for event in events if mixed else ():
            for subscriber in mixed:
                if event.channel in subscriber.channels and subscriber.push(event):
                    delivered += 1
        metrics.DELIVERED.inc(delivered)

    def _on_history_lost(self, channels: list[str], head: int) -> None:
        """The broker lost the history these channels were delivered from."""
        affected: set[Subscriber] = set()
        for channel in channels:
            affected.update(self._by_channel.get(channel, ()))
        reset = Frame(sse.reset({"reason": "history lost"}, head))
        for subscriber in affected:
            subscriber.history_lost(reset)
        metrics.HISTORY_RESETS.inc()
        metrics.STREAM_RESETS.inc(len(affected))
        log.warning("stored history lost on %d channels: %d streams got event: reset (id %d)",
                    len(channels), len(affected), head)

    async def _beat(self) -> None:
        """Heartbeats, and the write timeout: a stream whose send has waited on its
        client for longer than SSEHUB_WRITE_TIMEOUT is dropped (checked once a
        heartbeat, so within the timeout plus one heartbeat)."""
        while True:
            await asyncio.sleep(self.config.heartbeat)
            stuck = time.monotonic() - self.config.write_timeout
            for subscriber in list(self._subscribers):
                try:
                    if 0.0 < subscriber.sending < stuck:
                        subscriber.drop("write timeout")
                    else:
                        subscriber.push(HEARTBEAT)
                except Exception:  # one broken stream must not stop the heartbeats
                    log.exception("heartbeat to a stream of %s failed",
                                  ",".join(subscriber.channels))

    async def replay(self, channels: Sequence[str], after: int,
                     limit: int | None = None) -> Replay:
        """The broker's replay (a page of at most ``limit`` events), with the age
        limit applied when it is read too.

        Brokers trim by age when a channel gets a publish, so a quiet channel still
        holds events older than SSEHUB_RETENTION_SECONDS: a client that missed one
        of those gets a reset, as the contract says, not a stale replay.
        """
        replay = await self.broker.replay(channels, after, limit)
        if not replay.reset and replay.events:
            oldest = replay.events[0].published_at
            if oldest is not None and oldest < time.time() - self.config.retention_seconds:
                return Replay(reset=True, head=replay.head)
        return replay

    # subscribers
    @property
    def open_streams(self) -> int:
        return len(self._subscribers)

    async def subscribe(self, channels: Iterable[str],
                        task: asyncio.Task[Any] | None = None) -> Subscriber:
        """Register a subscriber; return once the broker delivers its channels."""
        subscriber = Subscriber(tuple(channels), self.config.subscriber_buffer, task)
        waits = []
        for channel in subscriber.channels:
            self._by_channel.setdefault(channel, set()).add(subscriber)
            handle = self._unlisten.pop(channel, None)
            if handle is not None:
                handle.cancel()
            task = self._interest.get(channel)
            if task is None:
                task = asyncio.ensure_future(self.broker.listen(channel))
                self._interest[channel] = task
            waits.append(task)
        self._subscribers.add(subscriber)
        metrics.OPEN_STREAMS.inc()
        try:
            async with asyncio.timeout(LISTEN_TIMEOUT):
                for task in waits:
                    await asyncio.shield(task)
        except BaseException as exc:
            self.unsubscribe(subscriber)
            if isinstance(exc, (TimeoutError, BrokerUnavailable)):
                raise BrokerUnavailable("the broker did not confirm the subscription") from exc
            raise
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber not in self._subscribers:
            return
        self._subscribers.discard(subscriber)
        metrics.OPEN_STREAMS.dec()
        subscriber.closed = True
        for channel in subscriber.channels:
            members = self._by_channel.get(channel)
            if members is None:
                continue
            members.discard(subscriber)
            if not members:
                del self._by_channel[channel]
                assert self.loop is not None
                self._unlisten[channel] = self.loop.call_later(
                    UNLISTEN_DELAY, self._drop_interest, channel)

    def _drop_interest(self, channel: str) -> None:
        self._unlisten.pop(channel, None)
        if channel in self._by_channel:
            return
        task = self._interest.pop(channel, None)
        if task is not None and not task.done():
            task.cancel()
        pending = asyncio.ensure_future(self._safe_unlisten(channel))
        self._background.add(pending)
        pending.add_done_callback(self._background.discard)

    async def _safe_unlisten(self, channel: str) -> None:
        try:
            await self.broker.unlisten(channel)
        except Exception:  # the listener's reconnect re-subscribes only wanted channels
            log.exception("unlisten %s failed", channel)

    def drain(self) -> None:
        """Close every stream with a final comment; refuse new ones (readiness 503)."""
        if self.draining:
            return
        self.draining = True
        self.drained.set()
        log.info("draining %d streams", len(self._subscribers))
        for subscriber in list(self._subscribers):
            subscriber.finish(DRAINING)


_hub: Hub | None = None


def get_hub() -> Hub | None:
    return _hub


async def ensure_hub() -> Hub:
    """The process's hub, started on first use (lifespan startup normally does it)."""
    global _hub
    if _hub is None:
        from . import conf
        _hub = Hub(conf.get())
    if not _hub._started:
        await _hub.start()
    return _hub


async def shutdown_hub() -> None:
    global _hub
    if _hub is not None:
        hub, _hub = _hub, None
        await hub.close()
