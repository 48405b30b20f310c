"""``publish`` and ``apublish``: the Python API for Django code.

Inside the hub process the event goes through the hub's own broker (the
memory broker only works there). Elsewhere (a management command, a Celery
worker) a broker client is created for the running event loop; memory://
cannot work across processes and says so.

``publish`` (sync) runs ``apublish`` on the hub's loop when this process runs a
hub, else on one background loop per process that keeps its broker client:
``async_to_sync`` would make a new loop, hence a new client and connection,
on every call from a script or a WSGI view, and never close them.

Owns the step from a checked publish to the broker (``apublish_checked``, which
the HTTP API calls too) and the metric of new events. Must not: authorise (the
Python API is trusted code; the HTTP API authorises in ingest.py), nor check an
event other than through publishing.py, nor block a running event loop
(``publish`` refuses to run inside one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

from . import conf, metrics
from .brokers import Broker, BrokerUnavailable, create
from .hub import get_hub
from .publishing import PublishError, checked_channel, prepare

_publishers: dict[asyncio.AbstractEventLoop, Broker] = {}
_background: asyncio.AbstractEventLoop | None = None
_background_lock = threading.Lock()
# A sync publish waits at most this long (the brokers bound their own commands
# well inside it); then it raises BrokerUnavailable, as the HTTP API answers 503.
SYNC_PUBLISH_TIMEOUT = 30.0


def _broker_for_this_loop() -> Broker:
    loop = asyncio.get_running_loop()
    hub = get_hub()
    if hub is not None and hub.loop is loop:
        return hub.broker
    config = conf.get()
    if config.embedded:
        raise PublishError("memory:// publishes only inside the hub process; "
                           "set SSEHUB_BROKER_URL or publish over HTTP (ssehub publish)")
    for stale in [known for known in _publishers if known.is_closed()]:
        del _publishers[stale]
    broker = _publishers.get(loop)
    if broker is None:
        broker = _publishers[loop] = create(config)
    return broker


async def apublish(channel: str, data: Any, event: str | None = None, *,
                   idempotency_key: str | None = None) -> int:
    """Store one event and return its id. ``data`` is a string or any JSON value."""
    return await apublish_checked(checked_channel(channel), data, event,
                                  idempotency_key=idempotency_key)


async def apublish_checked(channel: str, data: Any, event: Any = None, *,
                           idempotency_key: Any = None) -> int:
    """``apublish`` to a ``channel`` that ``publishing.checked_channel`` returned (the
    HTTP API checks it before the token's scope): the channel is checked once."""
    config = conf.get()
    item = prepare(channel, data, event, idempotency_key, max_bytes=config.max_event_bytes)
    broker = _broker_for_this_loop()
    event_id = await broker.publish(item.channel, item.data, item.event, item.idempotency_key)
    if not getattr(event_id, "repeat", False):
        metrics.PUBLISHED.inc()
    return int(event_id)


def _background_loop() -> asyncio.AbstractEventLoop:
    """The process's loop for sync publishes outside the hub, started once."""
    global _background
    with _background_lock:
        if _background is None or _background.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="ssehub-publish",
                             daemon=True).start()
            _background = loop
        return _background


def publish(channel: str, data: Any, event: str | None = None, *,
            idempotency_key: str | None = None) -> int:
    """Synchronous ``apublish`` for sync views, signals and scripts."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("ssehub.publish() blocks; in async code use await ssehub.apublish()")
    hub = get_hub()
    loop = hub.loop if hub is not None and hub.loop is not None and hub.loop.is_running() \
        else _background_loop()
    future = asyncio.run_coroutine_threadsafe(
        apublish(channel, data, event, idempotency_key=idempotency_key), loop)
    try:
        return future.result(SYNC_PUBLISH_TIMEOUT)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise BrokerUnavailable(f"no answer from the broker within {SYNC_PUBLISH_TIMEOUT:g}s") \
            from None
