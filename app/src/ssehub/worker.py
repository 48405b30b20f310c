"""The gunicorn worker class: uvicorn with the hub's shutdown bound.

uvicorn waits for open connections on shutdown; with endless streams that is
forever (E2/E3). The hub closes its streams on SIGTERM (``@sse_stream`` views
too), and ``timeout_graceful_shutdown`` bounds whatever is left (other
long requests) at ``SSEHUB_DRAIN_SECONDS``.
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker

from . import conf


class HubWorker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "auto",
        "http": "auto",
        "lifespan": "on",
        "server_header": False,
        "timeout_graceful_shutdown": int(conf.get().drain_seconds) or 1,
    }
