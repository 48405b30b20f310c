"""One open stream's side of the fan-out: its buffer, its direct write, its replay floor.

Owns everything per stream that the hub and the stream's task share: the
bounded buffer (``buf``), the direct write to uvicorn's transport
(``direct_cycle``, ``attach``), the task's writes (``pump``, ``in_send``), the
live side of a Last-Event-ID replay (``floor``, ``replayed``, ``end_replay``)
and how a stream ends (``close``, ``finish``, ``drop``).

The hot path (read before "simplifying"): the hub calls ``push`` once per event
(or burst) per subscriber, so ``push`` and ``replayed`` do no encoding, no
allocation, no metric and no I/O beyond the one write, and read only this
object's fields; ``pump`` sends without an extra call per batch. Everything
else here runs once per stream, or when a stream ends. Only the stream's own
task reads ``buf``; the hub appends to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from . import metrics
from .http import Scope, Send

log = logging.getLogger(__name__)

# What send()'s owner must have for the direct write; anything else keeps the ASGI path.
DIRECT_ATTRIBUTES = ("transport", "flow", "disconnected", "chunked_encoding")


def direct_cycle(scope: Scope, send: Send) -> Any:
    """uvicorn's httptools response cycle behind ``send``, if the hub may write to it.

    The hub then writes each event's pre-built chunk straight to the transport
    (``Subscriber.push``) instead of waking this stream's task, which is what
    lets one worker reach the benchmark's figures. Only the pieces ``send`` itself
    checks are used (flow control, disconnect, chunked framing); any other server
    or protocol (h11, hypercorn, tests) keeps the plain ASGI path.
    """
    cycle = getattr(send, "__self__", None)
    if (scope["method"] != "GET" or cycle is None
            or type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl"
            or not all(hasattr(cycle, name) for name in DIRECT_ATTRIBUTES)):
        return None
    return cycle


class Subscriber:
    """One open stream. Only its own coroutine reads ``buf``; the hub appends.

    The stream's task calls, in order: ``bind`` (the connection a drop aborts),
    the replay's writes inside ``in_send`` and then ``end_replay``, ``attach`` (the
    direct write, when ``direct_cycle`` allows it), and ``pump`` until it closes.
    """

    __slots__ = ("buf", "channels", "chunked", "closed", "cycle", "dropped", "floor", "limit",
                 "sending", "task", "transport", "waiter")

    def __init__(self, channels: tuple[str, ...], limit: int,
                 task: asyncio.Task[Any] | None = None) -> None:
        self.channels = channels
        self.buf: list[Any] = []
        self.limit = limit
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.dropped = False
        # The stream's task, cancelled when it is dropped while blocked in send.
        self.task = task
        # Direct write (direct_cycle, attach): uvicorn's response cycle, set once the
        # headers are out and the replay is done; None means "wake the task instead".
        self.cycle: Any = None
        self.chunked = True
        # The connection's transport when the server has one: a drop aborts it.
        self.transport: Any = None
        # Since when (time.monotonic) the stream's task is inside send() with frames
        # it took from buf, 0.0 when it is not: uvicorn waits for a paused socket to
        # drain *before* writing them, so a direct write now would overtake them (ids
        # out of order, duplicates on replay); and Hub._beat drops a stream stuck
        # there longer than SSEHUB_WRITE_TIMEOUT.
        self.sending = 0.0
        # Ids up to here were sent by the Last-Event-ID replay (end_replay): the
        # listener may still deliver some of them live (it lags behind the replay's read).
        self.floor = 0

    # once per stream, from its task
    def bind(self, send: Send) -> None:
        """Know the connection behind ``send``, so that a drop aborts it even before
        the direct write starts."""
        self.transport = getattr(getattr(send, "__self__", None), "transport", None)

    def attach(self, cycle: Any) -> None:
        """Let the hub write to ``cycle`` (a ``direct_cycle``) itself: after the headers,
        the preamble and the replay, with nothing of this stream left in flight."""
        self.chunked = bool(cycle.chunked_encoding)
        self.cycle = cycle

    @contextlib.contextmanager
    def in_send(self) -> Iterator[None]:
        """Around the task's ``send`` of frames the hub cannot overtake (see ``sending``)."""
        self.sending = time.monotonic()
        try:
            yield
        finally:
            self.sending = 0.0

    def end_replay(self, cursor: int | None) -> None:
        """The replay sent every id up to ``cursor``: drop live events it covered, those
        buffered meanwhile now and those the listener delivers from here on (``floor``)."""
        self.floor = cursor or 0
        buffered, self.buf = self.buf, []
        self.buf.extend(item for item in buffered if not self.replayed(item))

    async def pump(self, send: Send) -> None:
        """Send what the hub buffered for this stream until it closes.

        The hub writes to the socket itself when it can (``push``); this task sends
        what it could not. While it is inside ``send`` the hub queues behind it
        (``sending``, as ``in_send`` sets it, written out here: no extra call per
        batch): uvicorn waits for a paused socket to drain before writing, and a
        direct write in that window would overtake these frames.
        """
        while True:
            await self.wait()
            batch = self.buf
            if batch:
                self.buf = []
                body = batch[0].frame if len(batch) == 1 else b"".join([e.frame for e in batch])
                self.sending = time.monotonic()
                try:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                finally:
                    self.sending = 0.0
            if self.closed:
                return

    async def wait(self) -> None:
        """Wait until something is buffered or the stream is closed."""
        if self.buf or self.closed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        try:
            await waiter
        finally:
            self.waiter = None

    # from the hub: per event, the hot path
    def push(self, item: Any) -> bool:
        """Write or queue ``item``; False when this subscriber does not take it
        (closed, dropped as slow now, or the replay already sent it)."""
        if self.closed:
            return False
        if self.floor and self.replayed(item):
            return False
        cycle = self.cycle
        if (cycle is not None and not self.buf and not self.sending
                and not cycle.flow.write_paused and not cycle.disconnected):
            # The hot path: the frame built once goes straight to the socket; no task
            # switch per subscriber per event. Anything else queues for the task.
            cycle.transport.write(item.chunk if self.chunked else item.frame)
            return True
        buf = self.buf
        if len(buf) >= self.limit:
            self.drop()
            return False
        buf.append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return True

    def replayed(self, item: Any) -> bool:
        """True when the replay already sent ``item`` (a Batch: pushes what it did not).

        Brokers deliver each channel in id order, so once a newer id passes on a
        one-channel stream nothing older can follow: the floor switches off, and
        after a rolling deploy (every client replays) the fan-out is back to
        the plain path.
        """
        floor = self.floor
        events = getattr(item, "events", None)
        if events is None:
            if item.id is None:
                return False
            if item.id <= floor:
                return True
        elif any(e.id is not None and e.id <= floor for e in events):
            for event in events:
                if event.id is None or event.id > floor:
                    self.push(event)
            return True
        elif item.id is None:
            return False
        if len(self.channels) == 1:
            self.floor = 0
        return False

    # how a stream ends
    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        self.wake()

    def finish(self, item: Any) -> None:
        """Close the stream after ``item`` (the drain comment): its task sends it last."""
        self.buf.append(item)
        self.close()

    def history_lost(self, reset: Any) -> None:
        """The store lost the history this stream was delivered from: send ``reset``, and
        forget the replay's floor (the new history's ids may be lower)."""
        self.floor = 0
        self.push(reset)

    def drop(self, why: str = "slow") -> None:
        """Disconnect a subscriber that fell behind; its writer may be blocked in send.

        ``why``: "slow" (its buffer filled) or "write timeout" (a send waited on the
        client for longer than SSEHUB_WRITE_TIMEOUT).
        """
        self.closed = True
        self.dropped = True
        self.buf = []
        metrics.DROPPED.inc()
        if why == "write timeout":
            metrics.WRITE_TIMEOUTS.inc()
        log.warning("dropped a subscriber of %s: %s (it replays on reconnect)",
                    ",".join(self.channels), why)
        transport = self.transport if self.transport is not None else (
            self.cycle.transport if self.cycle is not None else None)
        if transport is not None:
            # Abort the connection: uvicorn sees the disconnect, releases a writer
            # blocked in flow control, and the stream ends without an error (a
            # close would wait for a client that does not read to take the buffer).
            transport.abort()
            self.wake()
        elif self.task is not None and self.waiter is None:
            self.task.cancel()  # stuck writing to a client that does not read
        else:
            self.wake()
