"""The ASGI plumbing ``/events/`` and ``/publish/`` share on their thin paths.

Owns: the ASGI types (``Scope``, ``Receive``, ``Send``), ``Request`` (a
request's method, headers and query, each parsed once per request, never per
event), where a token travels (``Authorization: Bearer``, ``?token=``, the
``ssehub_token`` cookie), ``Refusal`` (an answer other than 2xx) and the JSON
answers both endpoints give.

Must not: decide what a token allows (auth.py), know a route (asgi.py), or hold
anything per event. Both endpoints answer every refusal here, as a short JSON
body ``{"error": ...}`` with ``Cache-Control: no-store``, never a redirect.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from functools import cached_property
from typing import Any
from urllib.parse import parse_qs

from django.http.cookie import parse_cookie

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

# The cookie a browser's EventSource sends its subscriber token in (the chat demo sets it).
COOKIE_NAME = "ssehub_token"


class Refusal(Exception):
    """An answer other than success: ``status``, a short ``reason`` and extra headers."""

    def __init__(self, status: int, reason: str, headers: Headers | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


class Request:
    """One request on a thin path, parsed once: method, headers, query.

    Header names are lower-cased; a header sent twice keeps its last value. The
    query is parsed only when asked for (``/publish/`` never reads it).
    """

    def __init__(self, scope: Scope) -> None:
        self.method: str = scope["method"]
        self.headers: dict[str, str] = {k.decode("latin-1").lower(): v.decode("latin-1")
                                        for k, v in scope["headers"]}
        self._query_string: bytes = scope.get("query_string", b"")

    @cached_property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self._query_string.decode("latin-1"), keep_blank_values=True)

    def first(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def header_token(self) -> str | None:
        """The token of ``Authorization: Bearer``: the one place a publisher's comes from."""
        authorization = self.headers.get("authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        return None

    def token(self) -> str | None:
        """A subscriber's token: ``Authorization: Bearer``, ``?token=`` or the cookie, in
        that order (an EventSource sets no header: the cookie or the query carry it)."""
        token = self.header_token()
        if token is not None:
            return token
        query_token = self.first("token")
        if query_token:
            return query_token
        cookie_header = self.headers.get("cookie")
        if cookie_header:
            # As browsers send them: a sibling cookie that is not RFC 6265 (a space, UTF-8,
            # JSON) must not hide ours, and SimpleCookie dropped every cookie for one.
            return parse_cookie(cookie_header).get(COOKIE_NAME) or None
        return None


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: Headers | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
        *(headers or []),
    ]})
    await send({"type": "http.response.body", "body": payload})


async def refuse(send: Send, refusal: Refusal) -> None:
    """Answer ``refusal`` as ``{"error": reason}`` with its status and headers."""
    await send_json(send, refusal.status, {"error": refusal.reason}, refusal.headers)
