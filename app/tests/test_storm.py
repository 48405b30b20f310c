"""A reconnect storm over the Unix socket gets streams, not 502s (issue 13, part 4).

After a restart or a deploy every stream of a host comes back within the retry
window. Regression: the hub listened with gunicorn's default backlog (2,048),
and on a Unix socket an overflow is an immediate error for the proxy, not a
retried SYN as on TCP: of 4,000 streams opened at once through nginx, 1,592 got
a 502 ("connect() to unix:... failed (11: Resource temporarily unavailable)"),
which closes a browser's EventSource for good. Now the hub asks for a backlog
of 65535, which the kernel caps at net.core.somaxconn, set by the common role;
nginx on the app host backs the socket up with the hub's own TCP listener, as
the nginx role renders the upstream.

The kernel setting is the common role's, applied for the test's duration (and
put back after), so the test runs what the role deploys. The streams come from
one loopback address, standing in for many clients: the per-address limits are
lifted (servers.locations_for_load). One Caddy process holds a client and an
upstream connection per stream, so it gets 9,000 under this machine's open-files
cap of 20,000; nginx spreads 10,000 over four workers.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ssekit_testing.fixtures import base_env
from ssekit_testing.roles import role_defaults
from ssekit_testing.servers import (
    CaddyOnSocket,
    Nginx,
    Redis,
    ServedHub,
    locations_for_load,
    running,
)

NGINX_STREAMS = 10_000
CADDY_STREAMS = 9_000
OPEN_SECONDS = 60  # every stream's first bytes, at the latest
SOMAXCONN = "net.core.somaxconn"


@pytest.fixture(scope="module")
def role_kernel() -> Iterator[int]:
    """net.core.somaxconn as the common role sets it, for the module's duration."""
    wanted = int(role_defaults("common")["common_sysctl"][SOMAXCONN])
    before = int(subprocess.check_output(["sysctl", "-n", SOMAXCONN], text=True))
    if before < wanted:
        subprocess.run(["sysctl", "-q", "-w", f"{SOMAXCONN}={wanted}"], check=True)
    try:
        yield wanted
    finally:
        if before < wanted:
            subprocess.run(["sysctl", "-q", "-w", f"{SOMAXCONN}={before}"], check=True)


@pytest.fixture(scope="module")
def hub(role_kernel: int, redis_server: Redis,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedHub]:
    """One worker on its Unix socket and on 127.0.0.1, as the role's single host."""
    directory = tmp_path_factory.mktemp("storm")
    env = base_env(SSEHUB_BROKER_URL=redis_server.url, SSEHUB_REDIS_PREFIX="storm:",
                   SSEHUB_PUBLIC_CHANNELS="public.*", SSEHUB_DATA_DIR=str(directory))
    with running(ServedHub(directory, env, unix_socket=True, tcp_too=True)) as server:
        yield server


class FirstBytes(asyncio.Protocol):
    """A stream that keeps what arrived until the end of its first SSE block."""

    def __init__(self) -> None:
        self.data = b""
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if not self.done.done() and b"\n\n" in self.data.partition(b"\r\n\r\n")[2]:
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def storm(port: int, count: int) -> tuple[collections.Counter[str], float]:
    """Open ``count`` streams at once; what each got first, and the seconds it took."""
    loop = asyncio.get_running_loop()
    request = (f"GET /events/?channel=public.storm HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()

    async def one() -> tuple[asyncio.Transport, FirstBytes]:
        transport, protocol = await loop.create_connection(FirstBytes, "127.0.0.1", port)
        transport.write(request)
        await asyncio.wait_for(protocol.done, OPEN_SECONDS)
        return transport, protocol

    started = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    took = time.monotonic() - started
    outcomes: collections.Counter[str] = collections.Counter()
    for result in results:
        if isinstance(result, BaseException):
            outcomes[f"client: {type(result).__name__}"] += 1
            continue
        transport, protocol = result
        head, _, body = protocol.data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            outcomes[head.split(b"\r\n", 1)[0].decode(errors="replace")] += 1
        elif b": ssehub stream open" in body:
            outcomes["stream"] += 1
        elif b": ssehub unavailable" in body:  # the proxy's: no app server answered
            outcomes["retry stream"] += 1
        else:
            outcomes[body[:60].decode(errors="replace")] += 1
        transport.close()
    return outcomes, took


def test_nginx_opens_ten_thousand_streams_at_once_over_the_unix_socket(
        hub: ServedHub, tmp_path: Path) -> None:
    upstreams: list[int | str] = [hub.bind, f"127.0.0.1:{hub.port} backup"]
    nginx = Nginx(tmp_path, upstreams, locations=locations_for_load(tmp_path), workers=4,
                  worker_connections=8192)
    with running(nginx):
        outcomes, took = asyncio.run(storm(nginx.port, NGINX_STREAMS))
        refused = (tmp_path / "error.log").read_text().count("Resource temporarily unavailable")
    print(f"\n{NGINX_STREAMS} streams at once through nginx over the Unix socket: "
          f"{dict(outcomes)} in {took:.1f} s; {refused} refused connects to the socket")
    assert outcomes == {"stream": NGINX_STREAMS}


def test_caddy_opens_nine_thousand_streams_at_once_over_the_unix_socket(
        hub: ServedHub, tmp_path: Path) -> None:
    assert hub.socket is not None
    with running(CaddyOnSocket(tmp_path, hub.socket)) as caddy:
        outcomes, took = asyncio.run(storm(caddy.port, CADDY_STREAMS))
    print(f"\n{CADDY_STREAMS} streams at once through Caddy over the Unix socket: "
          f"{dict(outcomes)} in {took:.1f} s")
    assert outcomes == {"stream": CADDY_STREAMS}
