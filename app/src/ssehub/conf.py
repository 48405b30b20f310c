"""Settings of the hub, read once from environment variables.

Every tunable is a field of ``Config``, annotated with the type it is parsed to,
with its variable, default and documentation in the field's metadata: the settings
table (docs/settings.md, rendered from ``SETTINGS``; a test keeps it equal), the code
and mypy read the one table and cannot disagree. A bad value stops startup with
a message that names the variable: a hub that silently falls back to a default
on a typo is worse than one that refuses to start.

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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, cast, overload

MIN_SECRET_BYTES = 32


class ConfigError(Exception):
    """A setting has a bad value; the message names the variable."""


@dataclass(frozen=True)
class Setting:
    """One row of the settings table, kept in the metadata of its field of ``Config``."""

    name: str
    default: str | None
    doc: str
    parse: Callable[[str], Any] = str
    secret: bool = False

    @property
    def masked(self) -> bool:
        """Shown as '...' in errors and reprs: a secret, or a URL that may carry a password."""
        return self.secret or self.name.endswith("_URL")


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


def _path(value: str) -> Path:
    return Path(os.path.expanduser(value))


def _binds(value: str) -> tuple[str, ...]:
    """HOST:PORT or unix:/absolute/path, comma-separated."""
    binds = _csv(value)
    if not binds:
        raise ValueError("give HOST:PORT or unix:/path")
    for bind in binds:
        parse_bind(bind)
    return binds


SETTING = "setting"  # the key of a field's Setting in its metadata
_T = TypeVar("_T")


@overload
def _setting(name: str, default: str, doc: str, parse: Callable[[str], _T]) -> _T: ...
@overload
def _setting(name: str, default: None, doc: str, parse: Callable[[str], _T]) -> _T | None: ...
def _setting(name: str, default: str | None, doc: str, parse: Callable[[str], Any]) -> Any:
    """A field of ``Config`` read from the variable ``name``; unset is None without a default.

    Typed as the parser's value so that mypy checks the field's annotation against it;
    at runtime it is a field without a default (only ``load`` makes a Config).
    """
    return field(metadata={SETTING: Setting(name, default, doc, parse)})


def _secret(name: str, doc: str) -> str:
    """A secret: required, or generated into the data dir when embedded; never a default."""
    return cast(str, field(metadata={SETTING: Setting(name, None, doc, str, secret=True)}))


@dataclass(frozen=True, slots=True)
class Config:
    """The parsed settings: one field per variable (its name without the prefix, lowercase).

    The fields are the settings table: each keeps its variable, default, documentation
    and parser in its metadata (``SETTINGS``), and its annotation is the parsed type.
    """

    broker_url: str = _setting(
        "SSEHUB_BROKER_URL", "memory://",
        "Where events are stored and fanned out: `redis://[user:pass@]host:6379/0` "
        "(deployed default), `postgres://user:pass@host/db` (LISTEN/NOTIFY) or `memory://` "
        "(one process, development).", _broker_url)
    database_url: str | None = _setting(
        "SSEHUB_DATABASE_URL", None,
        "Django's database (the chat demo's messages). Default: SQLite in "
        "`SSEHUB_DATA_DIR`.", _database_url)
    token_secret: str = _secret(
        "SSEHUB_TOKEN_SECRET",
        "HS256 secret that signs publisher and subscriber tokens. Required unless embedded.")
    secret_key: str = _secret(
        "SSEHUB_SECRET_KEY",
        "Django's SECRET_KEY. Required unless embedded.")
    public_channels: tuple[str, ...] = _setting(
        "SSEHUB_PUBLIC_CHANNELS", "",
        "Comma-separated shell patterns of channels anyone may subscribe to (`news.*`).",
        _patterns)
    heartbeat: float = _setting(
        "SSEHUB_HEARTBEAT", "15",
        "Seconds between heartbeat comments on every stream; keep it well inside the "
        "proxy's read timeout.", _positive_float)
    retry_ms: int = _setting(
        "SSEHUB_RETRY_MS", "2000",
        "Base of the `retry:` sent to clients; each stream gets a value between this and "
        "twice this, so reconnects after a restart spread out.", _positive_int)
    drain_seconds: float = _setting(
        "SSEHUB_DRAIN_SECONDS", "10",
        "On SIGTERM, open streams are closed within this many seconds.", _positive_float)
    max_event_bytes: int = _setting(
        "SSEHUB_MAX_EVENT_BYTES", "65536",
        "Largest `data` accepted by `POST /publish/` (UTF-8 bytes, counted as framed: each "
        "line break adds the 6 bytes of its `data: `); larger gets 413.",
        _positive_int)
    retention_events: int = _setting(
        "SSEHUB_RETENTION_EVENTS", "1000",
        "Events kept per channel for `Last-Event-ID` replay.", _positive_int)
    retention_seconds: int = _setting(
        "SSEHUB_RETENTION_SECONDS", "86400",
        "Age after which events are no longer replayed.", _positive_int)
    subscriber_buffer: int = _setting(
        "SSEHUB_SUBSCRIBER_BUFFER", "1000",
        "Events queued for one stream before it counts as slow and is disconnected (its "
        "reconnect replays what it missed).", _positive_int)
    write_timeout: float = _setting(
        "SSEHUB_WRITE_TIMEOUT", "30",
        "Seconds a write may wait on a client that reads nothing before its stream is "
        "dropped (checked once a heartbeat); it replays what it missed on reconnect.",
        _positive_float)
    redis_prefix: str = _setting(
        "SSEHUB_REDIS_PREFIX", "ssehub:",
        "Prefix of the hub's Redis keys and pub/sub channels (`redis-cli PUBLISH "
        "ssehub:NAME text` reaches subscribers of NAME).", str)
    pg_listen_url: str | None = _setting(
        "SSEHUB_PG_LISTEN_URL", None,
        "PostgreSQL URL for the LISTEN connection when `SSEHUB_BROKER_URL` goes through "
        "pgbouncer (LISTEN needs a direct session).", _postgres_url)
    allowed_hosts: tuple[str, ...] = _setting(
        "SSEHUB_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]",
        "Django's ALLOWED_HOSTS, comma-separated.", _csv)
    csrf_trusted_origins: tuple[str, ...] = _setting(
        "SSEHUB_CSRF_TRUSTED_ORIGINS", "",
        "Django's CSRF_TRUSTED_ORIGINS (`https://example.org`), for the chat demo's form "
        "behind a TLS proxy.", _csv)
    secure_cookies: bool = _setting(
        "SSEHUB_SECURE_COOKIES", "false",
        "Mark the chat demo's CSRF cookie `Secure` (Django's CSRF_COOKIE_SECURE): on behind "
        "a TLS proxy (the role turns it on); off, the demo works over plain HTTP too.", _bool)
    debug: bool = _setting(
        "SSEHUB_DEBUG", "false", "Django's DEBUG. Never in production.", _bool)
    data_dir: Path = _setting(  # noqa: RUF009 (a dataclasses.Field at runtime, not a default)
        "SSEHUB_DATA_DIR", "~/.local/share/ssehub",
        "Embedded mode's SQLite database and generated secrets.", _path)
    static_root: str | None = _setting(
        "SSEHUB_STATIC_ROOT", None, "Where `ssehub collectstatic` writes static files.", str)
    bind: tuple[str, ...] = _setting(
        "SSEHUB_BIND", "127.0.0.1:8000",
        "Address `ssehub serve` listens on: HOST:PORT, or unix:/path for a proxy on the "
        "same host (cheaper per event than loopback TCP); several, comma-separated, "
        "under gunicorn.", _binds)
    workers: int = _setting(
        "SSEHUB_WORKERS", "0",
        "gunicorn worker processes; 0 means one per CPU core.", _non_negative_int)
    keepalive: int = _setting(
        "SSEHUB_KEEPALIVE", "75",
        "Seconds an idle keep-alive connection stays open; longer than the proxy's "
        "upstream idle timeout (nginx 60 s) so the proxy closes first.", _positive_int)
    metrics_dir: str | None = _setting(
        "SSEHUB_METRICS_DIR", None,
        "Directory for prometheus_client's multiprocess files (one per worker); "
        "`ssehub serve` uses a temporary one when unset.", str)
    demo: bool = _setting(
        "SSEHUB_DEMO", "false",
        "Serve the chat demo (`GET /`, anonymous posts to `/chat/messages/`). Off in "
        "production: anyone can post to it.", _bool)
    demo_posts_per_minute: int = _setting(
        "SSEHUB_DEMO_POSTS_PER_MINUTE", "20",
        "Chat demo posts allowed per client address and minute (bursts of the same "
        "size); more get 429 with `Retry-After`.", _positive_int)
    demo_keep_messages: int = _setting(
        "SSEHUB_DEMO_KEEP_MESSAGES", "200",
        "Chat demo messages kept per room (older ones are deleted), and 50 rooms' worth "
        "in all.", _positive_int)

    @property
    def embedded(self) -> bool:
        return _embedded(self.broker_url)

    def __repr__(self) -> str:
        # Tracebacks and debuggers print it: secrets and URLs (passwords) stay out.
        shown = ", ".join(
            f"{key}={'...' if setting.masked else repr(getattr(self, key))}"
            for key, setting in _FIELDS)
        return f"Config({shown})"


# (field name, its Setting), in the table's order.
_FIELDS: tuple[tuple[str, Setting], ...] = tuple(
    (item.name, item.metadata[SETTING]) for item in fields(Config))
SETTINGS: tuple[Setting, ...] = tuple(setting for _, setting in _FIELDS)


def _embedded(broker_url: str) -> bool:
    return broker_url.startswith("memory:")


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
    for key, setting in _FIELDS:
        raw = env.get(setting.name, setting.default)
        if raw is None:
            values[key] = None
            continue
        try:
            values[key] = setting.parse(raw)
        except ValueError as exc:
            # URLs may carry a password, and logs keep startup errors: show those masked.
            shown = "'...'" if setting.masked else repr(raw)
            raise ConfigError(f"{setting.name}={shown} is invalid: {exc}") from None
    for key, name in [(key, setting.name) for key, setting in _FIELDS if setting.secret]:
        if values[key]:
            # Embedded too: a development hub on a shared machine or a forwarded port
            # is reachable, and a guessable secret mints any token.
            if len(values[key].encode()) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"{name} is too short ({len(values[key].encode())} bytes): use at least "
                    f"{MIN_SECRET_BYTES} random bytes, e.g. python3 -c 'import secrets; "
                    "print(secrets.token_urlsafe(48))'")
            continue
        if not _embedded(values["broker_url"]):
            raise ConfigError(
                f"{name} is required when SSEHUB_BROKER_URL is not memory:// "
                "(generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        values[key] = _generated_secret(values["data_dir"], name)
    return Config(**values)


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

