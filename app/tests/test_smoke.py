"""`ssehub smoke`: passes through a healthy proxy, and names the hop that broke.

Each failure is made on purpose with a real server: an unresolvable name, a
closed port, TLS against plain HTTP, nginx with a dead upstream, a plain web
server, nginx that buffers, a token that may not publish, and a proxy whose
publish and stream go to hubs that do not share a broker.
"""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SECRET, base_env
from servers import TEMPLATES, Hub, Nginx, Redis, free_port, running

from ssehub import tokens
from ssehub.probe import probe

TOKEN = tokens.mint(SECRET, publish=["smoke.*"], subscribe=["smoke.*"], ttl=600)


def test_smoke_passes_through_nginx_and_reports_latency(stack) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    result = probe(nginx.url, TOKEN)
    assert result.ok, result.line()
    assert result.latency_ms is not None and result.latency_ms < 1000
    assert result.line().startswith("ok: event ")


def test_smoke_command_exit_codes(stack) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    good = subprocess.run([sys.executable, "-m", "ssehub.cli", "smoke", nginx.url, "--token",
                           TOKEN], capture_output=True, text=True, timeout=30)
    assert good.returncode == 0 and good.stdout.startswith("ok: "), good.stdout + good.stderr
    bad = subprocess.run([sys.executable, "-m", "ssehub.cli", "smoke",
                          f"http://127.0.0.1:{free_port()}", "--token", TOKEN],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and bad.stdout.startswith("FAILED at tcp: ")


@pytest.mark.parametrize(("url", "hop"), [
    ("http://no-such-host.invalid", "dns"),
    ("http://127.0.0.1:{closed}", "tcp"),
    ("https://127.0.0.1:{nginx}", "tls"),
])
def test_smoke_names_the_transport_hop(stack, url: str, hop: str) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    result = probe(url.format(closed=free_port(), nginx=nginx.port), TOKEN, timeout=3)
    assert not result.ok and result.hop == hop, result.line()


def test_smoke_names_a_dead_upstream(tmp_path: Path) -> None:
    with running(Nginx(tmp_path, [free_port()])) as nginx:
        result = probe(nginx.url, TOKEN, timeout=3)
    assert result.hop == "proxy status" and " 502 " in result.message, result.line()


def test_smoke_names_a_server_that_is_not_ssehub(tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "index.html").write_text("<html>not a stream</html>")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = probe(f"http://127.0.0.1:{server.server_address[1]}", TOKEN, timeout=3)
    finally:
        server.shutdown()
        server.server_close()
    assert result.hop == "content type" and "text/html" in result.message, result.line()


def test_smoke_names_compression_on_the_stream(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A6: gzip switched on for text/event-stream holds events back."""
    hub, _ = stack
    locations = tmp_path / "gzip.conf"
    locations.write_text((TEMPLATES / "nginx/ssehub-locations.conf").read_text().replace(
        "gzip off;", "gzip on; gzip_types text/event-stream;"))
    with running(Nginx(tmp_path, [hub.port], locations=locations)) as compressing:
        result = probe(compressing.url, TOKEN, timeout=3)
    assert result.hop == "buffering" and "compressed (gzip)" in result.message, result.line()


def test_smoke_names_a_buffering_proxy(stack) -> None:  # type: ignore[no-untyped-def]
    """A proxy that passes headers at once but holds the body until 64 kB (a stand-in
    for a buffering CDN or load balancer; nginx 1.22 flushes each upstream read)."""
    hub, _ = stack
    port = free_port()
    ready = threading.Event()

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
            await asyncio.sleep(15)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(5)
    result = probe(f"http://127.0.0.1:{port}", TOKEN, timeout=3)
    assert result.hop == "buffering" and "no bytes within" in result.message, result.line()


def test_smoke_names_a_token_that_may_not_publish(stack) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    subscribe_only = tokens.mint(SECRET, subscribe=["smoke.*"], ttl=600)
    result = probe(nginx.url, subscribe_only, timeout=3)
    assert result.hop == "publish" and "403" in result.message, result.line()


@pytest.fixture
def split_proxy(stack, tmp_path: Path) -> Iterator[Nginx]:  # type: ignore[no-untyped-def]
    """Streams go to the shared hub, publishes to a hub on another Redis."""
    hub, _ = stack
    redis = Redis(tmp_path)
    other = Hub(tmp_path, base_env(SSEHUB_BROKER_URL=redis.url, SSEHUB_DATA_DIR=str(tmp_path)))
    stream_part, publish_part = (TEMPLATES / "nginx/ssehub-locations.conf").read_text().split(
        "location = /publish/ {", 1)
    locations = tmp_path / "split.conf"
    locations.write_text(stream_part + "location = /publish/ {" + publish_part.replace(
        "proxy_pass http://ssehub;", "proxy_pass http://other;", 1))
    nginx = Nginx(tmp_path, [hub.port], locations=locations,
                  http_extra=f"upstream other {{ server 127.0.0.1:{other.port}; }}")
    try:
        redis.start()
        other.start()
        nginx.start()
        yield nginx
    finally:
        nginx.stop()
        other.stop()
        redis.stop()


def test_smoke_names_lost_delivery(split_proxy: Nginx) -> None:
    result = probe(split_proxy.url, TOKEN, timeout=2)
    assert result.hop == "delivery" and "was stored but did not arrive" in result.message, (
        result.line())


def run_smoke_playbook(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    playbook = Path(sys.executable).parent / "ansible-playbook"
    return subprocess.run(
        [str(playbook), "-i", "localhost,", "ansible/playbooks/smoke.yml",
         "-e", f"ssehub_smoke_url={url}", "-e", f"ssehub_token_secret={SECRET}", *extra],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "ANSIBLE_NOCOLOR": "1"})


def test_smoke_playbook_passes_and_fails_with_the_hop(stack) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    good = run_smoke_playbook(nginx.url)
    assert good.returncode == 0, good.stdout[-2000:]
    assert "ok: event " in good.stdout and "crossed" in good.stdout
    bad = run_smoke_playbook(f"http://127.0.0.1:{free_port()}")
    assert bad.returncode != 0
    assert "FAILED at tcp: cannot connect" in bad.stdout + bad.stderr


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


def test_hub_on_a_unix_socket_behind_nginx(redis_server: Redis, tmp_path: Path) -> None:
    """`ssehub serve --bind unix:/path`: a proxy on the same host reaches the hub
    over a Unix socket (cheaper per event than loopback TCP; README, figures)."""
    env = base_env(SSEHUB_BROKER_URL=redis_server.url, SSEHUB_REDIS_PREFIX="uds:",
                   SSEHUB_DATA_DIR=str(tmp_path))
    hub = Hub(tmp_path, env, workers=1, unix_socket=True)
    with running(hub):
        assert hub.socket is not None and hub.socket.is_socket()
        with running(Nginx(tmp_path, [hub.bind])) as nginx:
            result = probe(nginx.url, TOKEN)
    assert result.ok, result.line()
    assert hub.socket is not None and not hub.socket.parent.exists()


def test_serve_refuses_a_relative_unix_socket() -> None:
    bad = subprocess.run([sys.executable, "-m", "ssehub.cli", "serve", "--bind", "unix:hub.sock"],
                         capture_output=True, text=True, timeout=30,
                         env={**__import__("os").environ,
                              **base_env(SSEHUB_BROKER_URL="redis://127.0.0.1:1/0")})
    assert bad.returncode != 0 and "absolute path" in bad.stderr, bad.stderr
