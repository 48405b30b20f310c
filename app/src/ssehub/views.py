"""Django views: publish, health, readiness, metrics and the chat demo.

``POST /publish/`` never answers 500: every failure maps to a status with a
short JSON reason (400 bad input, 401/403 token, 413 too large, 503 broker).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from . import channels, conf, metrics, tokens
from .api import apublish
from .brokers import BrokerUnavailable
from .hub import ensure_hub
from .models import Message
from .publishing import PublishError
from .stream import COOKIE_NAME, bearer_token

log = logging.getLogger(__name__)

DEMO_TOKEN_TTL = 12 * 3600


def _error(status: int, reason: str, **headers: str) -> JsonResponse:
    response = JsonResponse({"error": reason}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    response["Cache-Control"] = "no-store"
    return response


def _parse_body(request: HttpRequest) -> dict[str, Any]:
    content_type = request.content_type or ""
    if content_type == "application/json":
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PublishError(f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise PublishError("JSON body must be an object with channel, event and data")
        return body
    if content_type in {"application/x-www-form-urlencoded", "multipart/form-data"}:
        return {key: request.POST.get(key) for key in ("channel", "event", "data")}
    raise PublishError("send application/json or form fields (curl -d channel=... -d data=...)")


@csrf_exempt
@require_POST
async def publish(request: HttpRequest) -> HttpResponse:
    config = conf.get()
    token = bearer_token(request.headers.get("Authorization"), None, None)
    if token is None:
        return _error(401, "a publisher token is required: Authorization: Bearer TOKEN",
                      WWW_Authenticate='Bearer realm="ssehub"')
    try:
        grant = tokens.verify(config.token_secret, token)
    except tokens.TokenError as exc:
        return _error(401, str(exc), WWW_Authenticate='Bearer realm="ssehub"')
    try:
        length = int(request.headers.get("Content-Length") or 0)
        if length > config.max_event_bytes * 7 + 65536:
            raise PublishError(f"body is {length} bytes, far above SSEHUB_MAX_EVENT_BYTES", 413)
        body = _parse_body(request)
        try:
            channel = channels.validate(body.get("channel"))
        except channels.InvalidChannel as exc:
            raise PublishError(str(exc)) from None
        if not grant.may_publish(channel):
            return _error(403, f"token does not allow publishing to {channel}")
        event_id = await apublish(channel, body.get("data"), body.get("event"),
                                  idempotency_key=request.headers.get("Idempotency-Key"))
    except PublishError as exc:
        return _error(exc.status, str(exc))
    except BrokerUnavailable as exc:
        log.warning("publish failed: %s", exc)
        return _error(503, "broker unavailable, retry later", Retry_After="1")
    except Exception as exc:  # the contract: no input makes publish answer 500
        log.exception("publish failed")
        return _error(400, f"could not publish: {type(exc).__name__}")
    return JsonResponse({"id": str(event_id)}, status=201)


@require_GET
async def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


def _database_ok() -> None:
    connection.ensure_connection()
    connection.close()


@require_GET
async def readyz(request: HttpRequest) -> HttpResponse:
    hub = await ensure_hub()
    problems = []
    if hub.draining:
        problems.append("draining")
    try:
        await hub.broker.ping()
    except BrokerUnavailable as exc:
        problems.append(str(exc))
    try:
        await sync_to_async(_database_ok)()
    except Exception as exc:
        problems.append(f"database: {exc}")
    if problems:
        return _error(503, "; ".join(problems), Retry_After="1")
    return JsonResponse({"status": "ready", "open_streams": hub.open_streams})


@require_GET
async def metrics_view(request: HttpRequest) -> HttpResponse:
    body, content_type = metrics.render()
    return HttpResponse(body, content_type=content_type)


def _rooms(request: HttpRequest) -> str:
    room = request.GET.get("room") or request.POST.get("room") or "lobby"
    return room if room.replace("-", "").replace("_", "").isalnum() and len(room) <= 40 else "lobby"


@require_GET
def chat(request: HttpRequest) -> HttpResponse:
    """The seed-002 chat: an EventSource page whose cookie lets it read chat.*."""
    room = _rooms(request)
    history = [m.as_event() for m in Message.objects.filter(room=room)[:50]][::-1]
    response = render(request, "ssehub/chat.html", {"room": room, "history": history})
    token = tokens.mint(conf.get().token_secret, subscribe=[f"chat.{room}"],
                        ttl=DEMO_TOKEN_TTL)
    response.set_cookie(COOKIE_NAME, token, max_age=DEMO_TOKEN_TTL, httponly=True,
                        samesite="Strict", secure=request.is_secure())
    return response


@require_POST
def chat_post(request: HttpRequest) -> HttpResponse:
    text = (request.POST.get("text") or "").strip("\x00")
    author = (request.POST.get("author") or "anonymous")[:40]
    if not text.strip():
        return _error(400, "text is required")
    if len(text) > 4000:
        return _error(400, "text is longer than 4000 characters")
    message = Message.objects.create(room=_rooms(request), author=author, text=text)
    return JsonResponse({"id": message.pk}, status=201)
