"""``make up-local`` / ``make down-local``: the whole stack on loopback, then a smoke test.

Starts Redis, PostgreSQL, the hub under gunicorn (two uvicorn workers) and
nginx with the snippets from ``templates/nginx``, the same servers the tests
use, in ``.cache/stack``; proves an event crosses nginx; prints the URLs and
ready-to-paste curl lines. ``down`` stops exactly the PIDs ``up`` recorded.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from ssekit_testing.servers import Nginx, Postgres, Redis, ServedHub

ROOT = Path(__file__).resolve().parents[1]

STATE = ROOT / ".cache" / "stack"
PIDS = STATE / "pids.json"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def up() -> None:
    if PIDS.exists():
        sys.exit(f"already up (see {PIDS}); run `make down-local` first")
    STATE.mkdir(parents=True, exist_ok=True)
    env_file = STATE / "ssehub.env"
    env = {
        "SSEHUB_TOKEN_SECRET": secrets.token_urlsafe(48),
        "SSEHUB_SECRET_KEY": secrets.token_urlsafe(48),
        "SSEHUB_HEARTBEAT": "15",
        "SSEHUB_DATA_DIR": str(STATE / "data"),
        "SSEHUB_DEMO": "true",  # the chat demo's URL is printed below; never in production
    }
    pids: dict[str, int] = {}
    try:
        step("starting Redis")
        redis = Redis(STATE)
        redis.start()
        pids["redis"] = redis.process.pid  # type: ignore[union-attr]
        step("starting PostgreSQL")
        pg = Postgres(STATE)
        pg.init()
        pg.start()
        pids["postgres"] = int((pg.dir / "postmaster.pid").read_text().split()[0])
        pids["postgres-runuser"] = pg.process.pid  # type: ignore[union-attr]
        env["SSEHUB_BROKER_URL"] = redis.url
        env["SSEHUB_DATABASE_URL"] = pg.url
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        env_file.chmod(0o600)
        step("migrating the database")
        os.environ.update(env)
        import subprocess

        subprocess.run([sys.executable, "-m", "ssehub.cli", "migrate", "-v", "0"], check=True)
        step("starting the hub (gunicorn, 2 uvicorn workers)")
        hub = ServedHub(STATE, env, workers=2)
        hub.start()
        pids["hub"] = hub.process.pid  # type: ignore[union-attr]
        step("starting nginx with templates/nginx")
        nginx = Nginx(STATE, [hub.port])
        nginx.start()
        pids["nginx"] = nginx.process.pid  # type: ignore[union-attr]
    finally:
        PIDS.write_text(json.dumps(pids))
    step("smoke test: publish through nginx, receive through nginx")
    latency = smoke(nginx.url, env["SSEHUB_TOKEN_SECRET"])
    from ssekit_testing import tokens

    pub = tokens.mint(env["SSEHUB_TOKEN_SECRET"], publish=["*"], ttl=86400)
    sub = tokens.mint(env["SSEHUB_TOKEN_SECRET"], subscribe=["*"], ttl=86400)
    print(f"""
ssekit is up (event crossed nginx in {latency * 1000:.0f} ms).
  chat demo:  {nginx.url}/
  subscribe:  curl -N '{nginx.url}/events/?channel=demo&token={sub}'
  publish:    curl -H 'Authorization: Bearer {pub}' \\
                -d channel=demo -d data=hello {nginx.url}/publish/
  metrics:    curl {nginx.url}/metrics
  settings:   {env_file}
Stop it with: make down-local""")


def smoke(url: str, secret: str) -> float:
    from ssehub import probe

    result = probe.probe(url, probe.mint(secret))
    if not result.ok or result.latency_ms is None:
        sys.exit(f"smoke test {result.line()}")
    return result.latency_ms / 1000


def down() -> None:
    if not PIDS.exists():
        print("nothing is up")
        return
    pids = json.loads(PIDS.read_text())
    for name in ("nginx", "hub", "postgres", "redis"):
        pid = pids.get(name)
        if pid is None:
            continue
        sig = {"nginx": signal.SIGQUIT, "postgres": signal.SIGINT}.get(name, signal.SIGTERM)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        for _ in range(300):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        print(f"stopped {name} (pid {pid})")
    PIDS.unlink()


if __name__ == "__main__":
    {"up": up, "down": down}[sys.argv[1] if len(sys.argv) > 1 else "up"]()
