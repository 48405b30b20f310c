"""Django views: health, readiness, metrics and the chat demo.

The demo is routed only with ``SSEHUB_DEMO`` on (urls.py): anyone may post to
it. Posts are rate-limited per client address (ratelimit.py, 429 with
``Retry-After``) and each keeps the newest ``SSEHUB_DEMO_KEEP_MESSAGES`` of its
room, so a flood costs bounded storage.

``/events/`` and ``/publish/`` are served on the thin ASGI path (stream.py,
ingest.py); ``asgi.py`` routes them before Django.

Must not: serve or authorise streams and publishes (the demo only mints a
subscriber token and sets it in the cookie http.py reads), nor block the event
loop in an async view (the database check runs in a thread).
"""

from __future__ import annotations

import functools
import logging
import math
import re

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from . import conf, metrics, ratelimit, tokens
from .brokers import BrokerUnavailable
from .http import COOKIE_NAME
from .hub import ensure_hub
from .models import Message

log = logging.getLogger(__name__)

DEMO_TOKEN_TTL = 12 * 3600
ROOM = re.compile(r"[A-Za-z0-9_-]{1,40}")  # "chat." + ROOM is a channel name
DEMO_ROOMS = 50  # the demo keeps DEMO_ROOMS x SSEHUB_DEMO_KEEP_MESSAGES messages at most


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


def _room(value: str | None) -> str | None:
    """The room, or None when it is not 1-40 ASCII letters, digits, ``-`` or ``_``
    (``str.isalnum`` let ``ünï`` through: stored, then its channel refused with a 500)."""
    room = value or "lobby"
    return room if ROOM.fullmatch(room) else None


def client_address(request: HttpRequest) -> str:
    """The address the proxy saw (the last X-Forwarded-For entry, which nginx and Caddy
    add themselves), else the peer's. Only a rate-limit key: a client without a proxy
    in front can choose it, so the limit bounds a flood, not a determined client."""
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    last = forwarded.rsplit(",", 1)[-1].strip()
    return last or str(request.META.get("REMOTE_ADDR") or "")


@functools.lru_cache(maxsize=1)
def _limiter(per_minute: int) -> ratelimit.RateLimiter:
    return ratelimit.RateLimiter(per_minute, period=60.0)


def _trim(room: str, keep: int) -> None:
    """Keep the newest ``keep`` messages of ``room`` and DEMO_ROOMS times that in all."""
    for scope, limit in ((Message.objects.filter(room=room), keep),
                         (Message.objects.all(), keep * DEMO_ROOMS)):
        oldest_kept = list(scope.order_by("-id").values_list("id", flat=True)[limit:limit + 1])
        if oldest_kept:
            scope.filter(id__lte=oldest_kept[0]).delete()


@require_GET
def chat(request: HttpRequest) -> HttpResponse:
    """The seed-002 chat: an EventSource page whose cookie lets it read chat.*."""
    room = _room(request.GET.get("room")) or "lobby"
    history = [m.as_event() for m in Message.objects.filter(room=room)[:50]][::-1]
    response = render(request, "ssehub/chat.html", {"room": room, "history": history})
    token = tokens.mint(conf.get().token_secret, subscribe=[f"chat.{room}"],
                        ttl=DEMO_TOKEN_TTL)
    response.set_cookie(COOKIE_NAME, token, max_age=DEMO_TOKEN_TTL, httponly=True,
                        samesite="Strict", secure=request.is_secure())
    return response


@require_POST
def chat_post(request: HttpRequest) -> HttpResponse:
    config = conf.get()
    wait = _limiter(config.demo_posts_per_minute).take(client_address(request))
    if wait:
        return _error(429, "too many posts, wait a little", Retry_After=str(math.ceil(wait)))
    text = (request.POST.get("text") or "").strip("\x00")
    author = (request.POST.get("author") or "anonymous")[:40]
    room = _room(request.POST.get("room"))
    if room is None:
        return _error(400, "room must be 1-40 ASCII letters, digits, - or _")
    if not text.strip():
        return _error(400, "text is required")
    if len(text) > 4000:
        return _error(400, "text is longer than 4000 characters")
    if "\x00" in text or "\x00" in author:  # PostgreSQL's text cannot hold it: a 500
        return _error(400, "text and author must not contain NUL (U+0000)")
    message = Message.objects.create(room=room, author=author, text=text)
    _trim(room, config.demo_keep_messages)
    return JsonResponse({"id": message.pk}, status=201)
