"""Real servers for the tests: Redis, PostgreSQL, nginx, Caddy and the hub under
gunicorn (``ServedHub``).

Each runs from Debian's packages on a free loopback port in a temporary
directory, and is stopped by the PID we started. PostgreSQL refuses to run as
root, so as root it runs as the ``postgres`` user the Debian package creates.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from .roles import REPO, render_with_ansible, role_defaults

TEMPLATES = REPO / "templates"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout: float = 20.0, what: str = "server") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s: {last}")


def port_open(port: int) -> bool:
    with contextlib.closing(socket.socket()) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Redis:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), what="redis")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], check=True,
                              capture_output=True, text=True).stdout.strip()


class DeployedRedis(Redis):
    """Redis with the redis role's own redis.conf and users.acl, rendered by Ansible.

    The ACL (default user off, the app user's rules) and persistence (AOF,
    everysec) are the deployed ones; only what belongs to the host (port, bind,
    dir, log and pid files, systemd supervision) is overridden on the command
    line. A restart of this server is a restart of what the role deploys.
    """

    APP_PASSWORD = "app-password"
    ADMIN_PASSWORD = "admin-password"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.conf = render_redis_role(directory / "etc")
        defaults = role_defaults("redis")
        self.app_user = defaults["redis_app_user"]
        self.admin_user = defaults["redis_admin_user"]
        self.url = f"redis://{self.app_user}:{self.APP_PASSWORD}@127.0.0.1:{self.port}/0"
        self.log = directory / "redis.log"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", str(self.conf), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--logfile", str(self.log), "--supervised", "no",
             "--pidfile", str(self.dir / "redis.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), what="redis")
        # Listening is not loaded: wait until the AOF is replayed.
        wait_for(lambda: self.cli("PING") == "PONG", what="redis (loading)")

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), "--no-auth-warning",
                               "--user", self.admin_user, "--pass", self.ADMIN_PASSWORD, *args],
                              check=True, capture_output=True, text=True).stdout.strip()


def render_redis_role(out: Path) -> Path:
    """Render the redis role's redis.conf and users.acl into ``out`` with Ansible."""
    templates = REPO / "roles/redis/templates/etc/redis"
    variables = {**role_defaults("redis"), "ssekit_private_address": "127.0.0.1",
                 "redis_app_password": DeployedRedis.APP_PASSWORD,
                 "redis_admin_password": DeployedRedis.ADMIN_PASSWORD,
                 "__redis_acl_file": str(out / "users.acl")}
    run = render_with_ansible(out, variables, {name: templates / f"{name}.j2"
                                               for name in ("redis.conf", "users.acl")},
                              mode="0600")
    if run.returncode != 0:
        raise RuntimeError("rendering the redis role failed:\n" + run.stdout[-3000:])
    return out / "redis.conf"


class Postgres:
    def __init__(self, directory: Path) -> None:
        # Not under pytest's 0700 tmp dir: the postgres user must reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="ssehub-pg-")) / "pgdata"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.as_postgres = os.geteuid() == 0
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self.as_postgres else list(args)

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        if self.as_postgres:
            shutil.chown(self.dir.parent, "postgres")
            shutil.chown(self.dir, "postgres")
        subprocess.run(self._cmd(str(PG_BIN / "initdb"), "-D", str(self.dir), "-U", "postgres",
                                 "--auth=trust", "-E", "UTF8", "--no-sync"),
                       check=True, capture_output=True)

    def start(self) -> None:
        self.process = subprocess.Popen(
            self._cmd(str(PG_BIN / "postgres"), "-D", str(self.dir), "-p", str(self.port),
                      "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
                      "-c", "fsync=off", "-c", "max_connections=200"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._ready, what="postgres")

    def _ready(self) -> bool:
        import psycopg

        with psycopg.connect(self.conninfo(), connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True

    def conninfo(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def connections(self, dbname: str) -> int:
        """Sessions open on ``dbname`` now (pg_stat_activity), seen from another one."""
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as admin:
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                (dbname,)).fetchone()
        return int(row[0]) if row else 0

    def stop(self, keep: bool = False) -> None:
        if self.process is not None:
            # SIGINT is postgres' "fast" shutdown; send it to the postmaster itself
            # (runuser does not forward it).
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((self.dir / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
            stop(self.process, signal.SIGTERM)
        if not keep:
            shutil.rmtree(self.dir.parent, ignore_errors=True)


def locations_for_load(directory: Path) -> Path:
    """templates/nginx/ssehub-locations.conf with the per-address limits lifted: a
    load from one loopback address stands in for many clients (the benchmark, the
    reconnect storm)."""
    snippet = (TEMPLATES / "nginx/ssehub-locations.conf").read_text()
    snippet, raised = re.subn(r"limit_conn ssehub_streams \d+;",
                              "limit_conn ssehub_streams 60000;", snippet)
    if raised != 1:  # a silent miss would turn the load into 15-30 s retry streams
        raise RuntimeError("the stream location lost its limit_conn ssehub_streams")
    directory.mkdir(parents=True, exist_ok=True)
    locations = directory / "locations-for-load.conf"
    snippet, lifted = re.subn(r"limit_req zone=ssehub_publish burst=\d+ nodelay;", "", snippet)
    if lifted != 1:
        raise RuntimeError("the publish location lost its limit_req zone=ssehub_publish")
    locations.write_text(snippet)
    return locations


class Nginx:
    """nginx on loopback with the snippets from templates/nginx, as ops include them."""

    def __init__(self, directory: Path, upstreams: list[int | str], *,
                 locations: Path = TEMPLATES / "nginx/ssehub-locations.conf",
                 http_extra: str = "", server_extra: str = "", workers: int = 1,
                 worker_connections: int = 4096, tls: tuple[Path, Path] | None = None,
                 http2: bool = False) -> None:
        self.dir = directory
        self.workers = workers
        self.worker_connections = worker_connections
        self.port = free_port()
        self.upstreams = upstreams
        self.locations = locations
        self.http_extra = http_extra
        self.server_extra = server_extra
        self.tls = tls  # (certificate, key): listen with TLS
        self.http2 = http2
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def config(self) -> str:
        listen = f"127.0.0.1:{self.port}" + (" ssl" if self.tls else "") + (
            " http2" if self.http2 else "")
        tls = (f"ssl_certificate {self.tls[0]};\n        ssl_certificate_key {self.tls[1]};"
               if self.tls else "")
        upstream = (TEMPLATES / "nginx/ssehub-upstream.conf").read_text()
        servers = "".join(f"    server {p if isinstance(p, str) else f'127.0.0.1:{p}'} "
                          "max_fails=1 fail_timeout=5s;\n" for p in self.upstreams)
        upstream = upstream.replace(
            "    server 127.0.0.1:8000 max_fails=1 fail_timeout=5s;\n", servers)
        return f"""
daemon off;
master_process on;
worker_processes {self.workers};
worker_rlimit_nofile {min(20000, 2 * self.worker_connections + 100)};
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections {self.worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    gzip on;
    gzip_types text/event-stream application/json text/plain;
    gzip_min_length 1;
    include {TEMPLATES}/nginx/ssehub-http.conf;
    {upstream}
    {self.http_extra}
    server {{
        listen {listen};
        {tls}
        {self.server_extra}
        include {self.locations};
    }}
}}
"""

    def start(self) -> None:
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        subprocess.run(["nginx", "-t", "-q", "-c", str(conf), "-p", str(self.dir)], check=True)
        self.process = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(self.dir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), what="nginx")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, signal.SIGQUIT)


class Caddy:
    """Caddy on loopback with the site from templates/caddy/Caddyfile.ssehub, adapted as
    its header says (the site address and the upstream addresses), like the caddy role."""

    SNIPPET = TEMPLATES / "caddy/Caddyfile.ssehub"
    SITE = "example.org {"
    UPSTREAM = "reverse_proxy 127.0.0.1:8000"

    def __init__(self, directory: Path, upstreams: list[int]) -> None:
        self.dir = directory
        self.port = free_port()
        self.upstreams = upstreams
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_file = directory / "Caddyfile"
        self.log = directory / "caddy.log"
        # Caddy keeps certificates, locks and autosaved config under HOME/XDG dirs.
        self.env = {**os.environ, "HOME": str(directory),
                    "XDG_DATA_HOME": str(directory / "data"),
                    "XDG_CONFIG_HOME": str(directory / "config")}

    def config(self) -> str:
        site = self.SNIPPET.read_text()
        if site.count(self.SITE) != 1 or site.count(self.UPSTREAM) < 2:
            raise ValueError(f"{self.SNIPPET}: expected one '{self.SITE}' line and "
                             f"'{self.UPSTREAM}' on both routes")
        site = site.replace(self.SITE, f"http://127.0.0.1:{self.port} {{")
        site = site.replace(self.UPSTREAM, "reverse_proxy " + " ".join(
            f"127.0.0.1:{p}" for p in self.upstreams))
        # No admin endpoint (it would listen on the fixed port 2019), loopback only,
        # and a bounded grace period as the caddy role sets (C4).
        return f"{{\n\tadmin off\n\tdefault_bind 127.0.0.1\n\tgrace_period 2s\n}}\n\n{site}"

    def _caddy(self, command: str) -> subprocess.CompletedProcess[str]:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.config())
        return subprocess.run(["caddy", command, "--adapter", "caddyfile",
                               "--config", str(self.config_file)],
                              env=self.env, capture_output=True, text=True, timeout=60)

    def validate(self) -> subprocess.CompletedProcess[str]:
        return self._caddy("validate")

    def adapt(self) -> dict[str, Any]:
        """The JSON configuration Caddy makes of the Caddyfile."""
        adapted = self._caddy("adapt")
        adapted.check_returncode()
        config: dict[str, Any] = json.loads(adapted.stdout)
        return config

    def start(self) -> None:
        checked = self.validate()
        if checked.returncode != 0:
            raise RuntimeError(f"caddy validate failed:\n{checked.stdout}{checked.stderr}")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["caddy", "run", "--adapter", "caddyfile", "--config", str(self.config_file)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, what=f"caddy (log: {self.log})")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"caddy exited: {self.log.read_text()[-2000:]}")
        return port_open(self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


class CaddyOnSocket(Caddy):
    """Caddy on an app host: its upstream is the hub's Unix socket, as the caddy
    role renders it (``unix//path``)."""

    def __init__(self, directory: Path, socket: Path) -> None:
        super().__init__(directory, [0])
        self.socket = socket

    def config(self) -> str:
        return super().config().replace("reverse_proxy 127.0.0.1:0",
                                        f"reverse_proxy unix/{self.socket}")


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for ``host`` (an IP address) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class ServedHub:
    """``ssehub serve`` (gunicorn + uvicorn workers) as users run it (not
    ``ssehub.hub.Hub``, the in-process object a served hub's workers each hold)."""

    def __init__(self, directory: Path, env: dict[str, str], workers: int = 1,
                 unix_socket: bool = False, tcp_too: bool = False) -> None:
        self.dir = directory
        self.port = free_port()
        self.env = {**os.environ, **env}
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / f"hub-{self.port}.log"
        # unix_socket: listen on a Unix socket (a proxy on the same host) instead of TCP,
        # in a directory nginx's unprivileged workers can traverse.
        self.socket: Path | None = None
        # tcp_too: on the Unix socket and on 127.0.0.1:port, as the role's hub does
        # (the proxy's backup path, the deploy's checks).
        self.tcp_too = tcp_too
        if unix_socket:
            socket_dir = Path(tempfile.mkdtemp(prefix="ssehub-sock-"))
            socket_dir.chmod(0o755)
            self.socket = socket_dir / "hub.sock"

    @property
    def bind(self) -> str:
        """Where the hub listens; also the upstream address a proxy gives."""
        return f"unix:{self.socket}" if self.socket else f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ssehub.cli", "serve", "--bind", self.bind,
                 *(["--bind", f"127.0.0.1:{self.port}"] if self.tcp_too else []),
                 "--workers", str(self.workers)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, what=f"hub (log: {self.log})")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"hub exited: {self.log.read_text()[-2000:]}")
        if self.socket is not None and not self.socket.exists():
            return False  # (httpcore leaks the socket of a failed Unix connect)
        transport = httpx.HTTPTransport(uds=str(self.socket)) if self.socket else None
        with httpx.Client(transport=transport) as client:
            return client.get(self.url + "/readyz", timeout=1).status_code == 200

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=30)
        if self.socket is not None:
            shutil.rmtree(self.socket.parent, ignore_errors=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_embedded(home: Path, **extra_env: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``ssehub serve`` with no configuration (embedded mode) and HOME=``home``, as a
    first-time user runs it; returns the process, its URL and its output's file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSEHUB_", "DJANGO_"))}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = home / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "ssehub.cli", "serve", "--bind",
                                   f"127.0.0.1:{port}"], env={**env, "HOME": str(home),
                                                              **extra_env},
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: httpx.get(url + "/healthz", timeout=1).status_code == 200,
                 what="ssehub serve")
    except BaseException:
        stop(server)
        raise
    return server, url, log


@contextlib.contextmanager
def running(server) -> Iterator:  # type: ignore[no-untyped-def]
    server.start()
    try:
        yield server
    finally:
        server.stop()
