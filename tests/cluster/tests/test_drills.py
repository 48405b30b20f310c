"""Fault drills on the deployed stack (issue 13, part 6): one fault each while
streams read and a publisher publishes, then a count of what every stream got.

Each drill opens STREAMS EventSource-like readers on one channel through the
proxy over HTTPS. They behave as a browser's EventSource does: a 200
text/event-stream is read; when it ends or the network fails, the reader waits
the server's last `retry:` and reconnects with Last-Event-ID; any other answer
closes it for good (the drill then fails). Meanwhile sequence-numbered events
go to ``POST /publish/`` at RATE per second, each in its own request on
schedule, with an Idempotency-Key, and are sent again with the same key on a
5xx, a 429 or a broken connection, as a careful publisher does.

After the fault and AFTER_SECONDS of recovery, every stream must hold every
acknowledged event exactly once, in id order, with the id its publish was
acknowledged with (a second id for one key would be a duplicate in the store),
and no ``event: reset``. A stream may be without a hub connection, or behind on
delivery (an acknowledged event not yet received), for at most MAX_OUTAGE.
During the loss of an app host, publishing keeps at least KEPT_RATE of its
rate (publishes acknowledged within ON_TIME_SECONDS of their schedule).

Each drill prints one line of figures (the README's reliability table) and
appends it as JSON to drills.jsonl in the scenario's ephemeral directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from conftest import (
    EPHEMERAL,
    PROXY_PORT,
    PUBLIC_HOST,
    ROOT,
    SCENARIO,
    get_host,
    hosts_in,
    new_channel,
    secret,
    setting,
    token,
)
from ssekit_testing import sse

STREAMS = 50
RATE = 20  # publishes per second
BEFORE_SECONDS = 3.0  # publishing before the fault
AFTER_SECONDS = 5.0  # publishing after the fault is over
CATCH_UP_SECONDS = 20.0  # after publishing: streams get what they are owed
MAX_OUTAGE = 10.0  # seconds a stream may be without its hub or behind
KEPT_RATE = 0.9  # during an app host loss
ON_TIME_SECONDS = 2.0
PUBLISH_GIVE_UP_SECONDS = 60.0  # a publish retried this long fails the drill
LOSS_SECONDS = 20.0  # how long an app host is cut off
BACK_SECONDS = 60.0  # bound for a service to answer again after its fault
OPEN_SECONDS = 20.0  # bound for every reader to hold a stream at the start
BROWSER_RETRY_SECONDS = 3.0  # EventSource's reconnection time before any retry:
HUB_OPEN = ": ssehub stream open"  # the hub's preamble (a proxy's retry stream differs)


def _sh(host: Any, script: str) -> str:
    out = host.run(script)
    assert out.rc == 0, f"{script!r} failed (rc {out.rc}): {out.stdout} {out.stderr}"
    return str(out.stdout)


def _wait(host: Any, check: str, what: str) -> None:
    """Poll a shell check on a host until it succeeds, within BACK_SECONDS."""
    _sh(host, f"for i in $(seq {int(BACK_SECONDS * 5)}); do {check} && exit 0; sleep 0.2; done;"
              f" echo '{what} not back' >&2; exit 1")


def _redis_ping() -> str:
    return (f"[ \"$(redis-cli --no-auth-warning -p {setting('redis_port')}"
            f" --user {setting('redis_admin_user')} --pass {secret('redis_admin_password')}"
            " PING 2>/dev/null)\" = PONG ]")


def _hub_ready(host: Any) -> None:
    port = setting("ssehub_port")
    _wait(host, f"curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:{port}/readyz",
          "ssehub /readyz")


# The faults. Each applies one fault and returns once the faulted part is back
# (the drill's recovery window starts then). They run in a thread.

def kill_worker() -> None:
    app = get_host(hosts_in("app")[0])
    workers = setting("ssehub_workers")
    main = _sh(app, "systemctl show -p MainPID --value ssehub").strip()
    _sh(app, f"kill -9 $(pgrep -P {main} | head -n 1)")
    _wait(app, f"[ $(pgrep -c -P {main}) -ge {workers} ]", "the killed worker")
    _hub_ready(app)


def restart_ssehub() -> None:
    app = get_host(hosts_in("app")[0])
    _sh(app, "timeout 120 systemctl restart ssehub")
    _hub_ready(app)


def lose_app_host() -> None:
    """Cut one app host's network both ways (every packet dropped, as a lost
    host's network does: no FIN, no RST) for LOSS_SECONDS, then restore it."""
    app = get_host(hosts_in("app")[0])
    rules = ("table inet ssekit_drill {\n"
             " chain in { type filter hook input priority -100; policy drop; iif lo accept; }\n"
             " chain out { type filter hook output priority -100; policy drop; oif lo accept; }\n"
             "}\n")
    _sh(app, f"nft -f - <<'EOF'\n{rules}EOF")
    try:
        time.sleep(LOSS_SECONDS)
    finally:
        _sh(app, "nft delete table inet ssekit_drill")
    _hub_ready(app)


def _redis_fault(command: str) -> None:
    redis = get_host(hosts_in("redis")[0])
    old = _sh(redis, "systemctl show -p MainPID --value redis-server").strip()
    _sh(redis, command.format(pid=old))
    _wait(redis, f"[ \"$(systemctl show -p MainPID --value redis-server)\" != {old} ]"
                 f" && {_redis_ping()}", "redis")


def restart_redis() -> None:
    _redis_fault("timeout 60 systemctl restart redis-server")


def kill_redis() -> None:
    _redis_fault("kill -9 {pid}")  # systemd restarts it (Restart=always)


def restart_postgresql() -> None:
    postgres = get_host(hosts_in("postgres")[0])
    _sh(postgres, "timeout 60 systemctl restart postgresql")
    _wait(postgres, "pg_isready -q", "postgresql")


def _proxy() -> tuple[Any, str]:
    name = hosts_in("proxy")[0]
    return get_host(name), "caddy" if setting("ssekit_proxy") == "caddy" else "nginx"


def reload_proxy() -> None:
    proxy, unit = _proxy()
    _sh(proxy, f"timeout 60 systemctl reload {unit}")


def restart_proxy() -> None:
    proxy, unit = _proxy()
    _sh(proxy, f"timeout 60 systemctl restart {unit}")
    _wait(proxy, f"systemctl is-active -q {unit}", unit)


def site_yml(**extra: Any) -> subprocess.CompletedProcess[str]:
    """site.yml as an operator runs it, with extra variables; its smoke test last."""
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_PIPELINING": "true"}
    extra = {"ssehub_smoke_connect_to": f"127.0.0.1:{PROXY_PORT}", **extra}
    cmd = ["timeout", "900", "ansible-playbook", "-i", str(EPHEMERAL / "inventory"),
           str(ROOT / "site.yml"), "-e", json.dumps(extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def _deployed(done: subprocess.CompletedProcess[str], what: str) -> None:
    assert done.returncode == 0, f"{what} failed: {done.stdout[-3000:]}{done.stderr[-2000:]}"
    assert "RUNNING HANDLER [ssehub : Restart ssehub]" in done.stdout, "nothing restarted"


def rolling_deploy() -> None:
    """One changed setting (an extra variable in the hub's environment): the
    app play restarts one host at a time (serial: 1)."""
    _deployed(site_yml(ssehub_extra_env={"SSEHUB_DRILL_DEPLOY": uuid.uuid4().hex}),
              "the deploy")


def live_releases() -> dict[str, str]:
    return {name: get_host(name).check_output(
                f"basename $(readlink -f {setting('ssehub_home')}/current)")
            for name in hosts_in("app")}


def deploy_and_roll_back() -> None:
    """A new release (the app's source with one file added) goes live through
    site.yml, then ``ssehub_rollback=true`` puts the release before it back,
    one app host at a time, with no build or install."""
    before = live_releases()
    source = EPHEMERAL / "drill-release"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(ROOT / "app", source, ignore=shutil.ignore_patterns(
        "tests", "build", "*.egg-info", "__pycache__", ".mypy_cache"))
    (source / "src" / "ssehub" / "drill_release.py").write_text(
        f'"""A release made by the rollback drill."""\nMARK = "{uuid.uuid4().hex}"\n')
    start = time.monotonic()
    _deployed(site_yml(ssehub_source_dir=str(source)), "the new release's deploy")
    deployed = time.monotonic()
    new = live_releases()
    assert all(new[h] != before[h] for h in new), (before, new)
    _deployed(site_yml(ssehub_rollback=True), "the rollback")
    print(f"new release deployed in {deployed - start:.0f} s, rolled back in "
          f"{time.monotonic() - deployed:.0f} s")
    assert live_releases() == before, "the rollback did not return to the release before"


DRILLS: dict[str, Callable[[], None]] = {
    "kill -9 of one gunicorn worker": kill_worker,
    "systemctl restart ssehub (one app host)": restart_ssehub,
    "loss of one app host (network cut)": lose_app_host,
    "systemctl restart redis-server": restart_redis,
    "kill -9 of redis-server": kill_redis,
    "PostgreSQL restart": restart_postgresql,
    "proxy reload": reload_proxy,
    "proxy restart": restart_proxy,
    "rolling deploy of a changed setting": rolling_deploy,
    "deploy of a new release, then a rollback": deploy_and_roll_back,
}
# A single host has one of each: its proxy drills are the ones that say
# something about the proxy (the rest are the cluster's).
SCENARIO_DRILLS = {
    "cluster": list(DRILLS),
    "single-host-caddy": ["proxy reload", "proxy restart"],
}


def _client(**kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{PROXY_PORT}", headers={"Host": PUBLIC_HOST},
        verify=False,  # noqa: S501  self-signed or internal-CA test certificates
        **kwargs)


EXT = {"sni_hostname": PUBLIC_HOST}


@dataclass
class Reader:
    """One EventSource, as the WHATWG rules have it."""

    channel: str
    token: str
    received: list[tuple[int, str, float]] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    downs: list[float] = field(default_factory=list)  # seconds without a hub stream
    connects: int = 0
    closed_for_good: str | None = None
    last_id: str | None = None
    retry: float = BROWSER_RETRY_SECONDS
    up: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        down_since: float | None = None
        timeout = httpx.Timeout(10.0, read=None)
        async with _client(timeout=timeout) as c:
            while not stop.is_set():
                headers = {"Accept": "text/event-stream",
                           "Authorization": f"Bearer {self.token}"}
                if self.last_id is not None:
                    headers["Last-Event-ID"] = self.last_id
                try:
                    async with c.stream("GET", "/events/", params={"channel": self.channel},
                                        headers=headers, extensions=EXT) as r:
                        kind = r.headers.get("content-type", "")
                        if r.status_code != 200 or not kind.startswith("text/event-stream"):
                            self.closed_for_good = f"{r.status_code} {kind}"
                            return
                        self.connects += 1
                        async for line in self._lines(r, stop):
                            if line == HUB_OPEN:
                                if down_since is not None:
                                    self.downs.append(time.monotonic() - down_since)
                                    down_since = None
                                self.up.set()
                except httpx.HTTPError:
                    pass
                if stop.is_set():
                    return
                if down_since is None:
                    down_since = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.retry)

    async def _lines(self, r: httpx.Response, stop: asyncio.Event) -> Any:
        parser = sse.Parser()
        async for line in r.aiter_lines():
            if stop.is_set():
                return
            if line.startswith(":"):
                yield line
                continue
            event = parser.feed(line)
            if parser.last_event_id is not None:
                self.last_id = parser.last_event_id
            if parser.retry is not None:
                self.retry = parser.retry / 1000
            if event is None:
                continue
            if event.event == "reset":
                self.resets.append(event.data)
            elif event.id is not None and event.id.isdigit():
                self.received.append((int(event.id), event.data, time.monotonic()))


@dataclass
class Publisher:
    channel: str
    token: str
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    scheduled: dict[int, float] = field(default_factory=dict)
    acked: dict[int, tuple[int, float]] = field(default_factory=dict)  # n: (id, when)
    retries: int = 0
    failed: list[str] = field(default_factory=list)

    async def one(self, c: httpx.AsyncClient, n: int) -> None:
        headers = {"Authorization": f"Bearer {self.token}",
                   "Idempotency-Key": f"{self.run}-{n}"}
        give_up = time.monotonic() + PUBLISH_GIVE_UP_SECONDS
        last = ""
        while time.monotonic() < give_up:
            try:
                r = await c.post("/publish/", json={"channel": self.channel, "data": str(n)},
                                 headers=headers, extensions=EXT)
                if r.status_code in (200, 201):
                    self.acked[n] = (int(r.json()["id"]), time.monotonic())
                    return
                last = f"{r.status_code} {r.text[:200]}"
                if r.status_code not in (429, 502, 503, 504):
                    break  # a refusal a retry cannot mend
            except httpx.HTTPError as exc:
                last = repr(exc)
            self.retries += 1
            await asyncio.sleep(0.2)
        self.failed.append(f"event {n}: {last}")

    async def publish_until(self, stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with _client(timeout=httpx.Timeout(5.0), limits=limits) as c:
            tasks: list[asyncio.Task[None]] = []
            start = time.monotonic()
            n = 0
            while not stop.is_set():
                at = start + n / RATE
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, at - time.monotonic()))
                if stop.is_set():
                    break
                self.scheduled[n] = at
                tasks.append(asyncio.create_task(self.one(c, n)))
                n += 1
            await asyncio.gather(*tasks)


@dataclass
class Figures:
    drill: str
    streams: int
    published: int
    lost: int
    duplicated: int
    out_of_order: int
    resets: int
    closed_for_good: int
    longest_down: float
    longest_behind: float
    publish_retries: int
    publish_failed: int
    rate_kept: float
    fault_seconds: float

    def line(self) -> str:
        return (f"drill {self.drill!r} ({SCENARIO}): {self.streams} streams, {self.published}"
                f" events acknowledged; lost {self.lost}, duplicated {self.duplicated},"
                f" out of order {self.out_of_order}, resets {self.resets}, closed for good"
                f" {self.closed_for_good}; longest without the hub {self.longest_down:.1f} s,"
                f" longest behind {self.longest_behind:.1f} s; publishes retried"
                f" {self.publish_retries}, failed {self.publish_failed}, rate kept during the"
                f" fault {self.rate_kept:.0%} (fault {self.fault_seconds:.1f} s)")


def judge(drill: str, readers: list[Reader], pub: Publisher,
          fault_window: tuple[float, float]) -> Figures:
    acked = pub.acked
    by_data = {str(n): ident for n, (ident, _) in acked.items()}
    lost = duplicated = disordered = 0
    behind = 0.0
    for reader in readers:
        seen: set[str] = set()
        previous = 0
        for ident, data, at in reader.received:
            if data in seen or by_data.get(data, ident) != ident:
                duplicated += 1
            seen.add(data)
            if ident <= previous:
                disordered += 1
            previous = max(previous, ident)
            n = int(data) if data.isdigit() else None
            if n in acked:
                behind = max(behind, at - acked[n][1])
        missing = set(by_data) - seen
        lost += len(missing)
        if missing:  # owed and never received: behind until the end
            behind = max(behind, time.monotonic() - min(acked[int(d)][1] for d in missing))
    begin, end = fault_window
    window = [n for n, at in pub.scheduled.items() if begin <= at <= end]
    on_time = [n for n in window
               if n in acked and acked[n][1] - pub.scheduled[n] <= ON_TIME_SECONDS]
    return Figures(
        drill=drill, streams=len(readers), published=len(acked), lost=lost,
        duplicated=duplicated, out_of_order=disordered,
        resets=sum(len(r.resets) for r in readers),
        closed_for_good=sum(r.closed_for_good is not None for r in readers),
        longest_down=max((d for r in readers for d in r.downs), default=0.0),
        longest_behind=behind, publish_retries=pub.retries, publish_failed=len(pub.failed),
        rate_kept=len(on_time) / len(window) if window else 1.0, fault_seconds=end - begin)


async def run_drill(drill: str) -> Figures:
    channel = new_channel("drill")
    readers = [Reader(channel, token(subscribe=[channel], ttl=1800)) for _ in range(STREAMS)]
    stop_readers, stop_publishing = asyncio.Event(), asyncio.Event()
    reading = [asyncio.create_task(r.run(stop_readers)) for r in readers]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.up.wait() for r in readers)), OPEN_SECONDS)
    except TimeoutError:
        closed = [r.closed_for_good for r in readers if r.closed_for_good]
        stop_readers.set()
        await asyncio.gather(*reading)
        raise AssertionError(
            f"not every stream opened within {OPEN_SECONDS} s: {closed[:3]}") from None
    pub = Publisher(channel, token(publish=[channel], ttl=1800))
    publishing = asyncio.create_task(pub.publish_until(stop_publishing))
    await asyncio.sleep(BEFORE_SECONDS)
    begin = time.monotonic()
    try:
        await asyncio.to_thread(DRILLS[drill])
    finally:
        end = time.monotonic()
        await asyncio.sleep(AFTER_SECONDS)
        stop_publishing.set()
        await publishing
    # Catch-up: until every stream holds every acknowledged event, or the bound.
    want = {str(n) for n in pub.acked}
    until = time.monotonic() + CATCH_UP_SECONDS
    while time.monotonic() < until and any(
            want - {d for _, d, _ in r.received} for r in readers):
        await asyncio.sleep(0.2)
    figures = judge(drill, readers, pub, (begin, end))
    stop_readers.set()
    await asyncio.gather(*reading)
    assert not pub.failed, f"publishes failed: {pub.failed[:3]}"
    return figures


@pytest.mark.parametrize("drill", SCENARIO_DRILLS.get(SCENARIO, []))
def test_drill(drill: str) -> None:
    figures = asyncio.run(run_drill(drill))
    line = figures.line()
    print(line)
    with contextlib.suppress(OSError), (EPHEMERAL / "drills.jsonl").open("a") as out:
        out.write(json.dumps(figures.__dict__) + "\n")
    assert figures.lost == 0 and figures.duplicated == 0 and figures.out_of_order == 0, line
    assert figures.resets == 0, line
    assert figures.closed_for_good == 0, line
    assert figures.longest_down <= MAX_OUTAGE and figures.longest_behind <= MAX_OUTAGE, line
    if DRILLS[drill] is lose_app_host:
        assert figures.rate_kept >= KEPT_RATE, line


@pytest.mark.skipif(SCENARIO != "cluster", reason="the rollback drill runs on the cluster")
def test_rollback_is_refused_on_a_database_migrated_past_the_previous_release() -> None:
    """The previous release (after the drill: the one rolled back from) must know
    every applied migration; one it lacks stops the rollback on the first host."""
    postgres = get_host(hosts_in("postgres")[0])
    database = setting("ssehub_database_name")
    row = "('ssehub', '9999_from_a_later_release', now())"
    _sh(postgres, f"runuser -u postgres -- psql -d {database} -c "
                  f"\"INSERT INTO django_migrations (app, name, applied) VALUES {row}\"")
    try:
        before = live_releases()
        done = site_yml(ssehub_rollback=True)
        output = f"{done.stdout[-4000:]}{done.stderr[-2000:]}"
        assert done.returncode != 0, f"the rollback was not refused: {output}"
        # Ansible writes a failed task to stderr where its configuration says so
        # (molecule's environment does).
        assert "ssehub.9999_from_a_later_release" in done.stdout + done.stderr, output
        assert live_releases() == before, f"a refused rollback changed a host: {output}"
    finally:
        _sh(postgres, f"runuser -u postgres -- psql -d {database} -c \"DELETE FROM "
                      "django_migrations WHERE name = '9999_from_a_later_release'\"")
