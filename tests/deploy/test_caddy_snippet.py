"""templates/caddy/Caddyfile.ssehub as an operator includes it: Caddy accepts it, and
what Caddy makes of it keeps the stream route unbuffered and uncompressed (C1-C4).

Debian's Caddy (2.6.2) flushes text/event-stream responses by itself (the stream
tests through Caddy in test_e2e.py, parametrised over the proxy, prove each event
arrives at once), and with an `encode zstd gzip` added to the stream route it
still answered the stream without Content-Encoding when tried. The snippet must
not rely on the latter, so these tests read the configuration Caddy adapts.

No explicit `flush_interval -1`: with it Caddy ignores the client leaving
(caddyserver/caddy#4952) and holds the hub's stream until a heartbeat write
fails; `test_open_streams_gauge_sums_live_streams_across_workers[caddy]` failed
with it (6 streams still open 2 s after their clients closed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssekit_testing.servers import Caddy


def handlers(node: Any) -> list[dict[str, Any]]:
    """Every handler below ``node`` of Caddy's JSON configuration, subroutes included."""
    if isinstance(node, list):
        return [h for item in node for h in handlers(item)]
    if not isinstance(node, dict):
        return []
    found = [node] if "handler" in node else []
    return found + [h for key in ("handle", "routes") for h in handlers(node.get(key, []))]


def test_caddy_validates_the_snippet(tmp_path: Path) -> None:
    checked = Caddy(tmp_path, [8001]).validate()
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_stream_route_flushes_at_once_and_is_never_encoded(tmp_path: Path) -> None:
    config = Caddy(tmp_path, [8001, 8002]).adapt()
    assert config["admin"] == {"disabled": True}
    (server,) = config["apps"]["http"]["servers"].values()
    assert all(address.startswith("127.0.0.1:") for address in server["listen"])
    (site,) = server["routes"]
    routes = [route for subroute in site["handle"] for route in subroute["routes"]]
    # the hub's stream and users' @sse_stream views mounted below it
    stream = [r for r in routes if {"path": ["/events/", "/events/*"]} in r.get("match", [])]
    # (the site's response headers, HSTS and framing, are a route of their own)
    rest = [r for r in routes if "match" not in r
            and [h["handler"] for h in r["handle"]] != ["headers"]]
    assert len(stream) == 1 and len(rest) == 1, routes

    stream_handlers = handlers(stream[0])
    proxies = [h for h in stream_handlers if h["handler"] == "reverse_proxy"]
    assert [h.get("flush_interval") for h in proxies] == [None]
    assert [u["dial"] for u in proxies[0]["upstreams"]] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    # A read timeout of about three of the hub's heartbeats (15 s by default), in
    # nanoseconds: a live stream always sends within it, one on a lost host ends.
    assert 2 * 15 * 10**9 < proxies[0]["transport"]["read_timeout"] <= 60 * 10**9
    assert "encode" not in {h["handler"] for h in stream_handlers}

    # Everything else may be compressed: the snippet encodes that route.
    assert "encode" in {h["handler"] for h in handlers(rest[0])}
