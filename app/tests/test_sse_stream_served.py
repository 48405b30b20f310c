"""``@sse_stream`` views of a user's own URLconf, served by ``ssehub serve``
(gunicorn + uvicorn workers) behind the nginx snippets, read with httpx-sse.

The views are mounted under ``/events/``, as the README says, so the snippets'
stream location (a prefix) gives them its settings: this harness's nginx has
``gzip_types text/event-stream`` in ``http``, as some ops' servers do, and under
``location /`` the views came back gzipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse
from ssekit_testing.fixtures import base_env, fresh_database
from ssekit_testing.servers import Nginx, Postgres, Redis, ServedHub, running

SERVED = Path(__file__).parent / "served"
pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def served(redis_server: Redis, pg_server: Postgres,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, Path, ServedHub]]:
    directory = tmp_path_factory.mktemp("served")
    markers = directory / "markers"
    markers.mkdir()
    database = fresh_database(pg_server)
    env = base_env(SSEHUB_BROKER_URL=redis_server.url, SSEHUB_REDIS_PREFIX="served:",
                   SSEHUB_DATABASE_URL=database,
                   SSEHUB_DATA_DIR=str(directory), SSEHUB_HEARTBEAT="1",
                   DJANGO_SETTINGS_MODULE="served_settings", SERVED_MARKERS=str(markers),
                   PYTHONASYNCIODEBUG="1",
                   PYTHONPATH=os.pathsep.join([str(SERVED), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "ssehub.cli", "migrate", "-v", "0"],
                   env={**os.environ, **env}, check=True)
    with running(ServedHub(directory, env, workers=1)) as hub, \
            running(Nginx(directory, [hub.port])) as nginx:
        yield nginx, markers, hub


async def wait_for_marker(markers: Path, tag: str, within: float) -> float:
    left = time.monotonic()
    while not (markers / f"closed-{tag}").exists():
        assert time.monotonic() - left < within, f"view {tag!r} not closed within {within} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - left


async def test_async_view_streams_unbuffered_with_heartbeats_and_is_released(served) -> None:  # type: ignore[no-untyped-def]
    nginx, markers, _ = served
    async with httpx.AsyncClient(timeout=10) as client:
        started = time.monotonic()
        async with client.stream("GET", f"{nginx.url}/events/ticks/?tag=async",
                                 headers={"Accept-Encoding": "gzip"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            for absent in ("content-length", "content-encoding"):
                assert absent not in response.headers, response.headers
            lines: list[tuple[float, str]] = []
            async for line in response.aiter_lines():
                lines.append((time.monotonic() - started, line))
                if line.startswith(":") and any(text.startswith("data:") and '"n":2' in text
                                                for _, text in lines):
                    break  # a heartbeat after the last tick
        ticks = [(at, text) for at, text in lines if text.startswith("data:")]
        assert [json.loads(text[5:]) for _, text in ticks] == [{"n": 0}, {"n": 1}, {"n": 2}]
        # one by one as yielded (0.3 s apart), not held back until a buffer fills
        assert ticks[0][0] < 0.5 and ticks[2][0] - ticks[0][0] > 0.45, lines
        assert "event: tick" in [text for _, text in lines]
        took = await wait_for_marker(markers, "async", within=2.0)  # F3: released within 2 s
        assert took < 2.0


async def test_sync_view_through_an_sse_client_library_and_is_released(served) -> None:  # type: ignore[no-untyped-def]
    nginx, markers, _ = served
    got = []
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(client, "GET", f"{nginx.url}/events/lines/?tag=sync") as source:
            assert source.response.status_code == 200
            async for event in source.aiter_sse():
                if event.data:
                    got.append((event.event, event.data))
                if len(got) == 4:
                    break
    assert got == [("message", "line 0"), ("message", "line 1"), ("message", "line 2"),
                   ("still", "here")]
    await wait_for_marker(markers, "sync", within=2.0)


async def test_e1_control_a_blocking_call_shows_in_the_hub_log(served) -> None:  # type: ignore[no-untyped-def]
    """The e2e stack fails its session if the hub's log has a slow-callback line
    (asyncio debug mode, conftest.stack); this control shows such a line appears
    under gunicorn + uvicorn (uvloop) when a view blocks the loop, so that check
    can fail."""
    nginx, _, hub = served
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"{nginx.url}/blocks/")).status_code == 200
    deadline = time.monotonic() + 5
    while "Executing <" not in hub.output():
        assert time.monotonic() < deadline, hub.output()[-2000:]
        await asyncio.sleep(0.1)


async def test_f5_sync_view_using_the_orm_leaves_no_database_connection(served, pg_server) -> None:  # type: ignore[no-untyped-def]
    """Each step of a sync generator runs in the request's own thread, so the
    connection the ORM opened there closes when the response ends (run in
    arbitrary executor threads, those connections stayed open for good)."""
    nginx, markers, hub = served
    dbname = hub.env["SSEHUB_DATABASE_URL"].rsplit("/", 1)[1]

    def connections() -> int:
        return pg_server.connections(dbname)

    got = []
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(client, "GET", f"{nginx.url}/events/orm/?tag=orm") as source:
            async for event in source.aiter_sse():
                if event.data:
                    got.append((event.event, event.data))
                if len(got) == 3:
                    break
            assert connections() >= 1  # the ORM is using one now
    assert got == [("count", "0")] * 3
    await wait_for_marker(markers, "orm", within=2.0)
    left = time.monotonic()
    while (open_now := connections()) > 0:
        assert time.monotonic() - left < 2.0, f"{open_now} database connections left open"
        await asyncio.sleep(0.1)


async def test_sync_views_of_two_clients_run_side_by_side(served) -> None:  # type: ignore[no-untyped-def]
    """Each request has its own thread: two sync streams (0.2 s per step) are not
    serialised on one (that would take twice as long)."""
    nginx, _, _ = served

    async def read(tag: str) -> float:
        started = time.monotonic()
        got = 0
        async with httpx.AsyncClient(timeout=10) as client:
            async with aconnect_sse(client, "GET", f"{nginx.url}/events/lines/?tag={tag}") as src:
                async for event in src.aiter_sse():
                    got += bool(event.data)
                    if got == 8:
                        break
        return time.monotonic() - started

    took = await asyncio.gather(read("side-a"), read("side-b"))
    assert max(took) < 2.4, took  # 7 steps of 0.2 s each: about 1.4 s side by side


async def test_e2_sigterm_ends_custom_streams_with_the_drain_comment(
        redis_server: Redis, tmp_path: Path) -> None:
    """Like the hub's own streams, an @sse_stream view ends with the final comment
    as soon as the worker drains, not when uvicorn cuts it at the shutdown bound."""
    import signal

    markers = tmp_path / "markers"
    markers.mkdir()
    env = base_env(SSEHUB_BROKER_URL=redis_server.url, SSEHUB_REDIS_PREFIX="served-e2:",
                   SSEHUB_DATA_DIR=str(tmp_path), SSEHUB_DRAIN_SECONDS="8",
                   DJANGO_SETTINGS_MODULE="served_settings", SERVED_MARKERS=str(markers),
                   PYTHONPATH=os.pathsep.join([str(SERVED), os.environ.get("PYTHONPATH", "")]))
    with running(ServedHub(tmp_path, env, workers=1)) as hub:
        assert hub.process is not None
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream("GET", f"{hub.url}/events/ticks/?tag=drain") as response:
                received = b""
                chunks = response.aiter_raw()
                while b'"n":2' not in received:  # the view is quiet after three ticks
                    received += await anext(chunks)
                hub.process.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                async for chunk in chunks:
                    received += chunk
                took = time.monotonic() - sent
    assert received.endswith(b": draining, reconnect\n\n"), received[-200:]
    assert took < 2.0, f"stream ended {took:.1f} s after SIGTERM (drain bound 8 s)"
    await wait_for_marker(markers, "drain", within=2.0)
