"""The hub works under the Redis ACL the redis role deploys (its rendered users.acl).

Regression: a publish without Idempotency-Key passed an empty key name to the
Lua script, which an ACL limited to ``~ssehub:*`` refuses (found by the cluster
scenario: every such publish answered 503).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import _config_factory, take
from servers import DeployedRedis, running

from ssehub import conf
from ssehub.hub import Hub

pytestmark = pytest.mark.asyncio


async def test_publish_replay_and_listen_under_the_deployed_acl(tmp_path: Path) -> None:
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
            # take() opens a Batch: both may arrive in one read (a listener that
            # lagged behind on a loaded machine did, and a count of buffer items hung).
            assert [e.id for e in await take(subscriber, 2)] == [plain, keyed]
        finally:
            await hub.close()
            conf.reset()
