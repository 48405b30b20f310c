"""The Ansible roles as tests read them: a role's defaults, its templates rendered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
ROLES = REPO / "roles"
# ansible-playbook from the venv the tests run in (requirements-deploy.txt).
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

if not (ROLES / "ssehub").is_dir():  # an editable install reads the checkout it sits in
    raise ImportError(f"{REPO} is not the ssekit checkout: install tests/support with -e")


def role_defaults(role: str, *, with_vars: bool = True) -> dict[str, Any]:
    """A role's defaults (and, unless ``with_vars`` is false, its vars over them),
    as the role sees them before the inventory."""
    values: dict[str, Any] = {}
    for name in ("defaults", "vars") if with_vars else ("defaults",):
        path = ROLES / role / name / "main.yml"
        if path.exists():
            values.update(yaml.safe_load(path.read_text()) or {})
    return values


def run_playbook(directory: Path, plays: list[dict[str, Any]], *args: str,
                 inventory: str = "localhost,", env: dict[str, str] | None = None,
                 timeout: float = 120, **run: Any) -> subprocess.CompletedProcess[str]:
    """Write ``plays`` as a playbook in ``directory`` and run it there with
    ansible-playbook (``args`` after the playbook), under an empty ansible.cfg: not
    the repo's or the user's. ``env`` adds to the environment, ``run`` to subprocess.run."""
    directory.mkdir(parents=True, exist_ok=True)
    playbook = directory / "playbook.yml"
    playbook.write_text(yaml.safe_dump(plays))
    (directory / "ansible.cfg").write_text("[defaults]\n")
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "False",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
           "ANSIBLE_CONFIG": str(directory / "ansible.cfg"), **(env or {})}
    return subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", inventory, str(playbook), *args],
                          cwd=directory, env=env, capture_output=True, text=True,
                          timeout=timeout, **run)


def render_with_ansible(out: Path, variables: dict[str, Any], templates: dict[str, Path],
                        mode: str = "0644") -> subprocess.CompletedProcess[str]:
    """Render role templates (name in ``out``: source) with ansible-playbook, as the
    roles do, from ``variables`` alone: no inventory, no ansible.cfg of the repo's."""
    tasks = [{"name": f"Render {name}",
              "ansible.builtin.template": {"src": str(src), "dest": str(out / name),
                                           "mode": mode}}
             for name, src in templates.items()]
    return run_playbook(out, [{"hosts": "localhost", "connection": "local",
                               "gather_facts": False,
                               "vars": {**variables, "ansible_python_interpreter": sys.executable},
                               "tasks": tasks}])


def render_texts(out: Path, variables: dict[str, Any],
                 templates: dict[str, Path]) -> dict[str, str]:
    """render_with_ansible, then each rendered file's text by its name."""
    run = render_with_ansible(out, variables, templates)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    return {name: (out / name).read_text() for name in templates}
