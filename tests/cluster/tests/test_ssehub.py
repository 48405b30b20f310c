"""ssehub role on app hosts: service, hardening, env file, health."""

import hashlib
import ipaddress
import json
import posixpath
import re
import time

import pytest
from conftest import (
    ROOT,
    SCENARIO,
    get_host,
    hostname,
    hosts_in,
    listen_addresses,
    new_channel,
    nofile_expected,
    ports_of_unit,
    private_address,
    setting,
    unix_listeners,
    variable,
)

testinfra_hosts = ["app"]


def test_ssehub_is_enabled_and_running(host):
    svc = host.service("ssehub")
    assert svc.is_enabled and svc.is_running


def test_ssehub_is_ready(host):
    out = json.loads(host.check_output(f"curl -fsS -m 5 http://127.0.0.1:{setting('ssehub_port')}/readyz"))
    assert out["status"] == "ready"


def test_env_file_is_readable_by_the_service_and_written_only_by_root(host):
    f = host.file("/etc/ssehub/ssehub.env")
    assert (f.user, f.group, f.mode) == ("root", setting("ssehub_group"), 0o640)
    user = setting("ssehub_user")
    assert host.run(f"runuser -u {user} -- cat /etc/ssehub/ssehub.env").rc == 0
    assert host.run(f"runuser -u {user} -- test -w /etc/ssehub/ssehub.env").rc != 0


def test_the_demo_csrf_cookie_is_secure_behind_the_tls_proxy(host):
    """The proxies serve TLS only: the chat demo's CSRF cookie is Secure."""
    env = host.file("/etc/ssehub/ssehub.env").content_string.splitlines()
    assert "SSEHUB_SECURE_COOKIES=true" in env


def test_unit_caps_memory_and_tasks_as_the_role_sizes_them(host):
    props = dict(line.split("=", 1) for line in host.check_output(
        "systemctl show ssehub --property MemoryMax,TasksMax").splitlines())
    workers = int(setting("ssehub_workers"))
    mb = workers * int(setting("ssehub_worker_memory_mb")) + 128
    assert int(props["MemoryMax"]) == mb * 2**20
    assert int(props["TasksMax"]) == int(setting("ssehub_tasks_max"))


def test_stop_timeout_exceeds_the_drain(host):
    usec = host.check_output("systemctl show ssehub --property TimeoutStopUSec --value")
    seconds = 0  # systemd prints e.g. "20s" or "1min 10s"
    for part in usec.split():
        seconds += int(part[:-3]) * 60 if part.endswith("min") else int(part.rstrip("s"))
    assert seconds > int(setting("ssehub_drain_seconds"))


def test_running_service_has_the_nofile_limit(host):
    pid = host.check_output("systemctl show ssehub --property MainPID --value")
    limits = host.file(f"/proc/{pid}/limits").content_string
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert int(line.split()[3]) == nofile_expected(host, int(setting("ssehub_nofile_limit")))


# `systemd-analyze security ssehub` on the deployed unit (0 to 10, lower is
# better). What it still flags: the host's network and root directory, Unix
# and Internet sockets, other users, the RTC that ProtectClock allows, a
# group-readable UMask; and chown where gunicorn binds a Unix socket.
UNIT_EXPOSURE = 1.3


def test_unit_is_hardened(host):
    out = host.run("systemd-analyze security ssehub --no-pager")
    # "Overall exposure level for ssehub.service: 1.2 OK"
    level = float(out.stdout.strip().splitlines()[-1].split(":")[1].split()[0])
    print(f"\n{hostname(host)}: systemd-analyze security ssehub: {level}")
    assert level <= UNIT_EXPOSURE, out.stdout[-1500:]


def _unit_properties(host, *names):
    out = host.check_output(f"systemctl show ssehub --property {','.join(names)}")
    return dict(line.split("=", 1) for line in out.splitlines())


def test_unit_denies_what_the_hub_never_calls(host):
    """No writable executable memory, no privileged or resource-setting system
    calls (chown only where gunicorn binds a Unix socket), while the hub serves
    (the other tests' streams)."""
    props = _unit_properties(host, "MemoryDenyWriteExecute", "PrivateMounts",
                             "SystemCallFilter", "SystemCallErrorNumber")
    assert props["MemoryDenyWriteExecute"] == "yes" and props["PrivateMounts"] == "yes"
    assert props["SystemCallErrorNumber"] in ("EPERM", "1")
    allowed = set(props["SystemCallFilter"].split())
    assert "epoll_wait" in allowed and "socket" in allowed, props["SystemCallFilter"][:200]
    assert not allowed & {"setrlimit", "setpriority", "sched_setaffinity", "chroot", "setuid",
                          "setgroups", "capset", "bpf"}
    assert ("chown" in allowed) == bool(variable(host, "ssehub_unix_socket"))
    pid = host.check_output("systemctl show ssehub --property MainPID --value")
    assert "Seccomp:\t2" in host.file(f"/proc/{pid}/status").content_string


def _networks(value):
    return {ipaddress.ip_network(part, strict=False) for part in value.split()}


def _peers():
    """Loopback and the private address of every proxy, Redis and PostgreSQL host."""
    hosts = {h for group in ("proxy", "redis", "postgres") for h in hosts_in(group)}
    return _networks(" ".join(["127.0.0.0/8", "::1/128",
                               *(private_address(get_host(h)) for h in sorted(hosts))]))


def test_unit_exchanges_packets_only_with_the_hubs_peers(host):
    """IPAddressDeny=any with the peers from the inventory allowed; and systemd
    enforces such a filter here: a transient unit with the hub's list reaches
    Redis and PostgreSQL, one with loopback only does not."""
    props = _unit_properties(host, "IPAddressDeny", "IPAddressAllow")
    assert _networks(props["IPAddressDeny"]) == _networks("0.0.0.0/0 ::/0")
    assert _networks(props["IPAddressAllow"]) == _peers()
    for group, port in (("redis", setting("ssehub_redis_port")),
                        ("postgres", setting("ssehub_database_port"))):
        address = private_address(get_host(hosts_in(group)[0]))
        probe = f"-- nc -z -w 2 {address} {port}"
        run = "timeout 20 systemd-run --wait --quiet --pipe -p IPAddressDeny=any -p IPAddressAllow="
        assert host.run(f"{run}'{props['IPAddressAllow']}' {probe}").rc == 0, group
        assert host.run(f"{run}localhost {probe}").rc != 0, group


def test_service_runs_as_its_own_user_with_no_new_privileges(host):
    props = host.check_output("systemctl show ssehub --property User,NoNewPrivileges,ProtectSystem")
    assert f"User={setting('ssehub_user')}" in props
    assert "NoNewPrivileges=yes" in props and "ProtectSystem=strict" in props


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_release_is_its_source_and_lock_and_runs_the_locked_versions(host):
    """The release is named by the source's hash and the lock's, keeps the lock it was
    built from, and its venv holds exactly the lock's versions, which ssehub --version
    shows for the hot path."""
    lock = (ROOT / "app" / "requirements.lock").read_text()
    current = host.file(f"{setting('ssehub_home')}/current").linked_to
    lock_hash = hashlib.sha256(lock.encode()).hexdigest()[:16]
    assert re.fullmatch(rf"[0-9a-f]{{16}}-{lock_hash}-py3\.\d+\.\d+", posixpath.basename(current))
    assert host.file(f"{current}/requirements.lock").content_string == lock
    pins = {_canonical(n): v for n, v in re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", lock, re.M)}
    listed = host.check_output(
        f"{current}/venv/bin/pip list --format=json --disable-pip-version-check")
    installed = {_canonical(d["name"]): d["version"] for d in json.loads(listed)}
    assert {n: installed.get(n) for n in pins} == pins
    assert set(installed) - set(pins) == {"pip", "ssehub"}
    lines = host.check_output(f"{current}/venv/bin/ssehub --version").splitlines()
    printed = {_canonical(name): v for name, v in (line.split(" ", 1) for line in lines[1:])}
    assert printed and printed == {n: pins[n] for n in printed}


# Where each layout puts the hub: the single host serves its own proxy over a
# Unix socket and keeps TCP on loopback; in the cluster the proxy is another
# host and reaches the hub over TCP on every address.
LAYOUT = {
    "single-host-caddy": {"socket": True, "bind": "127.0.0.1"},
    "cluster": {"socket": False, "bind": "0.0.0.0"},
}


@pytest.fixture
def socket_path(host):
    path = variable(host, "ssehub_unix_socket")
    if not path:
        pytest.skip("this hub has no Unix socket (its proxy is on another host)")
    return path


def proxy_identity(host):
    """User and group of the proxy's processes on this host (nginx workers, or Caddy)."""
    if host.exists("caddy"):
        pid = host.check_output("systemctl show caddy --property MainPID --value")
    else:
        pid = host.check_output("pgrep -f 'nginx: worker process' | head -1")
    return host.check_output(f"stat -c '%U %G' /proc/{pid}").split()


def test_hub_uses_a_unix_socket_only_where_the_proxy_shares_its_host(host):
    """ssehub_unix_socket is on for an app host that is a proxy host too; TCP
    is on loopback only when this host is the only proxy, else on every address."""
    socket, bind = variable(host, "ssehub_unix_socket"), variable(host, "ssehub_bind_address")
    assert bool(socket) == (hostname(host) in hosts_in("proxy"))
    assert (bind == "127.0.0.1") == (hosts_in("proxy") == [hostname(host)])
    if SCENARIO in LAYOUT:
        assert bool(socket) == LAYOUT[SCENARIO]["socket"] and bind == LAYOUT[SCENARIO]["bind"]


def test_ssehub_listens_only_on_its_app_port(host):
    """gunicorn binds ssehub_bind_address:ssehub_port (the firewall admits only
    the proxies there; loopback only on a single host) and opens no other TCP
    port (/metrics goes through it); and the Unix socket when it has one."""
    port = int(setting("ssehub_port"))
    assert listen_addresses(host, port) == {variable(host, "ssehub_bind_address")}
    assert ports_of_unit(host, "ssehub.service") == {port}
    socket = variable(host, "ssehub_unix_socket")
    assert unix_listeners(host, "ssehub.service") == ({socket} if socket else set())


def test_unix_socket_is_open_to_the_proxy_group_only(host, socket_path):
    """The socket's folder is the gate: the service's, the proxy's group, mode
    2750, nobody else may enter (gunicorn makes the socket 0777 and gives it
    the service's group). The proxy's user reaches the hub through it and
    still cannot read the hub's secrets; another user cannot reach it."""
    user, group = proxy_identity(host)
    folder = host.file(posixpath.dirname(socket_path))
    assert (folder.user, folder.group, folder.mode) == (setting("ssehub_user"), group, 0o2750)
    sock = host.file(socket_path)
    assert sock.is_socket and sock.user == setting("ssehub_user")
    readyz = f"curl -fsS -m 5 --unix-socket {socket_path} http://localhost/readyz"
    assert json.loads(host.check_output(f"runuser -u {user} -- {readyz}"))["status"] == "ready"
    assert host.run(f"runuser -u nobody -- {readyz}").rc != 0
    assert host.run(f"runuser -u {user} -- cat /etc/ssehub/ssehub.env").rc != 0


def test_tmpfiles_entry_makes_the_socket_folder_again(host, socket_path):
    """/run is empty after a reboot: systemd-tmpfiles' entry makes the folder
    again as the role made it (here: put right after it was spoiled)."""
    folder = posixpath.dirname(socket_path)
    host.check_output(f"chmod 0755 {folder} && chgrp root {folder}")
    host.check_output("systemd-tmpfiles --create /etc/tmpfiles.d/ssehub-socket.conf")
    _, group = proxy_identity(host)
    f = host.file(folder)
    assert (f.user, f.group, f.mode) == (setting("ssehub_user"), group, 0o2750)
    assert host.file(socket_path).is_socket


def test_streams_through_the_proxy_reach_the_hub_over_the_unix_socket(
    host, socket_path, stream_factory
):
    """Each stream through the proxy holds one connection to the hub: on the
    Unix socket, not on TCP."""
    port = int(setting("ssehub_port"))
    for _ in range(3):
        stream_factory(new_channel("public"))
    time.sleep(0.5)
    unix = [line for line in host.check_output("ss -Hx state established").splitlines()
            if f" {socket_path} " in f" {line} "]
    tcp = host.check_output(f"ss -Htn state established '( sport = :{port} )'").splitlines()
    assert len(unix) >= 3, unix
    assert len(tcp) == 0, tcp
