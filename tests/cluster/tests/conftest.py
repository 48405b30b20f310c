"""Shared helpers for the testinfra checks of the molecule scenarios.

Expected values come from the same places the deploy reads them: the
inventory's group_vars (linked into the scenario) over the roles' defaults,
and the secrets the deploy generated on the controller. The cross-proxy tests
talk to the proxy through its port published on 127.0.0.1 (SSEKIT_PROXY_PORT),
like a browser outside the cluster.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import testinfra
import yaml
from ssekit_testing import sse, tokens
from ssekit_testing.roles import role_defaults

ROOT = Path(__file__).resolve().parents[3]
GROUP_VARS = ROOT / "inventories" / "single-host" / "group_vars" / "all"
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
INVENTORY = os.environ.get("MOLECULE_INVENTORY_FILE", "")
SECRETS = EPHEMERAL / "inventory" / ".secrets"
PROXY_PORT = int(os.environ.get("SSEKIT_PROXY_PORT", "18443"))
SCENARIO = os.environ.get("MOLECULE_SCENARIO_NAME", "cluster")
# Variables the scenario sets on its hosts (single-host-caddy: Caddy as the proxy).
SCENARIO_DIR = Path(os.environ.get("MOLECULE_SCENARIO_DIRECTORY", "/nonexistent"))
SCENARIO_HOST_VARS = SCENARIO_DIR / "host_vars"


def _load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def setting(name: str) -> Any:
    """Value of a deploy variable: the scenario's host_vars over the inventory's
    group_vars over role defaults, as in Ansible. A value that only names
    another variable ("{{ ssehub_port }}": what one role takes from another's)
    is that variable's value."""
    for path in [*sorted(SCENARIO_HOST_VARS.glob("*.yml")), *sorted(GROUP_VARS.glob("*.yml"))]:
        data = _load_yaml(path)
        if name in data:
            value = data[name]
            break
    else:
        value = role_defaults(name.split("_", 1)[0], with_vars=False)[name]
    alias = re.fullmatch(r"\{\{\s*(\w+)\s*\}\}", value) if isinstance(value, str) else None
    return setting(alias.group(1)) if alias else value


@functools.cache
def secret(name: str) -> str:
    """A secret the deploy generated on the controller (password lookup), read
    once: a read while a fault ran once gave 59 of the token secret's 64
    characters (the file's mtime did not change; cause not found), and every
    token signed with it was refused."""
    return (SECRETS / name).read_text().split()[0]


def get_host(name: str) -> testinfra.host.Host:
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")


def hosts_in(group: str) -> list[str]:
    """Hosts of an inventory group (molecule writes groups at the top level)."""
    inv = _load_yaml(Path(INVENTORY)) if INVENTORY else {}
    found: set[str] = set()

    def walk(node: dict[str, Any], inside: bool) -> None:
        if inside:
            found.update(node.get("hosts") or {})
        for child, sub in (node.get("children") or {}).items():
            walk(sub or {}, inside or child == group)

    for name, node in inv.items():
        walk(node or {}, group in ("all", name))
    return sorted(found)


def nofile_expected(host: Any, wanted: int) -> int:
    """A service's open-file limit: what the role set, capped by the hard
    limit of PID 1 (a container cannot raise it past its own)."""
    limits = host.file("/proc/1/limits").content_string
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    hard = line.split()[4]
    return wanted if hard == "unlimited" else min(wanted, int(hard))


# Units of nginx and Go (Caddy) durations, in seconds; a bare number is seconds.
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(value: str | int) -> float:
    """A duration as nginx or Caddy writes it ("1h", "90s", "1m30s", "500ms") in seconds."""
    parts = re.findall(r"(\d+)(ns|us|ms|s|m|h|d)?", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), value
    return sum(int(n) * DURATION_UNITS[u] for n, u in parts)


# Addresses ss prints for a socket bound to every address ("*" is dual-stack).
WILDCARD = frozenset({"0.0.0.0", "::", "*"})


def private_address(host: Any) -> str:
    """The host's ssekit_private_address, which the roles use: a literal set in
    the inventory, or else its default, the address of the default route."""
    value = host.ansible.get_variables().get("ssekit_private_address")
    if isinstance(value, str) and "{{" not in value:
        return value
    facts = host.ansible("setup", "gather_subset=!all,network filter=ansible_default_ipv4")
    return str(facts["ansible_facts"]["ansible_default_ipv4"]["address"])


def tcp_listeners(host: Any) -> list[tuple[str, int, str]]:
    """Listening TCP sockets as (address, port, systemd unit), from `ss -Htlne`.

    The socket's cgroup names the unit that opened it. (ss -p would need to
    read other users' /proc/PID/fd: CAP_SYS_PTRACE, which the containers lack.)"""
    found = []
    for line in host.check_output("ss -Htlne").splitlines():
        address, _, port = line.split()[3].rpartition(":")
        address = address.strip("[]").split("%", 1)[0]  # "[::1]", "0.0.0.0%lo"
        cgroup = re.search(r"\bcgroup:(\S+)", line)
        unit = cgroup.group(1).rstrip("/").rsplit("/", 1)[-1] if cgroup else ""
        found.append((address, int(port), unit))
    return found


def listen_addresses(host: Any, port: int) -> set[str]:
    """Addresses something listens on at this TCP port."""
    return {addr for addr, p, _ in tcp_listeners(host) if p == int(port)}


def ports_of_unit(host: Any, unit: str) -> set[int]:
    """Every TCP port the processes of this systemd unit listen on."""
    sockets = tcp_listeners(host)
    ports = {p for _, p, u in sockets if u == unit}
    assert ports, f"no socket of {unit} in {sockets}"
    return ports


def unix_listeners(host: Any, unit: str) -> set[str]:
    """Paths of the listening Unix sockets the processes of this systemd unit hold.

    ss shows no cgroup for Unix sockets, so: the unit's processes by their
    cgroup (/proc/PID/cgroup), the socket inodes in their /proc/PID/fd (read as
    the process's own user: root lacks CAP_SYS_PTRACE in the containers), and
    the paths `ss -Hxl` gives those inodes."""
    script = (
        f"for p in $(grep -l '/{unit}$' /proc/[0-9]*/cgroup 2>/dev/null | cut -d/ -f3); do "
        'runuser -u "$(stat -c %U /proc/$p)" -- '
        "find /proc/$p/fd -lname 'socket:*' -printf '%l\\n' 2>/dev/null; done; true"
    )
    inodes = set(re.findall(r"socket:\[(\d+)\]", host.check_output(script)))
    assert inodes, f"no socket of {unit}"
    found = set()
    for line in host.check_output("ss -Hxl").splitlines():
        fields = line.split()  # u_str LISTEN 0 5 /path INODE * 0
        if len(fields) >= 6 and fields[5] in inodes:
            found.add(fields[4])
    return found


def variable(host: Any, name: str) -> Any:
    """A deploy variable as Ansible renders it for this host (the inventory's
    templates evaluated for it), or the role default the inventory leaves."""
    value = host.ansible("debug", f"var={name}").get(name)
    if value is None or (isinstance(value, str) and value.startswith("VARIABLE IS NOT DEFINED")):
        return setting(name)
    return value


def hostname(host: Any) -> str:
    """The host's inventory name."""
    return str(host.backend.host)


def upstreams(proxy: Any, unix_prefix: str, port: int) -> list[str]:
    """Where a proxy should reach each app host: its own host's hub over the
    Unix socket when that hub has one (ssehub_unix_socket), the others over TCP
    at their private address."""
    found = []
    for app in hosts_in("app"):
        socket = variable(proxy, "ssehub_unix_socket") if app == hostname(proxy) else ""
        tcp = f"{private_address(get_host(app))}:{port}"
        found.append(f"{unix_prefix}{socket}" if socket else tcp)
    return sorted(found)


def is_loopback(address: str) -> bool:
    return address not in WILDCARD and ipaddress.ip_address(address).is_loopback


PUBLIC_HOST: str = setting("ssekit_public_hostname")


def token(
    publish: list[str] | None = None, subscribe: list[str] | None = None, ttl: int = 600
) -> str:
    """A token signed with the secret the deploy generated."""
    return tokens.mint(secret("ssehub_token_secret"), publish=publish or [],
                       subscribe=subscribe or [], ttl=ttl)


def client(**kwargs: Any) -> httpx.Client:
    """HTTPS client for the proxy: loopback port, the public name as Host and SNI."""
    return httpx.Client(
        base_url=f"https://127.0.0.1:{PROXY_PORT}",
        headers={"Host": PUBLIC_HOST},
        verify=False,  # noqa: S501  self-signed or internal-CA test certificates
        timeout=httpx.Timeout(10.0, read=60.0),
        **kwargs,
    )


def ext() -> dict[str, Any]:
    return {"sni_hostname": PUBLIC_HOST}


def publish(channel: str, data: str, event: str = "message", idempotent: bool = True) -> str:
    """Publish like a careful client: with a unique Idempotency-Key, so that a
    retried request cannot store the event twice."""
    headers = tokens.bearer(token(publish=[channel]))
    if idempotent:
        headers["Idempotency-Key"] = uuid.uuid4().hex
    with client() as c:
        r = c.post(
            "/publish/",
            json={"channel": channel, "event": event, "data": data},
            headers=headers,
            extensions=ext(),
        )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@dataclass
class Event:
    id: str | None
    event: str
    data: str
    at: float


@dataclass
class Stream:
    """An EventSource-like reader in a thread: parses frames, reconnects with
    Last-Event-ID when the stream ends, records what it saw."""

    channel: str
    last_event_id: str | None = None
    reconnect: bool = True
    extra_headers: dict[str, str] = field(default_factory=dict)
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    comments: list[tuple[float, str]] = field(default_factory=list)
    headers: list[httpx.Headers] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    connects: int = 0
    # (opened, ended, why) per connection, time.monotonic(): what a test prints
    # when a stream misbehaves.
    history: list[tuple[float, float, str]] = field(default_factory=list)
    opened: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _response: httpx.Response | None = None

    def start(self) -> Stream:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self.opened.wait(10), "stream did not open within 10 s"
        return self

    def stop(self) -> None:
        """Stop reading and close the connection now: a stream left to notice the
        flag at its next heartbeat stays open on the hub for up to a heartbeat,
        and the next test sees it (test_resilience counts the hosts holding one)."""
        self._stop.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):  # the reader thread may be closing it too
                response.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        deadline = time.monotonic() + 300  # never outlive a test run
        while not self._stop.is_set() and time.monotonic() < deadline:
            headers = {
                "Accept": "text/event-stream",
                **tokens.bearer(token(subscribe=[self.channel])),
                **self.extra_headers,
            }
            if self.last_event_id:
                headers["Last-Event-ID"] = self.last_event_id
            began, why = time.monotonic(), "ended by the server"
            try:
                with client() as c, c.stream(
                    "GET", "/events/", params={"channel": self.channel},
                    headers=headers, extensions=ext(),
                ) as r:
                    self._response = r
                    self.connects += 1
                    self.statuses.append(r.status_code)
                    self.headers.append(r.headers)
                    if r.status_code != 200:
                        raise httpx.HTTPError(f"status {r.status_code}")
                    self._read(r)
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            except Exception:
                if not self._stop.is_set():
                    raise
                return  # stop() closed the response under the reader
            finally:
                self.history.append((began, time.monotonic(), why))
            if not self.reconnect:
                break
            time.sleep(0.3)

    def _read(self, r: httpx.Response) -> None:
        parser = sse.Parser()  # as a browser: a bare id: sets the Last-Event-ID too
        for line in r.iter_lines():
            if self._stop.is_set():
                return
            now = time.monotonic()
            if line.startswith(":"):
                self.comments.append((now, line))
                self.opened.set()
                continue
            event = parser.feed(line)
            if parser.retry is not None:
                self.opened.set()
            if parser.last_event_id is not None:
                self.last_event_id = parser.last_event_id
            if event is not None:
                self.events.put(Event(event.id, event.event, event.data, now))

    def next(self, timeout: float = 5.0) -> Event:
        return self.events.get(timeout=timeout)

    def drain_ids(self, until: float) -> list[str]:
        ids: list[str] = []
        while time.monotonic() < until:
            try:
                ev = self.events.get(timeout=max(0.05, until - time.monotonic()))
            except queue.Empty:
                break
            if ev.id:
                ids.append(ev.id)
        return ids


def new_channel(prefix: str = "private") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def stream_factory() -> Iterator[Any]:
    streams: list[Stream] = []

    def make(channel: str, **kwargs: Any) -> Stream:
        s = Stream(channel=channel, **kwargs).start()
        streams.append(s)
        return s

    yield make
    for s in streams:
        s.stop()
