"""G3 and H4: the network between the hub and its broker misbehaves.

G3: a route drops packets. Nothing closes the sockets, so nothing tells the
hub; only its own health checks can. A forwarder in the test stops passing
bytes on the connections it holds (no FIN, no RST) while new connections pass,
as when a NAT entry or a route dies. The listener must notice, reconnect and
fill the gap from storage; a publish must fail with 503 in bounded time, not
hang, and a publish whose reply is lost must not be stored twice.

H4: PgBouncer in transaction pooling cannot carry LISTEN. The hub's commands
may go through it (``SSEHUB_BROKER_URL``); the listener connects directly
(``SSEHUB_PG_LISTEN_URL``). A real pgbouncer (Debian's) with two workers'
publishes interleaved on its server connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import _config_factory
from ssekit_testing.servers import Postgres, Redis, free_port, stop, wait_for
from test_broker_faults import collect

from ssehub import conf
from ssehub.brokers import BrokerUnavailable
from ssehub.brokers import postgres as pg_broker
from ssehub.brokers import redis as redis_broker
from ssehub.hub import Hub

pytestmark = pytest.mark.asyncio

BURST = 20


class Blackhole:
    """A loopback TCP forwarder whose open connections can be made to drop every byte."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen: list[dict[str, bool]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Blackhole:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def freeze(self, replies_only: bool = False) -> None:
        """Drop the bytes on the connections open now (both ways, or only the
        server's replies); later connections pass."""
        for flags in self.frozen:
            flags["reply"] = True
            flags["request"] = not replies_only

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        frozen = {"request": False, "reply": False}
        self.frozen.append(frozen)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                       way: str) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if not frozen[way]:
                        sink.write(data)
                        await sink.drain()

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pipe(reader, up_writer, "request"),
                                 pipe(up_reader, writer, "reply"))


@contextlib.asynccontextmanager
async def hub_with(url: str, **overrides: str) -> AsyncIterator[Hub]:
    hub = Hub(_config_factory(url)(**overrides))
    await hub.start()
    try:
        yield hub
    finally:
        await hub.close()


async def publish_burst(hub: Hub, channel: str, start: int) -> list[int]:
    return [await hub.broker.publish(channel, f"e{start + i}") for i in range(BURST)]


async def test_g3_redis_listener_recovers_from_a_silent_route(
        redis_server: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_broker, "IDLE_PING_SECONDS", 0.5)
    monkeypatch.setattr(redis_broker, "DEAD_AFTER_SECONDS", 2.0)
    monkeypatch.setattr(redis_broker, "COMMAND_TIMEOUT_SECONDS", 1.0)
    prefix = f"g3{os.getpid()}:"
    async with Blackhole(redis_server.port) as route, \
            hub_with(f"redis://127.0.0.1:{route.port}/0", SSEHUB_REDIS_PREFIX=prefix) as hub, \
            hub_with(redis_server.url, SSEHUB_REDIS_PREFIX=prefix) as direct:
        receiver = asyncio.create_task(collect(hub, 2 * BURST, timeout=20))
        await asyncio.sleep(0.3)
        published = [await hub.broker.publish("g2", "through the route")]
        published += await publish_burst(direct, "g2", 0)
        await asyncio.sleep(0.5)
        route.freeze()
        published += await publish_burst(direct, "g2", BURST - 1)
        received = await receiver
    conf.reset()
    assert received == published, f"missing {sorted(set(published) - set(received))}"


async def test_g3_redis_publish_whose_reply_is_lost_is_not_stored_twice(
        redis_server: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request reaches Redis and the event is stored, but the reply never
    comes back. The caller must get 503 (and retry with its Idempotency-Key); a
    library that resends the script on a new connection stores it twice."""
    monkeypatch.setattr(redis_broker, "COMMAND_TIMEOUT_SECONDS", 1.0)
    prefix = f"g3r{os.getpid()}:"
    async with Blackhole(redis_server.port) as route, \
            hub_with(f"redis://127.0.0.1:{route.port}/0", SSEHUB_REDIS_PREFIX=prefix) as hub, \
            hub_with(redis_server.url, SSEHUB_REDIS_PREFIX=prefix) as direct:
        first = await hub.broker.publish("lost", "before")
        # The listener's history check shares the command connection: let it finish,
        # or it, not the publish, is what loses its reply.
        async with asyncio.timeout(5):
            while not hub.broker.listener_up:
                await asyncio.sleep(0.01)
        route.freeze(replies_only=True)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(hub.broker.publish("lost", "once"), 10)
        waited = time.monotonic() - started
        after = await asyncio.wait_for(hub.broker.publish("lost", "after"), 10)
        stored = await direct.broker.replay(["lost"], first - 1)
    conf.reset()
    assert waited < 5, f"the publish was held {waited:.1f} s"
    assert [e.data for e in stored.events] == ["before", "once", "after"]
    assert stored.events[-1].id == after


async def test_g3_postgres_listener_recovers_from_a_silent_route(
        pg_server: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_broker, "IDLE_CHECK_SECONDS", 0.5)
    monkeypatch.setattr(pg_broker, "DEAD_AFTER_SECONDS", 2.0)
    async with Blackhole(pg_server.port) as route, \
            hub_with(f"postgres://postgres@127.0.0.1:{route.port}/postgres") as hub, \
            hub_with(pg_server.url) as direct:
        receiver = asyncio.create_task(collect(hub, 2 * BURST, timeout=20))
        await asyncio.sleep(0.3)
        published = await publish_burst(direct, "g2", 0)
        await asyncio.sleep(0.5)
        route.freeze()
        published += await publish_burst(direct, "g2", BURST)
        received = await receiver
    conf.reset()
    assert received == published, f"missing {sorted(set(published) - set(received))}"


class PgBouncer:
    """Debian's pgbouncer on loopback in transaction pooling, in front of ``pg``."""

    def __init__(self, pg: Postgres) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ssehub-pgbouncer-"))
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(f"""[databases]
postgres = host=127.0.0.1 port={pg.port} dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/users.txt
pool_mode = transaction
default_pool_size = 4
server_round_robin = 1
ignore_startup_parameters = extra_float_digits,options
logfile = {self.dir}/pgbouncer.log
""")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["/usr/sbin/pgbouncer", str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            shutil.chown(self.dir, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for(self._ready, what="pgbouncer")

    def _ready(self) -> bool:
        import psycopg

        with psycopg.connect(self.url.replace("postgres://", "postgresql://", 1),
                             connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pgbouncer(pg_server: Postgres) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(pg_server)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


async def test_h4_commands_through_pgbouncer_listener_direct(
        pg_server: Postgres, pgbouncer: PgBouncer) -> None:
    """Two workers publish through pgbouncer (transaction pooling, round robin over
    server connections, so statements land on connections that never saw them
    prepared); the listener connects directly and receives every event live."""
    direct = pg_server.url
    async with hub_with(pgbouncer.url, SSEHUB_PG_LISTEN_URL=direct) as worker1, \
            hub_with(pgbouncer.url, SSEHUB_PG_LISTEN_URL=direct) as worker2:
        receiver = asyncio.create_task(collect(worker1, 4 * BURST, timeout=20))
        await asyncio.sleep(0.3)
        batches = await asyncio.gather(*(publish_burst(worker, "g2", i * BURST)
                                         for i, worker in enumerate([worker1, worker2] * 2)))
        received = await receiver
        replay = await worker2.broker.replay(["g2"], min(received) - 1)
    conf.reset()
    published = sorted(i for batch in batches for i in batch)
    assert len(set(published)) == 4 * BURST
    assert received == published
    assert [e.id for e in replay.events] == published
