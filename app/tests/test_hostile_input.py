"""Issue 10, hostile input: what a publisher or a browser sends must get an answer
(a 400 with a reason, or 503) and must never hold or poison anything else.

HTTP cases run against ``ssehub serve`` on each broker (memory, Redis, PostgreSQL);
the Redis batch flusher is tested on the broker itself with a real Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from ssekit_testing import tokens
from ssekit_testing.fixtures import SECRET, base_env, fresh_database
from ssekit_testing.servers import Postgres, Redis
from ssekit_testing.servers import ServedHub as Served

from ssehub.brokers import BrokerUnavailable
from ssehub.brokers import redis as redis_broker
from ssehub.hub import Hub

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module", params=["memory", "redis", "postgres"])
def served(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``ssehub serve`` on one broker, one worker."""
    directory = tmp_path_factory.mktemp(f"hostile-{request.param}")
    env = base_env(SSEHUB_DATA_DIR=str(directory), SSEHUB_REDIS_PREFIX="hostile:")
    if request.param == "memory":
        env["SSEHUB_BROKER_URL"] = "memory://"
    elif request.param == "redis":
        redis: Redis = request.getfixturevalue("redis_server")
        env["SSEHUB_BROKER_URL"] = redis.url
    else:
        pg: Postgres = request.getfixturevalue("pg_server")
        env["SSEHUB_BROKER_URL"] = fresh_database(pg)
    hub = Served(directory, env, workers=1)
    hub.start()
    yield hub
    hub.stop()


def auth(**grants: list[str]) -> dict[str, str]:
    return tokens.bearer(tokens.mint(SECRET, ttl=300, **grants))


async def test_a_lone_surrogate_in_the_event_name_is_refused_not_held(
        served: Served, client: httpx.AsyncClient) -> None:
    """Redis held this publish forever: the surrogate killed its batch flusher."""
    headers = {**auth(publish=["priv.*"]), "Content-Type": "application/json"}
    body = b'{"channel":"priv.mine","data":"x","event":"\\ud800"}'
    refused = await client.post(f"{served.url}/publish/", content=body, headers=headers)
    assert refused.status_code == 400, refused.text
    assert "lone surrogate" in refused.json()["error"]
    after = await client.post(f"{served.url}/publish/", headers=headers,
                              json={"channel": "priv.mine", "data": "x", "event": "ok"})
    assert after.status_code == 201, after.text


@pytest.mark.parametrize("body", [
    {"json": {"channel": "pub.x", "data": "{}", "event": "reset"}},
    {"data": {"channel": "pub.x", "data": "{}", "event": "reset"}},
], ids=["json", "form"])
async def test_a_publisher_cannot_send_the_hubs_own_reset(
        served: Served, client: httpx.AsyncClient, body: dict) -> None:  # type: ignore[type-arg]
    """Every client took a published ``event: reset`` as the hub's own reset."""
    refused = await client.post(f"{served.url}/publish/", headers=auth(publish=["pub.*"]),
                                **body)
    assert refused.status_code == 400, refused.text
    assert "reserved" in refused.json()["error"] and "reset" in refused.json()["error"]


@pytest.mark.parametrize("sibling", [b"theme=dark mode", "name=\u00e9".encode(),
                                     b'prefs={"a":1}'], ids=["space", "utf8", "json"])
async def test_cookie_login_survives_a_sibling_cookie_that_does_not_parse(
        served: Served, client: httpx.AsyncClient, sibling: bytes) -> None:
    """SimpleCookie drops every cookie when one fails: the token cookie gave 401."""
    login = b"ssehub_token=" + tokens.mint(SECRET, subscribe=["priv.*"], ttl=300).encode()
    for cookie in (sibling + b"; " + login, login + b"; " + sibling):
        async with client.stream("GET", f"{served.url}/events/?channel=priv.cookie",
                                 headers={"Cookie": cookie}) as response:
            assert response.status_code == 200, (cookie, await response.aread())
            assert response.headers["content-type"] == "text/event-stream"


class Poison(str):
    """A value that fails when the Redis client encodes it, as a bug might."""

    def encode(self, *args: object, **kwargs: object) -> bytes:
        raise RuntimeError("poisoned")


@pytest.fixture
async def redis_hub(redis_config) -> AsyncIterator[Hub]:  # type: ignore[no-untyped-def]
    hub = Hub(redis_config())
    await hub.start()
    yield hub
    await hub.close()


@pytest.mark.parametrize("poison", [{"event": "\ud800"}, {"data": Poison("x")}],
                         ids=["surrogate", "unexpected-error"])
async def test_a_poisoned_publish_answers_its_batch_and_the_flusher_lives_on(
        redis_hub: Hub, poison: dict[str, str]) -> None:
    """The flusher died with the exception and every publish of its batch waited on
    its future forever (the caller has no timeout)."""
    broker = redis_hub.broker
    first = await broker.publish("poison", "before")
    calls = [broker.publish("poison", "mate 1"),
             broker.publish("poison", **{"data": "bad", **poison}),
             broker.publish("poison", "mate 2")]
    started = time.monotonic()
    async with asyncio.timeout(redis_broker.COMMAND_TIMEOUT_SECONDS + 1):
        answers = await asyncio.gather(*calls, return_exceptions=True)
    assert time.monotonic() - started < redis_broker.COMMAND_TIMEOUT_SECONDS
    assert isinstance(answers[1], BrokerUnavailable), answers
    assert all(isinstance(a, (int, BrokerUnavailable)) for a in answers), answers
    async with asyncio.timeout(5):
        after = await broker.publish("poison", "after")
    stored = [a for a in answers if isinstance(a, int)]
    assert [e.id for e in (await broker.replay(["poison"], 0)).events] == [first, *stored, after]


async def test_a_publish_answers_within_the_command_timeout_when_the_flusher_is_stuck(
        redis_hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever happens below the queue, the caller gets 503 in bounded time."""
    monkeypatch.setattr(redis_broker, "COMMAND_TIMEOUT_SECONDS", 0.5)
    stuck = asyncio.Event()

    async def never() -> None:
        await stuck.wait()

    monkeypatch.setattr(redis_hub.broker, "_script_loaded", never)
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailable):
            async with asyncio.timeout(5):
                await redis_hub.broker.publish("stuck", "x")
        assert time.monotonic() - started < 1.5
    finally:
        stuck.set()
        monkeypatch.undo()
    async with asyncio.timeout(5):
        after = await redis_hub.broker.publish("stuck", "after")
    # the publish that timed out in the queue was never sent afterwards
    assert [e.data for e in (await redis_hub.broker.replay(["stuck"], 0)).events] == ["after"]
    assert (await redis_hub.broker.replay(["stuck"], 0)).events[0].id == after

