"""End to end: ``ssehub serve`` (gunicorn, two uvicorn workers) behind a real nginx
and, for the checks that a stream crosses a proxy intact, behind a real Caddy too.

Streams are read with httpx-sse, a parser we did not write, and raw bytes where
timing or comments matter. Each test names the row of docs/failure-modes.md it pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse
from ssekit_testing import tokens
from ssekit_testing.fixtures import SECRET, base_env, fresh_database
from ssekit_testing.servers import Postgres, Redis, ServedHub

pytestmark = pytest.mark.asyncio


def token(publish: list[str] | None = None, subscribe: list[str] | None = None,
          ttl: int = 300) -> str:
    return tokens.mint(SECRET, publish=publish or [], subscribe=subscribe or [], ttl=ttl)


auth = tokens.bearer


async def publish(client: httpx.AsyncClient, base: str, channel: str, data: object,
                  event: str | None = None, **headers: str) -> str:
    body: dict[str, object] = {"channel": channel, "data": data}
    if event:
        body["event"] = event
    response = await client.post(f"{base}/publish/", json=body,
                                 headers={**auth(token(publish=[channel])), **headers})
    assert response.status_code == 201, response.text
    event_id: str = response.json()["id"]
    return event_id


async def read_events(client: httpx.AsyncClient, url: str, count: int,
                      headers: dict[str, str] | None = None, timeout: float = 5) -> list:
    got: list = []
    async with asyncio.timeout(timeout):
        async with aconnect_sse(client, "GET", url, headers=headers or {}) as source:
            assert source.response.status_code == 200
            last_id = None
            async for event in source.aiter_sse():
                # httpx-sse dispatches at every blank line once an id was seen, so the
                # preamble (retry: and a bare id:) and a heartbeat look like empty
                # events (browsers dispatch neither): every real event has data or a
                # new id, and none has retry:.
                if event.retry is not None and not event.data:
                    last_id = event.id or last_id
                    continue
                if event.data or (event.id and event.id != last_id):
                    got.append(event)
                last_id = event.id or last_id
                if len(got) >= count:
                    break
    return got


async def test_a3_first_bytes_at_once_through_proxy(proxy, client) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    async with client.stream("GET", f"{proxy.url}/events/?channel=public.a3") as response:
        first = await anext(response.aiter_raw())
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert elapsed < 1.0, f"first bytes after {elapsed:.2f}s"
    assert re.match(rb"retry: \d+\n: ", first)


async def test_d4_a7_stream_headers_from_the_app(stack, client) -> None:  # type: ignore[no-untyped-def]
    hub, _ = stack
    async with client.stream("GET", f"{hub.url}/events/?channel=public.h") as response:
        headers = response.headers
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    for hop in ("connection", "content-length", "content-encoding", "keep-alive"):
        assert hop not in headers, f"{hop}: {headers[hop]}"


async def test_head_answers_the_stream_headers_and_ends(stack, client) -> None:  # type: ignore[no-untyped-def]
    hub, _ = stack
    response = await client.head(f"{hub.url}/events/?channel=public.head", timeout=3)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    wrong = await client.post(f"{hub.url}/events/?channel=public.head")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"


async def test_a6_d4_stream_headers_and_no_compression_through_proxy(proxy, client) -> None:  # type: ignore[no-untyped-def]
    """Compression is on around the stream (the nginx harness gzips text/event-stream,
    the Caddy site encodes its catch-all route); the stream route turns it off."""
    async with client.stream("GET", f"{proxy.url}/events/?channel=public.gz",
                             headers={"Accept-Encoding": "gzip, br, zstd"}) as response:
        headers = response.headers
        first = await anext(response.aiter_raw())
    assert response.status_code == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    for name in ("content-encoding", "content-length"):
        assert name not in headers, f"{name}: {headers[name]}"
    assert first.startswith(b"retry: ")


async def test_a1_one_event_per_second_arrives_without_buffering(proxy, client) -> None:  # type: ignore[no-untyped-def]
    channel = "a1.tick"
    latencies: list[float] = []
    sent_at: dict[str, float] = {}

    async def reader() -> None:
        async with aconnect_sse(client, "GET", f"{proxy.url}/events/?channel={channel}",
                                headers=auth(token(subscribe=[channel]))) as source:
            async for event in source.aiter_sse():
                if event.data in sent_at:
                    latencies.append(time.monotonic() - sent_at[event.data])
                    if len(latencies) == 3:
                        return

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.3)
    for i in range(3):
        sent_at[f"tick {i}"] = time.monotonic()
        await publish(client, proxy.url, channel, f"tick {i}")
        await asyncio.sleep(1)
    await asyncio.wait_for(task, 5)
    assert max(latencies) < 1.5, latencies


async def test_a2_heartbeats_arrive_on_an_idle_stream(proxy, client) -> None:  # type: ignore[no-untyped-def]
    comments = 0
    started = time.monotonic()
    async with client.stream("GET", f"{proxy.url}/events/?channel=public.idle") as response:
        async for line in response.aiter_lines():
            if line == ":":
                comments += 1
                if comments == 2:
                    break
    assert time.monotonic() - started < 3.5  # SSEHUB_HEARTBEAT=1


async def test_i1_last_event_id_replays_the_gap_through_proxy(proxy, client) -> None:  # type: ignore[no-untyped-def]
    channel = "i1.replay"
    ids = [await publish(client, proxy.url, channel, f"m{i}") for i in range(5)]
    url = f"{proxy.url}/events/?channel={channel}"
    sub = auth(token(subscribe=[channel]))
    by_header = await read_events(client, url, 3, {**sub, "Last-Event-ID": ids[1]})
    assert [e.id for e in by_header] == ids[2:]
    by_query = await read_events(client, f"{url}&lastEventId={ids[3]}", 1, sub)
    assert [(e.id, e.data) for e in by_query] == [(ids[4], "m4")]


async def test_i1_replay_then_live_without_gap_or_duplicate(proxy, client) -> None:  # type: ignore[no-untyped-def]
    channel = "i1.join"
    first = await publish(client, proxy.url, channel, "before")
    url = f"{proxy.url}/events/?channel={channel}"
    headers = {**auth(token(subscribe=[channel])), "Last-Event-ID": str(int(first) - 1)}
    reader = asyncio.create_task(read_events(client, url, 21, headers))
    published = [first]
    for i in range(20):  # publish while the reader replays and joins the live stream
        published.append(await publish(client, proxy.url, channel, f"live {i}"))
    events = await asyncio.wait_for(reader, 10)
    assert [e.id for e in events] == published


async def test_i1_a_long_replay_arrives_whole_and_in_order(proxy, client) -> None:  # type: ignore[no-untyped-def]
    """A replay of several writes (replay.REPLAY_WRITE_BYTES each), then live."""
    channel = "i1.long"
    data = "x" * 30_000
    ids = [await publish(client, proxy.url, channel, f"{i} {data}") for i in range(20)]
    url = f"{proxy.url}/events/?channel={channel}"
    headers = {**auth(token(subscribe=[channel])), "Last-Event-ID": str(int(ids[0]) - 1)}
    reader = asyncio.create_task(read_events(client, url, 21, headers, timeout=10))
    await asyncio.sleep(0.5)
    ids.append(await publish(client, proxy.url, channel, "live"))
    events = await reader
    assert [e.id for e in events] == ids
    assert [e.data for e in events] == [f"{i} {data}" for i in range(20)] + ["live"]


async def test_i1_unknown_id_gets_a_reset_event(proxy, client) -> None:  # type: ignore[no-untyped-def]
    newest = await publish(client, proxy.url, "public.reset", "x")
    # An id above any issued, and ones that are no id (an id of a lost history:
    # test_history_reset).
    for unknown in [str(int(newest) + 10**9), "not-an-id", "-1"]:
        events = await read_events(client, f"{proxy.url}/events/?channel=public.reset", 1,
                                   {"Last-Event-ID": unknown})
        assert events[0].event == "reset"
        assert json.loads(events[0].data) == {"reason": "unknown id", "last_event_id": unknown}
        assert int(events[0].id) >= int(newest)  # resync from here


async def test_f5_open_streams_hold_no_database_connection(stack, pg_server, client) -> None:  # type: ignore[no-untyped-def]
    """Streams never keep a Django database connection (the chat page uses the
    database; the stream path does not), and closing them leaves none behind."""
    hub, nginx = stack
    dbname = hub.env["SSEHUB_DATABASE_URL"].rsplit("/", 1)[1]

    def connections() -> int:
        return pg_server.connections(dbname)

    assert (await client.get(f"{nginx.url}/")).status_code == 200  # a query per request
    baseline = connections()
    release = asyncio.Event()
    arrived = 0

    async def hold() -> None:
        nonlocal arrived
        async with client.stream("GET", f"{nginx.url}/events/?channel=public.f5") as response:
            async for chunk in response.aiter_raw():
                if b"data: f5" in chunk:
                    arrived += 1
                    await release.wait()
                    return

    holders = [asyncio.create_task(hold()) for _ in range(20)]
    await asyncio.sleep(0.5)
    await publish(client, nginx.url, "public.f5", "f5")
    async with asyncio.timeout(5):
        while arrived < 20:
            await asyncio.sleep(0.05)
    assert connections() <= baseline, "streams hold database connections"
    release.set()
    await asyncio.gather(*holders)
    deadline = time.monotonic() + 2
    while connections() > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert connections() <= baseline


async def test_a7_clients_get_only_their_own_events(proxy, client) -> None:  # type: ignore[no-untyped-def]
    alice = asyncio.create_task(read_events(client, f"{proxy.url}/events/?channel=user.alice", 1,
                                            auth(token(subscribe=["user.alice"]))))
    bob = asyncio.create_task(read_events(client, f"{proxy.url}/events/?channel=user.bob", 1,
                                          auth(token(subscribe=["user.bob"]))))
    await asyncio.sleep(0.5)
    await publish(client, proxy.url, "user.alice", "for alice")
    await publish(client, proxy.url, "user.bob", "for bob")
    assert [e.data for e in await alice] == ["for alice"]
    assert [e.data for e in await bob] == ["for bob"]


async def test_i3_retry_is_jittered(stack, client) -> None:  # type: ignore[no-untyped-def]
    hub, _ = stack
    values = set()
    for _ in range(8):
        async with client.stream("GET", f"{hub.url}/events/?channel=public.r") as response:
            first = await anext(response.aiter_raw())
        match = re.match(rb"retry: (\d+)\n", first)
        assert match
        values.add(int(match.group(1)))
    assert all(2000 <= v <= 4000 for v in values) and len(values) > 1, values


@pytest.mark.parametrize("data", [
    "two\nlines", "trailing newline\n", "\n\n", "line\u2028separator", " leading space",
    {"text": "crlf\r\nin json", "n": [1, 2]},
], ids=["lf", "trailing", "blank-lines", "u2028", "space", "json-crlf"])
async def test_i5_i6_payloads_round_trip(proxy, client, data) -> None:  # type: ignore[no-untyped-def]
    channel = "i5.payload"
    event_id = await publish(client, proxy.url, channel, data)
    events = await read_events(client, f"{proxy.url}/events/?channel={channel}", 1,
                               {**auth(token(subscribe=[channel])),
                                "Last-Event-ID": str(int(event_id) - 1)})
    expected = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    assert events[0].data == expected and events[0].id == event_id


async def test_i6_cr_in_string_data_arrives_as_lf(proxy, client) -> None:  # type: ignore[no-untyped-def]
    """SSE cannot carry CR in data; the hub sends it as a line break (documented)."""
    event_id = await publish(client, proxy.url, "i6.cr", "a\r\nb\rc")
    events = await read_events(client, f"{proxy.url}/events/?channel=i6.cr", 1,
                               {**auth(token(subscribe=["i6.cr"])),
                                "Last-Event-ID": str(int(event_id) - 1)})
    assert events[0].data == "a\nb\nc"


async def test_stream_errors_are_json_never_redirects(stack, client) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    base = f"{nginx.url}/events/"
    cases = [
        ("", {}, 400),
        ("?channel=bad%20name", {}, 400),
        ("?channel=" + "x" * 64, {}, 400),
        ("?channel=private.x", {}, 401),
        ("?channel=private.x", auth("not-a-jwt"), 401),
        ("?channel=private.x", auth(token(subscribe=["private.x"], ttl=-10)), 401),  # F7
        ("?channel=private.x", auth(token(subscribe=["other.*"])), 403),
        ("?channel=private.x&channel=public.ok", auth(token(subscribe=["public.*"])), 403),
    ]
    for query, headers, status in cases:
        response = await client.get(base + query, headers=headers)
        assert response.status_code == status, (query, response.status_code, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]


async def test_token_by_query_and_cookie(stack, client) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    value = token(subscribe=["private.*"])
    async with client.stream("GET", f"{nginx.url}/events/?channel=private.q&token={value}") as r:
        assert r.status_code == 200
    async with client.stream("GET", f"{nginx.url}/events/?channel=private.c",
                             headers={"Cookie": f"ssehub_token={value}"}) as r:
        assert r.status_code == 200


async def test_publish_errors(stack, client) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    url = f"{nginx.url}/publish/"
    good = auth(token(publish=["pub.*"]))
    cases = [
        ({}, {"json": {"channel": "pub.x", "data": "d"}}, 401),
        (auth("garbage"), {"json": {"channel": "pub.x", "data": "d"}}, 401),
        (auth(token(publish=["pub.*"], ttl=-5)), {"json": {"channel": "pub.x", "data": "d"}}, 401),
        (good, {"json": {"channel": "other", "data": "d"}}, 403),
        (good, {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        (good, {"json": ["a", "list"]}, 400),
        (good, {"json": {"channel": "pub x", "data": "d"}}, 400),
        (good, {"json": {"channel": "pub.x", "event": "a\nb", "data": "d"}}, 400),
        (good, {"json": {"channel": "pub.x", "event": "a\rb", "data": "d"}}, 400),
        (good, {"json": {"channel": "pub.x"}}, 400),
        (good, {"json": {"channel": 5, "data": "d"}}, 400),
        (good, {"content": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, 400),
        (good, {"content": b"raw", "headers": {"Content-Type": "text/plain"}}, 415),
        (good, {"json": {"channel": "pub.x", "data": "x" * 65537}}, 413),
        # PostgreSQL's text cannot hold NUL: a reason, never 503 "retry later"
        (good, {"json": {"channel": "pub.x", "data": "a\u0000b"}}, 400),
        (good, {"json": {"channel": "pub.x", "event": "a\u0000b", "data": "d"}}, 400),
    ]
    for headers, kwargs, status in cases:
        extra = kwargs.pop("headers", {})
        response = await client.post(url, headers={**headers, **extra}, **kwargs)
        assert response.status_code == status, (kwargs, response.status_code, response.text)
        assert response.json()["error"]
    form = await client.post(url, headers=good, data={"channel": "pub.form", "data": "curl -d"})
    assert form.status_code == 201 and form.json()["id"].isdigit()
    # any JSON value, null included; an empty event name (`curl -d event=`) is no name
    null = await client.post(url, headers=good, json={"channel": "pub.x", "data": None})
    unnamed = await client.post(url, headers=good,
                                data={"channel": "pub.x", "event": "", "data": "d"})
    assert (null.status_code, unnamed.status_code) == (201, 201), (null.text, unnamed.text)


async def test_publish_idempotency_key(stack, client) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    first = await publish(client, nginx.url, "idem.x", "pay", **{"Idempotency-Key": "k-1"})
    again = await publish(client, nginx.url, "idem.x", "pay", **{"Idempotency-Key": "k-1"})
    other = await publish(client, nginx.url, "idem.x", "pay", **{"Idempotency-Key": "k-2"})
    assert first == again != other


async def test_f3_closed_clients_release_broker_interest(stack, client, redis_server) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    import redis as redis_sync

    channels = [f"public.f3.{i}" for i in range(10)]
    async def hold(channel: str) -> None:
        async with client.stream("GET", f"{nginx.url}/events/?channel={channel}") as r:
            await anext(r.aiter_raw())
            await asyncio.sleep(0.5)

    redis = redis_sync.Redis.from_url(redis_server.url)
    tasks = [asyncio.create_task(hold(c)) for c in channels for _ in range(5)]
    await asyncio.sleep(0.4)
    assert sum(n for _, n in redis.pubsub_numsub(*[f"e2e:{c}" for c in channels])) > 0
    await asyncio.gather(*tasks)
    closed_at = time.monotonic()
    while sum(n for _, n in redis.pubsub_numsub(*[f"e2e:{c}" for c in channels])):
        assert time.monotonic() - closed_at < 2.0, "broker interest held > 2 s after close"
        await asyncio.sleep(0.05)


async def test_metrics_sum_across_workers(stack, client) -> None:  # type: ignore[no-untyped-def]
    hub, nginx = stack

    def value(text: str, name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match, name
        return float(match.group(1))

    before = value((await client.get(f"{hub.url}/metrics")).text, "ssehub_events_published_total")
    for i in range(10):  # spread over both workers by separate connections
        async with httpx.AsyncClient() as fresh:
            await publish(fresh, nginx.url, "metrics.x", str(i))
    # A publisher's retries with one Idempotency-Key store one event: counted once.
    key = {"Idempotency-Key": f"metrics-{time.time()}"}
    repeats = {await publish(client, nginx.url, "metrics.x", "once", **key) for _ in range(3)}
    assert len(repeats) == 1
    text = (await client.get(f"{hub.url}/metrics")).text
    assert value(text, "ssehub_events_published_total") - before == 11
    for name in ("ssehub_open_streams", "ssehub_events_delivered_total",
                 "ssehub_subscribers_dropped_total", "ssehub_broker_lag_seconds"):
        value(text, name)


async def test_open_streams_gauge_sums_live_streams_across_workers(stack, proxy, client) -> None:  # type: ignore[no-untyped-def]
    """Also F3 through each proxy: the proxy must end the upstream stream when its
    client leaves (Caddy with an explicit `flush_interval -1` kept it until a
    heartbeat write failed: 2.6-3.5 s here with 1 s heartbeats, 15-20 s with 5 s)."""
    hub, _ = stack

    async def gauge() -> float:
        text = (await client.get(f"{hub.url}/metrics")).text
        match = re.search(r"^ssehub_open_streams (\S+)$", text, re.M)
        assert match, text[:500]
        return float(match.group(1))

    async def settled() -> float:  # streams of earlier tests may still be closing
        last, steady = await gauge(), 0
        for _ in range(60):
            await asyncio.sleep(0.25)
            now = await gauge()
            steady = steady + 1 if now == last else 0
            if steady >= 8:  # unchanged for 2 s
                return now
            last = now
        raise AssertionError("ssehub_open_streams never settled")

    before = await settled()
    clients = [httpx.AsyncClient(timeout=10) for _ in range(6)]  # own connections: both workers
    try:
        streams = [await c.send(c.build_request("GET", f"{proxy.url}/events/?channel=public.g"),
                                stream=True) for c in clients]
        assert all(r.status_code == 200 for r in streams)
        assert await gauge() == before + 6
        for response in streams:
            await response.aclose()
    finally:
        for c in clients:
            await c.aclose()
    deadline = time.monotonic() + 2  # F3: released within 2 s
    while await gauge() != before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await gauge() == before


async def test_health_and_readiness(stack, client) -> None:  # type: ignore[no-untyped-def]
    _, nginx = stack
    assert (await client.get(f"{nginx.url}/healthz")).status_code == 200
    ready = await client.get(f"{nginx.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_chat_demo_posts_reach_the_stream(proxy, client) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as browser:
        page = await browser.get("/?room=e2e")
        assert page.status_code == 200 and "EventSource" in page.text
        assert "ssehub_token" in browser.cookies
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert csrf
        reader = asyncio.create_task(read_events(browser, "/events/?channel=chat.e2e", 1))
        await asyncio.sleep(0.5)
        sent = await browser.post("/chat/messages/", data={
            "csrfmiddlewaretoken": csrf.group(1), "room": "e2e", "author": "ann",
            "text": "hello\r\nworld\u2028!"}, headers={"Referer": proxy.url + "/"})
        assert sent.status_code == 201, sent.text
        events = await asyncio.wait_for(reader, 5)
    message = json.loads(events[0].data)
    assert events[0].event == "message"
    assert message["text"] == "hello\r\nworld\u2028!" and message["author"] == "ann"


@pytest.fixture
def lone_stack(tmp_path: Path, pg_server: Postgres) -> Iterator[tuple[Redis, ServedHub]]:
    """A hub with its own Redis, for tests that stop servers."""
    redis = Redis(tmp_path)
    redis.start()
    env = base_env(SSEHUB_BROKER_URL=redis.url, SSEHUB_DATABASE_URL=fresh_database(pg_server),
                   SSEHUB_PUBLIC_CHANNELS="*", SSEHUB_DRAIN_SECONDS="3",
                   SSEHUB_SUBSCRIBER_BUFFER="20",
                   SSEHUB_DATA_DIR=str(tmp_path))
    hub = ServedHub(tmp_path, env, workers=1)
    hub.start()
    yield redis, hub
    hub.stop()
    redis.stop()


async def test_publish_answers_503_when_the_broker_is_down(lone_stack, client) -> None:  # type: ignore[no-untyped-def]
    redis, hub = lone_stack
    redis.stop()
    response = await client.post(f"{hub.url}/publish/", json={"channel": "x", "data": "d"},
                                 headers=auth(token(publish=["*"])))
    assert response.status_code == 503 and response.headers["retry-after"]
    ready = await client.get(f"{hub.url}/readyz")
    assert ready.status_code == 503 and "redis" in ready.json()["error"]


async def test_e2_sigterm_drains_open_streams_within_the_bound(lone_stack, client) -> None:  # type: ignore[no-untyped-def]
    _, hub = lone_stack
    tails: list[bytes] = []

    async def hold(i: int) -> None:
        async with client.stream("GET", f"{hub.url}/events/?channel=drain.{i % 3}") as r:
            data = b""
            async for chunk in r.aiter_raw():
                data += chunk
            tails.append(data)

    tasks = [asyncio.create_task(hold(i)) for i in range(20)]
    await asyncio.sleep(0.5)
    started = time.monotonic()
    assert hub.process is not None
    hub.process.terminate()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    closed = time.monotonic() - started
    await asyncio.to_thread(hub.process.wait, 10)
    exited = time.monotonic() - started
    assert len(tails) == 20 and all(t.endswith(b": draining, reconnect\n\n") for t in tails)
    assert closed < 3.0 and exited < 3 + 5, (closed, exited)


async def test_g1_a_client_that_stops_reading_is_dropped_and_replays_the_rest(
        lone_stack, client) -> None:  # type: ignore[no-untyped-def]
    _, hub = lone_stack
    import socket

    stalled = socket.create_connection(("127.0.0.1", hub.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /events/?channel=g1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await asyncio.sleep(0.3)
    ids = []
    payload = "x" * 60000
    for _ in range(120):  # ~7 MB: far more than socket buffers and 20 queued events hold
        response = await client.post(f"{hub.url}/publish/", headers=auth(token(publish=["*"])),
                                     json={"channel": "g1", "data": payload})
        ids.append(response.json()["id"])
    await asyncio.sleep(0.5)
    metrics = (await client.get(f"{hub.url}/metrics")).text
    dropped = re.search(r"^ssehub_subscribers_dropped_total (\S+)$", metrics, re.M)
    assert dropped and float(dropped.group(1)) >= 1, "the stalled client was not dropped"
    # The client reads its first complete event (through its 4 KB window the
    # kernel's backlog trickles at about 40 KB/s), then reconnects with that id.
    frame = re.compile(rb"id: (\d+)\ndata: x{60000}\n\n")
    stalled.settimeout(1)
    received = b""
    deadline = time.monotonic() + 10
    while not frame.search(received) and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            received += stalled.recv(1 << 20)
    stalled.close()
    got = [m.decode() for m in frame.findall(received)]
    assert got and got == ids[:len(got)] and len(got) < len(ids), (len(got), len(ids))
    last = got[-1]
    replay = await read_events(client, f"{hub.url}/events/?channel=g1", len(ids) - len(got),
                               {"Last-Event-ID": last}, timeout=20)
    assert got + [e.id for e in replay] == ids
