"""The Last-Event-ID replay: from the client's id to live, with no gap and no duplicate.

Owns the stream's side of a replay: reading the id the client sent, paging
through the store (``Hub.replay``: the broker's page, with the age limit), the
``event: reset`` a client gets for an id the hub cannot replay (I1), writing
pages under flow control, and the hand-over to live events
(``Subscriber.end_replay``). The live side (``Subscriber.floor`` and
``replayed``, which drop what the replay already sent) stays with the
subscriber: it runs per event.

Must not: hold more than one page of a stream's history at a time, nor write
to the socket other than through the stream's ``send`` inside
``Subscriber.in_send``, so the hub neither overtakes these frames nor lets a
client that stops reading hold the stream past the write timeout.
"""

from __future__ import annotations

from . import sse
from .http import Send
from .hub import Hub
from .subscriber import Subscriber

REPLAY_WRITE_BYTES = 256 * 1024
REPLAY_PAGE_EVENTS = 64
NEVER_ISSUED = 2**63 - 1
MAX_ID_DIGITS = len(str(NEVER_ISSUED))


async def catch_up(hub: Hub, subscriber: Subscriber, names: list[str], last_id: str,
                   send: Send) -> None:
    """Send what the client missed, page by page, then drop buffered live events it now has.

    A page is at most REPLAY_PAGE_EVENTS events (brokers.Page), sent in writes of
    about REPLAY_WRITE_BYTES; each send waits for the client (flow control) before
    the next page is read, so one stream holds one page whatever the history
    behind it, and a client that stops reading is dropped by the write timeout
    (Hub._beat). Live events that arrive meanwhile wait in the subscriber's
    buffer, bounded like any other.
    """
    # An id that is not ours at all ("abc", "-1") is an id never issued: a reset
    # that carries the newest id, like any other unknown id.
    # So is one longer than any id can be: int() refuses over 4,300 digits, which
    # cut the stream with "Exception in ASGI application" instead of a reset.
    after = (min(int(last_id), NEVER_ISSUED)
             if last_id.isascii() and last_id.isdigit() and len(last_id) <= MAX_ID_DIGITS
             else NEVER_ISSUED)
    cursor = after
    while not subscriber.closed:
        replay = await hub.replay(names, cursor, REPLAY_PAGE_EVENTS)
        if replay.reset:
            head = replay.head
            reason = replay.reason or ("unknown id" if cursor > head else "older than retention")
            sent = last_id if cursor == after else str(cursor)
            reset = sse.reset({"reason": reason, "last_event_id": sent}, head if head else None)
            await _send_frames(subscriber, send, [reset])
            cursor = head
            break
        frames = [event.frame for event in replay.events]
        if replay.events:
            cursor = replay.events[-1].id or cursor
        more = replay.more
        del replay  # the page's events: only their frames are held while they are sent
        await _send_frames(subscriber, send, frames)
        if not more:
            break
    subscriber.end_replay(cursor)


async def _send_frames(subscriber: Subscriber, send: Send, frames: list[bytes]) -> None:
    """Send ``frames`` in writes of about REPLAY_WRITE_BYTES, each under the write timeout."""
    start = size = 0
    for end, frame in enumerate(frames, 1):
        size += len(frame)
        if size >= REPLAY_WRITE_BYTES or end == len(frames):
            with subscriber.in_send():
                await send({"type": "http.response.body", "body": b"".join(frames[start:end]),
                            "more_body": True})
            start, size = end, 0
