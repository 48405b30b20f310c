"""The lock (app/requirements.lock) against app/pyproject.toml, the venv and the Makefile.

A release is the commit plus its lock: the ssehub role builds the wheelhouse
from the lock alone (``pip download --require-hashes``), so a lock that misses
a dependency, or pins a version the package's ranges exclude, breaks a deploy
or ships what the tests never ran. Markers are evaluated for the deploy
target (the Makefile's LOCK_PYTHON_VERSION, Debian 12's 3.11.2), not for this
interpreter: redis needs async-timeout there and not on 3.11.3+.

The closure of the dependencies is read from the installed distributions'
metadata, which is the lock's own versions once the venv is built from it
(``test_the_tests_run_against_the_locked_versions`` checks that).
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "app" / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "app" / "pyproject.toml").read_text())
MAKEFILE = (ROOT / "Makefile").read_text()

# One requirement of the lock: "name==version \" then its "--hash=..." lines.
ENTRY = re.compile(r"^(?P<req>[A-Za-z0-9][^ \\\n]*)(?P<rest>(?:[ \t]*\\\n[ \t]*--hash=\S+)*)", re.M)


def target_environment() -> dict[str, str]:
    """Marker values of the deploy target the Makefile locks for."""
    found = re.search(r"^LOCK_PYTHON_VERSION := (\S+)$", MAKEFILE, re.M)
    assert found, "the Makefile names no LOCK_PYTHON_VERSION"
    version = found.group(1)
    env = default_environment()
    env.update(python_full_version=version, python_version=".".join(version.split(".")[:2]),
               implementation_name="cpython", implementation_version=version,
               platform_python_implementation="CPython", sys_platform="linux",
               platform_system="Linux", os_name="posix", platform_machine="x86_64")
    return env


def parse_lock(text: str) -> tuple[dict[str, Version], list[str]]:
    """The pins (canonical name -> version) and what is wrong with the file's form."""
    pins: dict[str, Version] = {}
    problems = []
    for m in ENTRY.finditer(text):
        req = Requirement(m.group("req"))
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            problems.append(f"{req}: not pinned with ==")
            continue
        if "--hash=sha256:" not in m.group("rest"):
            problems.append(f"{req}: no hash")
        pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins, problems


Requires = Callable[[str, Version], list[str] | None]


def installed_requires(name: str, version: Version) -> list[str] | None:
    """Requires-Dist of the installed distribution, None when it is not this version."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    if Version(dist.version) != version:
        return None
    return dist.requires or []


def lock_problems(text: str, pyproject: dict[str, object], env: dict[str, str],
                  requires: Requires = installed_requires) -> list[str]:
    """Everything that keeps the lock from installing app/pyproject.toml on the target."""
    pins, problems = parse_lock(text)
    project = pyproject["project"]
    build = pyproject["build-system"]
    assert isinstance(project, dict) and isinstance(build, dict)
    todo = [(Requirement(r), "app/pyproject.toml")
            for r in [*project["dependencies"], *build["requires"]]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, wanted_by = todo.pop()
        extras_asked = ("", *sorted(_extras(wanted_by)))
        if req.marker is not None and not any(
                req.marker.evaluate({**env, "extra": e}) for e in extras_asked):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} (wanted by {wanted_by}) is not in the lock")
            continue
        if not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} is outside {req} (wanted by {wanted_by})")
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        reqs = requires(name, pins[name])
        if reqs is None:
            problems.append(f"{name}=={pins[name]}: its metadata is not installed at that version "
                            "(build the venv from the lock: make venv)")
            continue
        extras = ",".join(sorted(req.extras))
        todo += [(Requirement(r), f"{name}[{extras}]" if extras else name) for r in reqs]
    return problems


def _extras(wanted_by: str) -> set[str]:
    """The extras a requirement's parent was asked for: "uvicorn[standard]" -> {"standard"}."""
    found = re.search(r"\[(.*)\]$", wanted_by)
    return set(found.group(1).split(",")) if found else set()


def test_the_lock_satisfies_pyproject_and_holds_what_the_target_needs() -> None:
    problems = lock_problems(LOCK.read_text(), PYPROJECT, target_environment())
    assert not problems, "\n".join([*problems, "(update it: make lock)"])


def test_a_lock_that_misses_a_dependency_or_leaves_a_range_is_refused() -> None:
    """The check itself: each way a lock goes wrong is named."""
    text = LOCK.read_text()
    env = target_environment()
    without = re.sub(r"^async-timeout==.*?(?=^\S)", "", text, flags=re.M | re.S)
    assert any("async-timeout" in p and "redis" in p
               for p in lock_problems(without, PYPROJECT, env))
    old_django = re.sub(r"^django==\S+", "django==5.1.4", text, flags=re.M)
    assert any(p.startswith("django==5.1.4 is outside") for p in lock_problems(
        old_django, PYPROJECT, env, requires=lambda name, version: []))
    no_hash = re.sub(r"^(uvloop==\S+) \\\n(\s+--hash=\S+ \\\n)*\s+--hash=\S+", r"\1",
                     text, flags=re.M)
    assert any(p.startswith("uvloop==") and "no hash" in p
               for p in lock_problems(no_hash, PYPROJECT, env))
    # uvicorn[standard]'s own extras are followed: httptools and uvloop come from there.
    assert any("uvloop" in p and "uvicorn[standard]" in p for p in lock_problems(
        re.sub(r"^uvloop==.*?(?=^\S)", "", text, flags=re.M | re.S), PYPROJECT, env))


def test_the_tests_run_against_the_locked_versions() -> None:
    pins, _ = parse_lock(LOCK.read_text())
    moved = {}
    for name, version in pins.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            moved[name] = f"locked {version}, installed {installed}"
    assert not moved, f"the venv is not the lock's (make venv): {moved}"


def test_a_changed_lock_rebuilds_the_venv_from_it() -> None:
    """make venv depends on the lock and installs it with its hashes, the app without deps."""
    out = subprocess.run(["make", "-n", "-W", "app/requirements.lock", "venv"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "pip install -q --require-hashes -r app/requirements.lock" in out, out
    assert "pip install -q --no-deps -e app" in out, out
