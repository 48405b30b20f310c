"""``@sse_stream``: custom streams from sync or async generators (seed 001's ergonomics).

The generator may yield ``str`` (data), ``(event, data)``, a ``dict`` with
``data`` and optional ``event``/``id``, or an ``sse.Event``; data that is not a
string is sent as JSON, encoded as the publish API encodes it
(``sse.data_text``), and an event name or id with CR or LF raises ValueError
(it would forge fields). The response has the headers of ``/events/``
(``sse.STREAM_HEADERS``), starts with ``retry:`` and a comment at once, gets
heartbeat comments while the generator is quiet, and ends with the drain
comment when the hub drains. Sync generators run in the request's thread, one
step at a time, so they never block the event loop (E1/F1).

Must not: frame bytes of its own (every byte comes from sse.py), nor block the
event loop while a generator computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, StreamingHttpResponse

from . import conf, sse
from .hub import get_hub

_DONE = object()


def _frame(item: Any) -> bytes:
    if isinstance(item, sse.Event):
        return item.frame
    if isinstance(item, str):
        return sse.encode(item)
    if isinstance(item, tuple) and len(item) == 2:
        return sse.encode(sse.data_text(item[1]), str(item[0]))
    if isinstance(item, dict) and "data" in item:
        return sse.encode(sse.data_text(item["data"]), item.get("event"), item.get("id"))
    raise TypeError(f"@sse_stream generators yield str, (event, data), dict or Event, not {item!r}")


async def _as_async(gen: Generator[Any, None, None]) -> AsyncIterator[Any]:
    # thread_sensitive: every step runs in the request's own thread (Django's ASGI
    # handler gives each request one), where Django closes the request's database
    # connections when the response ends (F5); in pool threads they stayed open.
    advance = sync_to_async(lambda: next(gen, _DONE), thread_sensitive=True)
    step: asyncio.Future[Any] | None = None
    try:
        while True:
            # shielded: a cancelled stream (the client left) leaves the step running in
            # its thread, and a generator cannot be closed while it executes
            step = asyncio.ensure_future(advance())
            item = await asyncio.shield(step)
            if item is _DONE:
                return
            yield item
    finally:
        if step is not None and not step.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait([step])
        # close() runs the generator's finally blocks (its cleanup) in a thread too
        await sync_to_async(gen.close, thread_sensitive=True)()


async def _with_heartbeats(source: AsyncIterator[Any], heartbeat: float,
                           retry_ms: int) -> AsyncIterator[bytes]:
    yield sse.preamble(retry_ms)
    pending: asyncio.Task[Any] | None = None
    # On SIGTERM the hub drains: these streams end with its final comment too, so
    # clients reconnect elsewhere at once instead of being cut at the shutdown bound.
    hub = get_hub()
    drained = asyncio.ensure_future(hub.drained.wait()) if hub is not None else None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source, _DONE))
            done, _ = await asyncio.wait({pending} if drained is None else {pending, drained},
                                         timeout=heartbeat,
                                         return_when=asyncio.FIRST_COMPLETED)
            if drained is not None and drained in done:
                yield sse.DRAINING
                return
            if not done:
                yield sse.HEARTBEAT
                continue
            item, pending = pending.result(), None
            if item is _DONE:
                return
            yield _frame(item)
    finally:
        if drained is not None:
            drained.cancel()
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


def sse_stream(view: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a generator view into an SSE response with the hub's headers and heartbeats."""

    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> StreamingHttpResponse:
        config = conf.get()
        result = view(request, *args, **kwargs)
        source = result if hasattr(result, "__anext__") else _as_async(result)
        response = StreamingHttpResponse(
            _with_heartbeats(source, config.heartbeat, config.retry_ms))
        for name, value in sse.STREAM_HEADERS:  # the /events/ stream's, in the same order
            response[name] = value
        return response

    return wrapper
