"""Prometheus metrics, correct across gunicorn workers.

``ssehub serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker imports
this module, so every worker writes its own files and ``/metrics`` aggregates
them (gauges: live sum or max across live workers). Metrics are updated once
per event or per stream, never per subscriber per event.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
)

OPEN_STREAMS = Gauge("ssehub_open_streams", "Streams open now.", multiprocess_mode="livesum")
PUBLISHED = Counter("ssehub_events_published",
                    "Events stored through this hub (an idempotent repeat is not counted).")
DELIVERED = Counter("ssehub_events_delivered",
                    "Events handed to subscribers (one per subscriber per event).")
DROPPED = Counter("ssehub_subscribers_dropped",
                  "Subscribers disconnected because they fell behind (they replay on reconnect).")
WRITE_TIMEOUTS = Counter("ssehub_write_timeouts",
                         "Of those, streams whose client read nothing for SSEHUB_WRITE_TIMEOUT.")
BROKER_LAG = Gauge("ssehub_broker_lag_seconds",
                   "Seconds from publish to the listener receiving the event, last event seen.",
                   multiprocess_mode="livemax")
HISTORY_RESETS = Counter("ssehub_history_resets",
                         "Times this hub found the broker's stored history gone (a wiped "
                         "or restored store, a replica that lagged); its streams got a reset.")
STREAM_RESETS = Counter("ssehub_stream_resets",
                        "Streams sent event: reset because the stored history they were "
                        "delivered from is gone.")
STREAM_PATHS = Counter("ssehub_streams_opened",
                       "Streams opened, by how the hub writes to them: direct (uvicorn's "
                       "httptools transport, the fast path) or asgi (the plain ASGI send, about "
                       "a quarter of the deliveries a second).", ["path"])
DIRECT_PATH = Gauge("ssehub_direct_path",
                    "1 when the worker's HTTP protocol is uvicorn's httptools, whose transport "
                    "streams are written to directly; 0 when streams take the plain ASGI path.",
                    multiprocess_mode="livemin")
DRAINING = Gauge("ssehub_draining", "1 while the worker drains on shutdown.",
                 multiprocess_mode="livemax")


def render() -> tuple[bytes, str]:
    """The text exposition of every worker's metrics, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
