"""caddy role on the proxy: running, validated configuration, no encode on the
stream route, bounded grace period, admin endpoint on loopback only."""

import json

import pytest
from conftest import WILDCARD, is_loopback, listen_addresses, ports_of_listener

testinfra_hosts = ["proxy"]

# Caddy's admin endpoint (localhost:2019): the role's Caddyfile leaves it as is.
ADMIN_PORT = 2019
HTTP_PORT, HTTPS_PORT = 80, 443


@pytest.fixture(autouse=True)
def _caddy_only(host):
    if not host.exists("caddy"):
        pytest.skip("the proxy is not caddy")


def test_caddy_is_enabled_and_running(host):
    svc = host.service("caddy")
    assert svc.is_enabled and svc.is_running


def test_running_config_flushes_streams_and_bounds_grace_period(host):
    cfg = json.loads(host.check_output(f"curl -fsS -m 3 http://127.0.0.1:{ADMIN_PORT}/config/"))
    http = cfg["apps"]["http"]
    assert http.get("grace_period")
    text = json.dumps(cfg)
    assert '"flush_interval": -1' in text


def test_caddyfile_validates(host):
    assert host.run("caddy validate --adapter caddyfile --config /etc/caddy/Caddyfile").rc == 0


@pytest.mark.parametrize(
    ("port", "where"),
    [(HTTP_PORT, "public"), (HTTPS_PORT, "public"), (ADMIN_PORT, "loopback")],
    ids=["http", "https", "admin"],
)
def test_caddy_listens_only_where_it_should(host, port, where):
    """HTTP and HTTPS on every address; the admin API (it can rewrite the
    configuration) on loopback only; no other TCP port."""
    addrs = listen_addresses(host, port)
    if where == "public":
        assert addrs and addrs <= WILDCARD, addrs
    else:
        assert addrs and all(is_loopback(a) for a in addrs), addrs
    assert ports_of_listener(host, port, "caddy") == {HTTP_PORT, HTTPS_PORT, ADMIN_PORT}
