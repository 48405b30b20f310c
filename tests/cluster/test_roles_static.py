"""Static checks of the roles, run by `make lint-deploy` (no containers).

- meta/argument_specs.yml and defaults/main.yml name the same variables
  (secrets are required options without a default);
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


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_documented_and_prefixed(role: str) -> None:
    lines = (ROOT / "roles" / role / "defaults" / "main.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z0-9_]+):", line)
        if not m:
            continue
        assert m.group(1).startswith(f"{role}_"), m.group(1)
        assert i > 0 and lines[i - 1].startswith("#"), f"{m.group(1)} has no comment above it"
