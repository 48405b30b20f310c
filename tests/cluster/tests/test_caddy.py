"""caddy role on the proxy: running, validated configuration, no encode on the
stream route, bounded grace period."""

import json

import pytest

testinfra_hosts = ["proxy"]


@pytest.fixture(autouse=True)
def _caddy_only(host):
    if not host.exists("caddy"):
        pytest.skip("the proxy is not caddy")


def test_caddy_is_enabled_and_running(host):
    svc = host.service("caddy")
    assert svc.is_enabled and svc.is_running


def test_running_config_flushes_streams_and_bounds_grace_period(host):
    cfg = json.loads(host.check_output("curl -fsS -m 3 http://127.0.0.1:2019/config/"))
    http = cfg["apps"]["http"]
    assert http.get("grace_period")
    text = json.dumps(cfg)
    assert '"flush_interval": -1' in text


def test_caddyfile_validates(host):
    assert host.run("caddy validate --adapter caddyfile --config /etc/caddy/Caddyfile").rc == 0
