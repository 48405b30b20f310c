"""Django views: health, readiness, metrics and the chat demo.

``/events/`` and ``/publish/`` are served on the thin ASGI path (stream.py,
ingest.py); ``asgi.py`` routes them before Django.
"""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from . import conf, metrics, tokens
from .brokers import BrokerUnavailable
from .hub import ensure_hub
from .models import Message
from .stream import COOKIE_NAME

log = logging.getLogger(__name__)

DEMO_TOKEN_TTL = 12 * 3600


def _error(status: int, reason: str, **headers: str) -> JsonResponse:
    response = JsonResponse({"error": reason}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    response["Cache-Control"] = "no-store"
    return response


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
    else:
        if not hub.broker.listener_up:  # stores, but would deliver nothing live
            problems.append("broker listener not connected")
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
