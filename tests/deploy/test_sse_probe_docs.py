"""The sse_probe module's documentation is valid and says what its code does.

ansible-doc reads DOCUMENTATION, EXAMPLES and RETURN as ``ansible-doc sse_probe``
shows them to users. Its options are compared with the argument_spec the module
gives AnsibleModule, read from the module's source (importing the module would
need Ansible's module machinery) and checked once more against the arguments a
real run reports; EXAMPLES must be tasks that pass the module's own rules; RETURN
must list exactly the keys a run returns, with their types.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ssekit_testing.fixtures import SECRET
from ssekit_testing.servers import Nginx, ServedHub, free_port

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "ansible/playbooks"
MODULE = PLAYBOOKS / "library/sse_probe.py"
BIN = Path(sys.executable).parent
# What Ansible adds to every module result (not the module's to document).
ANSIBLE_KEYS = {"changed", "failed", "invocation", "action", "exception", "_ansible_no_log"}
PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str, "float": (float, int), "int": int, "bool": bool, "list": list, "dict": dict}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    shown = subprocess.run([str(BIN / "ansible-doc"), "-t", "module", "-M", str(MODULE.parent),
                            "sse_probe", "--json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "WARNING" not in shown.stderr, shown.stderr
    result: dict[str, Any] = json.loads(shown.stdout)["sse_probe"]
    return result


def module_call() -> dict[str, Any]:
    """The keyword arguments the module gives AnsibleModule(), as literals."""
    calls = [node for node in ast.walk(ast.parse(MODULE.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "AnsibleModule"]
    assert len(calls) == 1, "sse_probe.py should create one AnsibleModule"
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in calls[0].keywords
            if keyword.arg is not None}


def source_strings() -> dict[str, str]:
    """DOCUMENTATION, EXAMPLES and RETURN as the module's source has them."""
    names = {"DOCUMENTATION", "EXAMPLES", "RETURN"}
    return {target.id: ast.literal_eval(node.value)
            for node in ast.parse(MODULE.read_text()).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name) and target.id in names}


def normalised(option: dict[str, Any]) -> dict[str, Any]:
    """An option with Ansible's implicit values spelled out (type str, not required)."""
    return {"type": option.get("type", "str"), "default": option.get("default"),
            "required": option.get("required", False), "choices": option.get("choices"),
            "elements": option.get("elements"), "aliases": sorted(option.get("aliases", []))}


def run_module(**args: Any) -> dict[str, Any]:
    """sse_probe run once with ``args`` (ad hoc, from the repo root), its result."""
    ran = subprocess.run(
        [str(BIN / "ansible"), "localhost", "-i", "localhost,", "-c", "local",
         "-M", str(MODULE.parent), "-m", "sse_probe", "-a", json.dumps(args),
         "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
             "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
             "ANSIBLE_MODULE_UTILS": str(PLAYBOOKS / "module_utils")})
    result: dict[str, Any] = json.loads(ran.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    return result


def test_documented_options_match_the_argument_spec(doc: dict[str, Any]) -> None:
    documented = {name: normalised(option) for name, option in doc["doc"]["options"].items()}
    coded = {name: normalised(option) for name, option in module_call()["argument_spec"].items()}
    assert documented == coded


def test_every_option_has_a_description(doc: dict[str, Any]) -> None:
    undocumented = [name for name, option in doc["doc"]["options"].items()
                    if not option.get("description")]
    assert not undocumented
    assert doc["doc"]["short_description"] and doc["doc"]["description"]


def test_the_examples_are_tasks_the_module_accepts(doc: dict[str, Any]) -> None:
    examples = yaml.safe_load(doc["examples"])
    assert examples == yaml.safe_load(source_strings()["EXAMPLES"])
    assert isinstance(examples, list) and all("name" in task for task in examples), examples
    options = doc["doc"]["options"]
    rules = module_call()
    probes = [task for task in examples if "sse_probe" in task]
    assert probes, "no example runs sse_probe"
    for task in probes:
        given = set(task["sse_probe"])
        assert given <= set(options), f"undocumented options: {given - set(options)}"
        assert {name for name, o in options.items() if o.get("required")} <= given
        for group in rules.get("required_one_of", []):
            assert given & set(group), f"{task['name']}: give one of {group}"
        for group in rules.get("mutually_exclusive", []):
            assert len(given & set(group)) <= 1, f"{task['name']}: {group} exclude each other"
        # What the examples read from the registered result is documented in RETURN.
        if "register" in task:
            used = set(re.findall(rf"\b{task['register']}\.(\w+)", doc["examples"]))
            assert used <= set(doc["return"]), f"not in RETURN: {used - set(doc['return'])}"


def test_return_is_yaml_with_a_type_for_each_key(doc: dict[str, Any]) -> None:
    assert yaml.safe_load(source_strings()["RETURN"]) == doc["return"]
    for key, entry in doc["return"].items():
        assert entry.get("description") and entry.get("returned"), key
        assert entry.get("type") in PYTHON_TYPES, f"{key}: type {entry.get('type')!r}"


def check_result(result: dict[str, Any], doc: dict[str, Any], succeeded: bool) -> None:
    returns = doc["return"]
    assert set(result) - ANSIBLE_KEYS == set(returns)
    for key, entry in returns.items():
        value = result[key]
        if value is None:
            # "returned: success" keys are null after a failure; hop is null on success.
            assert ((not succeeded and entry["returned"] == "success")
                    or (succeeded and key == "hop")), (key, result)
        else:
            assert isinstance(value, PYTHON_TYPES[entry["type"]]), (key, value)
    # The defaults a run reports are the documented ones.
    arguments = result["invocation"]["module_args"]
    options = doc["doc"]["options"]
    assert set(arguments) == set(options)
    for name, option in options.items():
        if "default" in option:
            assert arguments[name] == option["default"], name


def test_a_failed_run_returns_what_return_documents(doc: dict[str, Any]) -> None:
    result = run_module(url=f"http://127.0.0.1:{free_port()}", token="not-needed")
    assert result["failed"] and result["hop"] == "tcp", result
    check_result(result, doc, succeeded=False)


def test_a_successful_run_returns_what_return_documents(
        doc: dict[str, Any], stack: tuple[ServedHub, Nginx]) -> None:
    _, nginx = stack
    result = run_module(url=nginx.url, token_secret=SECRET)
    assert not result.get("failed") and result["msg"].startswith("ok: event "), result
    check_result(result, doc, succeeded=True)
