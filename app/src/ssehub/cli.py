"""The ``ssehub`` command.

``serve``, ``publish``, ``listen`` and ``token`` are ours; any other word is a
Django management command (``ssehub migrate``, ``ssehub collectstatic``).
With no configuration, ``serve`` runs one embedded process (memory broker,
SQLite, secrets generated into ``SSEHUB_DATA_DIR``); with ``SSEHUB_BROKER_URL``
set it runs gunicorn managing uvicorn workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import urllib.parse
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from . import conf, logredact, tokens

OWN_COMMANDS = {"serve", "publish", "listen", "token", "smoke", "settings-table"}
DEFAULT_URL = "http://127.0.0.1:8000"


def _config() -> conf.Config:
    try:
        return conf.get()
    except conf.ConfigError as exc:
        sys.exit(f"ssehub: configuration error: {exc}")


def _django_setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ssehub.settings")
    import django

    django.setup()


def cmd_serve(args: argparse.Namespace) -> None:
    config = _config()
    binds = args.bind or list(config.bind)  # SSEHUB_BIND is checked when it is loaded
    try:
        (host, port), *_ = [conf.parse_bind(bind) for bind in binds]  # every one checked
    except ValueError as exc:
        sys.exit(f"ssehub: --bind: {exc}")
    if config.embedded:
        if len(binds) > 1:
            sys.exit("ssehub: the embedded mode listens on one HOST:PORT; several binds are "
                     "for gunicorn (set SSEHUB_BROKER_URL)")
        if port == 0:
            sys.exit("ssehub: the embedded mode listens on HOST:PORT; a unix: bind is for "
                     "gunicorn behind a proxy on the same host (set SSEHUB_BROKER_URL)")
        _serve_embedded(config, host, port)
    else:
        _serve_gunicorn(config, binds, args.workers)


def _serve_embedded(config: conf.Config, host: str, port: int) -> None:
    import uvicorn
    from django.core.management import call_command

    _django_setup()
    call_command("migrate", verbosity=0, interactive=False)
    url = f"http://{host}:{port}"
    pub = tokens.mint(config.token_secret, publish=["*"], ttl=86400)
    sub = tokens.mint(config.token_secret, subscribe=["*"], ttl=86400)
    demo = f"{url}/" if config.demo else "off (SSEHUB_DEMO=true serves it at /)"
    print(f"""ssehub: embedded mode (memory broker, SQLite in {config.data_dir})
  chat demo:  {demo}
  subscribe:  curl -N '{url}/events/?channel=demo&token={sub}'
  publish:    curl -H 'Authorization: Bearer {pub}' -d channel=demo -d data=hello {url}/publish/
  or:         ssehub listen demo   /   ssehub publish demo hello
Tokens are valid for 24 h; mint more with `ssehub token`. Stop with Ctrl-C.""", flush=True)
    uvicorn.run("ssehub.asgi:application", host=host, port=port, lifespan="on",
                timeout_keep_alive=config.keepalive, server_header=False,
                timeout_graceful_shutdown=int(config.drain_seconds) or 1,
                log_config=logredact.uvicorn_log_config())  # no ?token= in the access log


BACKLOG = 65535


def _serve_gunicorn(config: conf.Config, binds: list[str], workers: int | None) -> None:
    from gunicorn.app.base import BaseApplication

    metrics_dir = config.metrics_dir or tempfile.mkdtemp(prefix="ssehub-metrics-")
    os.makedirs(metrics_dir, exist_ok=True)
    for name in os.listdir(metrics_dir):  # stale files from a previous run skew gauges
        if name.endswith(".db"):
            os.unlink(os.path.join(metrics_dir, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    count = workers or config.workers or os.cpu_count() or 1

    def child_exit(server: Any, worker: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

    options = {
        "bind": binds,
        "workers": count,
        "worker_class": "ssehub.worker.HubWorker",
        "keepalive": config.keepalive,
        # Connections waiting to be accepted, per listening socket (the kernel caps it
        # at net.core.somaxconn, which the common role raises). A reconnect storm
        # (every browser back within the retry window) overflows gunicorn's 2,048,
        # and on a Unix socket an overflow is an immediate error for the proxy.
        "backlog": BACKLOG,
        # SIGTERM: the hub drains within SSEHUB_DRAIN_SECONDS; gunicorn kills after this.
        "graceful_timeout": int(config.drain_seconds) + 5,
        "timeout": 30,
        "child_exit": child_exit,
        "accesslog": None,
        "errorlog": "-",
        "proc_name": "ssehub",
    }

    class HubApplication(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)
            # gunicorn 27 opens a control socket in $HOME/.gunicorn by default: one
            # path shared by every hub of a user, and a write outside the unit's
            # ReadWritePaths. Nothing here uses it.
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            from .asgi import application

            return application

    print(f"ssehub: gunicorn with {count} uvicorn worker(s) on {', '.join(binds)}",
          flush=True)
    HubApplication().run()


def _token(config: conf.Config, args: argparse.Namespace, publish: list[str],
           subscribe: list[str]) -> str:
    if getattr(args, "token", None):
        return str(args.token)
    return tokens.mint(config.token_secret, publish=publish, subscribe=subscribe, ttl=300)


def cmd_publish(args: argparse.Namespace) -> None:
    config = _config()
    token = _token(config, args, [args.channel], [])
    body: dict[str, Any] = {"channel": args.channel, "data": args.data}
    if args.event:
        body["event"] = args.event
    import httpx

    try:
        response = httpx.post(args.url.rstrip("/") + "/publish/", json=body, timeout=10,
                              headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        sys.exit(f"ssehub publish: cannot reach {args.url}: {exc}")
    if response.status_code != 201:
        sys.exit(f"ssehub publish: HTTP {response.status_code}: {response.text}")
    print(response.json()["id"])


def cmd_listen(args: argparse.Namespace) -> None:
    import httpx
    from httpx_sse import connect_sse

    config = _config()
    token = _token(config, args, [], list(args.channels))
    query = urllib.parse.urlencode([("channel", c) for c in args.channels])
    try:
        with httpx.Client(timeout=httpx.Timeout(10, read=None)) as client, connect_sse(
                client, "GET", f"{args.url.rstrip('/')}/events/?{query}",
                headers={"Authorization": f"Bearer {token}"}) as source:
            if source.response.status_code != 200:
                source.response.read()
                sys.exit(f"ssehub listen: HTTP {source.response.status_code}: "
                         f"{source.response.text}")
            last_id = None
            for event in source.iter_sse():
                # httpx-sse dispatches at every blank line and keeps the last id, so the
                # preamble (retry:, and a bare id: to start from) and each heartbeat
                # comment look like empty events: every real event has data or a new
                # id, and none has retry: (browsers dispatch none of these).
                if event.retry is not None and not event.data:
                    last_id = event.id or last_id
                    continue
                if not event.data and (not event.id or event.id == last_id):
                    continue
                last_id = event.id
                print(json.dumps({"id": event.id, "event": event.event, "data": event.data},
                                 ensure_ascii=False), flush=True)
    except httpx.HTTPError as exc:
        sys.exit(f"ssehub listen: {exc}")
    except KeyboardInterrupt:
        pass


def cmd_token(args: argparse.Namespace) -> None:
    config = _config()
    if not args.publish and not args.subscribe:
        sys.exit("ssehub token: give at least one --publish or --subscribe pattern")
    print(tokens.mint(config.token_secret, publish=args.publish, subscribe=args.subscribe,
                      ttl=args.ttl))


def cmd_smoke(args: argparse.Namespace) -> None:
    from .probe import probe

    token = args.token
    if not token:
        token = tokens.mint(_config().token_secret, publish=["smoke.*"], subscribe=["smoke.*"],
                            ttl=300)
    result = probe(args.url, token, channel=args.channel, timeout=args.timeout,
                   insecure=args.insecure, connect_to=args.connect_to)
    print(json.dumps(result.as_dict()) if args.json else result.line(), flush=True)
    sys.exit(0 if result.ok else 1)


def cmd_settings_table(args: argparse.Namespace) -> None:
    print(conf.settings_table())


# What a stream's bytes go through, in the order of the path: the server and its
# parser and loop, the process manager, the brokers' clients, the framework.
# Their versions come from the release's lock (app/requirements.lock); an upgrade
# of one of them can change the hub's figures, so `ssehub --version` names them.
HOT_PATH_LIBRARIES = ("uvicorn", "httptools", "uvloop", "gunicorn", "redis", "hiredis",
                      "psycopg", "Django")


def version_text() -> str:
    """The hub's version and Python's, then one ``name version`` line per hot-path library."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"ssehub {version('ssehub')} (Python {platform.python_version()})"]
    return "\n".join(lines + [f"{name} {version(name)}" for name in HOT_PATH_LIBRARIES])


class _VersionAction(argparse.Action):
    """argparse's own version action reflows the text into one paragraph."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of the hub and its hot path's libraries")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssehub", description="Durable Server-Sent Events for Django. Other commands "
        "(migrate, collectstatic, ...) are Django's.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the hub")
    serve.add_argument("--bind", action="append",
                       help="HOST:PORT or unix:/path; repeat to listen on several (default "
                       "SSEHUB_BIND, 127.0.0.1:8000)")
    serve.add_argument("--workers", type=int, help="gunicorn workers (default SSEHUB_WORKERS)")
    serve.set_defaults(func=cmd_serve)

    pub = sub.add_parser("publish", help="publish one event over HTTP")
    pub.add_argument("channel")
    pub.add_argument("data")
    pub.add_argument("--event")
    pub.add_argument("--url", default=DEFAULT_URL)
    pub.add_argument("--token", help="publisher token (default: minted with the secret)")
    pub.set_defaults(func=cmd_publish)

    listen = sub.add_parser("listen", help="print events as they arrive, one JSON per line")
    listen.add_argument("channels", nargs="+")
    listen.add_argument("--url", default=DEFAULT_URL)
    listen.add_argument("--token", help="subscriber token (default: minted with the secret)")
    listen.set_defaults(func=cmd_listen)

    token = sub.add_parser("token", help="mint a token with SSEHUB_TOKEN_SECRET")
    token.add_argument("--publish", action="append", default=[], metavar="PATTERN")
    token.add_argument("--subscribe", action="append", default=[], metavar="PATTERN")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS")
    token.set_defaults(func=cmd_token)

    smoke = sub.add_parser("smoke", help="publish one event through URL and wait for it")
    smoke.add_argument("url", help="the public base URL, e.g. https://sse.example.org")
    smoke.add_argument("--token", help="a token that may publish and subscribe to the channel "
                       "(default: minted with SSEHUB_TOKEN_SECRET for smoke.*)")
    smoke.add_argument("--channel", help="default: smoke.<random>")
    smoke.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    smoke.add_argument("--insecure", action="store_true", help="accept any TLS certificate")
    smoke.add_argument("--connect-to", metavar="HOST[:PORT]",
                       help="connect there instead of the URL's host; Host and TLS name stay "
                            "the URL's (a proxy behind a load balancer, or before DNS)")
    smoke.add_argument("--json", action="store_true", help="print the result as JSON")
    smoke.set_defaults(func=cmd_smoke)

    table = sub.add_parser("settings-table", help="print the settings table (Markdown)")
    table.set_defaults(func=cmd_settings_table)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in OWN_COMMANDS and not argv[0].startswith("-"):
        _config()
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ssehub.settings")
        from django.core.management import execute_from_command_line

        execute_from_command_line(["ssehub", *argv])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()



