"""ssehub role on app hosts: service, hardening, env file, health."""

import json

from conftest import listen_addresses, nofile_expected, ports_of_unit, setting

testinfra_hosts = ["app"]


def test_ssehub_is_enabled_and_running(host):
    svc = host.service("ssehub")
    assert svc.is_enabled and svc.is_running


def test_ssehub_is_ready(host):
    out = json.loads(host.check_output(f"curl -fsS -m 5 http://127.0.0.1:{setting('ssehub_port')}/readyz"))
    assert out["status"] == "ready"


def test_env_file_is_readable_only_by_the_service(host):
    f = host.file("/etc/ssehub/ssehub.env")
    assert f.user == setting("ssehub_user") and f.mode == 0o600


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


def test_unit_is_hardened(host):
    out = host.run("systemd-analyze security ssehub --no-pager")
    # "Overall exposure level for ssehub.service: 2.1 OK"
    level = float(out.stdout.strip().splitlines()[-1].split(":")[1].split()[0])
    assert level <= 3.0, out.stdout[-400:]


def test_service_runs_as_its_own_user_with_no_new_privileges(host):
    props = host.check_output("systemctl show ssehub --property User,NoNewPrivileges,ProtectSystem")
    assert f"User={setting('ssehub_user')}" in props
    assert "NoNewPrivileges=yes" in props and "ProtectSystem=strict" in props



def test_ssehub_listens_only_on_its_app_port(host):
    """gunicorn binds ssehub_bind_address:ssehub_port (the firewall admits only
    the proxies there) and opens no other TCP port (/metrics goes through it)."""
    port = int(setting("ssehub_port"))
    assert listen_addresses(host, port) == {setting("ssehub_bind_address")}
    assert ports_of_unit(host, "ssehub.service") == {port}
