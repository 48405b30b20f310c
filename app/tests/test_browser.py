"""A real browser: headless Chromium (Debian's ``chromium``) driven by Playwright,
against ``ssehub serve`` (gunicorn, uvicorn workers, Redis) behind nginx with the
templates/nginx snippets, TLS and HTTP/2 on loopback (and, for the restart of the
only app host, Caddy with templates/caddy on the hub's Unix socket).

Nothing here skips: without chromium or playwright these tests fail (CI installs
both; `make deps` and `.ci/run` apt-install chromium, the test extra has playwright).
Playwright only speaks CDP to the Debian binary; `playwright install` is never needed.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from ssekit_testing import tokens
from ssekit_testing.fixtures import SECRET, base_env, fresh_database
from ssekit_testing.servers import (
    Caddy,
    Nginx,
    Postgres,
    Redis,
    ServedHub,
    running,
    self_signed_certificate,
    stop,
    wait_for,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in CI
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--ignore-certificate-errors",  # the self-signed certificate made below
]
# Each request nginx served (written when it ends) and the connection it came on.
LOG_FORMAT = "log_format streams '$server_protocol $status $request_uri $connection';"


class TLSStack:
    def __init__(self, h2: Nginx, h1: Nginx, http: httpx.Client) -> None:
        self.h2, self.h1 = h2, h1  # the same hub behind nginx with HTTP/2 and HTTP/1.1 only
        self.http = http  # trusts the stack's certificate

    def publish(self, base: str, channel: str, data: object) -> str:
        response = self.http.post(
            f"{base}/publish/", json={"channel": channel, "data": data},
            headers={"Authorization": "Bearer " + tokens.mint(SECRET, publish=[channel],
                                                              subscribe=[], ttl=300)})
        assert response.status_code == 201, response.text
        event_id: str = response.json()["id"]
        return event_id


def _nginx(directory: Path, hub_port: int, cert: tuple[Path, Path], http2: bool) -> Nginx:
    directory.mkdir()
    return Nginx(directory, [hub_port], tls=cert, http2=http2, http_extra=LOG_FORMAT,
                 server_extra=f"access_log {directory}/access.log streams;")


@pytest.fixture(scope="module")
def tls_stack(redis_server: Redis, pg_server: Postgres,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSStack]:
    directory = tmp_path_factory.mktemp("browser")
    cert = self_signed_certificate(directory)
    env = base_env(SSEHUB_BROKER_URL=redis_server.url,
                   SSEHUB_DATABASE_URL=fresh_database(pg_server),
                   SSEHUB_REDIS_PREFIX="browser:", SSEHUB_HEARTBEAT="5",
                   SSEHUB_PUBLIC_CHANNELS="public.*", SSEHUB_DATA_DIR=str(directory),
                   SSEHUB_DEMO="true")
    subprocess.run([sys.executable, "-m", "ssehub.cli", "migrate", "-v", "0"],
                   env={**os.environ, **env}, check=True)
    hub = ServedHub(directory, env, workers=2)
    h2 = _nginx(directory / "h2", hub.port, cert, http2=True)
    h1 = _nginx(directory / "h1", hub.port, cert, http2=False)
    # No SSEHUB_CSRF_TRUSTED_ORIGINS: the chat form's POST carries Origin
    # https://127.0.0.1:PORT, and the snippet passes Host as the client sent it
    # ($http_host, port included), so Django's CSRF origin check passes on its own.
    verify = ssl.create_default_context(cafile=str(cert[0]))
    with (running(hub), running(h2), running(h1),
          httpx.Client(verify=verify, timeout=10) as http):
        yield TLSStack(h2, h1, http)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium (make deps)"
    # Imported here so that without playwright these tests fail, not the whole collection.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # A fresh profile per launch (Playwright makes and removes its own user data dir).
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                              headless=True, timeout=60_000)
        try:
            yield instance
        finally:
            instance.close()


OPEN_STREAM = """(url) => {
  window.got = [];
  window.source = new EventSource(url);
  window.source.onmessage = (e) => { window.got.push(e.data); };
}"""


def open_stream(page: Page, channel: str) -> None:
    page.evaluate(OPEN_STREAM, f"/events/?channel={channel}")


def stream_requests(nginx: Nginx, prefix: str, count: int) -> list[str]:
    """nginx's access log lines for streams on ``prefix.*`` channels, once ``count`` of
    them have ended (nginx logs a request when it ends)."""
    log = nginx.dir / "access.log"

    def lines() -> list[str]:
        text = log.read_text() if log.exists() else ""
        return [line for line in text.splitlines() if f"/events/?channel={prefix}." in line]

    wait_for(lambda: len(lines()) >= count, timeout=10, what=f"{count} stream lines in {log}")
    return lines()


def test_chat_message_posted_in_one_page_appears_in_the_other(tls_stack, browser) -> None:  # type: ignore[no-untyped-def]
    """Two visitors (separate cookie jars) on the chat demo: one posts through the page's
    form, over TLS and HTTP/2 through nginx, and both pages show it from their stream."""
    url = tls_stack.h2.url + "/?room=browser"
    contexts = [browser.new_context() for _ in range(2)]
    try:
        alice, bob = (context.new_page() for context in contexts)
        for page in (alice, bob):
            page.set_default_timeout(10_000)
            page.goto(url)
            page.wait_for_function("document.getElementById('state').textContent === 'live'")
        text = "hello from alice\nline two \u2028 ✓"
        alice.fill("input[name=author]", "alice")
        alice.fill("#text", text)
        alice.click("button[type=submit]")
        bob.wait_for_function("window.received.length === 1")
        received = bob.evaluate("window.received")
        # The form's line break travels as CRLF (HTML form encoding); the chat's JSON
        # data keeps it, and U+2028 arrives as it was typed.
        assert [(m["author"], m["text"]) for m in received] == [
            ("alice", text.replace("\n", "\r\n"))]
        shown = bob.locator("#log li").last
        assert shown.inner_text().startswith("alice: hello from alice")
        alice.wait_for_function("window.received.length === 1")
        assert alice.evaluate("document.getElementById('text').value") == ""
        assert alice.evaluate("document.getElementById('state').textContent") == "live"
    finally:
        for context in contexts:
            context.close()


def test_payloads_arrive_intact_in_the_browser(tls_stack, browser) -> None:  # type: ignore[no-untyped-def]
    """What the browser's own EventSource parser hands to the page (I5/I6)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.goto(tls_stack.h2.url + "/healthz")
        open_stream(page, "public.payloads")
        page.wait_for_function("window.source.readyState === EventSource.OPEN")
        cases: list[tuple[object, str]] = [
            ("two\nlines", "two\nlines"),
            ("trailing newline\n", "trailing newline\n"),
            ("\n\n", "\n\n"),
            ("line\u2028separator", "line\u2028separator"),
            # SSE cannot carry CR in data: a CRLF string arrives as LF (documented) ...
            ("crlf\r\nstring", "crlf\nstring"),
        ]
        # ... and JSON data keeps CR, LF, CRLF, U+2028 and a trailing newline exactly.
        kept = {"text": "crlf\r\nlf\ncr\r u2028\u2028 trailing\n"}
        cases.append((kept, json.dumps(kept, separators=(",", ":"), ensure_ascii=False)))
        for data, _ in cases:
            tls_stack.publish(tls_stack.h2.url, "public.payloads", data)
        page.wait_for_function(f"window.got.length === {len(cases)}")
        got = page.evaluate("window.got")
        assert got == [expected for _, expected in cases]
        assert json.loads(got[-1]) == kept
    finally:
        context.close()


def eight_tabs(browser: Browser, nginx: Nginx, prefix: str) -> tuple[list[Page], list[str]]:
    """Eight tabs of one browser profile on ``nginx``, each opening a stream on its own
    channel. The pages load first (their connections are then idle), then the streams."""
    context = browser.new_context()
    context.set_default_timeout(10_000)
    pages = [context.new_page() for _ in range(8)]
    for page in pages:
        page.goto(nginx.url + "/healthz")
    channels = [f"public.{prefix}.{i}" for i in range(8)]
    for page, channel in zip(pages, channels, strict=True):
        open_stream(page, channel)
    return pages, channels


def ready_states(pages: list[Page]) -> list[int]:
    return [int(page.evaluate("window.source.readyState")) for page in pages]


def test_eight_tabs_stream_over_one_http2_connection(tls_stack, browser) -> None:  # type: ignore[no-untyped-def]
    """HTTP/2 multiplexes every tab's stream: HTTP/1.1's six connections per host do not
    limit how many tabs stream at once."""
    pages, channels = eight_tabs(browser, tls_stack.h2, "h2tab")
    try:
        for page in pages:
            page.wait_for_function("window.source.readyState === EventSource.OPEN")
        ids = [tls_stack.publish(tls_stack.h2.url, channel, f"to {channel}")
               for channel in channels]
        for page, channel in zip(pages, channels, strict=True):
            page.wait_for_function("window.got.length === 1")
            assert page.evaluate("window.got") == [f"to {channel}"]
            assert page.evaluate(
                "performance.getEntriesByType('navigation')[0].nextHopProtocol") == "h2"
        assert len(set(ids)) == 8
    finally:
        pages[0].context.close()
    logged = [line.split() for line in stream_requests(tls_stack.h2, "public.h2tab", 8)]
    assert sorted(fields[:3] for fields in logged) == sorted(
        ["HTTP/2.0", "200", f"/events/?channel={c}"] for c in channels)
    assert len({fields[3] for fields in logged}) == 1, "not one shared connection"


def test_eight_tabs_over_http1_wait_for_the_six_connection_limit(tls_stack, browser) -> None:  # type: ignore[no-untyped-def]
    """The same eight tabs over HTTP/1.1: Chromium opens six connections per host, so
    two streams wait until a tab closes. This is why the proxy should speak HTTP/2."""
    pages, channels = eight_tabs(browser, tls_stack.h1, "h1tab")
    try:
        wait_for(lambda: ready_states(pages).count(1) == 6, timeout=10, what="six open streams")
        time.sleep(1)  # the other two stay queued, however long they wait
        states = ready_states(pages)
        assert sorted(states) == [0, 0, 1, 1, 1, 1, 1, 1], states
        waiting = [page for page, state in zip(pages, states, strict=True) if state == 0]
        open_pages = [page for page, state in zip(pages, states, strict=True) if state == 1]
        for channel in channels:
            tls_stack.publish(tls_stack.h1.url, channel, f"to {channel}")
        for page in open_pages:
            page.wait_for_function("window.got.length === 1")
        assert [page.evaluate("window.got.length") for page in waiting] == [0, 0]
        assert open_pages[0].evaluate(
            "performance.getEntriesByType('navigation')[0].nextHopProtocol") == "http/1.1"
        open_pages[0].close()  # frees a connection: one waiting stream gets it
        wait_for(lambda: sorted(ready_states(waiting)) == [0, 1], timeout=10,
                 what="a waiting stream to connect")
        # Close the tab still waiting first, so its request never reaches nginx.
        next(page for page in waiting if ready_states([page]) == [0]).close()
    finally:
        pages[0].context.close()
    logged = [line.split() for line in stream_requests(tls_stack.h1, "public.h1tab", 7)]
    assert len(logged) == 7 and all(fields[:2] == ["HTTP/1.1", "200"] for fields in logged)
    assert len({fields[3] for fields in logged}) == 7, "one connection per stream"


# -- the only app host restarts (issue 13, part 5) ---------------------------------

# How long the hub stays down: longer than Caddy keeps trying the dial of a
# stream (lb_try_duration 5s), so that through both proxies the browser's
# first reconnect finds no app server (the retry stream) and comes back again.
DOWN_SECONDS = 7.0
# Two streams: one that has events before the restart, and a quiet one that has
# none, whose only Last-Event-ID is the bare id: the hub sends when it opens.
RESTART_OPEN = """([url, quietUrl]) => {
  window.got = []; window.states = []; window.marker = 'not reloaded'; window.quiet = [];
  window.source = new EventSource(url);
  window.source.onmessage = (e) => { window.got.push([e.lastEventId, e.data]); };
  window.source.onerror = () => { window.states.push(window.source.readyState); };
  window.quietSource = new EventSource(quietUrl);
  window.quietSource.onmessage = (e) => { window.quiet.push([e.lastEventId, e.data]); };
}"""


@pytest.fixture(scope="module", params=["nginx", "caddy"])
def single_host(request: pytest.FixtureRequest, redis_server: Redis, tmp_path_factory:
                pytest.TempPathFactory) -> Iterator[tuple[ServedHub, Nginx | Caddy]]:
    """The single-host layout: the proxy reaches the only hub over its Unix socket.
    nginx with TLS and HTTP/2 (as the role serves it); Caddy over plain HTTP."""
    from ssekit_testing.servers import CaddyOnSocket

    directory = tmp_path_factory.mktemp(f"single-{request.param}")
    env = base_env(SSEHUB_BROKER_URL=redis_server.url, SSEHUB_REDIS_PREFIX="single:",
                   SSEHUB_HEARTBEAT="5", SSEHUB_PUBLIC_CHANNELS="public.*",
                   SSEHUB_DATA_DIR=str(directory))
    subprocess.run([sys.executable, "-m", "ssehub.cli", "migrate", "-v", "0"],
                   env={**os.environ, **env}, check=True, timeout=120)
    hub = ServedHub(directory, env, unix_socket=True)
    assert hub.socket is not None
    proxy: Nginx | Caddy
    if request.param == "nginx":
        proxy = Nginx(directory / "nginx", [hub.bind], tls=self_signed_certificate(directory),
                      http2=True)
        (directory / "nginx").mkdir()
    else:
        proxy = CaddyOnSocket(directory / "caddy", hub.socket)
    with running(hub), running(proxy):
        yield hub, proxy


def restart(hub: ServedHub, down: float) -> None:
    """Stop the hub as systemd does (SIGTERM: it drains), leave it down, start it."""
    assert hub.process is not None
    stop(hub.process, timeout=30)
    time.sleep(down)
    hub.start()


def test_a_page_rides_out_a_restart_of_the_only_app_host(single_host, browser) -> None:  # type: ignore[no-untyped-def]
    """While the only hub is down, the proxy answers the stream with a 200 retry
    stream, not a 502 (which would close EventSource for good); the page reconnects
    by itself with its Last-Event-ID and gets what was published meanwhile."""
    hub, proxy = single_host
    channel = f"public.restart-{type(proxy).__name__.lower()}"
    quiet = f"{channel}-quiet"
    verify = False  # the nginx stack's self-signed certificate
    with httpx.Client(verify=verify, timeout=10) as http:
        def publish(data: str, channel: str = channel) -> str:
            """As a careful publisher: a 502/503 (Caddy's health check has not seen the
            hub back yet) is sent again with the same Idempotency-Key."""
            token = tokens.mint(SECRET, publish=[channel], subscribe=[], ttl=300)
            headers = {"Idempotency-Key": uuid.uuid4().hex, "Authorization": f"Bearer {token}"}
            deadline = time.monotonic() + 10
            while True:
                answer = http.post(f"{proxy.url}/publish/", headers=headers,
                                   json={"channel": channel, "data": data})
                if answer.status_code not in (502, 503) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert answer.status_code == 201, answer.text
            event_id: str = answer.json()["id"]
            return event_id

        context = browser.new_context(ignore_https_errors=True)
        try:
            page = context.new_page()
            page.set_default_timeout(20_000)
            page.goto(proxy.url + "/healthz")
            page.evaluate(RESTART_OPEN, [f"/events/?channel={channel}",
                                         f"/events/?channel={quiet}"])
            page.wait_for_function("window.source.readyState === EventSource.OPEN"
                                   " && window.quietSource.readyState === EventSource.OPEN")
            sent = [(publish(f"before {i}"), f"before {i}") for i in range(3)]
            page.wait_for_function("window.got.length === 3")
            restart(hub, DOWN_SECONDS)
            # Published before the page is back: it gets them by replay.
            sent += [(publish(f"after {i}"), f"after {i}") for i in range(3)]
            to_quiet = [(publish(f"quiet {i}", quiet), f"quiet {i}") for i in range(2)]
            page.wait_for_function("window.got.length >= 6 && window.quiet.length >= 2")
            sent.append((publish("live"), "live"))
            page.wait_for_function("window.got.length >= 7")
            time.sleep(0.5)  # a repeat would show
            got = [tuple(item) for item in page.evaluate("window.got")]
            got_quiet = [tuple(item) for item in page.evaluate("window.quiet")]
            states = page.evaluate("window.states")
            assert page.evaluate("window.marker") == "not reloaded"
            assert page.evaluate("window.source.readyState") == 1, states
        finally:
            context.close()
    assert 2 not in states, f"EventSource was closed for good: readyState {states}"
    assert states, "the page never saw the restart"
    assert got == sent, f"the page got {got}"
    assert got_quiet == to_quiet, f"the quiet stream got {got_quiet}"
