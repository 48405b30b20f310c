"""``ssehub serve`` on the binds the ssehub role gives it: a Unix socket behind
nginx, a socket and a loopback port at once (SSEHUB_BIND), never a relative
socket path. (probe(), the check of tests/deploy/test_smoke.py, tells that the hub
answers through nginx.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ssekit_testing import tokens
from ssekit_testing.fixtures import SECRET, base_env
from ssekit_testing.servers import Nginx, Redis, ServedHub, free_port, running, stop, wait_for

from ssehub.probe import probe

# Minted at collection: the default hour outlasts a slow suite.
TOKEN = tokens.mint(SECRET, publish=["smoke.*"], subscribe=["smoke.*"])


def test_hub_on_a_unix_socket_behind_nginx(redis_server: Redis, tmp_path: Path) -> None:
    """`ssehub serve --bind unix:/path`: a proxy on the same host reaches the hub
    over a Unix socket (cheaper per event than loopback TCP; README, figures)."""
    env = base_env(SSEHUB_BROKER_URL=redis_server.url, SSEHUB_REDIS_PREFIX="uds:",
                   SSEHUB_DATA_DIR=str(tmp_path))
    hub = ServedHub(tmp_path, env, workers=1, unix_socket=True)
    with running(hub):
        assert hub.socket is not None and hub.socket.is_socket()
        with running(Nginx(tmp_path, [hub.bind])) as nginx:
            result = probe(nginx.url, TOKEN)
    assert result.ok, result.line()
    assert hub.socket is not None and not hub.socket.parent.exists()


def test_serve_listens_on_every_bind_of_ssehub_bind(redis_server: Redis, tmp_path: Path) -> None:
    """SSEHUB_BIND with a Unix socket and a loopback port (the single-host role:
    the proxy on the socket, health checks and metrics on TCP): both answer."""
    import httpx

    socket_path = tmp_path / "hub.sock"
    port = free_port()
    env = base_env(SSEHUB_BROKER_URL=redis_server.url, SSEHUB_DATA_DIR=str(tmp_path),
                   SSEHUB_BIND=f"unix:{socket_path}, 127.0.0.1:{port}")
    log = tmp_path / "hub.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "ssehub.cli", "serve", "--workers", "1"],
                                  env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        def answers(transport: httpx.HTTPTransport | None, url: str) -> bool:
            try:
                with httpx.Client(transport=transport) as client:
                    return client.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        tcp = f"http://127.0.0.1:{port}/readyz"
        wait_for(lambda: socket_path.exists() and answers(None, tcp), what=f"hub ({log})")
        assert answers(httpx.HTTPTransport(uds=str(socket_path)), "http://127.0.0.1/readyz")
        assert f"unix:{socket_path}, 127.0.0.1:{port}" in log.read_text()
    finally:
        stop(server, timeout=30)


def test_serve_refuses_a_relative_unix_socket() -> None:
    bad = subprocess.run([sys.executable, "-m", "ssehub.cli", "serve", "--bind", "unix:hub.sock"],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ,
                              **base_env(SSEHUB_BROKER_URL="redis://127.0.0.1:1/0")})
    assert bad.returncode != 0 and "absolute path" in bad.stderr, bad.stderr
