"""The hub works under the Redis ACL the redis role deploys (its rendered users.acl),
and that ACL grants the app's user nothing else.

Regression: a publish without Idempotency-Key passed an empty key name to the
Lua script, which an ACL limited to ``~ssehub:*`` refuses (found by the cluster
scenario: every such publish answered 503).

Issue 10, item 5: the rules let the app's user run any Lua with EVAL (a 20-million
step loop blocked Redis for 0.54 s), CLIENT KILL other connections, CLIENT PAUSE
the server and CLIENT LIST everyone's addresses. What the hub sends was read from
the code and watched with MONITOR over the Redis broker's tests: AUTH (needs no
grant), PING, EVALSHA, SCRIPT LOAD, GET, XINFO STREAM, XRANGE, TIME, SUBSCRIBE
and UNSUBSCRIBE, and in its scripts GET, SET, INCR, XADD, XLEN, XRANGE, XDEL,
PEXPIRE and PUBLISH (Redis checks a script's commands against the caller's ACL too).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from conftest import _config_factory, take
from redis.exceptions import NoPermissionError
from ssekit_testing.servers import DeployedRedis, running

from ssehub import conf
from ssehub.brokers import listener
from ssehub.hub import Hub

pytestmark = pytest.mark.asyncio

# What the hub never sends, each on a key or channel the user may otherwise touch.
REFUSED = [
    ("EVAL", "return 1", "0"),
    ("CLIENT", "KILL", "ID", "1"),
    ("CLIENT", "PAUSE", "1"),
    ("CLIENT", "LIST"),
    ("CLIENT", "SETNAME", "x"),
    ("INFO",),
    ("XREVRANGE", "ssehub:s:acl", "+", "-"),
    ("XTRIM", "ssehub:s:acl", "MAXLEN", "0"),
    ("EXPIRE", "ssehub:s:acl", "1"),
    ("PSUBSCRIBE", "ssehub:*"),
    ("PUNSUBSCRIBE", "ssehub:*"),
    ("SCRIPT", "FLUSH"),
    ("FLUSHALL",),
]


def acl_log(redis: DeployedRedis) -> list[str]:
    """What the server refused since it started: one 'command-or-key by user' a refusal."""
    lines = redis.cli("ACL", "LOG").splitlines()
    fields: dict[str, str] = {}
    refused = []
    for name, value in itertools.pairwise(lines):
        if name in {"object", "username"}:
            fields[name] = value
            if len(fields) == 2:
                refused.append(f"{fields['object']} by {fields['username']}")
                fields = {}
    return refused


async def test_publish_replay_and_listen_under_the_deployed_acl(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The listener's periodic history check runs during the test, not 5 s later.
    monkeypatch.setattr(listener, "HISTORY_CHECK_SECONDS", 0.05)
    with running(DeployedRedis(tmp_path)) as redis:
        hub = Hub(_config_factory(redis.url)(SSEHUB_REDIS_PREFIX="ssehub:"))
        await hub.start()
        try:
            subscriber = await hub.subscribe(["acl"])
            plain = await hub.broker.publish("acl", "no key")
            keyed = await hub.broker.publish("acl", "with key", idempotency_key="k1")
            assert await hub.broker.publish("acl", "with key", idempotency_key="k1") == keyed
            replay = await hub.broker.replay(["acl"], 0)
            assert [e.id for e in replay.events] == [plain, keyed]
            assert [e.id for e in (await hub.broker.replay(["acl"], plain)).events] == [keyed]
            assert (await hub.broker.replay(["acl"], keyed + 1)).reset
            # A channel with nothing above the id: replay reads the ticks (TIME, XRANGE).
            assert not (await hub.broker.replay(["acl", "none"], plain)).reset
            # take() opens a Batch: both may arrive in one read (a listener that
            # lagged behind on a loaded machine did, and a count of buffer items hung).
            assert [e.id for e in await take(subscriber, 2)] == [plain, keyed]
            await hub.broker.ping()
            await hub.broker.unlisten("acl")
            # The script cache lost (as after a restart): the hub loads it again.
            redis.cli("SCRIPT", "FLUSH")
            assert await hub.broker.publish("acl", "after flush") > keyed
        finally:
            await hub.close()
            conf.reset()
        # The hub was refused nothing. (Redis 7.2 and later know CLIENT SETINFO,
        # which redis-py sends on connecting and forgoes when refused.)
        assert [r for r in acl_log(redis) if not r.startswith("client|setinfo")] == []


async def test_the_app_user_is_refused_what_the_hub_never_sends(tmp_path: Path) -> None:
    with running(DeployedRedis(tmp_path)) as redis:
        user = aioredis.Redis.from_url(redis.url, protocol=2)
        try:
            assert await user.ping()
            allowed = []
            for command in REFUSED:
                try:
                    await user.execute_command(*command)
                    allowed.append(" ".join(command))
                except NoPermissionError:
                    pass
                except Exception as exc:  # ran, and failed on its arguments
                    allowed.append(f"{' '.join(command)} ({exc})")
            assert allowed == []
        finally:
            await user.aclose()
