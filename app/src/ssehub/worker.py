"""The gunicorn worker class: uvicorn with the hub's shutdown bound.

uvicorn waits for open connections on shutdown; with endless streams that is
forever (E2/E3). The hub closes its streams on SIGTERM (``@sse_stream`` views
too), and ``timeout_graceful_shutdown`` bounds whatever is left (other
long requests) at ``SSEHUB_DRAIN_SECONDS``.
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string
from uvicorn_worker import UvicornWorker

from . import conf

log = logging.getLogger(__name__)

# The protocol whose response cycle subscriber.direct_cycle writes to.
DIRECT_PROTOCOL_MODULE = "uvicorn.protocols.http.httptools_impl"


def takes_direct_path(http: Any) -> bool:
    """Whether uvicorn's ``http`` setting ("auto", a name or a class) gives the
    httptools protocol, whose transport the hub writes streams to directly."""
    protocol = import_from_string(HTTP_PROTOCOLS[http]) if isinstance(http, str) else http
    return bool(getattr(protocol, "__module__", "") == DIRECT_PROTOCOL_MODULE)


class HubWorker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "auto",
        "http": "auto",
        "lifespan": "on",
        "server_header": False,
        "timeout_graceful_shutdown": int(conf.get().drain_seconds) or 1,
    }

    def run(self) -> None:
        # Said at startup, once the app (and the log configuration) is loaded, so an
        # upgrade that loses the fast path shows in the log and in ssehub_direct_path
        # before any benchmark; ssehub_streams_opened_total counts each stream's
        # real path. Imported here, in the worker: a gauge the master made would
        # count too (its 0 would hold the livemin down).
        from . import metrics

        direct = takes_direct_path(self.config.http)
        metrics.DIRECT_PATH.set(1 if direct else 0)
        if direct:
            log.info("streams take the direct path (uvicorn's httptools transport)")
        else:
            log.warning("streams take the plain ASGI path (uvicorn's HTTP protocol here is "
                        "not httptools): about a quarter of the direct path's deliveries a "
                        "second; install httptools")
        super().run()
