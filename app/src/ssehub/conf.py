"""Settings of the hub, read once from environment variables.

Every tunable lives here, with its default and its documentation, so the
settings table (docs/settings.md) and the code cannot disagree (a test renders the table
from ``SETTINGS``). A bad value stops startup with a message that names the
variable: a hub that silently falls back to a default on a typo is worse than
one that refuses to start.

Embedded mode: when ``SSEHUB_BROKER_URL`` is unset or ``memory://``, the hub is
a single process for development. Missing secrets are then generated once into
``SSEHUB_DATA_DIR`` (mode 0600) instead of being required; nothing secret ever
has a default in the code.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_SECRET_BYTES = 32


class ConfigError(Exception):
    """A setting has a bad value; the message names the variable."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    doc: str
    parse: Callable[[str], Any] = str
    secret: bool = False


def _positive_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a positive number")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be zero or a positive integer")
    return number


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be true or false")


def _database_url(value: str) -> str:
    import dj_database_url

    try:
        dj_database_url.parse(value)
    except Exception as exc:  # it raises several kinds for a bad URL
        raise ValueError(f"not a database URL ({exc}); e.g. "
                         "postgres://USER:PASSWORD@HOST:5432/NAME") from None
    return value


def _patterns(value: str) -> tuple[str, ...]:
    from .channels import validate_pattern  # InvalidChannel is a ValueError

    return tuple(validate_pattern(pattern) for pattern in _csv(value))


def postgres_conninfo(url: str) -> str:
    """A postgres:// URL as libpq spells it (postgresql://)."""
    return "postgresql://" + url.split("://", 1)[1] if url.startswith("postgres://") else url


def _postgres_url(value: str) -> str:
    import psycopg

    if not value.startswith(("postgres://", "postgresql://")):
        raise ValueError("must start with postgres:// (e.g. postgres://USER:PASSWORD@HOST/DB)")
    try:
        params = psycopg.conninfo.conninfo_to_dict(postgres_conninfo(value))
    except psycopg.Error as exc:
        raise ValueError(f"not a PostgreSQL URL ({exc})") from None
    if not all(port.isdigit() for port in str(params.get("port", "5432")).split(",")):
        raise ValueError("the port is not a number")
    return value


def _broker_url(value: str) -> str:
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in {"memory", "redis", "rediss", "postgres", "postgresql", "unix"}:
        raise ValueError("must start with memory://, redis://, rediss:// or postgres://")
    if scheme.startswith("postgres"):
        return _postgres_url(value)
    if scheme != "memory":
        from redis.connection import parse_url

        try:
            parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({exc}); e.g. redis://HOST:6379/0") from None
    return value


def parse_bind(value: str) -> tuple[str, int]:
    """HOST:PORT, or ``unix:/absolute/path`` (returned as that string and port 0)."""
    if value.startswith("unix:"):
        if not value[5:].startswith("/"):
            raise ValueError(f"a unix: bind needs an absolute path, not {value!r}")
        return value, 0
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a bind is HOST:PORT or unix:/path, not {value!r}")
    return host.strip("[]"), int(port)


def _binds(value: str) -> tuple[str, ...]:
    """HOST:PORT or unix:/absolute/path, comma-separated."""
    binds = _csv(value)
    if not binds:
        raise ValueError("give HOST:PORT or unix:/path")
    for bind in binds:
        parse_bind(bind)
    return binds


SETTINGS: tuple[Setting, ...] = (
    Setting("SSEHUB_BROKER_URL", "memory://",
            "Where events are stored and fanned out: `redis://[user:pass@]host:6379/0` "
            "(deployed default), `postgres://user:pass@host/db` (LISTEN/NOTIFY) or `memory://` "
            "(one process, development).", _broker_url),
    Setting("SSEHUB_DATABASE_URL", None,
            "Django's database (the chat demo's messages). Default: SQLite in "
            "`SSEHUB_DATA_DIR`.", _database_url),
    Setting("SSEHUB_TOKEN_SECRET", None,
            "HS256 secret that signs publisher and subscriber tokens. Required unless embedded.",
            str, secret=True),
    Setting("SSEHUB_SECRET_KEY", None,
            "Django's SECRET_KEY. Required unless embedded.", str, secret=True),
    Setting("SSEHUB_PUBLIC_CHANNELS", "",
            "Comma-separated shell patterns of channels anyone may subscribe to (`news.*`).",
            _patterns),
    Setting("SSEHUB_HEARTBEAT", "15",
            "Seconds between heartbeat comments on every stream; keep it well inside the "
            "proxy's read timeout.", _positive_float),
    Setting("SSEHUB_RETRY_MS", "2000",
            "Base of the `retry:` sent to clients; each stream gets a value between this and "
            "twice this, so reconnects after a restart spread out.", _positive_int),
    Setting("SSEHUB_DRAIN_SECONDS", "10",
            "On SIGTERM, open streams are closed within this many seconds.", _positive_float),
    Setting("SSEHUB_MAX_EVENT_BYTES", "65536",
            "Largest `data` accepted by `POST /publish/` (UTF-8 bytes, counted as framed: each "
            "line break adds the 6 bytes of its `data: `); larger gets 413.",
            _positive_int),
    Setting("SSEHUB_RETENTION_EVENTS", "1000",
            "Events kept per channel for `Last-Event-ID` replay.", _positive_int),
    Setting("SSEHUB_RETENTION_SECONDS", "86400",
            "Age after which events are no longer replayed.", _positive_int),
    Setting("SSEHUB_SUBSCRIBER_BUFFER", "1000",
            "Events queued for one stream before it counts as slow and is disconnected (its "
            "reconnect replays what it missed).", _positive_int),
    Setting("SSEHUB_WRITE_TIMEOUT", "30",
            "Seconds a write may wait on a client that reads nothing before its stream is "
            "dropped (checked once a heartbeat); it replays what it missed on reconnect.",
            _positive_float),
    Setting("SSEHUB_REDIS_PREFIX", "ssehub:",
            "Prefix of the hub's Redis keys and pub/sub channels (`redis-cli PUBLISH "
            "ssehub:NAME text` reaches subscribers of NAME).", str),
    Setting("SSEHUB_PG_LISTEN_URL", None,
            "PostgreSQL URL for the LISTEN connection when `SSEHUB_BROKER_URL` goes through "
            "pgbouncer (LISTEN needs a direct session).", _postgres_url),
    Setting("SSEHUB_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]",
            "Django's ALLOWED_HOSTS, comma-separated.", _csv),
    Setting("SSEHUB_CSRF_TRUSTED_ORIGINS", "",
            "Django's CSRF_TRUSTED_ORIGINS (`https://example.org`), for the chat demo's form "
            "behind a TLS proxy.", _csv),
    Setting("SSEHUB_SECURE_COOKIES", "false",
            "Mark the chat demo's CSRF cookie `Secure` (Django's CSRF_COOKIE_SECURE): on behind "
            "a TLS proxy (the role turns it on); off, the demo works over plain HTTP too.", _bool),
    Setting("SSEHUB_DEBUG", "false", "Django's DEBUG. Never in production.", _bool),
    Setting("SSEHUB_DATA_DIR", "~/.local/share/ssehub",
            "Embedded mode's SQLite database and generated secrets.", str),
    Setting("SSEHUB_STATIC_ROOT", None, "Where `ssehub collectstatic` writes static files.", str),
    Setting("SSEHUB_BIND", "127.0.0.1:8000",
            "Address `ssehub serve` listens on: HOST:PORT, or unix:/path for a proxy on the "
            "same host (cheaper per event than loopback TCP); several, comma-separated, "
            "under gunicorn.", _binds),
    Setting("SSEHUB_WORKERS", "0",
            "gunicorn worker processes; 0 means one per CPU core.", _non_negative_int),
    Setting("SSEHUB_KEEPALIVE", "75",
            "Seconds an idle keep-alive connection stays open; longer than the proxy's "
            "upstream idle timeout (nginx 60 s) so the proxy closes first.", _positive_int),
    Setting("SSEHUB_METRICS_DIR", None,
            "Directory for prometheus_client's multiprocess files (one per worker); "
            "`ssehub serve` uses a temporary one when unset.", str),
    Setting("SSEHUB_DEMO", "false",
            "Serve the chat demo (`GET /`, anonymous posts to `/chat/messages/`). Off in "
            "production: anyone can post to it.", _bool),
    Setting("SSEHUB_DEMO_POSTS_PER_MINUTE", "20",
            "Chat demo posts allowed per client address and minute (bursts of the same "
            "size); more get 429 with `Retry-After`.", _positive_int),
    Setting("SSEHUB_DEMO_KEEP_MESSAGES", "200",
            "Chat demo messages kept per room (older ones are deleted), and 50 rooms' worth "
            "in all.", _positive_int),
)

@dataclass(frozen=True)
class Config:
    """Parsed settings; attribute names are the variable names without the prefix."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, item: str) -> Any:
        try:
            return self.values[item]
        except KeyError:
            raise AttributeError(item) from None

    @property
    def embedded(self) -> bool:
        return bool(str(self.values["broker_url"]).startswith("memory:"))

    @property
    def data_dir(self) -> Path:
        return Path(os.path.expanduser(self.values["data_dir_raw"]))


def _generated_secret(data_dir: Path, name: str) -> str:
    """Return a secret kept in the data dir, creating it once (embedded mode only)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / f"{name.lower()}.secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value)
        return value


def load(environ: Mapping[str, str] | None = None) -> Config:
    """Parse every setting from ``environ``; raise ConfigError naming the bad variable."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = env.get(setting.name, setting.default)
        key = setting.name.removeprefix("SSEHUB_").lower()
        if raw is None:
            values[key] = None
            continue
        try:
            values[key] = setting.parse(raw)
        except ValueError as exc:
            # URLs may carry a password, and logs keep startup errors: show those masked.
            shown = "'...'" if setting.secret or setting.name.endswith("_URL") else repr(raw)
            raise ConfigError(f"{setting.name}={shown} is invalid: {exc}") from None
    values["data_dir_raw"] = values.pop("data_dir")
    config = Config(values)
    for name in ("SSEHUB_TOKEN_SECRET", "SSEHUB_SECRET_KEY"):
        key = name.removeprefix("SSEHUB_").lower()
        if values[key]:
            # Embedded too: a development hub on a shared machine or a forwarded port
            # is reachable, and a guessable secret mints any token.
            if len(values[key].encode()) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"{name} is too short ({len(values[key].encode())} bytes): use at least "
                    f"{MIN_SECRET_BYTES} random bytes, e.g. python3 -c 'import secrets; "
                    "print(secrets.token_urlsafe(48))'")
            continue
        if not config.embedded:
            raise ConfigError(
                f"{name} is required when SSEHUB_BROKER_URL is not memory:// "
                "(generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        values[key] = _generated_secret(config.data_dir, name)
    return config


_current: Config | None = None


def get() -> Config:
    """The process-wide configuration, loaded on first use."""
    global _current
    if _current is None:
        _current = load()
    return _current


def reset() -> None:
    """Forget the loaded configuration (tests change the environment)."""
    global _current
    _current = None


def settings_table() -> str:
    """The settings table of docs/settings.md, generated from SETTINGS."""
    rows = ["| variable | default | what it does |", "| --- | --- | --- |"]
    for setting in SETTINGS:
        default = "(required)" if setting.secret else (
            f"`{setting.default}`" if setting.default else "(unset)")
        rows.append(f"| `{setting.name}` | {default} | {setting.doc} |")
    return "\n".join(rows)

