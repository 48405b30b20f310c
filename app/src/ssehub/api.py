"""``publish`` and ``apublish``: the Python API for Django code.

Inside the hub process the event goes through the hub's own broker (the
memory broker only works there). Elsewhere (a management command, a Celery
worker) a broker client is created for the running event loop; memory://
cannot work across processes and says so.
"""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import async_to_sync

from . import conf, metrics
from .brokers import Broker, create
from .hub import get_hub
from .publishing import PublishError, prepare

_publishers: dict[asyncio.AbstractEventLoop, Broker] = {}


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
    config = conf.get()
    item = prepare(channel, data, event, idempotency_key, max_bytes=config.max_event_bytes)
    broker = _broker_for_this_loop()
    event_id = await broker.publish(item.channel, item.data, item.event, item.idempotency_key)
    metrics.PUBLISHED.inc()
    return event_id


def publish(channel: str, data: Any, event: str | None = None, *,
            idempotency_key: str | None = None) -> int:
    """Synchronous ``apublish`` for sync views, signals and scripts."""
    result: int = async_to_sync(apublish)(channel, data, event, idempotency_key=idempotency_key)
    return result
