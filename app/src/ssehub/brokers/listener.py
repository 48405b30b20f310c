"""What the Redis and PostgreSQL brokers' listeners share: the reconnect loop,
the last-id bookkeeping, the history check and the gap fill.

A listener holds one connection that announces events (pub/sub, LISTEN) and
keeps, per listened channel, the last id it delivered. This base owns:

- the reconnect loop (G3): anything that ends a connection, a bug on the
  delivery path included, is logged and followed by a new connection after a
  backoff that starts again once a connection worked. The listener never dies:
  every stream of the worker would go silent while /readyz said 200;
- the history check: when it connects and every ``HISTORY_CHECK_SECONDS``
  (never per event) it compares the store's sequence and epoch with the
  history it delivered from, and a lost history sends ``on_reset`` (J2);
- the gap fill (G2/H6): after a connect, or a lost history, it reads from the
  store what came after each channel's last id, and hands over only ids above
  it, so nothing arrives twice and nothing published meanwhile is missed.

A broker plugs in how it connects and reads its announcements
(``_connect_and_read``, which sets ``_up`` and ``_was_connected`` where its
connection counts as working), and how it reads the store through ``store``
(PostgreSQL: the listener's own connection; Redis: the command connection, as a
subscribed one takes no other command): ``_read_history``, ``_start_history``,
``_read_after``. The per-event path (reading a burst and handing it to
``on_events``) stays the broker's own; only PostgreSQL's, which reads a burst's
rows by id, drops duplicates through ``_deliver_new`` as the gap fill does.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import ClassVar, Generic, TypeVar

from ..conf import Config
from ..sse import Event
from . import Broker, EventCallback, ResetCallback

log = logging.getLogger(__name__)

# Starts an announcement of a stored event (its id follows); a raw message from
# outside (redis-cli PUBLISH, psql NOTIFY) lacks it and is delivered live only.
# The Redis publish script writes it as the Lua escape '\30' (record separator).
MARKER = "\x1e"
RECONNECT_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0)
# How often a connected listener checks that the store's history is still the
# one it delivered from (one round trip, not per event).
HISTORY_CHECK_SECONDS = 5.0

Store = TypeVar("Store")


class ListenerBroker(Broker, Generic[Store]):
    kind: ClassVar[str]  # in log lines: "redis listener lost its connection"
    task_name: ClassVar[str]
    # What a lost connection raises; anything else is also logged with its traceback.
    connection_errors: ClassVar[tuple[type[BaseException], ...]]

    def __init__(self, url: str, config: Config) -> None:
        super().__init__(url, config)
        self._channels: set[str] = set()  # the channels listened to
        # The history delivered from: the last id seen per listened channel, the
        # highest of channels no longer listened to, and the store's epoch when
        # last read (None: not read yet).
        self._last_id: dict[str, int] = {}
        self._high = 0
        self._epoch: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = False  # listener_up
        self._was_connected = False  # since the last loss: the backoff starts again

    async def start(self, on_events: EventCallback,
                    on_reset: ResetCallback | None = None) -> None:
        await super().start(on_events, on_reset)
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    @property
    def listener_up(self) -> bool:
        return self._up

    # the broker's parts
    @abc.abstractmethod
    async def _connect_and_read(self) -> None:
        """Connect, check the history, subscribe, fill the gaps, then read and
        deliver until the connection fails (raise)."""

    async def _disconnect(self) -> None:
        """After a loss: release what ``_connect_and_read`` left open."""

    @abc.abstractmethod
    async def _read_history(self, store: Store) -> tuple[int, int | None]:
        """The store's sequence (the newest id issued) and epoch (None: no history)."""

    @abc.abstractmethod
    async def _start_history(self, store: Store, high: int) -> int:
        """Make sure the store has a history that holds every id up to ``high``
        (a new one above it when its sequence is below); return its epoch."""

    @abc.abstractmethod
    async def _read_after(self, store: Store, channel: str, after: int) -> list[Event]:
        """The stored events of ``channel`` with ids above ``after``, in id order."""

    # the shared listener
    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect_and_read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Connection trouble, or a bug on the delivery path: either way the
                # listener must not die (every stream of the worker would go silent
                # while /readyz says 200). Reconnect; the gap fill redelivers.
                if not isinstance(exc, self.connection_errors):
                    log.exception("%s listener failed; reconnecting", self.kind)
                self._up = False
                await self._disconnect()
                if self._was_connected:  # a new loss: the backoff starts again
                    attempt, self._was_connected = 0, False
                delay = RECONNECT_BACKOFF[min(attempt, len(RECONNECT_BACKOFF) - 1)]
                attempt += 1
                log.warning("%s listener lost its connection (%s); retrying in %.2fs",
                            self.kind, exc, delay)
                await asyncio.sleep(delay)

    def _forget(self, channel: str) -> None:
        """No more interest in ``channel``: its last id still counts as seen."""
        self._channels.discard(channel)
        self._high = max(self._high, self._last_id.pop(channel, 0))

    @staticmethod
    def _history_check_due() -> float:
        """When the next periodic history check is due, from now."""
        return time.monotonic() + HISTORY_CHECK_SECONDS

    async def _recheck_history(self, store: Store) -> float:
        """The periodic history check of a connected listener, with the gap fill
        of a lost history; returns when the next is due."""
        due = self._history_check_due()
        if await self._check_history(store):
            await self._fill_gaps(store, sorted(self._channels))
        return due

    async def _check_history(self, store: Store) -> bool:
        """Compare the store's history (its sequence and epoch, read now) with the
        one delivered from; True if it was lost.

        A store without a history, or whose sequence is below the ids seen, gets one
        from ``_start_history(store, highest id seen)`` (a new history above them),
        so a later wipe is always told apart from a store that never had one. On a
        loss every stream of the listened channels gets ``event: reset``
        (``on_reset``), and the gap fill starts where the store's history now begins.
        """
        seq, epoch = await self._read_history(store)
        high = max(self._high, *self._last_id.values(), 0)
        known = self._epoch
        if epoch is None or seq < high:
            epoch = await self._start_history(store, high)
            # Events stored after the sequence went back are new: deliver them.
            start = dict.fromkeys(self._last_id, seq)
            lost = known is not None or seq < high
            reason = f"the store's sequence went back from {high} to {seq}"
        else:
            # Ids of another history start above its epoch; what was delivered live
            # of it already (a check while connected) is not sent again.
            start = {c: max(epoch, i) for c, i in self._last_id.items()}
            lost = known is not None and epoch != known
            reason = f"the store holds another history (epoch {known} is now {epoch})"
        self._epoch = epoch
        if not lost:
            return False
        log.warning("%s: stored history lost: %s; streams of %d channels get a reset",
                    type(self).__name__, reason, len(self._last_id))
        self._high = 0
        self._last_id.update(start)
        self.on_reset(sorted(self._last_id), epoch)
        return True

    async def _fill_gaps(self, store: Store, channels: Sequence[str]) -> None:
        """Deliver what the store holds after each channel's last id (after a
        (re)connect: what was published while the listener was away)."""
        for channel in channels:
            after = self._last_id.get(channel)
            if after is None:
                continue
            self._deliver_new(await self._read_after(store, channel, after))

    def _deliver_new(self, events: list[Event]) -> None:
        """Hand over the events whose ids are above their channel's last id, and
        move it: a duplicate of a gap fill is dropped here, once for all streams."""
        fresh = []
        for event in events:
            assert event.id is not None
            if event.id > self._last_id.get(event.channel, 0):
                self._last_id[event.channel] = event.id
                fresh.append(event)
        if fresh:
            self.on_events(fresh)
