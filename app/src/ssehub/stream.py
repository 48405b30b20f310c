"""``GET /events/``: the stream, served by a thin ASGI path in front of Django.

Why not Django's StreamingHttpResponse: Django's handler adds per-chunk work
(an async iterator and a ``send`` per chunk through its response machinery) and
per-request middleware. ``tests/bench/run.py --django-path`` measures the same
fan-out through an ``@sse_stream`` view fed by the same hub subscriber: p99
294 ms against 23 ms here at 1,000 streams x 20 events/s, and six times the
hub's CPU (docs/performance.md). Everything else (publish, health,
metrics, demo) stays in Django.

Owns the order of a stream: validate channels (400), authorise (401/403,
auth.py), register the subscriber with the hub (the broker confirms interest),
send the headers and the first bytes at once (A3; both from sse.py), replay
from ``Last-Event-ID`` (I1, replay.py), then live frames (the subscriber's
``pump``, or the hub's direct write once ``attach`` allows it). Events that
arrive live during the replay are buffered and only those newer than the
replay are sent, so there is no gap and no duplicate.

Must not: do anything per event. Everything here runs once per stream; the
per-event work is the hub's fan-out and ``Subscriber.push``.
"""

from __future__ import annotations

import asyncio
import logging

from . import auth, channels, conf, metrics, replay, sse
from .brokers import BrokerUnavailable
from .http import Receive, Refusal, Request, Scope, Send, refuse
from .hub import ensure_hub
from .subscriber import Subscriber, direct_cycle

log = logging.getLogger(__name__)

MAX_CHANNELS = 32


def parse_request(request: Request, config: conf.Config) -> tuple[list[str], str | None]:
    """Return (channels, Last-Event-ID) or raise Refusal."""
    names = list(dict.fromkeys(request.query.get("channel", [])))
    if not names:
        raise Refusal(400, "at least one channel parameter is required: /events/?channel=NAME")
    if len(names) > MAX_CHANNELS:
        raise Refusal(400, f"at most {MAX_CHANNELS} channels per stream")
    for name in names:
        try:
            channels.validate(name)
        except channels.InvalidChannel as exc:
            raise Refusal(400, str(exc)) from None
    auth.authorise_subscriber(names, request.token(), config)
    last_id = request.headers.get("last-event-id") or request.first("lastEventId")
    return names, (last_id or None)


async def _watch_disconnect(receive: Receive, subscriber: Subscriber) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            subscriber.close()
            return


async def stream_app(scope: Scope, receive: Receive, send: Send) -> None:
    config = conf.get()
    try:
        if scope["method"] not in {"GET", "HEAD"}:
            raise Refusal(405, "use GET", [(b"allow", b"GET")])
        names, last_id = parse_request(Request(scope), config)
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
        await refuse(send, refusal)
        return

    subscriber.bind(send)
    watcher = asyncio.create_task(_watch_disconnect(receive, subscriber))
    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": sse.ASGI_STREAM_HEADERS})
        if scope["method"] == "HEAD":  # headers only: a probe, not a stream
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.body", "body": sse.preamble(config.retry_ms, start_id),
                    "more_body": True})
        if last_id is not None:
            await replay.catch_up(hub, subscriber, names, last_id, send)
        cycle = direct_cycle(scope, send)
        metrics.STREAM_PATHS.labels("direct" if cycle is not None else "asgi").inc()
        if cycle is not None:
            subscriber.attach(cycle)
        await subscriber.pump(send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not subscriber.dropped:  # dropped while blocked in send: end quietly
            raise
    except BrokerUnavailable as exc:
        log.warning("closing a stream: %s", exc)
    finally:
        watcher.cancel()
        hub.unsubscribe(subscriber)
