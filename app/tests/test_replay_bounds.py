"""Issue 10, item 2: a replay's memory is bounded, and a client that reads nothing is dropped.

Before: the brokers read a replay's whole range at once (XRANGE without COUNT,
fetchall) and the stream held it while a client that never read sat on it; 500
stored events of 32 KB on a public channel grew the worker by about 46 MB per
such stream, freed only when the client left. Now a replay is read in pages of
``replay.REPLAY_PAGE_EVENTS`` (brokers.Page), each sent under flow control
before the next is read, and a send that waits on its client for longer than
SSEHUB_WRITE_TIMEOUT drops the stream (checked once a heartbeat).

Against ``ssehub serve`` (gunicorn, one uvicorn worker) on a real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ssekit_testing import sse, tokens
from ssekit_testing.fixtures import SECRET, base_env
from ssekit_testing.servers import Redis
from ssekit_testing.servers import ServedHub as Served

from ssehub.replay import REPLAY_PAGE_EVENTS

pytestmark = pytest.mark.asyncio

STORED = 500
SIZE = 32 * 1024
STALLED = 4
WRITE_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def served(redis_server: Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("replay-bounds")
    env = base_env(SSEHUB_DATA_DIR=str(directory), SSEHUB_BROKER_URL=redis_server.url,
                   SSEHUB_REDIS_PREFIX="bounds:", SSEHUB_PUBLIC_CHANNELS="public.*",
                   SSEHUB_WRITE_TIMEOUT=str(WRITE_TIMEOUT), SSEHUB_HEARTBEAT="0.5")
    hub = Served(directory, env, workers=1)
    hub.start()
    yield hub
    hub.stop()


def worker_rss(served: Served) -> int:
    """Resident bytes of the hub's one worker (the gunicorn master's child)."""
    assert served.process is not None
    master = served.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    status = Path(f"/proc/{children[0]}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match
    return int(match.group(1)) * 1024


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_streams_that_never_read_a_long_replay_hold_a_page_and_are_dropped(
        served: Served, client: httpx.AsyncClient) -> None:
    channel = "public.bounds"
    publish = {"Authorization": f"Bearer {tokens.mint(SECRET, ttl=300, publish=['*'])}"}
    ids = []
    for i in range(STORED):
        response = await client.post(f"{served.url}/publish/", headers=publish,
                                     json={"channel": channel, "data": f"{i:04} " + "x" * SIZE})
        assert response.status_code == 201, response.text
        ids.append(int(response.json()["id"]))
    await asyncio.sleep(0.5)
    before = worker_rss(served)

    stalled = []
    for _ in range(STALLED):  # clients that never read: a 4 KB window, nothing taken
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", served.port))
        sock.sendall(f"GET /events/?channel={channel} HTTP/1.1\r\nHost: localhost\r\n"
                     "Last-Event-ID: 0\r\n\r\n".encode())
        stalled.append(sock)
    opened = time.monotonic()
    await asyncio.sleep(1.5)
    held = worker_rss(served)
    growth = (held - before) / STALLED
    stored_mb = STORED * SIZE / 2**20
    print(f"\nreplay of {STORED} x {SIZE // 1024} KB ({stored_mb:.0f} MB stored), "
          f"{STALLED} streams that never read: worker {before / 2**20:.0f} -> "
          f"{held / 2**20:.0f} MB, {growth / 2**20:.1f} MB a stream "
          f"(page {REPLAY_PAGE_EVENTS} events = {REPLAY_PAGE_EVENTS * SIZE / 2**20:.1f} MB)")
    # The old code held the whole replay, about three times over: 46 MB a stream here.
    assert growth < 3 * REPLAY_PAGE_EVENTS * SIZE + 2 * 2**20, growth

    # Nothing read for WRITE_TIMEOUT (plus a heartbeat): every stalled stream is dropped.
    timeouts = 0.0
    while time.monotonic() < opened + WRITE_TIMEOUT + 5:
        await asyncio.sleep(0.5)
        timeouts = metric((await client.get(f"{served.url}/metrics")).text,
                          "ssehub_write_timeouts_total")
        if timeouts >= STALLED:
            break
    dropped_after = time.monotonic() - opened
    print(f"dropped by the write timeout ({WRITE_TIMEOUT:.0f} s, heartbeat 0.5 s) after "
          f"{dropped_after:.1f} s: {timeouts:.0f} of {STALLED}")
    assert timeouts >= STALLED
    for sock in stalled:  # the hub closed them: what the kernel held, then the end
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(1 << 20):
                pass
        sock.close()

    # A client that reads gets the whole history, page after page, in order, then live.
    live = asyncio.create_task(_read(client, f"{served.url}/events/?channel={channel}",
                                     STORED + 1, {"Last-Event-ID": "0"}))
    await asyncio.sleep(1.0)
    response = await client.post(f"{served.url}/publish/", headers=publish,
                                 json={"channel": channel, "data": "live"})
    ids.append(int(response.json()["id"]))
    got = await live
    assert [i for i, _ in got] == ids
    assert [d[:4] for _, d in got[:STORED]] == [f"{i:04}" for i in range(STORED)]
    assert got[-1][1] == "live"


async def _read(client: httpx.AsyncClient, url: str, count: int,
                headers: dict[str, str]) -> list[tuple[int, str]]:
    got: list[tuple[int, str]] = []
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        parser = sse.Parser()
        async for line in response.aiter_lines():
            event = parser.feed(line)
            if event is not None and event.id is not None and event.data:
                got.append((int(event.id), event.data))
                if len(got) == count:
                    return got
    return got
