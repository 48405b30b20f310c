"""The failure catalogue (docs/failure-modes.md) is the one the tree cites.

Comments and test names cite rows by id ("G3: a silent route", ``test_g4_*``);
a newcomer must be able to look every one of them up, and every test the
catalogue names must exist.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "docs" / "failure-modes.md"
# Where the tree cites rows: code, tests, roles, snippets and the docs.
CITING = ("app/src", "app/tests", "tests", "roles", "templates", "ansible", "docs", "README.md")
SUFFIXES = {".py", ".yml", ".yaml", ".j2", ".conf", ".md", ".html", ".js", ""}
CITED = re.compile(r"(?<![\w.#-])([A-J][1-9])(?:[-/]([A-J]?[1-9]))?(?![\w-])")
TEST_NAME = re.compile(r"\btest_((?:[a-j][1-9]_)+)")


def defined() -> set[str]:
    ids: set[str] = set()
    for line in CATALOGUE.read_text().splitlines():
        match = re.match(r"\| ([A-J][1-9])(?:([-/])([A-J]?)([1-9]))? \|", line)
        if not match:
            continue
        first, sep, letter, last = match.groups()
        ids.add(first)
        if sep == "-":  # C1-C4
            ids.update(f"{first[0]}{n}" for n in range(int(first[1]), int(last) + 1))
        elif sep == "/":  # A4/A5, G2/H6
            ids.add(f"{letter or first[0]}{last}")
    return ids


def citing_files() -> list[Path]:
    files: list[Path] = []
    for name in CITING:
        path = ROOT / name
        candidates = [path] if path.is_file() else path.rglob("*")
        files += [p for p in candidates if p.is_file() and p != CATALOGUE
                  and p.suffix in SUFFIXES and ".mypy_cache" not in p.parts
                  and "__pycache__" not in p.parts and ".molecule" not in p.parts]
    return files


def test_every_failure_id_the_tree_cites_is_in_the_catalogue() -> None:
    known = defined()
    assert {"A1", "C4", "G3", "H5", "I6", "J1"} <= known, sorted(known)
    unknown: dict[str, str] = {}
    for path in citing_files():
        text = path.read_text(errors="replace")
        cited = set()
        for first, second in CITED.findall(text):
            cited.add(first)
            if second:
                cited.add(second if len(second) == 2 else first[0] + second)
        for group in TEST_NAME.findall(text):
            cited.update(code.upper() for code in group.strip("_").split("_"))
        for code in cited - known:
            unknown.setdefault(code, str(path.relative_to(ROOT)))
    assert not unknown, f"cited but not in docs/failure-modes.md: {unknown}"


def test_every_test_the_catalogue_names_exists() -> None:
    tests: set[str] = set()
    files: set[str] = set()
    for path in [*(ROOT / "app" / "tests").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        tests |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
        files.add(path.name)
    text = CATALOGUE.read_text()
    named = set(re.findall(r"`(test_[a-z0-9_*]+)`", text))
    named_files = set(re.findall(r"`(test_[a-z0-9_]+\.py)`", text))
    assert named and named_files
    assert not [n for n in named if not fnmatch.filter(tests, n)], \
        sorted(n for n in named if not fnmatch.filter(tests, n))
    assert named_files <= files, sorted(named_files - files)
