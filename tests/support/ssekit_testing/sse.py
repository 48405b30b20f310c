"""An event stream parsed as a browser's EventSource parses it (WHATWG HTML,
"Interpreting an event stream"), one line at a time, for readers that must see
more than events: comments (heartbeats), ``retry:``, the Last-Event-ID a
reconnection would send.

The e2e tests read streams with httpx-sse as well, a parser we did not write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


def field_of(line: str) -> tuple[str, str]:
    """A stream line's field name and value (one leading space dropped)."""
    name, _, value = line.partition(":")
    return name, value.removeprefix(" ")


def fields(body: str) -> list[tuple[str, str]]:
    """The fields of a whole event stream, comments and blank lines dropped."""
    return [field_of(line) for line in re.split(r"\r\n|\r|\n", body)
            if line and not line.startswith(":")]


@dataclass
class Event:
    """An event a browser dispatches: a block with data. ``id`` is the block's own
    ``id:`` (None without one; the browser's lastEventId keeps the one before)."""

    id: str | None
    event: str
    data: str


@dataclass
class Parser:
    """Feed it a stream's lines (without their line ends); it returns each event as
    the blank line that ends it arrives. A block's ``id:`` sets ``last_event_id``
    even without data (the hub's preamble carries a bare ``id:``); only data makes
    an event. Comments are not events: a caller that counts heartbeats looks at
    lines starting with ":" itself."""

    last_event_id: str | None = None
    retry: int | None = None  # milliseconds, from the last valid retry: field
    _id: str | None = None
    _event: str = "message"
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> Event | None:
        if line == "":
            if self._id is not None:
                self.last_event_id = self._id
            event = (Event(self._id, self._event, "\n".join(self._data))
                     if self._data else None)
            self._id, self._event, self._data = None, "message", []
            return event
        if line.startswith(":"):
            return None
        name, value = field_of(line)
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None
