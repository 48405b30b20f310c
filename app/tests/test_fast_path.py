"""Issue 12: the fast path must not disappear in an upgrade.

The hub writes each event's pre-built chunk straight into uvicorn's httptools
transport (subscriber.direct_cycle), which depends on uvicorn internals; any other
server or protocol falls back to the plain ASGI path at about a quarter of the
throughput, with every other test still green. So: under ``ssehub serve``
(gunicorn, the hub's uvicorn worker, the installed uvicorn and httptools) every
stream must be counted on the direct path, and the worker must say so at
startup; and the same check on a worker forced onto h11 must see the plain
path, so it can fail.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ssekit_testing import tokens
from ssekit_testing.fixtures import SECRET, base_env
from ssekit_testing.servers import Redis, free_port, stop, wait_for
from ssekit_testing.servers import ServedHub as Served


def paths(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    counted = dict(re.findall(r'^ssehub_streams_opened_total\{path="(\w+)"\} (\S+)$', text, re.M))
    direct = re.search(r"^ssehub_direct_path (\S+)$", text, re.M)
    return {**{k: float(v) for k, v in counted.items()},
            "worker": float(direct.group(1)) if direct else -1.0}


def stream_once(base: str) -> None:
    """Open a stream, get one published event on it, close it."""
    publish = {"Authorization": f"Bearer {tokens.mint(SECRET, ttl=60, publish=['*'])}"}
    with httpx.Client(timeout=10) as client, client.stream(
            "GET", f"{base}/events/?channel=public.fast") as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines)  # the preamble is out: subscribed
        client.post(f"{base}/publish/", headers=publish,
                    json={"channel": "public.fast", "data": "on its way"})
        assert any(line == "data: on its way" for line in lines)


@pytest.fixture
def env(redis_server: Redis, tmp_path: Path) -> dict[str, str]:
    return base_env(SSEHUB_DATA_DIR=str(tmp_path), SSEHUB_BROKER_URL=redis_server.url,
                    SSEHUB_REDIS_PREFIX="fast:", SSEHUB_PUBLIC_CHANNELS="public.*")


@pytest.fixture
def served(env: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    hub = Served(tmp_path, env, workers=1)
    hub.start()
    yield hub
    hub.stop()


def test_streams_under_ssehub_serve_take_the_direct_path(served: Served) -> None:
    stream_once(served.url)
    stream_once(served.url)
    counted = paths(served.url)
    assert counted.get("direct") == 2 and counted.get("asgi", 0) == 0, counted
    assert counted["worker"] == 1
    wait_for(lambda: "streams take the direct path" in served.log.read_text(),
             what="the worker's startup line")


def test_a_worker_forced_onto_h11_is_seen_on_the_plain_path(
        env: dict[str, str], tmp_path: Path) -> None:
    """The control: the same check sees a hub that lost the fast path."""
    port = free_port()
    log = tmp_path / "h11.log"
    worker = "ssehub.worker.HubWorker"
    code = (f"import {worker.rsplit('.', 1)[0]} as w\n"
            "w.HubWorker.CONFIG_KWARGS = {**w.HubWorker.CONFIG_KWARGS, 'http': 'h11'}\n"
            "from ssehub import cli\n"
            f"cli.main(['serve', '--bind', '127.0.0.1:{port}', '--workers', '1'])\n")
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", code], env={**env},
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200,
                 what=f"the h11 hub (log: {log})")
        stream_once(base)
        counted = paths(base)
        assert counted.get("asgi") == 1 and counted.get("direct", 0) == 0, counted
        assert counted["worker"] == 0
        deadline = time.monotonic() + 10
        while "streams take the plain ASGI path" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        stop(process)
