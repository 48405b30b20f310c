"""The claims of the README and of docs/ that a test can keep true."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import subprocess
import types
import typing
from pathlib import Path

import pytest

from ssehub import cli, conf

ROOT = Path(__file__).resolve().parents[2]
# The README and the pages it maps (docs/): the claims tests keep true are in both.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = "\n".join(page.read_text() for page in PAGES)
SETTINGS_PAGE = (ROOT / "docs" / "settings.md").read_text()


def test_settings_table_is_the_generated_one() -> None:
    block = SETTINGS_PAGE.split("<!-- settings-table -->\n", 1)[1].split(
        "<!-- /settings-table -->", 1)[0]
    assert block.strip() == conf.settings_table().strip()


def test_every_test_the_readme_names_exists() -> None:
    """The README points at tests by name (``test_g4_*`` for a family)."""
    defined: set[str] = set()
    for path in [*(ROOT / "app" / "tests").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        defined |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    named = set(re.findall(r"`(test_[a-z0-9_*]+)`", README))
    assert named, "the README names no tests"
    assert not [n for n in named if not fnmatch.filter(defined, n)], \
        sorted(n for n in named if not fnmatch.filter(defined, n))


def test_every_ssehub_command_in_the_readme_exists() -> None:
    parser = cli.build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    options = set(parser._option_string_actions)  # ssehub --version
    mentioned = set(re.findall(r"`ssehub ([a-z_-]+)", README))
    django = {"migrate", "collectstatic", "migrations_known"}  # management commands
    assert mentioned - django <= subcommands | options, mentioned - django - subcommands - options


def test_every_make_target_the_readme_names_exists() -> None:
    """`make lock`, `make up`, ...: in the text and at the start of a line in its blocks."""
    named = set(re.findall(r"(?:`|^)(?:[A-Z_]+=\S+ )*make ([a-z][\w-]*)", README, re.M))
    database = subprocess.run(["make", "-pq", "help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60).stdout
    targets = set(re.findall(r"^([a-z][\w-]*):", database, re.M))
    assert "lock" in named and named <= targets, sorted(named - targets)


def test_a_bad_setting_names_the_variable() -> None:
    with pytest.raises(conf.ConfigError, match="SSEHUB_HEARTBEAT"):
        conf.load({"SSEHUB_HEARTBEAT": "soon"})
    with pytest.raises(conf.ConfigError, match="SSEHUB_TOKEN_SECRET is required"):
        conf.load({"SSEHUB_BROKER_URL": "redis://127.0.0.1/0", "SSEHUB_SECRET_KEY": "x" * 40})
    with pytest.raises(conf.ConfigError, match="SSEHUB_BROKER_URL"):
        conf.load({"SSEHUB_BROKER_URL": "mysql://x"})
    for name, value in [("SSEHUB_HEARTBEAT", "nan"), ("SSEHUB_DRAIN_SECONDS", "inf"),
                        ("SSEHUB_PUBLIC_CHANNELS", "news.*, bad name"),
                        ("SSEHUB_BIND", "localhost"), ("SSEHUB_BIND", "unix:hub.sock"),
                        ("SSEHUB_BIND", "127.0.0.1:8000,:99999"), ("SSEHUB_BIND", " , "),
                        ("SSEHUB_PG_LISTEN_URL", "redis://db/0"),
                        ("SSEHUB_PG_LISTEN_URL", "postgres://db:port/x"),
                        ("SSEHUB_BROKER_URL", "redis://host:port/0"),
                        ("SSEHUB_BROKER_URL", "postgres://db/x?sslmode")]:
        with pytest.raises(conf.ConfigError, match=name):
            conf.load({name: value})
    # A bad URL is named without echoing it: it may carry a password.
    with pytest.raises(conf.ConfigError, match="SSEHUB_DATABASE_URL") as bad:
        conf.load({"SSEHUB_DATABASE_URL": "postgress://app:s3cret@db/app"})
    assert "s3cret" not in str(bad.value)
    good = conf.load({"SSEHUB_BIND": "unix:/run/s/hub.sock, 127.0.0.1:8000",
                      "SSEHUB_PG_LISTEN_URL": "postgres://u:p@db:5432/x"})
    assert good.bind == ("unix:/run/s/hub.sock", "127.0.0.1:8000")


def _is_a(value: object, hint: typing.Any) -> bool:
    """isinstance for a field's annotation: a class, ``X | None`` or ``tuple[X, ...]``."""
    if isinstance(hint, types.UnionType):
        return any(_is_a(value, arm) for arm in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_is_a(v, typing.get_args(hint)[0]) for v in value)
    return isinstance(value, hint)


def test_each_setting_is_a_field_of_config_typed_as_it_parses(tmp_path: Path) -> None:
    """The table is Config's fields: a row's variable is its field's name, a value parsed
    from a row has its field's type (mypy sees the annotations), and Config is frozen."""
    fields = dataclasses.fields(conf.Config)
    assert [field.metadata[conf.SETTING] for field in fields] == list(conf.SETTINGS)
    assert [setting.name for setting in conf.SETTINGS] == [
        f"SSEHUB_{field.name.upper()}" for field in fields]
    hints = typing.get_type_hints(conf.Config)
    unset = {"SSEHUB_DATABASE_URL": "postgres://u:p@db/x", "SSEHUB_PG_LISTEN_URL": "postgres://db/x",
             "SSEHUB_STATIC_ROOT": "/srv/static", "SSEHUB_METRICS_DIR": "/run/metrics"}
    assert {s.name for s in conf.SETTINGS if s.default is None and not s.secret} == set(unset)
    for environ in ({}, {**unset, "SSEHUB_PUBLIC_CHANNELS": "news.*"}):
        config = conf.load({**environ, "SSEHUB_DATA_DIR": str(tmp_path)})
        for field in fields:
            value = getattr(config, field.name)
            assert _is_a(value, hints[field.name]), (field.name, value, hints[field.name])
    assert config.database_url == unset["SSEHUB_DATABASE_URL"] and config.data_dir == tmp_path
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.heartbeat = 1.0  # type: ignore[misc]
    # Its repr (tracebacks, debuggers) shows no secret and no URL's password.
    assert "database_url=..." in repr(config) and "heartbeat=15.0" in repr(config)
    for secret in (config.token_secret, config.secret_key, "u:p@"):
        assert secret not in repr(config)
    # A name that is no field fails too (a TypeError on 3.11: the frozen __setattr__ names
    # the class that slots=True replaced).
    with pytest.raises((dataclasses.FrozenInstanceError, TypeError)):
        config.heartbeet = 1.0  # type: ignore[attr-defined]


def test_grafana_dashboard_charts_every_metric() -> None:
    import json

    from ssehub import metrics

    dashboard = json.loads((Path(metrics.__file__).parent / "grafana/dashboard.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (metrics.OPEN_STREAMS, metrics.PUBLISHED, metrics.DELIVERED, metrics.DROPPED,
                   metrics.BROKER_LAG):
        assert metric._name in queries, metric._name  # type: ignore[attr-defined]


def test_the_wheel_builds_with_its_templates_migrations_and_dashboard(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    app = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                    str(app)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("ssehub-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("ssehub/py.typed", "ssehub/templates/ssehub/chat.html",
                   "ssehub/migrations/0001_initial.py", "ssehub/grafana/dashboard.json"):
        assert needed in names
