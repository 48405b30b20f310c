"""What a publish must satisfy, shared by the HTTP API (ingest.py) and the Python
API (api.py): the channel, the event name, the data and its size, the
Idempotency-Key. Each is checked once per publish, the channel included
(``checked_channel`` first, then ``prepare`` on the name it returned). A
value that is not a string becomes data as ``sse.data_text`` encodes it.

Must not: authorise (auth.py), talk to a broker (api.py) or frame an event
(sse.py, once the broker stored it and gave it its id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import channels, sse

MAX_EVENT_NAME = 64
MISSING: Any = object()  # no "data" field at all (JSON null is a value: data "null")
MAX_IDEMPOTENCY_KEY = 200
FRAMED_LINE_BYTES = len("data: ")  # what each line break of data adds to the frame
# Event names the hub sends itself and clients act on: sse.RESET (replay.py, a
# Last-Event-ID it cannot replay; hub.py, a lost history). A publisher may not forge them.
# Nor EventSource's own: a published "event: error" fires the page's onerror (its
# reconnect UI), "open" its onopen, as if the connection had failed or opened.
RESERVED_EVENTS = frozenset({sse.RESET, "error", "open"})


class PublishError(ValueError):
    """Bad input; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Publication:
    channel: str
    data: str
    event: str | None
    idempotency_key: str | None


def checked_channel(name: Any) -> str:
    """The channel a publish names, or PublishError (400)."""
    try:
        return channels.validate(name)
    except channels.InvalidChannel as exc:
        raise PublishError(str(exc)) from None


def prepare(channel: str, data: Any, event: Any = None, idempotency_key: Any = None, *,
            max_bytes: int) -> Publication:
    """Validate and normalise one event on ``channel``, a name ``checked_channel`` returned;
    raise PublishError with a reason."""
    if event == "":
        event = None  # `curl -d event=`: no name, so clients see the default "message"
    if event is not None:
        if not isinstance(event, str) or len(event) > MAX_EVENT_NAME:
            raise PublishError(f"event must be a string of 1-{MAX_EVENT_NAME} characters")
        if "\r" in event or "\n" in event:
            raise PublishError("event must not contain CR or LF")
        if "\0" in event:
            raise PublishError("event must not contain NUL (U+0000)")
        if event in RESERVED_EVENTS:
            raise PublishError(f"event {event!r} is reserved: the hub sends it itself")
        try:
            event.encode()  # the brokers fail on it below the API otherwise
        except UnicodeEncodeError:
            raise PublishError("event is not valid Unicode (lone surrogate)") from None
    if data is MISSING:
        raise PublishError("data is required (a string or any JSON value)")
    if not isinstance(data, str):  # JSON null included: data "null"
        try:
            data = sse.data_text(data)
        except (TypeError, ValueError) as exc:
            raise PublishError(f"data is not JSON-serialisable: {exc}") from None
        except RecursionError:
            raise PublishError("data is not JSON-serialisable: nested too deeply") from None
    try:
        size = len(data.encode())
    except UnicodeEncodeError:
        raise PublishError("data is not valid Unicode (lone surrogate)") from None
    if "\0" in data:
        # PostgreSQL's text cannot hold it; refused on every broker alike, so moving
        # to another broker never changes what publishers may send.
        raise PublishError("data must not contain NUL (U+0000)")
    if size > max_bytes:
        raise PublishError(f"data is {size} bytes, above SSEHUB_MAX_EVENT_BYTES={max_bytes}", 413)
    # Framed, every line of data gets its own "data: " (sse.encode): 64 KB of newlines
    # was a 455 KB frame to every subscriber. Counted here, once per publish, and only
    # for data that has a line break: `in` is a memchr, str.count is not (64 KB of one
    # line: 3 us to check, not 240 us to count).
    has_cr = "\r" in data
    if has_cr or "\n" in data:
        breaks = data.count("\n") + (data.count("\r") - data.count("\r\n") if has_cr else 0)
    else:
        breaks = 0
    if breaks and size + FRAMED_LINE_BYTES * breaks > max_bytes:
        raise PublishError(
            f"data is {size + FRAMED_LINE_BYTES * breaks} bytes as framed ({breaks} line "
            f"breaks, each adds {FRAMED_LINE_BYTES} bytes of 'data: '), above "
            f"SSEHUB_MAX_EVENT_BYTES={max_bytes}", 413)
    if idempotency_key is not None:
        if (not isinstance(idempotency_key, str) or not idempotency_key
                or len(idempotency_key) > MAX_IDEMPOTENCY_KEY
                or not idempotency_key.isprintable()):
            raise PublishError(
                f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters")
    return Publication(channel, data, event, idempotency_key)
