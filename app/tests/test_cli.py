"""`ssehub serve` with no configuration at all, and the CLI around it."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from ssekit_testing.servers import start_embedded, stop


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSEHUB_", "DJANGO_"))}
    env["HOME"] = str(home)
    return env


def test_serve_with_no_configuration_then_publish_and_listen(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    # heartbeats every second while the listener waits
    server, url, log = start_embedded(tmp_path, SSEHUB_HEARTBEAT="1")
    try:
        printed = log.read_text()
        assert "embedded mode" in printed and "subscribe:" in printed and "publish:" in printed
        assert (tmp_path / ".local/share/ssehub/ssehub.sqlite3").exists()
        secret = tmp_path / ".local/share/ssehub/ssehub_token_secret.secret"
        assert oct(secret.stat().st_mode)[-3:] == "600"
        listener = subprocess.Popen([sys.executable, "-m", "ssehub.cli", "listen", "demo",
                                     "--url", url], env=env, stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        published = subprocess.run(
            [sys.executable, "-m", "ssehub.cli", "publish", "demo", "hello\nworld", "--url", url],
            env=env, capture_output=True, text=True, check=True).stdout.strip()
        assert published.isdigit()
        assert listener.stdout is not None
        line = listener.stdout.readline()
        assert f'"id": "{published}"' in line and '"data": "hello\\nworld"' in line
        time.sleep(2.5)  # two heartbeats: not printed as events (httpx-sse dispatches them)
        second = subprocess.run(
            [sys.executable, "-m", "ssehub.cli", "publish", "demo", "again", "--event", "greet",
             "--url", url], env=env, capture_output=True, text=True, check=True).stdout.strip()
        line = listener.stdout.readline()
        listener.terminate()
        listener.wait(5)
        listener.stdout.close()
        assert line.strip() == f'{{"id": "{second}", "event": "greet", "data": "again"}}', line
        token = subprocess.run([sys.executable, "-m", "ssehub.cli", "token", "--publish", "x.*",
                                "--subscribe", "y.*", "--ttl", "60"], env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", token)
        import base64
        import json
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["ssehub"] == {"publish": ["x.*"], "subscribe": ["y.*"]}
        assert 55 <= claims["exp"] - time.time() <= 60
    finally:
        stop(server)


def test_configuration_errors_name_the_variable(tmp_path: Path) -> None:
    env = {**clean_env(tmp_path), "SSEHUB_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([sys.executable, "-m", "ssehub.cli", "serve"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "SSEHUB_TOKEN_SECRET is required" in result.stderr


def test_django_management_commands_through_the_same_entry_point(tmp_path: Path) -> None:
    env = {**clean_env(tmp_path), "SSEHUB_STATIC_ROOT": str(tmp_path / "static")}
    for command in (["migrate", "-v", "0"], ["collectstatic", "--noinput"],
                    ["showmigrations", "ssehub"]):
        done = subprocess.run([sys.executable, "-m", "ssehub.cli", *command], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    assert "static files copied to '" + str(tmp_path / "static") in subprocess.run(
        [sys.executable, "-m", "ssehub.cli", "collectstatic", "--noinput"], env=env,
        capture_output=True, text=True, timeout=60).stdout
    assert "[X] 0001" in done.stdout  # migrate applied the app's migrations


HOT_PATH = ["uvicorn", "httptools", "uvloop", "gunicorn", "redis", "hiredis", "psycopg", "Django"]


def test_version_names_the_hub_and_the_locked_libraries_of_the_hot_path(tmp_path: Path) -> None:
    """`ssehub --version` on a host says what the release runs; here, what the lock pins."""
    from importlib import metadata

    from test_lock import LOCK, parse_lock

    done = subprocess.run([sys.executable, "-m", "ssehub.cli", "--version"],
                          env=clean_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    first, *rest = done.stdout.splitlines()
    assert first == f"ssehub {metadata.version('ssehub')} (Python {platform.python_version()})"
    printed = dict(line.split(" ", 1) for line in rest)
    assert list(printed) == HOT_PATH
    pins, _ = parse_lock(LOCK.read_text())
    assert printed == {name: str(pins[name.lower()]) for name in HOT_PATH}
