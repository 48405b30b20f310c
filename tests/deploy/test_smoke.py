"""`ssehub smoke`: passes through a healthy proxy, and names the hop that broke.

Each failure is made on purpose with a real server: an unresolvable name, a
closed port, TLS against plain HTTP, nginx with a dead upstream, a plain web
server, nginx that compresses the stream, a proxy that buffers, a token that may
not publish, and a proxy whose publish and stream go to hubs that do not share a
broker. Each one meets the three doors to the same check: ``probe()``, the
``ssehub smoke`` command, and the ``sse_probe`` module run by
ansible/playbooks/smoke.yml.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from ssehub.probe import probe
from ssekit_testing import tokens
from ssekit_testing.fixtures import SECRET, base_env
from ssekit_testing.roles import ANSIBLE_PLAYBOOK
from ssekit_testing.servers import (
    TEMPLATES,
    Nginx,
    Redis,
    ServedHub,
    free_port,
    running,
)

# Minted at collection: the default hour outlasts a slow suite.
TOKEN = tokens.mint(SECRET, publish=["smoke.*"], subscribe=["smoke.*"])


def test_smoke_passes_through_nginx_and_reports_latency(stack) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    result = probe(nginx.url, TOKEN)
    assert result.ok, result.line()
    assert result.latency_ms is not None and result.latency_ms < 1000
    assert result.line().startswith("ok: event ")


def test_smoke_command_prints_one_ok_line(stack) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    good = subprocess.run([sys.executable, "-m", "ssehub.cli", "smoke", nginx.url, "--token",
                           TOKEN], capture_output=True, text=True, timeout=30)
    assert good.returncode == 0 and good.stdout.startswith("ok: "), good.stdout + good.stderr
    assert len(good.stdout.splitlines()) == 1, good.stdout


def run_smoke_playbook(url: str, *extra: str,
                       callback: str = "default") -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "ansible/playbooks/smoke.yml",
         "-e", f"ssehub_smoke_url={url}", "-e", f"ssehub_token_secret={SECRET}", *extra],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_STDOUT_CALLBACK": callback})


def test_smoke_playbook_reports_the_latency(stack) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    good = run_smoke_playbook(nginx.url)
    assert good.returncode == 0, good.stdout[-2000:]
    assert "ok: event " in good.stdout and "crossed" in good.stdout


@dataclass(frozen=True)
class Broken:
    """A deployment broken at one hop, and what the smoke test must say about it."""

    hop: str
    url: str
    says: str  # part of the message after "FAILED at <hop>: "
    token: str | None = None  # None: TOKEN (the playbook mints its own from SECRET)
    timeout: float = 3.0


# A breakage sets up one failure with real servers (stack: the session's hub and
# nginx; a fresh directory) and tears it down once all three doors have met it.
Breakage = Callable[[tuple[ServedHub, Nginx], Path], AbstractContextManager[Broken]]


@contextmanager
def unresolvable_name(stack: tuple[ServedHub, Nginx], directory: Path) -> Iterator[Broken]:
    yield Broken("dns", "http://no-such-host.invalid", "cannot resolve no-such-host.invalid")


@contextmanager
def closed_port(stack: tuple[ServedHub, Nginx], directory: Path) -> Iterator[Broken]:
    yield Broken("tcp", f"http://127.0.0.1:{free_port()}", "cannot connect to 127.0.0.1:")


@contextmanager
def tls_against_plain_http(stack: tuple[ServedHub, Nginx], directory: Path) -> Iterator[Broken]:
    _, nginx = stack
    yield Broken("tls", f"https://127.0.0.1:{nginx.port}", "TLS handshake with 127.0.0.1:")


@contextmanager
def dead_upstream(stack: tuple[ServedHub, Nginx], directory: Path) -> Iterator[Broken]:
    with running(Nginx(directory, [free_port()])) as nginx:
        # A 200 retry stream, for browsers: the probe still names the hop.
        yield Broken("proxy status", nginx.url, "the proxy reached no app server")


@contextmanager
def server_that_is_not_ssehub(stack: tuple[ServedHub, Nginx], directory: Path) -> Iterator[Broken]:
    (directory / "events").mkdir()
    (directory / "events" / "index.html").write_text("<html>not a stream</html>")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Broken("content type", f"http://127.0.0.1:{server.server_address[1]}",
                     "Content-Type 'text/html")
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def compression_on_the_stream(stack: tuple[ServedHub, Nginx], directory: Path) -> Iterator[Broken]:
    """A6: gzip switched on for text/event-stream holds events back."""
    hub, _ = stack
    locations = directory / "gzip.conf"
    locations.write_text((TEMPLATES / "nginx/ssehub-locations.conf").read_text().replace(
        "gzip off;", "gzip on; gzip_types text/event-stream;"))
    with running(Nginx(directory, [hub.port], locations=locations)) as compressing:
        yield Broken("buffering", compressing.url, "compressed (gzip)")


@contextmanager
def buffering_proxy(stack: tuple[ServedHub, Nginx], directory: Path) -> Iterator[Broken]:
    """A proxy that passes headers at once but holds the body until 64 kB (a stand-in
    for a buffering CDN or load balancer; nginx 1.22 flushes each upstream read)."""
    hub, _ = stack
    port = free_port()
    ready, done = threading.Event(), threading.Event()

    async def pipe(reader, writer, hold: bool) -> None:  # type: ignore[no-untyped-def]
        held = b""
        try:
            head = b""
            if hold:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(head)
            while chunk := await reader.read(65536):
                if hold:
                    held += chunk
                    if len(held) < 65536:
                        continue
                    chunk, held = held, b""
                writer.write(chunk)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        async def handle(client_reader, client_writer) -> None:  # type: ignore[no-untyped-def]
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", hub.port)
            await asyncio.gather(pipe(client_reader, upstream_writer, False),
                                 pipe(upstream_reader, client_writer, True))

        server = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()
        async with server:
            await asyncio.to_thread(done.wait)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(5), "the buffering proxy did not start"
    try:
        yield Broken("buffering", f"http://127.0.0.1:{port}", "no bytes within")
    finally:
        done.set()
        thread.join(10)


@contextmanager
def token_that_may_not_publish(stack: tuple[ServedHub, Nginx], directory: Path) -> Iterator[Broken]:
    _, nginx = stack
    subscribe_only = tokens.mint(SECRET, subscribe=["smoke.*"], ttl=600)
    yield Broken("publish", nginx.url, "answered 403", token=subscribe_only)


@contextmanager
def lost_delivery(stack: tuple[ServedHub, Nginx], directory: Path) -> Iterator[Broken]:
    """Streams go to the shared hub, publishes to a hub on another Redis."""
    hub, _ = stack
    redis = Redis(directory)
    other = ServedHub(directory, base_env(SSEHUB_BROKER_URL=redis.url,
                                          SSEHUB_DATA_DIR=str(directory)))
    stream_part, publish_part = (TEMPLATES / "nginx/ssehub-locations.conf").read_text().split(
        "location = /publish/ {", 1)
    locations = directory / "split.conf"
    locations.write_text(stream_part + "location = /publish/ {" + publish_part.replace(
        "proxy_pass http://ssehub;", "proxy_pass http://other;", 1))
    nginx = Nginx(directory, [hub.port], locations=locations,
                  http_extra=f"upstream other {{ server 127.0.0.1:{other.port}; }}")
    try:
        redis.start()
        other.start()
        nginx.start()
        yield Broken("delivery", nginx.url, "was stored but did not arrive", timeout=1)
    finally:
        nginx.stop()
        other.stop()
        redis.stop()


BREAKAGES: list[Breakage] = [
    unresolvable_name, closed_port, tls_against_plain_http, dead_upstream,
    server_that_is_not_ssehub, compression_on_the_stream, buffering_proxy,
    token_that_may_not_publish, lost_delivery,
]


@pytest.fixture(scope="module", params=BREAKAGES, ids=lambda breakage: breakage.__name__)
def broken(request: pytest.FixtureRequest, stack: tuple[ServedHub, Nginx],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broken]:
    """Module scope: pytest runs the three tests below against one breakage, then the next."""
    with request.param(stack, tmp_path_factory.mktemp("broken")) as case:
        yield case


def test_smoke_names_the_hop_that_broke(broken: Broken) -> None:
    result = probe(broken.url, broken.token or TOKEN, timeout=broken.timeout)
    assert not result.ok and result.hop == broken.hop, result.line()
    assert broken.says in result.message and len(result.line().splitlines()) == 1, (
        repr(result.line()))


def test_smoke_command_prints_the_hop_that_broke(broken: Broken) -> None:
    bad = subprocess.run([sys.executable, "-m", "ssehub.cli", "smoke", broken.url,
                          "--token", broken.token or TOKEN, "--timeout", str(broken.timeout)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    line, *rest = bad.stdout.splitlines() or [""]
    assert not rest and line.startswith(f"FAILED at {broken.hop}: "), bad.stdout
    assert broken.says in line, line


def test_smoke_playbook_fails_with_the_hop_that_broke(broken: Broken) -> None:
    extra = ["-e", f"ssehub_smoke_timeout={broken.timeout}"]
    if broken.token:
        extra += ["-e", f"ssehub_smoke_token={broken.token}"]
    bad = run_smoke_playbook(broken.url, *extra, callback="ansible.posix.json")
    assert bad.returncode != 0, bad.stdout[-2000:]
    tasks = json.loads(bad.stdout)["plays"][0]["tasks"]
    result = next(task["hosts"]["localhost"] for task in tasks
                  if task["hosts"]["localhost"]["action"] == "sse_probe")
    assert result["failed"] and result["hop"] == broken.hop, result
    message = result["msg"]
    assert message.startswith(f"FAILED at {broken.hop}: ") and broken.says in message, message


def test_smoke_connect_to_keeps_the_public_name(stack) -> None:  # type: ignore[no-untyped-def]
    """--connect-to: the socket goes to the proxy; the URL's name is never resolved."""
    _, nginx = stack
    url = f"http://sse.example.invalid:{nginx.port}"
    assert probe(url, TOKEN, timeout=3).hop == "dns"
    result = probe(url, TOKEN, connect_to=f"127.0.0.1:{nginx.port}")
    assert result.ok, result.line()
    closed = probe(url, TOKEN, timeout=3, connect_to=f"127.0.0.1:{free_port()}")
    assert closed.hop == "tcp" and "127.0.0.1" in closed.message, closed.line()
    via_playbook = run_smoke_playbook(url, "-e", f"ssehub_smoke_connect_to=127.0.0.1:{nginx.port}")
    assert via_playbook.returncode == 0, via_playbook.stdout[-2000:]
