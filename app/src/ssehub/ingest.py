"""``POST /publish/``: the publish API, on the thin ASGI path like ``/events/``.

Measured (tests/bench, one core for hub + nginx + Redis, 8 publishers): as a
Django async view it stored 187 events/s, because Django's ASGI handler runs
the request signals and sync middleware through per-request thread pools; this
path does the same checks without them. It never answers 500: every failure is
a status with a short JSON reason (400 bad input, 401/403 token, 405 method,
413 too large, 415 media type, 503 broker).

Owns the order of checks: method, token (401, auth.py), size (413, before
reading a large body), body and channel (400), the token's scope (403,
auth.py), the event itself (400/413, publishing.py), then the broker (503). The
channel is checked once, here, and the rest of the event once, in
``api.apublish_checked``.

Must not: depend on the stream (``/events/``): the two endpoints share only
http.py's plumbing and auth.py's rules.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

from . import auth, conf
from .api import apublish_checked
from .brokers import BrokerUnavailable
from .http import Receive, Refusal, Request, Scope, Send, refuse, send_json
from .hub import ensure_hub
from .publishing import MISSING, PublishError, checked_channel

log = logging.getLogger(__name__)

# Room for JSON escaping (a control character becomes six bytes) and the other fields.
BODY_OVERHEAD_FACTOR = 7
BODY_OVERHEAD_BYTES = 65536


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refusal(400, "client disconnected before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PublishError(f"body is over {limit} bytes, far above SSEHUB_MAX_EVENT_BYTES",
                               413)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _parse(content_type: str, body: bytes) -> dict[str, Any]:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PublishError(f"body is not valid JSON: {exc}") from None
        except RecursionError:  # it logged a traceback of a thousand frames
            raise PublishError("body is not valid JSON: nested too deeply") from None
        if not isinstance(parsed, dict):
            raise PublishError("JSON body must be an object with channel, event and data")
        return parsed
    if media == "application/x-www-form-urlencoded":
        try:
            fields = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False,
                              errors="strict")
        except UnicodeDecodeError:
            raise PublishError("form body is not valid UTF-8") from None
        return {key: values[-1] for key, values in fields.items()}
    raise PublishError("send application/json or form fields (curl -d channel=... -d data=...)",
                       415)


async def publish_app(scope: Scope, receive: Receive, send: Send) -> None:
    config = conf.get()
    try:
        if scope["method"] != "POST":
            raise Refusal(405, "use POST", [(b"allow", b"POST")])
        request = Request(scope)
        grant = auth.publisher(request.header_token(), config)
        limit = config.max_event_bytes * BODY_OVERHEAD_FACTOR + BODY_OVERHEAD_BYTES
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > limit:
            raise PublishError(f"body is {declared} bytes, far above SSEHUB_MAX_EVENT_BYTES", 413)
        body = _parse(request.headers.get("content-type", ""), await _read_body(receive, limit))
        channel = checked_channel(body.get("channel"))
        auth.authorise_publish(grant, channel)
        await ensure_hub()
        event_id = await apublish_checked(channel, body.get("data", MISSING), body.get("event"),
                                          idempotency_key=request.headers.get("idempotency-key"))
    except Refusal as refusal:
        await refuse(send, refusal)
        return
    except PublishError as exc:
        await send_json(send, exc.status, {"error": str(exc)})
        return
    except BrokerUnavailable as exc:
        log.warning("publish failed: %s", exc)
        await send_json(send, 503, {"error": "broker unavailable, retry later"},
                        [(b"retry-after", b"1")])
        return
    except Exception as exc:  # the contract: no input makes publish answer 500
        log.exception("publish failed")
        await send_json(send, 400, {"error": f"could not publish: {type(exc).__name__}"})
        return
    await send_json(send, 201, {"id": str(event_id)})
