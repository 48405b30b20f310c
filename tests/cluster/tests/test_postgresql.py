"""postgresql role: private address, scram-sha-256, app role and limits in effect."""

from conftest import setting

testinfra_hosts = ["postgres"]


def psql(host, sql):
    return host.check_output(f"runuser -u postgres -- psql -XAtc \"{sql}\"")


def test_postgresql_is_running(host):
    svc = host.service(f"postgresql@{setting('postgresql_version')}-main")
    assert svc.is_enabled and svc.is_running


def test_postgresql_settings_in_effect(host):
    assert psql(host, "SHOW password_encryption") == "scram-sha-256"
    listen = psql(host, "SHOW listen_addresses")
    assert "localhost" in listen and "*" not in listen
    assert int(psql(host, "SHOW max_connections")) > int(
        psql(host, f"SELECT rolconnlimit FROM pg_roles WHERE rolname = '{setting('postgresql_app_user')}'")
    )


def test_app_role_owns_its_database(host):
    owner = psql(
        host,
        "SELECT pg_get_userbyid(datdba) FROM pg_database "
        f"WHERE datname = '{setting('postgresql_app_database')}'",
    )
    assert owner == setting("postgresql_app_user")


def test_app_role_uses_scram(host):
    assert psql(
        host, f"SELECT left(rolpassword, 13) FROM pg_authid WHERE rolname = '{setting('postgresql_app_user')}'"
    ) == "SCRAM-SHA-256"
