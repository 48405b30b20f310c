"""postgresql role: private address, scram-sha-256, app role and limits in effect."""

import shlex

from conftest import is_loopback, listen_addresses, ports_of_unit, private_address, setting

testinfra_hosts = ["postgres"]

UNIT = f"postgresql@{setting('postgresql_version')}-main.service"


def psql(host, sql, **params):
    """Run SQL as postgres; values are psql variables (:'name'), quoted by psql."""
    args = " ".join(f"-v {k}={shlex.quote(str(v))}" for k, v in params.items())
    return host.check_output(
        f"printf '%s\\n' {shlex.quote(sql)} | runuser -u postgres -- psql -XAtq {args} -f -"
    )


def test_postgresql_is_running(host):
    svc = host.service(UNIT)
    assert svc.is_enabled and svc.is_running


def test_postgresql_settings_in_effect(host):
    assert psql(host, "SHOW password_encryption") == "scram-sha-256"
    listen = psql(host, "SHOW listen_addresses")
    assert "localhost" in listen and "*" not in listen
    limit = psql(host, "SELECT rolconnlimit FROM pg_roles WHERE rolname = :'role'",
                 role=setting("postgresql_app_user"))
    assert int(psql(host, "SHOW max_connections")) > int(limit) > 0


def test_app_role_owns_its_database(host):
    owner = psql(host, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :'db'",
                 db=setting("postgresql_app_database"))
    assert owner == setting("postgresql_app_user")


def test_app_role_uses_scram(host):
    kind = psql(host, "SELECT left(rolpassword, 13) FROM pg_authid WHERE rolname = :'role'",
                role=setting("postgresql_app_user"))
    assert kind == "SCRAM-SHA-256"



def test_postgresql_listens_only_on_loopback_and_its_private_address(host):
    """Never 0.0.0.0: localhost for local tools, the private address
    (postgresql_listen_address: ssekit_private_address) for the app hosts."""
    port = setting("postgresql_port")
    private = private_address(host)
    addrs = listen_addresses(host, port)
    assert "127.0.0.1" in addrs and private in addrs, addrs
    assert all(is_loopback(a) or a == private for a in addrs), addrs
    assert ports_of_unit(host, UNIT) == {int(port)}
