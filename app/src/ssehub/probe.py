"""The post-deploy smoke test: one event across the public URL, hop by hop.

Opens a stream through the proxy, publishes a unique event, and waits for it.
On failure it names the first hop that broke, in one readable line: ``dns``,
``tcp``, ``tls``, ``proxy status``, ``content type``, ``buffering``,
``publish``, ``delivery``.

``connect_to`` ("HOST:PORT", like curl's ``--connect-to``) sends the TCP
connection elsewhere while the Host header and TLS SNI stay the URL's: the
check for a proxy behind a load balancer, or before DNS points at it.

Standard library only, on purpose: ``ssehub smoke`` uses it, and so does the
Ansible module ``sse_probe`` (``ansible/playbooks/module_utils/ssehub_probe.py``
is this file), which runs where ssehub is not installed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import secrets
import socket
import ssl
import time
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

FIRST_BYTES_SECONDS = 2.0
BODY_EXCERPT_CHARS = 200
# The comments of the proxy snippets' retry streams (a 200 text/event-stream with
# only ``retry:``, so that browsers reconnect): what each says about the hop.
RETRY_STREAMS = {
    b": ssehub unavailable, retry": "the proxy reached no app server (502/503/504 behind it)",
    b": too many streams from this address": "the proxy's stream limit per address (429 "
                                             "behind it)",
}


def _excerpt(body: bytes) -> str:
    """A response body fit for the one readable line. Error pages end their lines with
    CRLF (nginx's do), and a CR left in the line overwrites it in a terminal."""
    return " ".join(body.decode(errors="replace").split())[:BODY_EXCERPT_CHARS]


@dataclass
class ProbeResult:
    ok: bool
    hop: str | None
    message: str
    latency_ms: float | None = None
    channel: str | None = None
    event_id: str | None = None

    def line(self) -> str:
        if self.ok:
            return self.message
        return f"FAILED at {self.hop}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class HopFailed(Exception):
    def __init__(self, hop: str, message: str) -> None:
        super().__init__(message)
        self.hop = hop
        self.message = message


def mint(secret: str, channel_pattern: str = "smoke.*", ttl: int = 300) -> str:
    """An HS256 token that may publish and subscribe to ``channel_pattern`` (no PyJWT)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"exp": int(time.time()) + ttl,
              "ssehub": {"publish": [channel_pattern], "subscribe": [channel_pattern]}}
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256)
    return f"{header}.{payload}.{b64(signature.digest())}"


def _context(insecure: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _target(parts: urllib.parse.SplitResult, connect_to: str | None) -> tuple[str, int]:
    """Where the TCP connection goes: ``connect_to`` if given, else the URL's host and port."""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not connect_to:
        return parts.hostname or "", port
    host, colon, given = connect_to.rpartition(":")
    if not colon or not given.isdigit():
        return connect_to.strip("[]"), port
    return host.strip("[]"), int(given)


def _check_transport(parts: urllib.parse.SplitResult, timeout: float, insecure: bool,
                     target: tuple[str, int]) -> None:
    host, port = target
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HopFailed("dns", f"cannot resolve {host}: {exc.strerror}") from None
    family, kind, proto, _, address = addresses[0]
    sock = socket.socket(family, kind, proto)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(address)
        except OSError as exc:
            raise HopFailed("tcp", f"cannot connect to {host}:{port}: "
                                   f"{exc.strerror or exc}") from None
        if parts.scheme == "https":
            try:
                _context(insecure).wrap_socket(sock, server_hostname=parts.hostname).close()
            except (ssl.SSLError, OSError) as exc:
                raise HopFailed("tls", f"TLS handshake with {host}:{port} failed: {exc} "
                                       "(--insecure accepts a self-signed certificate)") from None
    finally:
        sock.close()


def _connection(parts: urllib.parse.SplitResult, timeout: float, insecure: bool,
                target: tuple[str, int]) -> http.client.HTTPConnection:
    host = parts.hostname or ""
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(host, parts.port or 443, timeout=timeout,
                                                 context=_context(insecure))
    else:
        connection = http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)
    # Host header and SNI come from host/port above; only the socket goes to target.
    # _create_connection is http.client's hook for exactly this (its tests use it).
    connection._create_connection = (  # type: ignore[attr-defined]
        lambda _address, wait, source=None: socket.create_connection(target, wait, source))
    return connection


def _read_until(response: http.client.HTTPResponse, buffer: bytearray, marker: bytes,
                deadline: float, sock: socket.socket | None) -> bool:
    while marker not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if sock is not None:
            sock.settimeout(remaining)
        try:
            chunk = response.read1(65536)
        except TimeoutError:
            return False
        if not chunk:
            return False
        buffer.extend(chunk)
    return True


def probe(url: str, token: str, *, channel: str | None = None, timeout: float = 5.0,
          insecure: bool = False, publish_token: str | None = None,
          connect_to: str | None = None) -> ProbeResult:
    """Run the smoke test against the hub behind ``url`` (its public base URL)."""
    channel = channel or f"smoke.{secrets.token_hex(6)}"
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    base = parts.path
    marker = f"ssekit-smoke-{secrets.token_hex(8)}"
    stream: http.client.HTTPConnection | None = None
    try:
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise HopFailed("dns", f"not an http(s) URL: {url!r}")
        target = _target(parts, connect_to)
        _check_transport(parts, timeout, insecure, target)
        stream = _connection(parts, timeout, insecure, target)
        query = urllib.parse.urlencode({"channel": channel})
        try:
            stream.request("GET", f"{base}/events/?{query}",
                           headers={"Authorization": f"Bearer {token}",
                                    "Accept": "text/event-stream",
                                    "Accept-Encoding": "gzip, br, zstd"})
            response = stream.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise HopFailed("proxy status", f"no HTTP answer for the stream: {exc}") from None
        if response.status != 200:
            raise HopFailed("proxy status", f"GET {base}/events/ answered {response.status} "
                                            f"{response.reason}: {_excerpt(response.read(300))}")
        content_type = response.getheader("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            raise HopFailed("content type", f"stream answered Content-Type {content_type!r}, "
                                            "not text/event-stream (is /events/ routed to ssehub?)")
        if response.getheader("Content-Encoding"):
            raise HopFailed("buffering", f"stream is compressed "
                                         f"({response.getheader('Content-Encoding')}): "
                                         "compression holds events back; turn it off for "
                                         "text/event-stream")
        sock = stream.sock
        buffer = bytearray()
        if not _read_until(response, buffer, b"\n\n", time.monotonic() + FIRST_BYTES_SECONDS,
                           sock):
            raise HopFailed("buffering", f"headers arrived but no bytes within "
                                         f"{FIRST_BYTES_SECONDS:.0f} s: the proxy buffers the "
                                         "stream (nginx: proxy_buffering off; Caddy flushes "
                                         "text/event-stream unless a CDN or filter sits between)")
        for comment, meaning in RETRY_STREAMS.items():
            if comment in buffer.split(b"\n\n", 1)[0].splitlines():
                raise HopFailed("proxy status", f"GET {base}/events/ answered a retry stream "
                                                f"({comment.decode()!r}): {meaning}")
        sent = time.monotonic()
        event_id = _publish(parts, base, publish_token or token, channel, marker, timeout,
                            insecure, target)
        deadline = sent + timeout
        needle = f"data: {marker}\n".encode()
        if not _read_until(response, buffer, needle, deadline, sock):
            raise HopFailed("delivery", f"event {event_id} was stored but did not arrive on the "
                                        f"stream within {timeout:.0f} s")
        latency = (time.monotonic() - sent) * 1000
        return ProbeResult(True, None, f"ok: event {event_id} crossed {url} in {latency:.0f} ms",
                           latency, channel, event_id)
    except HopFailed as failure:
        return ProbeResult(False, failure.hop, failure.message, None, channel)
    finally:
        if stream is not None:
            stream.close()


def _publish(parts: urllib.parse.SplitResult, base: str, token: str, channel: str,
             marker: str, timeout: float, insecure: bool, target: tuple[str, int]) -> str:
    connection = _connection(parts, timeout, insecure, target)
    try:
        connection.request("POST", f"{base}/publish/",
                           body=json.dumps({"channel": channel, "data": marker}),
                           headers={"Authorization": f"Bearer {token}",
                                    "Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read(2000)
    except (OSError, http.client.HTTPException) as exc:
        raise HopFailed("publish", f"POST {base}/publish/ failed: {exc}") from None
    finally:
        connection.close()
    if response.status != 201:
        raise HopFailed("publish", f"POST {base}/publish/ answered {response.status}: "
                                   f"{_excerpt(body)}")
    try:
        return str(json.loads(body)["id"])
    except (ValueError, KeyError, TypeError):
        raise HopFailed("publish", f"POST {base}/publish/ answered 201 without an id: "
                                   f"{_excerpt(body)}") from None
