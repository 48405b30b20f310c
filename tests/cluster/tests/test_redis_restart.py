"""A restart or a crash of the deployed Redis keeps every stored event, the id
sequence and the idempotency keys, and open streams go on without a gap or a
repeat (regression, issue 13).

Redis 7.0 replays the AOF as the default user, and EXEC re-checks each queued
command against that user's ACL (redis/redis#14541). The hub's publish script
reaches the AOF as MULTI ... EXEC; while the role's default user had ``-@all``,
every EXEC was refused at startup ("NOPERM ..." in the Redis log) and a restart
lost everything stored. Faults are applied on the redis host to the server the
role runs (its users.acl, AOF, and systemd unit, Restart=always); events go
through the proxy like a publisher's and a browser's. Ids are compared as
integers: they need not be small.
"""

from __future__ import annotations

import queue
import shlex
import time
import uuid
from typing import Any

import httpx
import pytest
from conftest import (
    Event,
    Stream,
    client,
    ext,
    get_host,
    hosts_in,
    new_channel,
    secret,
    setting,
    token,
)

EVENTS = 30  # stored before the fault
AFTER = 5  # published once Redis is back
REPEATED = 3  # the event whose Idempotency-Key is sent again after the fault
# Bounds: Redis back (systemd's restart and the AOF load), a publish accepted
# again (the hubs reconnect to Redis), the expected events delivered.
REDIS_BACK_SECONDS = 30
PUBLISH_SECONDS = 30
DELIVERY_SECONDS = 15
# Reading goes on this long after the last expected event, so that a repeat shows.
GRACE_SECONDS = 1.0
# Answers of the proxy or the hub that mean "try again" (the hub's 503 has Retry-After).
RETRY_STATUSES = frozenset({502, 503, 504})

FAULTS = {
    "systemctl restart": f"timeout {REDIS_BACK_SECONDS} systemctl restart redis-server",
    "kill -9": 'kill -9 "$old"',  # systemd restarts it (Restart=always in Debian's unit)
}

# Runs on the redis host, so that the timing leaves out testinfra's round trips:
# notes the log's size, the main PID and systemd's restart count, applies the
# fault, then waits until a new main PID answers PING (the AOF is loaded: until
# then Redis answers LOADING) or the bound passed ("none" for the new PID).
# Prints: milliseconds, log offset, old PID, new PID, NRestarts before, after.
FAULT_AND_WAIT = """
off=$(stat -c %s {log})
old=$(systemctl show -p MainPID --value redis-server)
restarts=$(systemctl show -p NRestarts --value redis-server)
[ "$old" -gt 0 ] || exit 3
start=$(date +%s%N)
{fault} || exit 4
while :; do
  pid=$(systemctl show -p MainPID --value redis-server)
  if [ "$pid" -gt 0 ] && [ "$pid" != "$old" ] && [ "$({ping} 2>/dev/null)" = PONG ]; then break; fi
  if [ $(( $(date +%s%N) - start )) -ge {bound}000000000 ]; then pid=none; break; fi
  sleep 0.1
done
echo $(( ($(date +%s%N) - start) / 1000000 )) $off $old $pid $restarts \
  $(systemctl show -p NRestarts --value redis-server)
"""


def redis_cli(*args: str) -> str:
    """A redis-cli command line on the redis host, as the ACL's admin user."""
    return shlex.join([
        "redis-cli", "--no-auth-warning", "-p", str(setting("redis_port")),
        "--user", setting("redis_admin_user"), "--pass", secret("redis_admin_password"), *args,
    ])


def publish_with_key(channel: str, data: str, key: str, deadline: float) -> int:
    """POST /publish/ like a careful client: a refused (503) or broken request is
    sent again with the same Idempotency-Key until the deadline. Returns the id."""
    headers = {"Authorization": f"Bearer {token(publish=[channel])}", "Idempotency-Key": key}
    while True:
        try:
            with client() as c:
                r = c.post("/publish/", json={"channel": channel, "data": data},
                           headers=headers, extensions=ext())
            if r.status_code not in RETRY_STATUSES:
                assert r.status_code in (200, 201), f"{r.status_code} {r.text}"
                return int(r.json()["id"])
            last = f"{r.status_code} {r.text}"
        except httpx.TransportError as exc:
            last = repr(exc)
        assert time.monotonic() < deadline, f"publish of {data!r} still refused: {last}"
        time.sleep(0.2)


def collect(stream: Stream, expected: list[int], timeout: float) -> list[Event]:
    """What the stream delivers until every expected id arrived or the timeout
    passed, and GRACE_SECONDS more."""
    missing = set(expected)
    got: list[Event] = []
    until = time.monotonic() + timeout
    while (left := until - time.monotonic()) > 0:
        try:
            event = stream.next(timeout=left)
        except queue.Empty:
            break
        got.append(event)
        if event.id is not None and event.id.isdigit():
            missing.discard(int(event.id))
        if not missing:
            until = min(until, time.monotonic() + GRACE_SECONDS)
    return got


def ids(events: list[Event]) -> list[int]:
    return [int(e.id) for e in events if e.id is not None]


def resets(events: list[Event]) -> list[str]:
    return [e.data for e in events if e.event == "reset"]


def apply_fault(redis: Any, fault: str, logfile: str) -> int:
    """Apply the fault on the redis host, wait until Redis answers again; returns
    the offset in the Redis log where the fault began."""
    script = FAULT_AND_WAIT.format(log=shlex.quote(logfile), fault=FAULTS[fault],
                                   ping=redis_cli("PING"), bound=REDIS_BACK_SECONDS)
    out = redis.run(script)
    assert out.rc == 0, f"{fault} failed (rc {out.rc}): {out.stdout} {out.stderr}"
    took_ms, offset, old, new, restarts_before, restarts_after = out.stdout.split()
    if new == "none":
        redis.run("systemctl start redis-server")  # leave the cluster as found
        raise AssertionError(f"Redis did not answer within {REDIS_BACK_SECONDS} s after {fault}"
                             f" (systemd NRestarts {restarts_before} -> {restarts_after})")
    if fault == "kill -9":
        assert int(restarts_after) == int(restarts_before) + 1, "systemd did not restart Redis"
    print(f"{fault}: Redis (pid {old} -> {new}) answered again after {took_ms} ms;"
          f" systemd NRestarts {restarts_before} -> {restarts_after}")
    return int(offset)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_redis_restart_keeps_stored_events_ids_and_idempotency_keys(stream_factory, fault):
    redis = get_host(hosts_in("redis")[0])
    logfile = redis.check_output(redis_cli("CONFIG", "GET", "logfile")).splitlines()[1]
    channel = new_channel()
    # Opened before anything is published: from id 0, so no event can slip past.
    live = stream_factory(channel, last_event_id="0")
    keys = [uuid.uuid4().hex for _ in range(EVENTS)]
    deadline = time.monotonic() + PUBLISH_SECONDS
    stored = [publish_with_key(channel, f"e{i}", key, deadline) for i, key in enumerate(keys)]
    assert stored == sorted(set(stored)), f"ids not increasing: {stored}"

    offset = apply_fault(redis, fault, logfile)

    log = redis.check_output(f"tail -c +{offset + 1} {shlex.quote(logfile)}")
    refused = [line for line in log.splitlines() if "NOPERM" in line]
    assert len(refused) == 0, f"the AOF replay was refused {len(refused)} times: {refused[:1]}"
    assert "Ready to accept connections" in log, f"no restart in the Redis log: {log[-2000:]}"

    replay = stream_factory(channel, last_event_id="0")
    replayed = collect(replay, stored, DELIVERY_SECONDS)
    replay.stop()
    assert not resets(replayed), f"replay from 0 got event: reset {resets(replayed)}"
    got = ids(replayed)
    assert got == stored, f"replay from 0 gave {len(got)} of {EVENTS} stored ids: {got[:5]}"

    deadline = time.monotonic() + PUBLISH_SECONDS
    again = publish_with_key(channel, "again", keys[REPEATED], deadline)
    assert again == stored[REPEATED], "the Idempotency-Key was lost: a repeat was stored anew"
    after = [publish_with_key(channel, f"after{i}", uuid.uuid4().hex, deadline)
             for i in range(AFTER)]
    assert after[0] > max(stored), f"the id sequence went back: {after[0]} <= {max(stored)}"
    assert after == sorted(set(after)), f"ids not increasing: {after}"

    delivered = collect(live, stored + after, DELIVERY_SECONDS)
    got = ids(delivered)
    assert not resets(delivered), f"the open stream got event: reset {resets(delivered)}"
    missing = [i for i in after if i not in got]
    assert not missing, f"the open stream missed {len(missing)} of {AFTER} new events: {missing}"
    assert len(got) == len(set(got)), f"the open stream got repeats: {got}"
    assert got == stored + after, f"the open stream got {got}"

    # Storage holds the new events once each, and nothing for the repeat.
    tail = stream_factory(channel, last_event_id=str(stored[-1]))
    assert ids(collect(tail, after, DELIVERY_SECONDS)) == after
