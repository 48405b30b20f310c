"""Transient trouble on ``/events/`` reaches a browser as an ended retry stream.

A browser's EventSource reconnects by itself only after a network error or a
stream that ends; any answer but a 200 ``text/event-stream`` fails the
connection for good (WHATWG HTML, EventSource). So while no app server answers
(502/504 of the proxy), while the hub answers 503 (draining, broker down) and
when nginx's per-address stream limit says 429, the proxies answer the stream
path with a complete 200 ``text/event-stream`` that carries only a ``retry:``
and a comment: the browser waits ``retry`` ms and tries again. The hub's real
refusals (400, 401, 403, 405) pass through as the hub sent them, and the publish
API keeps its 5xx (publishers are programs that read status codes).

Real nginx and Caddy with the snippets from templates/, in front of a closed
port, a missing Unix socket, the real hub (``stack``), or a small upstream that
answers 503 the way the hub does (``Hub503``: draining is hard to catch on a
real hub, whose listener closes when it drains).
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ssekit_testing import sse, tokens
from ssekit_testing.fixtures import SECRET
from ssekit_testing.servers import (
    TEMPLATES,
    Caddy,
    CaddyOnSocket,
    Nginx,
    ServedHub,
    free_port,
    running,
)

# The stream route's retry budget in the Caddy snippet (lb_try_duration 5s): Caddy
# keeps trying a dead upstream that long before it gives up with an error.
CADDY_TRY_SECONDS = 5
# A retry stream is one short, complete answer: its body ends at once.
BODY_ENDS_WITHIN = 2.0


def retry_stream(url: str, **request: Any) -> tuple[int, str, float]:
    """GET ``url``; assert it is a retry stream that ends; return (retry ms, body, seconds).

    The seconds count from the answer's headers to the end of its body.
    """
    with httpx.Client(timeout=CADDY_TRY_SECONDS + 5) as client, \
            client.stream("GET", url, **request) as response:
        headers_at = time.monotonic()
        body = response.read().decode()
        took = time.monotonic() - headers_at
    assert response.status_code == 200, (response.status_code, response.headers, body)
    assert response.headers["content-type"].split(";")[0] == "text/event-stream", response.headers
    assert response.headers.get("cache-control") == "no-cache", response.headers
    assert "content-encoding" not in response.headers
    fields = sse.fields(body)
    # Only a reconnection time: no data (EventSource would dispatch an event) and
    # no id (it would overwrite the Last-Event-ID the browser replays from).
    assert [name for name, _ in fields] == ["retry"], body
    assert fields[0][1].isdigit(), body
    assert body.endswith("\n\n"), body
    assert took < BODY_ENDS_WITHIN, f"the retry stream took {took:.1f}s to end"
    return int(fields[0][1]), body, took


# -- upstreams --------------------------------------------------------------------


class Hub503:
    """An upstream that answers like a hub whose broker cannot confirm interest:
    ready, but the stream gets 503 with Retry-After and a JSON error, the publish
    API 503 too; ``?channel=hold`` is a stream that stays open until the server
    stops (to fill nginx's per-address limit)."""

    STREAM_ERROR = {"error": "draining, reconnect to another server"}
    PUBLISH_ERROR = {"error": "broker unavailable, retry later"}

    def __init__(self) -> None:
        self.port = free_port()
        self.stopping = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def answer(self, status: int, body: dict[str, str], retry_after: str) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith("/events/?channel=hold"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"retry: 2000\n: held open\n\n")
                    self.wfile.flush()
                    outer.stopping.wait(30)
                    self.close_connection = True
                    return
                if self.path == "/readyz":  # ready: Caddy's health check keeps it
                    self.answer(200, {"status": "ready"}, "0")
                    return
                self.answer(503, outer.STREAM_ERROR, "1")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer(503, outer.PUBLISH_ERROR, "2")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(5)


@pytest.fixture(scope="module")
def hub503() -> Iterator[Hub503]:
    with running(Hub503()) as server:
        yield server


def missing_socket(tmp_path: Path) -> Path:
    return tmp_path / "no-such-dir" / "ssehub.sock"


@pytest.fixture(params=["nginx-tcp", "nginx-unix", "caddy-tcp", "caddy-unix"])
def proxy_down(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Nginx | Caddy]:
    """A proxy with the repo's snippets whose only app server is gone: a closed
    port, or (a proxy on an app host) a Unix socket that does not exist."""
    proxy: Nginx | Caddy
    if request.param == "nginx-tcp":
        proxy = Nginx(tmp_path, [free_port()])
    elif request.param == "nginx-unix":
        proxy = Nginx(tmp_path, [f"unix:{missing_socket(tmp_path)}"])
    elif request.param == "caddy-tcp":
        proxy = Caddy(tmp_path, [free_port()])
    else:
        proxy = CaddyOnSocket(tmp_path, missing_socket(tmp_path))
    with running(proxy) as server:
        yield server


@pytest.fixture(params=["nginx", "caddy"])
def proxy_503(request: pytest.FixtureRequest, tmp_path: Path,
              hub503: Hub503) -> Iterator[Nginx | Caddy]:
    proxy = (Nginx(tmp_path, [hub503.port]) if request.param == "nginx"
             else Caddy(tmp_path, [hub503.port]))
    with running(proxy) as server:
        yield server


# -- tests --------------------------------------------------------------------------


def test_stream_gets_a_retry_stream_not_a_502_while_no_app_server_answers(
        proxy_down: Nginx | Caddy) -> None:
    """The only app host restarting: the browser must retry, not give up on a 502."""
    started = time.monotonic()
    retry, body, _ = retry_stream(f"{proxy_down.url}/events/?channel=x",
                                  headers={"Accept": "text/event-stream"})
    budget = BODY_ENDS_WITHIN + (CADDY_TRY_SECONDS if isinstance(proxy_down, Caddy) else 0)
    assert time.monotonic() - started < budget
    assert 1000 <= retry <= 10000, body
    # Everything else keeps its error: the publish API (programs read 5xx and
    # retry with their Idempotency-Key) and the pages.
    with httpx.Client(timeout=CADDY_TRY_SECONDS + 5) as client:
        published = client.post(f"{proxy_down.url}/publish/",
                                 json={"channel": "x", "data": "d"})
        page = client.get(f"{proxy_down.url}/readyz")
    assert published.status_code in {502, 503}, (published.status_code, published.text)
    assert "event-stream" not in published.headers.get("content-type", "")
    assert page.status_code in {502, 503}, page.status_code


def test_stream_gets_a_retry_stream_not_the_hubs_503(proxy_503: Nginx | Caddy) -> None:
    """A draining hub (or one whose broker cannot confirm interest) answers the
    stream 503 with Retry-After, which a browser does not read: the proxy turns
    it into a retry stream. The publish API's 503 reaches the publisher as sent."""
    retry, body, _ = retry_stream(f"{proxy_503.url}/events/?channel=d")
    assert 1000 <= retry <= 10000, body
    with httpx.Client(timeout=CADDY_TRY_SECONDS + 5) as client:
        published = client.post(f"{proxy_503.url}/publish/", json={"channel": "d", "data": "x"})
    assert published.status_code == 503
    assert published.headers["retry-after"] == "2"
    assert published.json() == Hub503.PUBLISH_ERROR


def test_retry_streams_spread_the_reconnections(proxy_503: Nginx | Caddy) -> None:
    """Browsers turned away together (a restart ends every stream at once) must
    not all come back in the same instant: each retry stream's delay is drawn
    from a range."""
    values = {retry_stream(f"{proxy_503.url}/events/?channel=j")[0] for _ in range(40)}
    assert len(values) >= 3, values
    assert max(values) >= 1.5 * min(values), values


def test_nginx_stream_limit_answers_a_longer_retry_stream_not_a_429(
        tmp_path: Path, hub503: Hub503) -> None:
    """An address over ``limit_conn ssehub_streams`` (an office behind one NAT
    address with many tabs) gets a retry stream with a longer delay: the limit is
    temporary, and a 429 would end that tab's live updates until a reload."""
    snippet = (TEMPLATES / "nginx/ssehub-locations.conf").read_text()
    limited, count = re.subn(r"limit_conn ssehub_streams \d+;",
                             "limit_conn ssehub_streams 1;", snippet)
    assert count == 1, "the stream location lost its limit_conn ssehub_streams"
    locations = tmp_path / "locations.conf"
    locations.write_text(limited)
    with running(Nginx(tmp_path, [hub503.port], locations=locations)) as nginx, \
            httpx.Client(timeout=httpx.Timeout(5, read=5)) as client, \
            client.stream("GET", f"{nginx.url}/events/?channel=hold") as held:
        assert held.status_code == 200
        chunks = held.iter_raw()  # kept: a dropped iterator closes the stream
        assert next(chunks).startswith(b"retry: ")  # the address's one stream is open
        busy, body, _ = retry_stream(f"{nginx.url}/events/?channel=x")
    # Longer than the 2-4 s of an unavailable hub: a slot frees only when a tab closes.
    assert busy >= 10000, body


@pytest.mark.parametrize(("query", "headers", "status"), [
    ("", {}, 400),
    ("?channel=private.x", {}, 401),
    ("?channel=private.x", {"Authorization": "Bearer not-a-jwt"}, 401),
    ("?channel=private.x", {"Authorization": "Bearer " + tokens.mint(
        SECRET, subscribe=["other.*"], ttl=600)}, 403),
], ids=["400-no-channel", "401-no-token", "401-bad-token", "403-other-channel"])
def test_hub_refusals_reach_the_client_as_the_hub_sent_them(
        proxy: Nginx | Caddy, stack: tuple[ServedHub, Nginx], query: str,
        headers: dict[str, str], status: int) -> None:
    """A refusal is final: status, JSON body and WWW-Authenticate pass the proxy
    unchanged (intercepting only the transient codes must not touch them)."""
    hub, _ = stack
    with httpx.Client(timeout=10) as client:
        direct = client.get(f"{hub.url}/events/{query}", headers=headers)
        proxied = client.get(f"{proxy.url}/events/{query}", headers=headers)
    assert direct.status_code == status, direct.text
    assert proxied.status_code == status, proxied.text
    assert proxied.headers["content-type"] == "application/json"
    assert proxied.json() == direct.json()
    assert proxied.headers.get("www-authenticate") == direct.headers.get("www-authenticate")


def test_hub_405_on_the_stream_reaches_the_client(proxy: Nginx | Caddy) -> None:
    with httpx.Client(timeout=10) as client:
        refused = client.post(f"{proxy.url}/events/?channel=public.x", content=b"")
    assert refused.status_code == 405, refused.text
    assert refused.headers["allow"] == "GET"
    assert refused.json()["error"]
