"""nginx role on the proxy: running, configuration in effect, limits of the
running workers, listening sockets (stub_status on loopback only)."""

import re

import pytest
from conftest import (
    ROOT,
    WILDCARD,
    hosts_in,
    listen_addresses,
    nofile_expected,
    ports_of_unit,
    seconds,
    setting,
    upstreams,
)

testinfra_hosts = ["proxy"]

STUB_ADDRESS, STUB_PORT = setting("nginx_stub_status_listen").rsplit(":", 1)
# Ports of the two public servers in the role's sites-available/ssehub.
HTTP_PORT, HTTPS_PORT = 80, 443
SNIPPETS = ROOT / "templates" / "nginx"
# Where the role puts each snippet ops copy.
DEPLOYED = {
    "ssehub-http.conf": "/etc/nginx/conf.d/ssehub-http.conf",
    "ssehub-locations.conf": "/etc/nginx/snippets/ssehub-locations.conf",
}
STREAM, PUBLISH = "location /events/", "location = /publish/"


def directives(text):
    """Directives of each block of an nginx configuration, keyed by the block's
    header ("main", "http", "location /events/"; later blocks with the same
    header add to it): {header: {name: [args, ...]}}."""
    text = re.sub(r"#[^\n]*", "", text)
    blocks, stack, statement = {"main": {}}, ["main"], ""
    for piece in re.findall(r"[^{};]+|[{};]", text):
        if piece == "{":
            stack.append(statement)
            blocks.setdefault(statement, {})
        elif piece == "}":
            stack.pop()
        elif piece == ";" and statement:
            name, _, args = statement.partition(" ")
            blocks[stack[-1]].setdefault(name, []).append(args)
        else:
            statement = " ".join(piece.split())
            continue
        statement = ""
    return blocks


@pytest.fixture(scope="module", autouse=True)
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


@pytest.fixture(scope="module")
def running(host, _nginx_only):
    """The configuration nginx loads (`nginx -T` prints every file it read,
    one after another), parsed file by file: {path: directives(file)}."""
    dump = host.check_output("nginx -T 2>/dev/null")
    parts = re.split(r"^# configuration file (\S+):$", dump, flags=re.MULTILINE)
    return {path: directives(text) for path, text in zip(parts[1::2], parts[2::2], strict=True)}


@pytest.mark.parametrize(
    ("snippet", "block", "name"),
    [
        ("ssehub-http.conf", "main", "limit_conn_zone"),
        ("ssehub-http.conf", "main", "limit_req_zone"),
        ("ssehub-locations.conf", STREAM, "limit_conn"),
        ("ssehub-locations.conf", STREAM, "limit_conn_status"),
        ("ssehub-locations.conf", STREAM, "proxy_next_upstream"),
        ("ssehub-locations.conf", STREAM, "proxy_next_upstream_tries"),
        ("ssehub-locations.conf", STREAM, "proxy_read_timeout"),
        ("ssehub-locations.conf", STREAM, "gzip"),
        ("ssehub-locations.conf", STREAM, "proxy_intercept_errors"),
        ("ssehub-locations.conf", STREAM, "error_page"),
        ("ssehub-locations.conf", PUBLISH, "limit_req"),
        ("ssehub-locations.conf", PUBLISH, "limit_req_status"),
        ("ssehub-locations.conf", PUBLISH, "client_max_body_size"),
        ("ssehub-locations.conf", PUBLISH, "proxy_next_upstream"),
    ],
)
def test_running_config_has_the_snippets_limits_and_retries(running, snippet, block, name):
    """What nginx loads is what the repo's snippets say, directive by directive."""
    wanted = directives((SNIPPETS / snippet).read_text())[block]
    assert name in wanted, f"{name} is no longer in {snippet}: update this test"
    assert DEPLOYED[snippet] in running, f"nginx does not read {DEPLOYED[snippet]}"
    assert running[DEPLOYED[snippet]][block].get(name) == wanted[name]


def test_running_stream_location_suits_long_lived_streams(running):
    """No gzip on the stream (A6), a read timeout above the heartbeat (A2),
    retries on connect errors and draining servers (I2), a stream limit; the
    publish API is never retried after it was sent; old workers are bounded (A9)."""
    locations = running[DEPLOYED["ssehub-locations.conf"]]
    stream, publish = locations[STREAM], locations[PUBLISH]
    assert stream["gzip"] == ["off"]
    assert seconds(stream["proxy_read_timeout"][-1]) > int(setting("ssehub_heartbeat"))
    retries = set(stream["proxy_next_upstream"][-1].split())
    assert {"error", "timeout", "http_502", "http_503"} <= retries
    assert int(stream["limit_conn"][-1].split()[1]) > 0
    # A connect that failed or timed out goes on (nothing was sent); never a sent POST.
    assert set(publish["proxy_next_upstream"][-1].split()) == {"error", "timeout"}
    assert seconds(publish["proxy_connect_timeout"][-1]) <= 2
    shutdown = f"{setting('nginx_worker_shutdown_timeout')}s"
    assert running["/etc/nginx/nginx.conf"]["main"]["worker_shutdown_timeout"] == [shutdown]


def test_upstream_lists_every_app_host(host, running):
    """One server per app host: the hub on nginx's own host over its Unix
    socket (unix:/path) when it has one, the others over TCP."""
    lines = running["/etc/nginx/conf.d/ssehub-upstream.conf"]["upstream ssehub"]["server"]
    servers = [line for line in lines if "backup" not in line.split()]
    backups = [line.split()[0] for line in lines if "backup" in line.split()]
    assert len(servers) == len(hosts_in("app"))
    port = int(setting("nginx_upstream_port"))
    wanted = upstreams(host, "unix:", port)
    assert sorted(server.split()[0] for server in servers) == wanted
    # Over its own host's Unix socket, the hub's TCP listener backs it up (a full
    # socket backlog fails a connect at once).
    over_socket = any(server.startswith("unix:") for server in wanted)
    assert backups == ([f"127.0.0.1:{port}"] if over_socket else [])


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
    assert ports_of_unit(host, "nginx.service") == {HTTP_PORT, HTTPS_PORT, int(STUB_PORT)}
