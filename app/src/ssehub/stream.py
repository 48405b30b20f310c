"""``GET /events/``: the stream, served by a thin ASGI path in front of Django.

Why not Django's StreamingHttpResponse: Django's handler adds per-chunk work
(an async iterator and a ``send`` per chunk through its response machinery) and
per-request middleware. ``tests/bench/run.py --django-path`` measures the same
fan-out through an ``@sse_stream`` view fed by the same hub subscriber: p99
294 ms against 23 ms here at 1,000 streams x 20 events/s, and six times the
hub's CPU (docs/performance.md). Everything else (publish, health,
metrics, demo) stays in Django.

Order of a stream: validate channels (400), authorise (401/403), register the
subscriber with the hub (the broker confirms interest), send headers and the
first bytes at once (A3), replay from ``Last-Event-ID`` (I1), then live frames.
Events that arrive live during the replay are buffered and only those newer
than the replay are sent, so there is no gap and no duplicate.

Headers: never ``Connection``, ``Content-Length`` or ``Content-Encoding`` (D4,
A6); ``Cache-Control: no-cache`` (A7) and ``X-Accel-Buffering: no`` (A1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from django.http.cookie import parse_cookie

from . import channels, conf, metrics, sse, tokens
from .brokers import BrokerUnavailable
from .hub import Hub, Subscriber, ensure_hub

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_CHANNELS = 32
REPLAY_WRITE_BYTES = 256 * 1024
REPLAY_PAGE_EVENTS = 64
NEVER_ISSUED = 2**63 - 1
MAX_ID_DIGITS = len(str(NEVER_ISSUED))
DIRECT_ATTRIBUTES = ("transport", "flow", "disconnected", "chunked_encoding")
COOKIE_NAME = "ssehub_token"
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Refusal(Exception):
    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
        *(headers or []),
    ]})
    await send({"type": "http.response.body", "body": payload})


def bearer_token(authorization: str | None, query_token: str | None,
                 cookie_header: str | None) -> str | None:
    """The token from ``Authorization: Bearer``, ``?token=`` or the cookie, in that order."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if query_token:
        return query_token
    if cookie_header:
        # As browsers send them: a sibling cookie that is not RFC 6265 (a space, UTF-8,
        # JSON) must not hide ours, and SimpleCookie dropped every cookie for one.
        return parse_cookie(cookie_header).get(COOKIE_NAME) or None
    return None


def authorise_subscriber(names: list[str], token: str | None, config: conf.Config) -> None:
    private = [c for c in names if not channels.matches(c, config.public_channels)]
    if not private:
        return
    if token is None:
        raise Refusal(401, "a subscriber token is required for channel " + private[0],
                      [(b"www-authenticate", b'Bearer realm="ssehub"')])
    try:
        grant = tokens.verify(config.token_secret, token)
    except tokens.TokenError as exc:
        raise Refusal(401, str(exc), [(b"www-authenticate", b'Bearer realm="ssehub"')]) from None
    denied = [c for c in private if not grant.may_subscribe(c)]
    if denied:
        raise Refusal(403, "token does not allow subscribing to " + denied[0])


def parse_request(scope: Scope, config: conf.Config) -> tuple[list[str], str | None]:
    """Return (channels, Last-Event-ID) or raise Refusal."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    names = list(dict.fromkeys(query.get("channel", [])))
    if not names:
        raise Refusal(400, "at least one channel parameter is required: /events/?channel=NAME")
    if len(names) > MAX_CHANNELS:
        raise Refusal(400, f"at most {MAX_CHANNELS} channels per stream")
    for name in names:
        try:
            channels.validate(name)
        except channels.InvalidChannel as exc:
            raise Refusal(400, str(exc)) from None
    token = bearer_token(headers.get("authorization"), (query.get("token") or [None])[0],
                         headers.get("cookie"))
    authorise_subscriber(names, token, config)
    last_id = headers.get("last-event-id") or (query.get("lastEventId") or [None])[0]
    return names, (last_id or None)


def direct_cycle(scope: Scope, send: Send) -> Any:
    """uvicorn's httptools response cycle behind ``send``, if the hub may write to it.

    The hub then writes each event's pre-built chunk straight to the transport
    (hub.Subscriber.push) instead of waking this stream's task, which is what
    lets one worker reach the benchmark's figures. Only the pieces ``send`` itself
    checks are used (flow control, disconnect, chunked framing); any other server
    or protocol (h11, hypercorn, tests) keeps the plain ASGI path.
    """
    cycle = getattr(send, "__self__", None)
    if (scope["method"] != "GET" or cycle is None
            or type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl"
            or not all(hasattr(cycle, name) for name in DIRECT_ATTRIBUTES)):
        return None
    return cycle


async def _watch_disconnect(receive: Receive, subscriber: Subscriber) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            subscriber.close()
            return


async def _catch_up(hub: Hub, subscriber: Subscriber, names: list[str], last_id: str,
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
            data = json.dumps({"reason": reason, "last_event_id": sent})
            reset = sse.encode(data, "reset", head if head else None)
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
    # Live events the replay covers are dropped (Subscriber.floor): those
    # buffered now, and those the listener delivers from here on.
    subscriber.floor = cursor or 0
    buffered, subscriber.buf = subscriber.buf, []
    subscriber.buf.extend(item for item in buffered if not subscriber.replayed(item))


async def _send_frames(subscriber: Subscriber, send: Send, frames: list[bytes]) -> None:
    """Send ``frames`` in writes of about REPLAY_WRITE_BYTES, each under the write timeout."""
    start = size = 0
    for end, frame in enumerate(frames, 1):
        size += len(frame)
        if size >= REPLAY_WRITE_BYTES or end == len(frames):
            subscriber.sending = time.monotonic()
            try:
                await send({"type": "http.response.body", "body": b"".join(frames[start:end]),
                            "more_body": True})
            finally:
                subscriber.sending = 0.0
            start, size = end, 0


async def _pump(subscriber: Subscriber, send: Send) -> None:
    """Send what the hub buffered for this stream until it closes.

    The hub writes to the socket itself when it can (hub.Subscriber.push); this
    task sends what it could not. While it is inside ``send`` the hub queues
    behind it (``sending``): uvicorn waits for a paused socket to drain before
    writing, and a direct write in that window would overtake these frames.
    """
    while True:
        await subscriber.wait()
        batch = subscriber.buf
        if batch:
            subscriber.buf = []
            body = batch[0].frame if len(batch) == 1 else b"".join([e.frame for e in batch])
            subscriber.sending = time.monotonic()
            try:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            finally:
                subscriber.sending = 0.0
        if subscriber.closed:
            return


async def stream_app(scope: Scope, receive: Receive, send: Send) -> None:
    config = conf.get()
    try:
        if scope["method"] not in {"GET", "HEAD"}:
            raise Refusal(405, "use GET", [(b"allow", b"GET")])
        names, last_id = parse_request(scope, config)
        hub = await ensure_hub()
        if hub.draining:
            raise Refusal(503, "draining, reconnect to another server", [(b"retry-after", b"1")])
        subscriber = None
        try:
            subscriber = await hub.subscribe(names, asyncio.current_task())
            # Read once subscribed: a later event is delivered live or replayed.
            start_id = (await hub.broker.head()
                        if last_id is None and scope["method"] == "GET" else None)
        except BrokerUnavailable as exc:
            if subscriber is not None:
                hub.unsubscribe(subscriber)
            raise Refusal(503, f"broker unavailable: {exc}", [(b"retry-after", b"2")]) from None
    except Refusal as refusal:
        await send_json(send, refusal.status, {"error": refusal.reason}, refusal.headers)
        return

    # The connection, so that a drop aborts it even before the direct path starts.
    subscriber.transport = getattr(getattr(send, "__self__", None), "transport", None)
    watcher = asyncio.create_task(_watch_disconnect(receive, subscriber))
    try:
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        if scope["method"] == "HEAD":  # headers only: a probe, not a stream
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.body", "body": sse.preamble(config.retry_ms, start_id),
                    "more_body": True})
        if last_id is not None:
            await _catch_up(hub, subscriber, names, last_id, send)
        cycle = direct_cycle(scope, send)
        metrics.STREAM_PATHS.labels("direct" if cycle is not None else "asgi").inc()
        if cycle is not None:
            subscriber.chunked = bool(cycle.chunked_encoding)
            subscriber.cycle = cycle
        await _pump(subscriber, send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not subscriber.dropped:  # dropped while blocked in send: end quietly
            raise
    except BrokerUnavailable as exc:
        log.warning("closing a stream: %s", exc)
    finally:
        watcher.cancel()
        hub.unsubscribe(subscriber)
