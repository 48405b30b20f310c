"""caddy role on the proxy: running, validated configuration, no encode on the
stream route, bounded grace period, admin endpoint on a Unix socket only root
and caddy can reach."""

import json
import re

import pytest
from conftest import (
    ROOT,
    WILDCARD,
    listen_addresses,
    ports_of_unit,
    seconds,
    setting,
    upstreams,
)

testinfra_hosts = ["proxy"]

# Caddy's admin endpoint: the role moves it off localhost:2019 (no authentication:
# any local user could rewrite the proxy there) to a Unix socket.
ADMIN_PORT = 2019
ADMIN_SOCKET = setting("caddy_admin_socket")
HTTP_PORT, HTTPS_PORT = 80, 443
SNIPPET = ROOT / "templates" / "caddy" / "Caddyfile.ssehub"


def json_seconds(value):
    """A duration in Caddy's JSON config (nanoseconds, or a Go duration string)."""
    return value / 1e9 if isinstance(value, int) else seconds(value)


def handlers(node, kind):
    """Every handler of this kind anywhere in a Caddy JSON config (subroutes too)."""
    if isinstance(node, dict):
        if node.get("handler") == kind:
            yield node
        for child in node.values():
            yield from handlers(child, kind)
    elif isinstance(node, list):
        for child in node:
            yield from handlers(child, kind)


@pytest.fixture(scope="module", autouse=True)
def _caddy_only(host):
    if not host.exists("caddy"):
        pytest.skip("the proxy is not caddy")


@pytest.fixture(scope="module")
def running(host, _caddy_only):
    """The configuration Caddy runs, from its admin API (the adapted Caddyfile).
    Over the Unix socket Caddy wants an empty Host."""
    return json.loads(host.check_output(
        f"curl -fsS -m 3 -H 'Host: ' --unix-socket {ADMIN_SOCKET} http://localhost/config/"))


def test_caddy_is_enabled_and_running(host):
    svc = host.service("caddy")
    assert svc.is_enabled and svc.is_running


def test_running_config_flushes_streams_and_bounds_grace_period(running):
    """C4: a reload waits caddy_grace_period for open streams, no longer. No
    explicit flush_interval: Caddy flushes text/event-stream by itself, and -1
    would keep the hub's stream open after its client left (caddy#4952)."""
    grace = running["apps"]["http"].get("grace_period")
    assert grace and json_seconds(grace) == seconds(setting("caddy_grace_period"))
    assert '"flush_interval"' not in json.dumps(running)


def test_running_proxies_check_upstream_health_on_readyz(running):
    """Every reverse_proxy probes the app's readiness URI the snippet names
    (/readyz answers 503 while a hub drains, so Caddy stops sending to it)."""
    wanted = re.findall(r"^\s*health_uri\s+(\S+)", SNIPPET.read_text(), flags=re.MULTILINE)
    assert wanted and set(wanted) == {"/readyz"}
    proxies = list(handlers(running, "reverse_proxy"))
    active = [p.get("health_checks", {}).get("active", {}) for p in proxies]
    assert sorted(a.get("uri", a.get("path")) for a in active) == sorted(wanted)
    assert all(json_seconds(a.get("interval", 0)) > 0 for a in active)


def test_running_proxies_reach_each_app_host_where_the_inventory_says(host, running):
    """Both routes go to every app host: the hub on Caddy's own host over its
    Unix socket (unix//path) when it has one, the others over TCP. Caddy's
    active health checks dial the same addresses (a failing /readyz would
    take the upstream out, and the end-to-end tests would get 503s)."""
    wanted = upstreams(host, "unix/", int(setting("caddy_upstream_port")))
    proxies = list(handlers(running, "reverse_proxy"))
    assert proxies
    for proxy in proxies:
        assert sorted(u["dial"] for u in proxy["upstreams"]) == wanted


def test_caddyfile_validates(host):
    assert host.run("caddy validate --adapter caddyfile --config /etc/caddy/Caddyfile").rc == 0


@pytest.mark.parametrize(
    ("port", "where"),
    [(HTTP_PORT, "public"), (HTTPS_PORT, "public"), (ADMIN_PORT, "nowhere")],
    ids=["http", "https", "admin"],
)
def test_caddy_listens_only_where_it_should(host, port, where):
    """HTTP and HTTPS on every address; the admin API (it can rewrite the
    configuration) on no TCP port at all; no other TCP port."""
    addrs = listen_addresses(host, port)
    if where == "public":
        assert addrs and addrs <= WILDCARD, addrs
    else:
        assert not addrs, addrs
    assert ports_of_unit(host, "caddy.service") == {HTTP_PORT, HTTPS_PORT}


def test_admin_socket_is_reachable_by_root_and_caddy_only(host, running):
    """The socket's folder is caddy's, 0700: another user (nobody, the hub's)
    cannot even reach the socket; root reads the configuration (`running`)."""
    folder = host.file(ADMIN_SOCKET.rsplit("/", 1)[0])
    assert (folder.user, folder.mode) == ("caddy", 0o700)
    assert running["admin"]["listen"] == f"unix/{ADMIN_SOCKET}"
    denied = host.run(f"runuser -u nobody -- curl -sS -m 3 -H 'Host: ' --unix-socket "
                      f"{ADMIN_SOCKET} http://localhost/config/")
    assert denied.rc != 0, denied.stdout
