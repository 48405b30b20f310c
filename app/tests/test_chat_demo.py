"""Issue 10, item 6: the chat demo took anonymous posts without limit, everywhere.

It is served only with SSEHUB_DEMO on; there, posts are rate-limited per client
address and each room keeps its newest SSEHUB_DEMO_KEEP_MESSAGES. Against
``ssehub serve`` on Redis with PostgreSQL as Django's database, as deployed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ssekit_testing.fixtures import base_env, fresh_database
from ssekit_testing.servers import Postgres, Redis
from ssekit_testing.servers import ServedHub as Served

pytestmark = pytest.mark.asyncio

POSTS_PER_MINUTE = 5
KEEP = 3


def serve(directory: Path, **env: str) -> Served:
    full = base_env(SSEHUB_DATA_DIR=str(directory), **env)
    subprocess.run([sys.executable, "-m", "ssehub.cli", "migrate", "-v", "0"],
                   env={**os.environ, **full}, check=True)
    hub = Served(directory, full, workers=1)
    hub.start()
    return hub


@pytest.fixture(scope="module")
def demo(redis_server: Redis, pg_server: Postgres,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    hub = serve(tmp_path_factory.mktemp("demo"), SSEHUB_BROKER_URL=redis_server.url,
                SSEHUB_DATABASE_URL=fresh_database(pg_server), SSEHUB_REDIS_PREFIX="demo:",
                SSEHUB_DEMO="true", SSEHUB_DEMO_POSTS_PER_MINUTE=str(POSTS_PER_MINUTE),
                SSEHUB_DEMO_KEEP_MESSAGES=str(KEEP))
    yield hub
    hub.stop()


async def post(client: httpx.AsyncClient, url: str, room: str, text: str,
               address: str) -> httpx.Response:
    """Post as a browser does (the page's CSRF token), from ``address`` as the proxy saw it."""
    page = await client.get(f"{url}/", params={"room": room})
    assert page.status_code == 200, page.text
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert csrf
    return await client.post(f"{url}/chat/messages/", data={
        "csrfmiddlewaretoken": csrf.group(1), "room": room, "author": "a", "text": text},
        headers={"X-Forwarded-For": f"203.0.113.9, {address}"})


def history(page: str) -> list[str]:
    return re.findall(r"<li data-id=\"\d+\"><b>a</b>: ([^<]*)</li>", page)


async def test_the_chat_demo_is_not_served_unless_enabled(
        redis_server: Redis, tmp_path: Path, client: httpx.AsyncClient) -> None:
    """It was on every deploy, production included: anyone could post to it."""
    hub = serve(tmp_path, SSEHUB_BROKER_URL=redis_server.url, SSEHUB_REDIS_PREFIX="nodemo:")
    try:
        assert (await client.get(f"{hub.url}/")).status_code == 404
        posted = await client.post(f"{hub.url}/chat/messages/", data={"text": "x"})
        assert posted.status_code == 404, posted.text
        assert (await client.get(f"{hub.url}/healthz")).status_code == 200
    finally:
        hub.stop()


async def test_behind_tls_the_csrf_cookie_is_secure_and_posts_go_through(
        redis_server: Redis, tmp_path: Path) -> None:
    """Issue 10 (low): the demo's CSRF cookie lacked Secure behind the TLS proxy.
    With SSEHUB_SECURE_COOKIES (the role sets it), a page served through TLS
    (the proxy's X-Forwarded-Proto) sets it Secure, and a browser's post over TLS,
    which sends it back, goes through; the other tests post over plain HTTP without it."""
    hub = serve(tmp_path, SSEHUB_BROKER_URL=redis_server.url, SSEHUB_REDIS_PREFIX="tls:",
                SSEHUB_DEMO="true", SSEHUB_SECURE_COOKIES="true")
    tls = {"X-Forwarded-Proto": "https"}
    try:
        async with httpx.AsyncClient(timeout=10) as browser:  # no cookies of other hubs
            page = await browser.get(f"{hub.url}/", headers=tls)
            csrf_cookie = next(c for c in page.headers.get_list("set-cookie")
                               if c.startswith("csrftoken="))
            assert "; secure" in csrf_cookie.lower(), csrf_cookie
            value = csrf_cookie.split(";", 1)[0].split("=", 1)[1]
            form = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
            assert form
            posted = await browser.post(f"{hub.url}/chat/messages/", data={
                "csrfmiddlewaretoken": form.group(1), "room": "tls", "author": "a",
                "text": "over TLS"}, headers={**tls, "Cookie": f"csrftoken={value}",
                                              "Origin": hub.url.replace("http:", "https:")})
            assert posted.status_code == 201, posted.text
    finally:
        hub.stop()


async def test_chat_posts_beyond_the_rate_get_429_with_retry_after(
        demo: Served, client: httpx.AsyncClient) -> None:
    """300 posts went through in 8.5 s, all 201."""
    answers = [await post(client, demo.url, "rate", f"m{n}", "198.51.100.1")
               for n in range(POSTS_PER_MINUTE + 2)]
    assert [a.status_code for a in answers] == [201] * POSTS_PER_MINUTE + [429, 429]
    assert int(answers[-1].headers["retry-after"]) >= 1
    assert "too many posts" in answers[-1].json()["error"]
    # another client is not limited by this one
    assert (await post(client, demo.url, "rate", "other", "198.51.100.2")).status_code == 201


async def test_the_chat_demo_keeps_only_the_newest_messages_of_a_room(
        demo: Served, client: httpx.AsyncClient) -> None:
    """Messages were never deleted."""
    for n in range(KEEP + 3):
        sent = await post(client, demo.url, "keep", f"k{n}", f"192.0.2.{n + 1}")
        assert sent.status_code == 201, sent.text
    page = await client.get(f"{demo.url}/", params={"room": "keep"})
    assert history(page.text) == [f"k{n}" for n in range(3, KEEP + 3)]


async def test_the_rate_limiter_refills_and_forgets_the_oldest_key() -> None:
    from ssehub import ratelimit

    now = [0.0]
    limiter = ratelimit.RateLimiter(2, period=60.0, clock=lambda: now[0])
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(30.0)
    now[0] = 30.0
    assert limiter.take("a") == 0.0
    for n in range(ratelimit.MAX_KEYS + 1):
        limiter.take(str(n))
    assert len(limiter._buckets) == ratelimit.MAX_KEYS and "a" not in limiter._buckets
