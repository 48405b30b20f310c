"""The ASGI application: ``/events/`` and ``/publish/`` on thin paths, the rest in Django.

Owns the routing by path and the process's lifespan. Must not: handle a request
itself (stream.py, ingest.py, Django) nor let Django see a WebSocket upgrade.

Lifespan starts the hub (the broker listener) before the first request and
hooks SIGTERM: the server's own handler still runs (it stops accepting and
waits for connections), and ours first turns readiness red and closes every
stream with a final comment, so the wait is short and bounded (E2/E3).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ssehub.settings")

from django.core.asgi import get_asgi_application

from . import metrics
from .http import Receive, Scope, Send
from .hub import ensure_hub, get_hub, shutdown_hub
from .ingest import publish_app
from .stream import stream_app

log = logging.getLogger(__name__)

django_app = get_asgi_application()
STREAM_PATH = "/events/"
WS_POLICY_VIOLATION = 1008
PUBLISH_PATH = "/publish/"


def begin_drain() -> None:
    hub = get_hub()
    metrics.DRAINING.set(1)
    if hub is not None:
        hub.drain()


def _hook_sigterm(loop: asyncio.AbstractEventLoop) -> None:
    """Run ``begin_drain`` on SIGTERM/SIGINT, then the server's own handler."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(sig: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(begin_drain)
            if callable(previous):
                previous(sig, frame)

        try:
            signal.signal(signum, handler)
        except ValueError:  # not the main thread (tests run servers in threads)
            return


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                loop = asyncio.get_running_loop()
                if os.environ.get("PYTHONASYNCIODEBUG") or sys.flags.dev_mode:
                    # Python's asyncio debug switch; uvicorn's loop under gunicorn does
                    # not read it, so callbacks over 100 ms went unlogged (E1).
                    loop.set_debug(True)
                await ensure_hub()
                _hook_sigterm(loop)
            except Exception as exc:
                log.exception("hub failed to start")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            begin_drain()
            await shutdown_hub()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http" and scope["path"] == STREAM_PATH:
        await stream_app(scope, receive, send)
    elif scope["type"] == "http" and scope["path"] == PUBLISH_PATH:
        await publish_app(scope, receive, send)
    elif scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "websocket":
        await refuse_websocket(receive, send)
    else:
        await django_app(scope, receive, send)  # type: ignore[arg-type]


async def refuse_websocket(receive: Receive, send: Send) -> None:
    """No path speaks WebSocket: close the handshake, which servers answer with 403.

    uvicorn hands an upgrade to the app when a WebSocket library is installed, and
    Caddy forwards upgrades; Django raised on it ("Exception in ASGI application", 500).
    """
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
