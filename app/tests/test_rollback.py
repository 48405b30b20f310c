"""Issue 12, rollback: a release may go live again only on a database whose
applied migrations it knows (``ssehub migrations_known``, which the role's
``ssehub_rollback`` runs with the release it returns to)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from ssekit_testing.fixtures import base_env


def ssehub(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = base_env(SSEHUB_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "-m", "ssehub.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_release_refuses_a_database_migrated_past_it(tmp_path: Path) -> None:
    migrated = ssehub(tmp_path, "migrate", "--noinput")
    assert migrated.returncode == 0, migrated.stderr
    known = ssehub(tmp_path, "migrations_known")
    assert known.returncode == 0, known.stderr
    assert "applied migrations are known to this release" in known.stdout
    # A later release applied a migration this one does not have.
    with sqlite3.connect(tmp_path / "ssehub.sqlite3") as db:
        db.execute("INSERT INTO django_migrations (app, name, applied) "
                   "VALUES ('ssehub', '9999_from_a_later_release', '2026-12-06')")
    refused = ssehub(tmp_path, "migrations_known")
    assert refused.returncode == 1
    assert "ssehub.9999_from_a_later_release" in refused.stderr
