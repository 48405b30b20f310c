"""Static checks of the roles, run by `make lint-deploy` (no containers).

- meta/argument_specs.yml and defaults/main.yml name the same variables
  (secrets are required options without a default), with the same default
  values and types; a Jinja default is typed at run time and the spec leaves
  it out; each description starts like the comment above the variable;
- every default has a comment above it (defaults/main.yml is the role's API);
- every public variable starts with the role's name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "defaults" / "main.yml").exists())


def _defaults(role: str) -> dict:
    return yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text()) or {}


def _options(role: str) -> dict:
    spec = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    return spec["argument_specs"]["main"]["options"]


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_match_defaults(role: str) -> None:
    defaults, options = _defaults(role), _options(role)
    required = {k for k, v in options.items() if v.get("required")}
    assert set(defaults) == set(options) - required
    for name in required:
        assert name not in defaults, f"{name} is a secret: no default in the repo"


# argument_specs types and the YAML values they accept (bool is not an int).
SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "path": (str,),
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
}


def _is_template(value: object) -> bool:
    return isinstance(value, str) and "{{" in value


def _type_ok(value: object, kind: str) -> bool:
    if kind == "raw":
        return True
    if isinstance(value, bool) and kind in ("int", "float"):
        return False
    return isinstance(value, SPEC_TYPES[kind])


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_defaults_and_types_match_defaults(role: str) -> None:
    defaults, options = _defaults(role), _options(role)
    for name, value in defaults.items():
        spec = options[name]
        kind = spec.get("type", "str")
        if _is_template(value):
            assert "default" not in spec, f"{name}: the spec repeats a Jinja default"
            continue
        assert "default" in spec, f"{name}: the spec gives no default ({value!r} in defaults)"
        assert spec["default"] == value, f"{name}: spec default {spec['default']!r} != {value!r}"
        assert _type_ok(value, kind), f"{name}: {value!r} is not of type {kind}"
        if kind == "list" and "elements" in spec:
            bad = [v for v in value if not _type_ok(v, spec["elements"])]
            assert not bad, f"{name}: elements {bad} are not {spec['elements']}"


def _comments_above(role: str) -> dict[str, str]:
    """The first line of the comment block above each variable in defaults/main.yml."""
    lines = (ROOT / "roles" / role / "defaults" / "main.yml").read_text().splitlines()
    found = {}
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z0-9_]+):", line)
        if m:
            j = i
            while j > 0 and lines[j - 1].startswith("#"):
                j -= 1
            found[m.group(1)] = lines[j].lstrip("#").strip()
    return found


@pytest.mark.parametrize("role", ROLES)
def test_argument_spec_descriptions_start_like_the_defaults_comment(role: str) -> None:
    """Catches a description taken from a commented example instead of the text."""
    options = _options(role)
    for name, comment in _comments_above(role).items():
        first_sentence = comment.split(". ")[0].rstrip(".")
        description = " ".join(str(options[name].get("description", "")).split())
        assert description.startswith(first_sentence), f"{name}: {description!r}"


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_documented_and_prefixed(role: str) -> None:
    lines = (ROOT / "roles" / role / "defaults" / "main.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z0-9_]+):", line)
        if not m:
            continue
        assert m.group(1).startswith(f"{role}_"), m.group(1)
        assert i > 0 and lines[i - 1].startswith("#"), f"{m.group(1)} has no comment above it"


# Values of inventories/production.example nobody can deploy with as they stand.
MUST_SET = ["ansible_host", "ansible_user", "ssekit_public_hostname", "caddy_acme_email"]


@pytest.mark.parametrize("name", MUST_SET)
def test_production_example_marks_what_users_must_set(name: str) -> None:
    """Each line that sets such a value says MUST SET, on it or in the comment above it."""
    found = 0
    for path in sorted((ROOT / "inventories" / "production.example").rglob("*.yml")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"^\s*{name}:", line):
                found += 1
                j = i
                while j > 0 and lines[j - 1].lstrip().startswith("#"):
                    j -= 1
                assert any("MUST SET" in text for text in lines[j : i + 1]), f"{path}:{i + 1}"
    assert found, f"{name} is not in production.example"
