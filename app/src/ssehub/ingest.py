"""``POST /publish/``: the publish API, on the thin ASGI path like ``/events/``.

Measured (tests/bench, one core for hub + nginx + Redis, 8 publishers): as a
Django async view it stored 187 events/s, because Django's ASGI handler runs
the request signals and sync middleware through per-request thread pools; this
path does the same checks without them. It never answers 500: every failure is
a status with a short JSON reason (400 bad input, 401/403 token, 405 method,
413 too large, 415 media type, 503 broker).

Order of checks: method, token (401), size (413, before reading a large body),
body and channel (400), the token's scope (403), then the broker (503).
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

from . import channels, conf, tokens
from .api import apublish
from .brokers import BrokerUnavailable
from .hub import ensure_hub
from .publishing import MISSING, PublishError
from .stream import Receive, Refusal, Scope, Send, bearer_token, send_json

log = logging.getLogger(__name__)

# Room for JSON escaping (a control character becomes six bytes) and the other fields.
BODY_OVERHEAD_FACTOR = 7
BODY_OVERHEAD_BYTES = 65536
UNAUTHORISED = [(b"www-authenticate", b'Bearer realm="ssehub"')]


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


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
        headers = _headers(scope)
        token = bearer_token(headers.get("authorization"), None, None)
        if token is None:
            raise Refusal(401, "a publisher token is required: Authorization: Bearer TOKEN",
                          UNAUTHORISED)
        try:
            grant = tokens.verify(config.token_secret, token)
        except tokens.TokenError as exc:
            raise Refusal(401, str(exc), UNAUTHORISED) from None
        limit = config.max_event_bytes * BODY_OVERHEAD_FACTOR + BODY_OVERHEAD_BYTES
        declared = headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > limit:
            raise PublishError(f"body is {declared} bytes, far above SSEHUB_MAX_EVENT_BYTES", 413)
        body = _parse(headers.get("content-type", ""), await _read_body(receive, limit))
        try:
            channel = channels.validate(body.get("channel"))
        except channels.InvalidChannel as exc:
            raise PublishError(str(exc)) from None
        if not grant.may_publish(channel):
            raise Refusal(403, f"token does not allow publishing to {channel}")
        await ensure_hub()
        event_id = await apublish(channel, body.get("data", MISSING), body.get("event"),
                                  idempotency_key=headers.get("idempotency-key"))
    except Refusal as refusal:
        await send_json(send, refusal.status, {"error": refusal.reason}, refusal.headers)
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
