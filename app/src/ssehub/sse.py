"""SSE wire format: events, frames, the stream's headers and the fixed byte strings.

The one place the bytes of a stream are decided, for ``/events/`` (stream.py)
and ``@sse_stream`` views (decorators.py) alike: the headers, the preamble, how
an event and its data are framed, heartbeats, the drain comment and
``event: reset``.

Must not: run per subscriber (a frame is built once per event per process and
shared, as ``bytes``, by every subscriber), do I/O, or import another module of
the hub (the brokers build events with it).

Design choices:
- Data lines are split on CRLF, CR and LF and joined with LF only (I6): an SSE
  parser treats all three as line ends, so CR cannot travel inside ``data``
  (send JSON to carry it; JSON escapes it). Other characters, U+2028 included,
  pass untouched, which is why this does not use ``str.splitlines``.
- Ids are decimal integers that order events on every broker.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

_LINE_BREAK = re.compile(r"\r\n|\r|\n")

HEARTBEAT = b":\n\n"
DRAINING = b": draining, reconnect\n\n"
# The event name of the hub's own resets (a Last-Event-ID it cannot replay, a lost
# history): clients resync on it, so publishers may not send it (publishing.py).
RESET = "reset"

# Headers of every stream, as Django names them (``@sse_stream``). Never
# ``Connection``, ``Content-Length`` or ``Content-Encoding`` (D4, A6);
# ``Cache-Control: no-cache`` (A7) and ``X-Accel-Buffering: no`` (A1).
STREAM_HEADERS = (
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
)
# The same as an ASGI ``http.response.start`` sends them (``/events/``).
ASGI_STREAM_HEADERS = [(name.lower().encode(), value.encode()) for name, value in STREAM_HEADERS]


@dataclass(slots=True)
class Event:
    """One event on one channel. ``id`` is None for raw broker messages (live only)."""

    channel: str
    data: str
    event: str | None = None
    id: int | None = None
    published_at: float | None = None
    frame: bytes = field(init=False, repr=False, compare=False)
    chunk: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.frame = encode(self.data, self.event, self.id)
        self.chunk = chunked(self.frame)


def data_text(value: Any) -> str:
    """An event's data: a string as it is, any other value as compact JSON.

    One encoding for the publish API (publishing.py) and ``@sse_stream`` yields:
    UTF-8 kept as it is, no spaces, and only JSON (NaN and infinities raise
    ValueError, as an unserialisable value raises TypeError).
    """
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def chunked(frame: bytes) -> bytes:
    """The frame as one HTTP/1.1 chunk, built once so fan-out writes it as it is."""
    return b"%x\r\n%b\r\n" % (len(frame), frame)


def encode(data: str, event: str | None = None, event_id: int | str | None = None) -> bytes:
    """Encode one SSE frame: ``id:``, ``event:``, one ``data:`` per line, blank line.

    A CR or LF in ``event`` or ``event_id`` would start another field (a forged
    ``data:`` or ``id:``): ValueError. The publish API refuses such names with a
    400 before they get here; this guards every other caller (``@sse_stream``).
    """
    head = ""
    if event_id is not None:
        head = f"id: {event_id}\n"
        if not isinstance(event_id, int) and _LINE_BREAK.search(event_id):
            raise ValueError(f"an SSE id must not contain CR or LF: {event_id!r}")
    if event:
        if _LINE_BREAK.search(event):
            raise ValueError(f"an SSE event name must not contain CR or LF: {event!r}")
        head += f"event: {event}\n"
    body = "data: " + "\ndata: ".join(_LINE_BREAK.split(data))
    return f"{head}{body}\n\n".encode()


def reset(fields: dict[str, Any], event_id: int | None) -> bytes:
    """``event: reset`` with ``fields`` as its JSON data and the id to resume from."""
    return encode(json.dumps(fields), RESET, event_id)


def preamble(retry_ms: int, last_id: int | None = None) -> bytes:
    """First bytes of a stream: a jittered ``retry:`` (I3) and a comment, sent at once (A3).

    ``last_id`` (a new stream: the newest id when it subscribed) goes out as a bare
    ``id:``. A browser sets its Last-Event-ID from it without dispatching an event
    (no data), so a stream that is cut before its first event still reconnects
    with an id and gets what it missed, instead of only what comes next.
    """
    jittered = retry_ms + random.randint(0, retry_ms)  # noqa: S311 - jitter, not security
    start_id = f"id: {last_id}\n" if last_id else ""
    return f"retry: {jittered}\n: ssehub stream open\n{start_id}\n".encode()
