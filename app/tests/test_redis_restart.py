"""A restart of the Redis the role deploys keeps every stored event (issue 13).

Regression: Redis 7.0 replays the AOF as the default user, and EXEC re-checks
each queued command against that user's ACL (redis/redis#14541). The hub's
publish script reaches the AOF as MULTI ... EXEC, and the role's default user
had ``-@all``: after a restart every stored event, the id sequence and the
idempotency keys were gone, and the next publish got id 1. The harness's
plain Redis (no ACL file) could not show it; this runs the role's rendered
redis.conf and users.acl (servers.DeployedRedis).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from conftest import _config_factory, take
from ssekit_testing.servers import DeployedRedis, running, stop

from ssehub import conf
from ssehub.hub import UNLISTEN_DELAY, Hub

pytestmark = pytest.mark.asyncio

EVENTS = 40


def restart(redis: DeployedRedis, how: str) -> None:
    """Stop Redis as systemd does (SIGTERM) or kill it, and start it again."""
    assert redis.process is not None
    if how == "restart":
        stop(redis.process)
    else:
        redis.process.send_signal(signal.SIGKILL)
        redis.process.wait(10)
    redis.start()


@pytest.mark.parametrize("how", ["restart", "kill -9"])
async def test_redis_restart_under_the_role_config_keeps_events_ids_and_keys(
        tmp_path: Path, how: str) -> None:
    with running(DeployedRedis(tmp_path)) as redis:
        hub = Hub(_config_factory(redis.url)(SSEHUB_REDIS_PREFIX="ssehub:"))
        await hub.start()
        try:
            stored = [await hub.broker.publish("restart", f"e{i}", idempotency_key=f"k{i}")
                      for i in range(EVENTS)]
            subscriber = await hub.subscribe(["restart"])
            # everysec: give the AOF its fsync, as a restart for an upgrade would
            redis.cli("DEBUG", "SLEEP", "0")
            restart(redis, how)

            log = redis.log.read_text()
            assert "NOPERM" not in log, [line for line in log.splitlines() if "NOPERM" in line][:2]
            replay = await hub.replay(["restart"], 0)
            assert not replay.reset
            assert [e.id for e in replay.events] == stored
            assert [e.data for e in replay.events] == [f"e{i}" for i in range(EVENTS)]
            # the idempotency keys survived: a retry stores nothing new
            assert await hub.broker.publish("restart", "again", idempotency_key="k3") == stored[3]
            after = await hub.broker.publish("restart", "after the restart")
            assert after > max(stored), "the id sequence went back"
            # the live stream goes on with the new event, no reset, no repeat
            got = await take(subscriber, 1, timeout=15)
            assert [(e.id, e.data) for e in got] == [(after, "after the restart")]
        finally:
            await hub.close()
            conf.reset()


@pytest.mark.parametrize("how", ["restart", "kill -9"])
async def test_the_first_commands_after_a_redis_restart_succeed(tmp_path: Path, how: str) -> None:
    """After a restart, a process that listened to nothing opens a new stream and
    publishes at the first try (regression: each got a 503 from a connection Redis
    had closed, which redis-py 8.1 handed out again, redis/redis-py#4252; and a
    listener with no channel read nothing, so it did not notice the loss)."""
    with running(DeployedRedis(tmp_path)) as redis:
        hub = Hub(_config_factory(redis.url)(SSEHUB_REDIS_PREFIX="ssehub:"))
        await hub.start()
        try:
            before = await hub.broker.publish("first", "before")
            hub.unsubscribe(await hub.subscribe(["first"]))
            await asyncio.sleep(UNLISTEN_DELAY + 0.5)  # the process listens to nothing
            restart(redis, how)
            await asyncio.sleep(0.5)
            subscriber = await hub.subscribe(["first"])  # raised BrokerUnavailable
            after = await hub.broker.publish("first", "after")
            assert after > before
            got = await take(subscriber, 1, timeout=5)
            assert [(e.id, e.data) for e in got] == [(after, "after")]
        finally:
            await hub.close()
            conf.reset()
