"""Brokers: where events are stored, numbered and fanned out between processes.

One small interface, three implementations chosen by ``SSEHUB_BROKER_URL``:
``redis://`` (deployed default), ``postgres://`` (LISTEN/NOTIFY, no extra
infrastructure) and ``memory://`` (one process, development and tests). The
Redis and PostgreSQL brokers' listeners (reconnect, history check, gap fill)
share one base, ``listener.ListenerBroker``.

Contract every broker keeps (``tests/test_broker_contract.py`` runs the same
tests against all three):

- ``publish`` stores the event durably, gives it an integer id larger than every
  id issued before, and only then makes it visible to listeners.
- A process holds a fixed number of broker connections (one listener, one for
  commands), never one per subscriber. ``listen``/``unlisten`` change the
  listener's interest; ``listen`` returns once the interest is in effect, so a
  replay that follows it cannot miss an event published in between.
- ``on_events`` is called on the event loop with the events that arrived
  together (a burst read at once), in id order per channel, at most once per
  id per process (duplicates from a reconnect's gap fill are dropped
  here, not per subscriber).
- ``replay(channels, after, limit)`` returns the retained events with
  ``id > after`` in id order: at most ``limit`` of them (``Page``), with
  ``more`` set when the store may hold newer ones (the caller reads on from the
  last id), or ``reset`` when ``after`` is older than retention on one of the
  channels, newer than anything the broker issued, or from a history the
  store lost (ids carry their history: a new one starts above every id an
  older one issued).
- When the listener finds that the store lost the history it delivered from
  (a wiped or restored store, a replica that lagged), it calls ``on_reset``
  with its channels and the id a client resumes from, then delivers the new
  history's events. Nothing is dropped as a duplicate that was not delivered.
- Raw messages from outside (``redis-cli PUBLISH``, psql ``NOTIFY``) reach
  listeners as events with ``id=None``: live only, never stored.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..conf import Config
from ..sse import Event

EventCallback = Callable[[list[Event]], None]

ABOVE_EVERY_ID = 2**63
# A new history's first id: the clock in microseconds. Below 2**53 until 2255,
# so JavaScript numbers hold it exactly; a history overlaps a later one only if
# it averaged more than a million events a second over its life.
ID_BASE_PER_SECOND = 1_000_000


def new_history_base(now: float) -> int:
    """The epoch of a history started at ``now``: its ids are above it."""
    return int(now * ID_BASE_PER_SECOND)


# (channels whose stored history is gone, the id their streams resume from)
ResetCallback = Callable[[list[str], int], None]


class BrokerUnavailable(Exception):
    """The broker cannot store or read events right now (HTTP 503)."""


class Published(int):
    """The id ``Broker.publish`` returns; ``repeat`` is true when an Idempotency-Key
    matched an earlier event, so nothing new was stored (metrics count only new ones)."""

    repeat = False

    @classmethod
    def earlier(cls, event_id: int) -> Published:
        known = cls(event_id)
        known.repeat = True
        return known


@dataclass
class Replay:
    events: list[Event] = field(default_factory=list)
    reset: bool = False
    head: int = 0
    # Why a reset, when the broker knows better than "unknown id" or "older than retention".
    reason: str = ""
    # The store holds events after the last of ``events``: read the next page from there.
    more: bool = False


class Page:
    """One page of a replay over several channels, merged in id order.

    Each channel is read with at most ``limit`` events, none above ``end``. A range
    that comes back full may hold more after its last id, so the page ends there;
    and the page keeps only its first ``limit`` events. Every retained event up to
    the page's last id is then in it, the next page starts after that id, and no
    more than two pages of events are held while one is read, whatever the
    number of channels or the history behind them.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.events: list[Event] = []
        self.end: int | None = None  # no event above this id belongs to the page
        self.more = False  # the store may hold events after the page's last id

    def add(self, part: list[Event]) -> None:
        events = self.events + part
        events.sort(key=lambda e: e.id or 0)
        limit = self.limit
        if limit is not None and len(part) >= limit:
            self.more = True
            self.end = min(self.end or part[-1].id or 0, part[-1].id or 0)
            events = [e for e in events if (e.id or 0) <= self.end]
        if limit is not None and len(events) > limit:
            del events[limit:]
            self.more = True
            self.end = events[-1].id
        self.events = events


class Broker(abc.ABC):
    def __init__(self, url: str, config: Config) -> None:
        self.url = url
        self.config = config
        self.on_events: EventCallback = lambda events: None
        self.on_reset: ResetCallback = lambda channels, head: None

    async def start(self, on_events: EventCallback,
                    on_reset: ResetCallback | None = None) -> None:
        """Connect and start the listener task."""
        self.on_events = on_events
        if on_reset is not None:
            self.on_reset = on_reset

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def listen(self, channel: str) -> None: ...

    @abc.abstractmethod
    async def unlisten(self, channel: str) -> None: ...

    @abc.abstractmethod
    async def publish(self, channel: str, data: str, event: str | None = None,
                      idempotency_key: str | None = None) -> int:
        """Store one event; its id, or the earlier event's (``Published.earlier``)
        when ``idempotency_key`` was seen within retention."""

    @abc.abstractmethod
    async def replay(self, channels: Sequence[str], after: int,
                     limit: int | None = None) -> Replay: ...

    async def head(self) -> int:
        """The newest id issued (0: none yet): a new stream's first Last-Event-ID.
        Every broker answers an ``after`` above all ids with a reset that carries it,
        before it reads any channel."""
        return (await self.replay([], ABOVE_EVERY_ID)).head

    @property
    def listener_up(self) -> bool:
        """False while the listener has no connection (no live delivery: /readyz 503)."""
        return True

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise BrokerUnavailable unless the broker answers."""


def create(config: Config, url: str | None = None) -> Broker:
    """Return the broker for ``url`` (default ``SSEHUB_BROKER_URL``)."""
    url = url or config.broker_url
    scheme = url.split("://", 1)[0]
    if scheme == "memory":
        from .memory import MemoryBroker
        return MemoryBroker(url, config)
    if scheme in {"redis", "rediss", "unix"}:
        from .redis import RedisBroker
        return RedisBroker(url, config)
    from .postgres import PostgresBroker
    return PostgresBroker(url, config)
