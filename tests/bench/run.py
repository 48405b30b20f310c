"""The hub's benchmark: prints figures, asserts nothing (``make bench``).

Set-up, as issue 3 asks: Redis, nginx (templates/nginx snippets) and the hub
(``ssehub serve``, one gunicorn/uvicorn worker) pinned to core 0 with
``taskset``; this load generator pinned to core 1. Events are published through
``POST /publish/`` (so they are stored), each carrying its publish time; every
stream checks ids for loss and duplicates and measures publish-to-receive.

Streams are read over HTTP/1.0 through nginx (no chunked framing to strip)
with a bare asyncio protocol, so the generator costs little per event.

    python tests/bench/run.py                 # every scenario
    python tests/bench/run.py fanout-1000 idle --idle-streams 5000
    python tests/bench/run.py fanout-1000 --tcp   # nginx to the hub over TCP
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ssekit_testing import tokens
from ssekit_testing.servers import Nginx, Redis, ServedHub, locations_for_load

FRAME = re.compile(rb"id: (\d+)\ndata: ([0-9.]+)\n\n")
CHANNEL = "bench"
STREAM_PATH = "/events/"  # --django-path: /events/django/ (bench_django.py)


def pin(pid: int, core: str) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", core, str(pid)], check=True,
                   stdout=subprocess.DEVNULL)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Stream(asyncio.Protocol):
    """One SSE client: counts ids, detects loss/duplicates, records latency."""

    def __init__(self, record_latency: bool) -> None:
        self.buf = b""
        self.ids: list[int] = []
        self.latencies: list[float] | None = [] if record_latency else None
        self.opened = asyncio.get_running_loop().create_future()
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self.opened.done():
            if b"retry:" in data:
                self.opened.set_result(None)
            elif data.startswith(b"HTTP/1.") and b" 200 " not in data[:16]:
                self.opened.set_exception(RuntimeError(data[:200].decode(errors="replace")))
                return
        buf = self.buf + data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.buf = buf
            return
        self.buf = buf[end + 2:]
        found = FRAME.findall(buf, 0, end + 2)
        if not found:
            return
        ids = self.ids
        latencies = self.latencies
        for event_id, stamp in found:
            ids.append(int(event_id))
            if latencies is not None:
                latencies.append(now - float(stamp))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before the stream opened"))


async def open_streams(port: int, count: int, token: str, latency_every: int = 1,
                       rate: int = 2000) -> list[Stream]:
    loop = asyncio.get_running_loop()
    request = (f"GET {STREAM_PATH}?channel={CHANNEL}&token={token} HTTP/1.0\r\n"
               f"Host: localhost\r\n\r\n").encode()
    streams: list[Stream] = []
    batch = max(1, rate // 20)
    for start in range(0, count, batch):
        started = time.monotonic()
        made = []
        for i in range(start, min(count, start + batch)):
            transport, protocol = await loop.create_connection(
                lambda i=i: Stream(i % latency_every == 0), "127.0.0.1", port)
            transport.write(request)
            made.append(protocol)
        await asyncio.gather(*(asyncio.wait_for(p.opened, 30) for p in made))
        streams.extend(made)
        await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - started)))
    return streams


class Publisher:
    """A keep-alive HTTP/1.1 client for POST /publish/, nothing more."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def publish(self, data: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        body = json.dumps({"channel": CHANNEL, "data": data}).encode()
        self.writer.write(
            b"POST /publish/ HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + self.token.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length: (\d+)", head)
        if match is None:
            raise RuntimeError(f"publish answered without a length: {head!r}")
        payload = await self.reader.readexactly(int(match.group(1)))
        if b"\r\nConnection: close" in head or b"\r\nconnection: close" in head:
            self.close()  # nginx ends a keep-alive connection after keepalive_requests
            self.writer = None
        if not head.startswith(b"HTTP/1.1 201"):
            raise RuntimeError(f"publish failed: {head[:40]!r} {payload[:200]!r}")
        event_id: int = json.loads(payload)["id"]
        return int(event_id)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def check(streams: list[Stream], published: list[int]) -> dict[str, float]:
    expected = set(published)
    lost = dup = 0
    for stream in streams:
        got = [i for i in stream.ids if i in expected]
        dup += len(got) - len(set(got))
        lost += len(expected - set(got))
    latencies = [x for s in streams if s.latencies for x in s.latencies]
    return {"lost": lost, "duplicated": dup,
            "p50_ms": percentile(latencies, 0.50) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": max(latencies, default=float("nan")) * 1000}


async def fanout(port: int, streams_count: int, rate: float, seconds: float) -> dict:
    sub = tokens.mint(SECRET, subscribe=[CHANNEL], ttl=3600)
    pub = tokens.mint(SECRET, publish=[CHANNEL], ttl=3600)
    streams = await open_streams(port, streams_count, sub)
    publisher = Publisher(port, pub)
    await asyncio.sleep(0.5)
    published = []
    round_trips: list[float] = []
    interval = 1 / rate
    start = time.monotonic()
    for n in range(int(rate * seconds)):
        target = start + n * interval
        await asyncio.sleep(max(0.0, target - time.monotonic()))
        sent = time.monotonic()
        published.append(await publisher.publish(repr(time.time())))
        round_trips.append(time.monotonic() - sent)
    await asyncio.sleep(1.0)
    publisher.close()
    result = check(streams, published)
    result["publish_p50_ms"] = percentile(round_trips, 0.5) * 1000
    result.update(streams=len(streams), events=len(published),
                  deliveries_per_s=len(published) * len(streams) / seconds)
    for s in streams:
        if s.transport:
            s.transport.close()
    return result


async def throughput(port: int, streams_count: int, seconds: float, publishers: int) -> dict:
    """Publish as fast as the subscribers keep up: publishers wait for delivery."""
    sub = tokens.mint(SECRET, subscribe=[CHANNEL], ttl=3600)
    pub = tokens.mint(SECRET, publish=[CHANNEL], ttl=3600)
    streams = await open_streams(port, streams_count, sub, latency_every=50)
    await asyncio.sleep(0.5)
    published: list[int] = []
    deadline = time.monotonic() + seconds
    window = 200  # events in flight: a publisher waits while the slowest stream lags more

    async def run(p: Publisher) -> None:
        while time.monotonic() < deadline:
            if published and streams[-1].ids and published[-1] - streams[-1].ids[-1] > window:
                await asyncio.sleep(0.001)
                continue
            published.append(await p.publish(repr(time.time())))

    clients = [Publisher(port, pub) for _ in range(publishers)]
    start = time.monotonic()
    await asyncio.gather(*(run(c) for c in clients))
    last = max(published)
    while time.monotonic() - start < seconds + 10 and any(
            (not s.ids or s.ids[-1] < last) for s in streams):
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - start
    for c in clients:
        c.close()
    delivered = sum(len(s.ids) for s in streams)
    result = check(streams, published)
    result.update(streams=len(streams), events=len(published),
                  deliveries_per_s=delivered / elapsed)
    for s in streams:
        if s.transport:
            s.transport.close()
    return result


async def idle(port: int, worker_pid: int, count: int) -> dict:
    sub = tokens.mint(SECRET, subscribe=[CHANNEL], ttl=3600)
    await asyncio.sleep(1)
    before = rss_kb(worker_pid)
    start = time.monotonic()
    streams = await open_streams(port, count, sub, latency_every=10**9, rate=2000)
    established = time.monotonic() - start
    await asyncio.sleep(2)
    after = rss_kb(worker_pid)
    open_count = sum(1 for s in streams if not s.closed)
    for s in streams:
        if s.transport:
            s.transport.close()
    return {"streams": open_count, "established_s": established,
            "worker_rss_before_mb": before / 1024, "worker_rss_after_mb": after / 1024,
            "kb_per_stream": (after - before) / max(1, open_count)}


async def publish_api(port: int, seconds: float, concurrency: int) -> dict:
    pub = tokens.mint(SECRET, publish=[CHANNEL], ttl=3600)
    count = 0
    deadline = time.monotonic() + seconds

    async def run() -> None:
        nonlocal count
        p = Publisher(port, pub)
        while time.monotonic() < deadline:
            await p.publish("x")
            count += 1
        p.close()

    start = time.monotonic()
    await asyncio.gather(*(run() for _ in range(concurrency)))
    return {"publishers": concurrency, "stored_events_per_s": count / (time.monotonic() - start)}


SECRET = secrets.token_urlsafe(48)
SCENARIOS = ["fanout-1000", "fanout-4000", "throughput", "idle", "publish", "latency-1"]


def bench_nginx(directory: Path, upstream: str, workers: int) -> Nginx:
    """nginx with the snippets from templates/nginx, limits raised for the load.

    One worker for the fan-out scenarios (several workers on one core wait for
    each other's time slices: p99 59 ms with 4 against 49 ms with 1 in one
    comparison); four for the idle scenario, whose 38,000 connections do not fit
    one worker under the 20,000 open-files cap.
    """
    locations = locations_for_load(directory)
    return Nginx(directory, [upstream], locations=locations, workers=workers,
                 worker_connections=65536 if workers == 1 else 16384)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []],
                        help="default: all of them")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--direct", action="store_true",
                        help="streams and publishes straight to the hub, not through nginx")
    parser.add_argument("--django-path", action="store_true",
                        help="streams through Django's StreamingHttpResponse (an @sse_stream "
                             "view on the same hub, bench_django.py) instead of the thin "
                             "/events/ path, to measure what the thin path saves")
    parser.add_argument("--tcp", action="store_true",
                        help="nginx reaches the hub over loopback TCP (the hop to a proxy on "
                             "another host, as in the cluster layout) instead of the Unix "
                             "socket the single-host layout deploys")
    # 19,000 rather than 20,000: these machines cap open files at 20,000 per process
    # (hard limit, not raisable here), and the hub worker holds one socket per stream.
    parser.add_argument("--idle-streams", type=int, default=19000)
    args = parser.parse_args()
    args.scenarios = args.scenarios or SCENARIOS
    want = args.idle_streams + 500  # this client's sockets; nginx spreads over 4 workers
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard < want:
            sys.exit(f"open files limit {hard} is too low for {args.idle_streams} streams")
    pin(os.getpid(), "1")
    directory = Path(tempfile.mkdtemp(prefix="ssehub-bench-"))
    redis = Redis(directory)
    hub = nginx = None
    env = {"SSEHUB_BROKER_URL": redis.url, "SSEHUB_TOKEN_SECRET": SECRET,
           "SSEHUB_SECRET_KEY": secrets.token_urlsafe(48), "SSEHUB_DATA_DIR": str(directory)}
    # Retention as deployed (1,000 events per channel): past that, every publish
    # also trims the oldest entry.
    # The hub, nginx and Redis on one core is the single-host layout, whose proxy
    # reaches the hub over a Unix socket (roles: ssehub_unix_socket); --direct and
    # --tcp put the hub on loopback TCP.
    if args.django_path:
        global STREAM_PATH
        STREAM_PATH = "/events/django/"
        env.update(DJANGO_SETTINGS_MODULE="bench_django", PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    hub = ServedHub(directory, env, workers=1, unix_socket=not (args.direct or args.tcp))
    nginx = bench_nginx(directory / "nginx", hub.bind, workers=1)
    try:
        redis.start()
        hub.start()
        nginx.start()
        results = run_scenarios(args, redis, hub, nginx)
    finally:
        for server in (nginx, hub, redis):
            server.stop()
    print(json.dumps(results, indent=1))


def run_scenarios(args: argparse.Namespace, redis: Redis, hub: ServedHub, nginx: Nginx) -> dict:
    assert hub.process is not None and nginx.process is not None and redis.process is not None
    worker = children(hub.process.pid)[0]
    for pid in (redis.process.pid, hub.process.pid, worker, nginx.process.pid,
                *children(nginx.process.pid)):
        pin(pid, "0")
    results: dict[str, dict] = {}
    port = hub.port if args.direct else nginx.port
    for name in args.scenarios:
        print(f"--- {name}", flush=True)
        groups = {"hub": [worker], "nginx": children(nginx.process.pid),
                  "redis": [redis.process.pid], "generator": [os.getpid()]}
        before = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
        started = time.monotonic()
        if name == "fanout-1000":
            result = asyncio.run(fanout(port, 1000, 20, args.seconds))
        elif name == "latency-1":  # one stream: the floor under the fan-out figures
            result = asyncio.run(fanout(port, 1, 20, args.seconds))
        elif name == "fanout-4000":
            result = asyncio.run(fanout(port, 4000, 20, args.seconds))
        elif name == "throughput":
            result = asyncio.run(throughput(port, 1000, args.seconds, 32))
        elif name == "idle":
            idle_nginx = bench_nginx(Path(tempfile.mkdtemp(prefix="ssehub-bench-idle-")),
                                     hub.bind, workers=4)
            idle_nginx.start()
            assert idle_nginx.process is not None
            for pid in (idle_nginx.process.pid, *children(idle_nginx.process.pid)):
                pin(pid, "0")
            try:
                result = asyncio.run(idle(hub.port if args.direct else idle_nginx.port,
                                          worker, args.idle_streams))
            finally:
                idle_nginx.stop()
        else:
            result = asyncio.run(publish_api(port, args.seconds / 2, 8))
        wall = time.monotonic() - started
        for group, pids in groups.items():
            used = sum(cpu_seconds(p) for p in pids) - before[group]
            result[f"cpu_{group}_pct"] = 100 * used / wall
        results[name] = result
        print("    " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in result.items()), flush=True)
        time.sleep(2)  # let closed streams drain before the next scenario
    return results


if __name__ == "__main__":
    main()
