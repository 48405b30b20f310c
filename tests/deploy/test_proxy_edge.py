"""The proxy edge against hostile clients (issue 10): what nginx and Caddy, as the
roles render them, log, show and pass on.

- No token in a log line: a browser's EventSource may carry its subscribe token
  as ``?token=<JWT>``; nginx's ``combined`` format, Caddy's error log and
  uvicorn's access log (``ssehub serve`` in embedded mode) wrote it whole.
- ``/readyz`` (the database host when it fails) and ``/metrics`` (versions,
  memory, counters) answer 404 through the proxy to any address not in the
  role's allow-list (loopback by default). A client from 127.0.0.2 stands in for
  a remote one: both proxies listen on 127.0.0.1 and see that source address.
- HSTS and no framing (``X-Frame-Options``, CSP ``frame-ancestors``) on the
  site's answers; on nginx no static-RSA key exchange and no CBC suites.
- ``X-Forwarded-Host`` is the proxy's own (the hub believes it,
  ``USE_X_FORWARDED_HOST``), never one a client sent. Caddy 2.6 already
  replaced it; nginx passed the client's on.
- Caddy's admin API (no authentication) on a Unix socket instead of
  localhost:2019, and ``caddy reload`` (the unit's reload) still works.

The upstream is a small server that answers every request with the headers it
got, as JSON (and 503 when asked, for Caddy's error log).
"""

from __future__ import annotations

import http.server
import json
import re
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ssekit_testing.roles import REPO, render_texts, role_defaults
from ssekit_testing.servers import (
    TEMPLATES,
    Caddy,
    Nginx,
    free_port,
    running,
    self_signed_certificate,
    start_embedded,
    stop,
)

# Shaped like the hub's tokens (HS256 JWT); no hub checks it here.
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJlZGdlLXRlc3QifQ.c2lnbmF0dXJlLW9mLWVkZ2U"
# An allow-list entry beyond the loopback default, to see the role's list used.
SCRAPER = "127.0.0.3"
OUTSIDER = "127.0.0.2"
HIDDEN = ["/readyz", "/metrics", "/metrics/", "/ready%7a", "//readyz"]
SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000",
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
}
# Placeholders the role is rendered with once; each proxy fills in its own.
SITE, UPSTREAM = "http://127.0.0.1:54321", "127.0.0.1:54322"


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers with the request headers as JSON; 503 (the hub's 'unavailable')
    when the query has fail=1."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        # every value of a header, joined: a header sent twice shows as "a, a"
        body = json.dumps({k.lower(): ", ".join(self.headers.get_all(k) or [])
                           for k in self.headers}).encode()
        self.send_response(503 if "fail=1" in self.path else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def echo() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The nginx and caddy roles' templates, rendered by Ansible with the snippets."""
    out = tmp_path_factory.mktemp("edge-rendered")
    templates = {name: REPO / "roles" / role / "templates/etc" / path for name, role, path in [
        ("ssehub-http.conf", "nginx", "nginx/conf.d/ssehub-http.conf.j2"),
        ("nginx.conf", "nginx", "nginx/nginx.conf.j2"),
        ("site", "nginx", "nginx/sites-available/ssehub.j2"),
        ("Caddyfile", "caddy", "caddy/Caddyfile.j2")]}
    allow = ["127.0.0.1", "::1", SCRAPER]
    variables = {**role_defaults("nginx"), **role_defaults("caddy"),
                 "nginx_snippets_dir": str(TEMPLATES / "nginx"),
                 "caddy_snippets_dir": str(TEMPLATES / "caddy"),
                 "nginx_server_name": "sse.example.org", "nginx_upstream_servers": [UPSTREAM],
                 "nginx_internal_allow": allow, "caddy_internal_allow": allow,
                 "caddy_site_address": SITE, "caddy_upstream_servers": [UPSTREAM],
                 "caddy_tls_internal": False, "caddy_acme_email": "ops@example.org"}
    return render_texts(out, variables, templates)


class RoleNginx(Nginx):
    """The harness's nginx with the role's ssehub-http.conf instead of the snippet's
    (the allow-list filled in), logging as the role's nginx.conf does."""

    def __init__(self, directory: Path, upstream: int, http_conf: str, **kwargs: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.http_conf = directory / "ssehub-http.conf"
        self.http_conf.write_text(http_conf)
        self.access_log = directory / "access.log"
        super().__init__(directory, [upstream],
                         server_extra=f"access_log {self.access_log} ssehub;", **kwargs)

    def config(self) -> str:
        snippet = f"include {TEMPLATES}/nginx/ssehub-http.conf;"
        text = super().config()
        assert text.count(snippet) == 1
        return text.replace(snippet, f"include {self.http_conf};")


class RoleCaddy(Caddy):
    """Caddy running the caddy role's Caddyfile as rendered (global options too),
    with its own port, upstream and admin socket folder."""

    def __init__(self, directory: Path, upstream: int, caddyfile: str) -> None:
        super().__init__(directory, [upstream])
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = directory / "run-caddy" / "admin.sock"
        self.caddyfile = caddyfile

    def config(self) -> str:
        default_socket = role_defaults("caddy")["caddy_admin_socket"]
        self.admin.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = self.caddyfile
        for old, new in ((f"{SITE} {{", f"{self.url} {{"),
                         (UPSTREAM, f"127.0.0.1:{self.upstreams[0]}"),
                         (f"unix/{default_socket}", f"unix/{self.admin}")):
            assert old in text, old
            text = text.replace(old, new)
        return text


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory, echo: int,
            rendered: dict[str, str]) -> Iterator[dict[str, Any]]:
    with running(RoleNginx(tmp_path_factory.mktemp("edge-nginx"), echo,
                           rendered["ssehub-http.conf"])) as nginx, \
            running(RoleCaddy(tmp_path_factory.mktemp("edge-caddy"), echo,
                              rendered["Caddyfile"])) as caddy:
        yield {"nginx": nginx, "caddy": caddy}


@pytest.fixture
def nginx(proxies: dict[str, Any]) -> RoleNginx:
    server: RoleNginx = proxies["nginx"]
    return server


@pytest.fixture
def caddy(proxies: dict[str, Any]) -> RoleCaddy:
    server: RoleCaddy = proxies["caddy"]
    return server


@pytest.fixture(params=["nginx", "caddy"])
def proxy(request: pytest.FixtureRequest) -> Nginx | Caddy:
    server: Nginx | Caddy = request.getfixturevalue(request.param)
    return server


def get(url: str, source: str = "127.0.0.1", **kwargs: Any) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.get(url, **kwargs)


def token_requests(url: str) -> None:
    """What a browser and a careless client send: the token in the query, the page's
    URL with one in the Referer, a second token, another name, an encoded one."""
    referer = {"Referer": f"https://app.example.org/page?room=a&token={JWT}"}
    for path in (f"/events/?channel=public.a&token={JWT}",
                 f"/events/?token={JWT}&channel=public.a&token={JWT}",
                 f"/?access_token={JWT}", f"/?%74oken={JWT}"):
        get(url + path, headers=referer)
    get(url + f"/events/?channel=public.a&fail=1&token={JWT}")  # a retry stream


# -- tokens in logs --------------------------------------------------------------


def test_no_token_in_the_nginx_access_log(nginx: RoleNginx, rendered: dict[str, str]) -> None:
    token_requests(nginx.url)
    deadline = time.monotonic() + 5  # nginx writes the line when the request ends
    while nginx.access_log.read_text().count("\n") < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    logged = nginx.access_log.read_text()
    assert logged.count("\n") >= 5, logged
    assert JWT not in logged and "eyJ" not in logged, logged
    assert '"GET /events/?channel=public.a&token=REDACTED HTTP/1.1" 200' in logged, logged
    assert '"https://app.example.org/page?room=a&token=REDACTED"' in logged, logged
    # The role's nginx.conf logs every server with that format, defined before use.
    conf = rendered["nginx.conf"]
    logs = re.findall(r"^\s*access_log\s+([^;]*);", conf, flags=re.MULTILINE)
    assert logs == ["/var/log/nginx/access.log ssehub"], logs
    assert conf.index("include /etc/nginx/conf.d/*.conf;") < conf.index("access_log")


def test_no_token_in_caddy_logs(caddy: RoleCaddy, tmp_path: Path,
                                rendered: dict[str, str]) -> None:
    """The site's access log (the snippet's, new: Caddy logged no access before),
    also for an error (no app server answers). Caddy 2.6.2 does not log errors
    that handle_errors answered; the role filters its default logger too, for
    those it does log (a debug level, another version)."""
    token_requests(caddy.url)
    with running(RoleCaddy(tmp_path, free_port(), rendered["Caddyfile"])) as lost:
        assert get(f"{lost.url}/?room=a&token={JWT}").status_code in (502, 503)
    time.sleep(0.5)
    logged = caddy.log.read_text() + lost.log.read_text()
    assert "http.log.access" in logged, logged[-3000:]
    assert JWT not in logged and "eyJ" not in logged, logged[-3000:]
    assert "/events/?channel=public.a&token=REDACTED" in logged, logged[-3000:]
    assert '"https://app.example.org/page?room=a&token=REDACTED"' in logged, logged[-3000:]
    assert '"/?room=a&token=REDACTED"' in lost.log.read_text()


def test_no_token_in_the_embedded_hubs_access_log(tmp_path: Path) -> None:
    server, url, log = start_embedded(tmp_path)
    try:
        assert get(f"{url}/events/?channel=priv.a&token={JWT}").status_code == 401
        get(f"{url}/?x=1&TOKEN={JWT}")
    finally:
        stop(server)
    logged = log.read_text()
    assert "/events/?channel=priv.a&token=REDACTED" in logged, logged
    assert JWT not in logged, logged


# -- /readyz and /metrics --------------------------------------------------------


def test_readyz_and_metrics_answer_404_outside_the_allow_list(proxy: Nginx | Caddy) -> None:
    for path in HIDDEN:
        assert get(proxy.url + path, OUTSIDER).status_code == 404, path
    assert get(proxy.url + "/healthz", OUTSIDER).status_code == 200
    assert get(proxy.url + "/?room=a", OUTSIDER).status_code == 200
    for source in ("127.0.0.1", SCRAPER):  # the deploy's checks, a scraper in the list
        for path in ("/readyz", "/metrics"):
            assert get(proxy.url + path, source).status_code == 200, (source, path)


# -- headers ---------------------------------------------------------------------


def test_answers_carry_hsts_and_refuse_framing(proxy: Nginx | Caddy) -> None:
    for path in ("/?room=a", "/events/?channel=public.a"):
        headers = get(proxy.url + path).headers
        assert {k: headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, path


def test_a_client_sent_x_forwarded_host_never_reaches_the_hub(proxy: Nginx | Caddy) -> None:
    host = proxy.url.removeprefix("http://")
    forged = {"X-Forwarded-Host": "evil.example"}
    for path in ("/?room=a", "/events/?channel=public.a"):
        seen = get(proxy.url + path, headers=forged).json()
        assert seen.get("x-forwarded-host") == host, (path, seen)
    with httpx.Client(timeout=10) as client:
        seen = client.post(proxy.url + "/publish/", json={}, headers=forged).json()
    assert seen.get("x-forwarded-host") == host, seen


# -- TLS -------------------------------------------------------------------------


def rsa_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "rsa.pem", directory / "rsa.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def handshake(port: int, cipher: str) -> bool:
    """A TLS 1.2 handshake offering only ``cipher``: did nginx accept it?"""
    done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
                           "-cipher", cipher], input=b"", capture_output=True, timeout=15)
    return done.returncode == 0 and f"Cipher is {cipher}".encode() in done.stdout


@pytest.mark.parametrize(("key", "modern", "weak"), [
    ("ecdsa", "ECDHE-ECDSA-AES128-GCM-SHA256",
     ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA"]),
    ("rsa", "ECDHE-RSA-AES128-GCM-SHA256",
     ["AES128-GCM-SHA256", "AES256-SHA", "ECDHE-RSA-AES128-SHA"]),
])
def test_nginx_offers_no_static_rsa_or_cbc_suites(tmp_path: Path, echo: int,
                                                  rendered: dict[str, str], key: str,
                                                  modern: str, weak: list[str]) -> None:
    """The role's TLS lines (sites-available/ssehub) with an ECDSA certificate (the
    role's self-signed one is) and an RSA one (a bought or ACME certificate may be)."""
    tls_lines = "\n".join(line for line in rendered["site"].splitlines()
                          if re.match(r"\s*ssl_(protocols|ciphers|prefer_server_ciphers)\s",
                                      line))
    pair = self_signed_certificate(tmp_path) if key == "ecdsa" else rsa_certificate(tmp_path)
    (tmp_path / "nginx").mkdir()
    with running(Nginx(tmp_path / "nginx", [echo], tls=pair, server_extra=tls_lines)) as server:
        assert handshake(server.port, modern)
        accepted = [cipher for cipher in weak if handshake(server.port, cipher)]
    assert accepted == []


# -- Caddy's admin API -----------------------------------------------------------


def test_caddy_admin_api_is_on_a_private_unix_socket_and_reloads_work(
        tmp_path: Path, echo: int, rendered: dict[str, str]) -> None:
    server = RoleCaddy(tmp_path, echo, rendered["Caddyfile"])
    config = server.adapt()
    assert config["admin"] == {"listen": f"unix/{server.admin}"}
    with running(server):
        mode = server.admin.stat().st_mode
        assert stat.S_ISSOCK(mode) and not mode & (stat.S_IWGRP | stat.S_IWOTH), oct(mode)
        assert stat.S_IMODE(server.admin.parent.stat().st_mode) == 0o700
        # What `systemctl reload caddy` runs (Debian's unit): it finds the socket in
        # the new Caddyfile. A changed header shows the new configuration is live.
        server.caddyfile = server.caddyfile.replace("X-Frame-Options DENY",
                                                    "X-Frame-Options SAMEORIGIN")
        server.config_file.write_text(server.config())
        reload = subprocess.run(["caddy", "reload", "--adapter", "caddyfile", "--force",
                                 "--config", str(server.config_file)], env=server.env,
                                capture_output=True, text=True, timeout=30)
        assert reload.returncode == 0, reload.stderr[-2000:]
        assert get(server.url + "/healthz").headers["x-frame-options"] == "SAMEORIGIN"
    # The handlers restart (a new socket folder) before they reload.
    handlers = (REPO / "roles/caddy/handlers/main.yml").read_text()
    assert handlers.index("state: restarted") < handlers.index("state: reloaded")
