"""redis role: private address only, ACL user limited to the hub's needs, AOF,
noeviction, pub/sub buffer limits, read from the running server."""

import itertools
import shlex

import pytest
from conftest import secret, setting

testinfra_hosts = ["redis"]


ADMIN = ("admin", "redis_admin_password")  # ACL user and the name of its secret file
APP = (setting("redis_app_user"), "redis_app_password")

# What the hub never sends (issue 10, item 5; app/tests/test_redis_acl.py watches
# what it does send): the app's user is refused each, on keys it may otherwise use.
NEVER_SENT = [
    ("EVAL", "return 1", "0"),
    ("CLIENT", "KILL", "ID", "1"),
    ("CLIENT", "PAUSE", "1"),
    ("CLIENT", "LIST"),
    ("INFO",),
    ("XREVRANGE", "ssehub:probe", "+", "-"),
    ("XTRIM", "ssehub:probe", "MAXLEN", "0"),
    ("EXPIRE", "ssehub:probe", "1"),
    ("PSUBSCRIBE", "ssehub:*"),
    ("PUNSUBSCRIBE", "ssehub:*"),
]
# Refusals these tests cause on purpose, as ACL LOG names them; CLIENT SETINFO is
# sent by redis-py on connecting and forgone when refused (Redis 7.2 and later).
PROBED = {"flushall", "keys", "other:probe", "client|setinfo"} | {
    "|".join(c[:2]).lower() if c[0] == "CLIENT" else c[0].lower() for c in NEVER_SENT}


def cli(host, *args, login=ADMIN):
    user, secret_name = login
    # Bounded: a PSUBSCRIBE that were allowed would wait for messages for good.
    cmd = ["timeout", "10", "redis-cli", "--no-auth-warning", "--user", user,
           "--pass", secret(secret_name), *args]
    return host.run(shlex.join(cmd))


def test_redis_is_enabled_and_running(host):
    svc = host.service("redis-server")
    assert svc.is_enabled and svc.is_running


def test_redis_listens_on_loopback_and_private_address_only(host):
    addrs = [line.split()[3] for line in host.check_output("ss -Htln").splitlines()]
    ports = [a for a in addrs if a.endswith(":6379")]
    assert ports and not any(a.startswith(("0.0.0.0", "*", "[::]")) for a in ports), ports


def test_redis_config_in_effect(host):
    def get(name):
        return cli(host, "CONFIG", "GET", name).stdout.split("\n")[1].strip()

    assert get("maxmemory-policy") == setting("redis_maxmemory_policy")
    assert get("appendonly") == "yes"
    hard, soft, seconds = setting("redis_pubsub_buffer_limit").split()
    limits = get("client-output-buffer-limit")  # bytes: "... pubsub 67108864 16777216 60"
    pubsub = limits.split("pubsub")[1].split()[:3]
    assert pubsub == [str(_bytes(hard)), str(_bytes(soft)), seconds]


def _bytes(size):
    units = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}
    for unit, factor in units.items():
        if size.lower().endswith(unit):
            return int(size[: -len(unit)]) * factor
    return int(size)


def test_redis_default_user_is_disabled(host):
    out = cli(host, "ACL", "GETUSER", "default").stdout
    assert "off" in out


def test_redis_app_user_is_confined_to_the_hub_prefix(host):
    app = {"login": APP}
    assert cli(host, "SET", "ssehub:probe", "1", **app).stdout.strip() == "OK"
    assert "NOPERM" in cli(host, "SET", "other:probe", "1", **app).stdout
    assert "NOPERM" in cli(host, "FLUSHALL", **app).stdout
    assert "NOPERM" in cli(host, "KEYS", "*", **app).stdout


@pytest.mark.parametrize("command", NEVER_SENT, ids=" ".join)
def test_redis_app_user_is_refused_what_the_hub_never_sends(host, command):
    out = cli(host, *command, login=APP)
    assert "NOPERM" in out.stdout + out.stderr, (out.rc, out.stdout, out.stderr)


def test_redis_refused_the_hubs_nothing(host):
    """The hubs of the scenario ran under these rules (the tests before this one
    published and streamed through them): none of their commands was refused."""
    lines = cli(host, "ACL", "LOG", "128").stdout.splitlines()
    refused, fields = [], {}
    for name, value in itertools.pairwise(lines):
        if name in {"object", "username"}:
            fields[name] = value
            if len(fields) == 2:
                refused.append((fields["object"], fields["username"]))
                fields = {}
    assert [r for r in refused if r[1] == APP[0] and r[0] not in PROBED] == []
