"""Issue 10, the low items: no input answers 500, and bad input logs one line.

Against ``ssehub serve`` on each broker (memory, Redis, PostgreSQL); on
PostgreSQL the chat demo's database is PostgreSQL too, as deployed.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ssekit_testing import tokens
from ssekit_testing.fixtures import SECRET, base_env, fresh_database
from ssekit_testing.servers import Postgres, Redis
from ssekit_testing.servers import ServedHub as Served

pytestmark = pytest.mark.asyncio

TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(scope="module", params=["memory", "redis", "postgres"])
def served(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``ssehub serve`` on one broker with the chat demo on, one worker."""
    directory = tmp_path_factory.mktemp(f"low-{request.param}")
    env = base_env(SSEHUB_DATA_DIR=str(directory), SSEHUB_REDIS_PREFIX="low:",
                   SSEHUB_DEMO="true")
    if request.param == "redis":
        redis: Redis = request.getfixturevalue("redis_server")
        env["SSEHUB_BROKER_URL"] = redis.url
    elif request.param == "postgres":
        pg: Postgres = request.getfixturevalue("pg_server")
        env["SSEHUB_BROKER_URL"] = env["SSEHUB_DATABASE_URL"] = fresh_database(pg)
    if request.param != "memory":  # the embedded mode migrates by itself
        subprocess.run([sys.executable, "-m", "ssehub.cli", "migrate", "-v", "0"],
                       env={**os.environ, **env}, check=True)
    hub = Served(directory, env, workers=1)
    hub.start()
    yield hub
    hub.stop()


class LogSince:
    """What the hub logs from now on."""

    def __init__(self, hub: Served) -> None:
        self.hub = hub
        self.start = len(hub.output())

    def text(self, settle: float = 0.3) -> str:
        time.sleep(settle)  # the worker writes its log line after the answer
        return self.hub.output()[self.start:]


def signed(claims: dict[str, object]) -> str:
    return tokens.signed(claims, SECRET)


async def chat_post(client: httpx.AsyncClient, url: str, **fields: str) -> httpx.Response:
    page = await client.get(f"{url}/")
    token = page.text.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]
    return await client.post(f"{url}/chat/messages/",
                             data={"csrfmiddlewaretoken": token, **fields})


async def test_a_chat_post_to_a_room_no_channel_can_name_is_a_400_and_stores_nothing(
        served: Served, client: httpx.AsyncClient) -> None:
    """``room=ünï`` passed str.isalnum: stored, then its publish failed with a 500."""
    log = LogSince(served)
    sent = await chat_post(client, served.url, room="\u00fcn\u00ef", text="unicode room")
    assert sent.status_code == 400, sent.text
    assert "room" in sent.json()["error"]
    assert "unicode room" not in (await client.get(f"{served.url}/")).text
    assert TRACEBACK not in log.text()


@pytest.mark.parametrize("field", ["text", "author"])
async def test_nul_inside_chat_text_or_author_is_a_400(
        served: Served, client: httpx.AsyncClient, field: str) -> None:
    """PostgreSQL's text cannot hold NUL: a 500 with a traceback."""
    fields = {"room": "nul", "author": "ann", "text": "hello", field: "a\x00b"}
    log = LogSince(served)
    sent = await chat_post(client, served.url, **fields)
    assert sent.status_code == 400, sent.text
    assert "NUL" in sent.json()["error"]
    assert TRACEBACK not in log.text()


@pytest.mark.parametrize("path", ["/events/", "/", "/anything"])
async def test_a_websocket_upgrade_is_refused_without_a_traceback(
        served: Served, client: httpx.AsyncClient, path: str) -> None:
    """Django got the upgrade and raised ("Exception in ASGI application", 500)."""
    log = LogSince(served)
    answer = await client.get(f"{served.url}{path}", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert answer.status_code == 403, answer.text
    text = log.text()
    assert TRACEBACK not in text and "Exception in ASGI application" not in text, text


@pytest.mark.parametrize("exp", [10**400, 1e300, "9999999999", 2.5e9], ids=[
    "10**400", "1e300", "numeric-string", "float"])
async def test_a_token_exp_that_is_no_sane_integer_is_a_401_in_one_log_line(
        served: Served, client: httpx.AsyncClient, exp: object) -> None:
    """10**400 answered 500 on /events/ (OverflowError) and logged a traceback on
    /publish/; a numeric string and 1e300 were accepted."""
    token = signed({"exp": exp, "ssehub": {"publish": ["*"], "subscribe": ["*"]}})
    headers = {"Authorization": f"Bearer {token}"}
    log = LogSince(served)
    stream = await client.get(f"{served.url}/events/?channel=priv.exp", headers=headers)
    assert stream.status_code == 401, stream.text
    assert "exp" in stream.json()["error"]
    published = await client.post(f"{served.url}/publish/", headers=headers,
                                  json={"channel": "priv.exp", "data": "x"})
    assert published.status_code == 401, published.text
    assert TRACEBACK not in log.text()


async def test_a_last_event_id_longer_than_int_allows_gets_a_reset(
        served: Served, client: httpx.AsyncClient) -> None:
    """int() refuses over 4,300 digits: the stream was cut ("Exception in ASGI
    application") instead of answered with a reset."""
    token = tokens.mint(SECRET, subscribe=["priv.*"], ttl=300)
    log = LogSince(served)
    lines: list[str] = []
    async with asyncio.timeout(10), client.stream(
            "GET", f"{served.url}/events/?channel=priv.longid",
            headers={"Authorization": f"Bearer {token}", "Last-Event-ID": "9" * 5000}
    ) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            lines.append(line)
            if line.startswith("data:"):
                break
    assert "event: reset" in lines, lines
    assert '"reason": "unknown id"' in lines[-1]
    assert TRACEBACK not in log.text()


async def test_json_nested_too_deeply_is_a_400_in_one_log_line(
        served: Served, client: httpx.AsyncClient) -> None:
    """json.loads raised RecursionError: a 400, but after a traceback of 1,000 frames."""
    headers = {"Authorization": f"Bearer {tokens.mint(SECRET, publish=['*'], ttl=300)}",
               "Content-Type": "application/json"}
    body = b'{"channel": "deep", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    log = LogSince(served)
    refused = await client.post(f"{served.url}/publish/", content=body, headers=headers)
    assert refused.status_code == 400, refused.text
    assert "nested too deeply" in refused.json()["error"]
    surrogate = await client.post(f"{served.url}/publish/", headers=headers,
                                  content=b'{"channel": "deep", "data": "\\udc00"}')
    assert surrogate.status_code == 400, surrogate.text
    assert TRACEBACK not in log.text()


OTHER_LIBRARIES = {  # claims other JWT libraries add, as offsets from now where timed
    "integer-sub": {"sub": 42},
    "integer-jti": {"jti": 7},
    "aud": {"aud": ["my-app", "other"]},
    "iss": {"iss": "https://idp.example"},
    "iat-1s-ahead": {"iat": 1},
    "iat-an-hour-ahead": {"iat": 3600},
    "nbf-2s-ahead": {"nbf": 2},
    "exp-1s-ago": {"exp": -1},
}


@pytest.mark.parametrize("extra", OTHER_LIBRARIES.values(), ids=OTHER_LIBRARIES.keys())
async def test_a_token_from_another_jwt_library_is_valid(
        served: Served, client: httpx.AsyncClient, extra: dict[str, object]) -> None:
    """PyJWT's defaults refused an integer sub or jti, any aud, and an iat one second
    ahead of this clock: "token invalid" for a token the contract accepts."""
    now = int(time.time())
    claims: dict[str, object] = {"exp": now + 300, "ssehub": {"subscribe": ["priv.*"]}}
    claims.update({k: now + v if k in ("iat", "nbf", "exp") else v  # type: ignore[operator]
                   for k, v in extra.items()})
    async with client.stream("GET", f"{served.url}/events/?channel=priv.lib",
                             headers={"Authorization": f"Bearer {signed(claims)}"}) as stream:
        assert stream.status_code == 200, await stream.aread()


@pytest.mark.parametrize(("extra", "reason"), [
    ({"exp": -300}, "expired"),
    ({"nbf": 600}, "not valid yet"),
], ids=["expired-5-minutes-ago", "nbf-10-minutes-ahead"])
async def test_the_leeway_is_small(served: Served, client: httpx.AsyncClient,
                                   extra: dict[str, int], reason: str) -> None:
    now = int(time.time())
    claims: dict[str, object] = {"exp": now + 300, "ssehub": {"subscribe": ["priv.*"]}}
    claims.update({k: now + v for k, v in extra.items()})
    answer = await client.get(f"{served.url}/events/?channel=priv.lib",
                              headers={"Authorization": f"Bearer {signed(claims)}"})
    assert answer.status_code == 401 and reason in answer.json()["error"], answer.text


async def test_an_event_made_of_newlines_is_measured_as_framed(
        served: Served, client: httpx.AsyncClient) -> None:
    """64 KB of newlines became a 455 KB frame to every subscriber: each line gets
    its own "data: ". Counted against SSEHUB_MAX_EVENT_BYTES (65536 here) as framed."""
    headers = auth_publish()
    lines = await client.post(f"{served.url}/publish/", headers=headers,
                              json={"channel": "framed", "data": "\n" * 60_000})
    assert lines.status_code == 413, lines.text
    assert "as framed" in lines.json()["error"]
    for fits in ("x" * 65_536, "ab\n" * 6_000):  # one line at the limit; 54 KB framed
        sent = await client.post(f"{served.url}/publish/", headers=headers,
                                 json={"channel": "framed", "data": fits})
        assert sent.status_code == 201, sent.text


def auth_publish() -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.mint(SECRET, publish=['*'], ttl=300)}"}


async def test_the_embedded_mode_refuses_a_short_secret(tmp_path: Path) -> None:
    """A 5-character secret was accepted when the broker was memory://."""
    from ssekit_testing.servers import free_port

    env = {**os.environ, **base_env(SSEHUB_DATA_DIR=str(tmp_path), SSEHUB_TOKEN_SECRET="12345")}
    env.pop("SSEHUB_BROKER_URL", None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ssehub.cli", "serve", "--bind", f"127.0.0.1:{free_port()}"],
            env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("ssehub serve started with a 5-character SSEHUB_TOKEN_SECRET")
    assert done.returncode != 0
    assert "SSEHUB_TOKEN_SECRET is too short (5 bytes)" in done.stderr, done.stderr


async def test_the_data_folder_is_private_when_secrets_are_given(tmp_path: Path) -> None:
    """It was created 0755 when no secret had to be generated into it."""
    data = tmp_path / "new" / "data"
    env = base_env(SSEHUB_DATA_DIR=str(data), SSEHUB_BROKER_URL="memory://")
    hub = Served(tmp_path, env, workers=1)
    hub.start()
    try:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert not list(data.glob("*.secret"))  # the secrets were given
    finally:
        hub.stop()


@pytest.mark.parametrize("name", ["error", "open"])
async def test_a_publisher_cannot_send_eventsources_own_events(
        served: Served, client: httpx.AsyncClient, name: str) -> None:
    """A published ``event: error`` fired every page's onerror handler (``open`` its
    onopen), as if the connection had failed."""
    refused = await client.post(f"{served.url}/publish/", headers=auth_publish(),
                                json={"channel": "pub.x", "data": "{}", "event": name})
    assert refused.status_code == 400, refused.text
    assert "reserved" in refused.json()["error"] and name in refused.json()["error"]
