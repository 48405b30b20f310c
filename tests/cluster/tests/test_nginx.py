"""nginx role on the proxy: running, configuration in effect, limits of the
running workers, listening sockets (stub_status on loopback only)."""

import pytest
from conftest import WILDCARD, listen_addresses, nofile_expected, ports_of_listener, setting

testinfra_hosts = ["proxy"]

STUB_ADDRESS, STUB_PORT = setting("nginx_stub_status_listen").rsplit(":", 1)
# Ports of the two public servers in the role's sites-available/ssehub.
HTTP_PORT, HTTPS_PORT = 80, 443


@pytest.fixture(autouse=True)
def _nginx_only(host):
    if not host.exists("nginx"):
        pytest.skip("the proxy is not nginx")


def test_nginx_is_enabled_and_running(host):
    svc = host.service("nginx")
    assert svc.is_enabled and svc.is_running


def test_loaded_configuration_is_tuned_for_streams(host):
    conf = host.check_output("nginx -T 2>/dev/null")
    for needle in (
        "proxy_buffering off",
        "proxy_cache off",
        "proxy_http_version 1.1",
        f"worker_shutdown_timeout {setting('nginx_worker_shutdown_timeout')}s",
        f"worker_connections {setting('nginx_worker_connections')}",
        "http2",
    ):
        assert needle in conf, needle


def test_upstream_lists_every_app_host(host):
    conf = host.check_output("cat /etc/nginx/conf.d/ssehub-upstream.conf")
    servers = [line for line in conf.splitlines() if line.strip().startswith("server ")]
    assert len(servers) == len(host.ansible.get_variables()["groups"]["app"])


def test_running_workers_have_the_nofile_limit(host):
    pid = host.check_output("pgrep -f 'nginx: worker process' | head -1")
    limits = host.file(f"/proc/{pid}/limits").content_string
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert int(line.split()[3]) == nofile_expected(host, int(setting("nginx_worker_rlimit_nofile")))


def test_stub_status_answers_on_loopback_only(host):
    listen = setting("nginx_stub_status_listen")
    assert "Active connections" in host.check_output(f"curl -fsS -m 3 http://{listen}/nginx_status")
    assert listen.startswith("127.")


def test_snippets_ops_copy_are_what_nginx_runs(host):
    """One source of truth: the deployed locations are the repo's snippet."""
    from conftest import ROOT

    deployed = host.file("/etc/nginx/snippets/ssehub-locations.conf").content_string
    assert (ROOT / "templates" / "nginx" / "ssehub-locations.conf").read_text().strip() in deployed


@pytest.mark.parametrize(
    ("port", "where"),
    [(HTTP_PORT, "public"), (HTTPS_PORT, "public"), (int(STUB_PORT), STUB_ADDRESS)],
    ids=["http", "https", "stub_status"],
)
def test_nginx_listens_only_where_it_should(host, port, where):
    """HTTP and HTTPS on every address; stub_status on nginx_stub_status_listen
    only; no other port."""
    addrs = listen_addresses(host, port)
    if where == "public":
        assert addrs and addrs <= WILDCARD, addrs
    else:
        assert addrs == {where}, addrs
    assert ports_of_listener(host, port) == {HTTP_PORT, HTTPS_PORT, int(STUB_PORT)}
