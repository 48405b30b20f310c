"""Static checks of the roles, run by `make lint-deploy` (no containers).

- meta/argument_specs.yml and defaults/main.yml name the same variables
  (secrets are required options without a default), with the same default
  values and types; a Jinja default is typed at run time and the spec leaves
  it out; each description starts like the comment above the variable;
- every default has a comment above it (defaults/main.yml is the role's API);
- every public variable starts with the role's name;
- where the proxies reach the hubs, single host (Unix socket) and apart (TCP),
  and which hosts get the proxy's keepalive timing;
- what two roles share (the hub's port, Redis's and PostgreSQL's port, user
  and database) follows the one value the inventory sets;
- every molecule scenario and the Vagrantfile run systemd in a container
  with the same docker flags;
- the ssehub unit's sandbox: the peers it may exchange packets with, the
  system calls and memory it may not use, its offline exposure figure;
- the ssehub role's wheelhouse is the same bytes from a fresh copy of the
  source (this one downloads the lock's wheels from the package index).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ssekit_testing.roles import role_defaults, run_playbook

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "defaults" / "main.yml").exists())


def _defaults(role: str) -> dict:
    return role_defaults(role, with_vars=False)


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


# Where each layout's proxy reaches the hubs, from the inventory's group_vars
# and the roles' defaults as Ansible renders them (no containers: nginx on a
# single host is in no molecule scenario).
LAYOUTS = {
    "single-host": {"sse1": ["proxy", "app", "redis", "postgres"]},
    "proxy-apart": {"proxy1": ["proxy"], "app1": ["app"], "app2": ["app"],
                    "redis1": ["redis"], "db1": ["postgres"]},
}
SOCKET = "/run/ssehub-socket/ssehub.sock"
UNIT = ROOT / "roles/ssehub/templates/etc/systemd/system/ssehub.service.j2"
UNIT_LOOKUP = f"{{{{ lookup('ansible.builtin.template', '{UNIT}') }}}}"
# What a role takes from another's variable (the inventory ties them).
SHARED = ["common_firewall_app_port", "common_firewall_redis_port",
          "common_firewall_postgresql_port", "ssehub_redis_port", "ssehub_redis_user",
          "ssehub_database_port", "ssehub_database_name", "ssehub_database_user"]


def _render_layout(tmp_path: Path, hosts: dict[str, list[str]],
                   extra_vars: dict | None = None) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for n, (name, member_of) in enumerate(sorted(hosts.items())):
        for group in member_of:
            groups.setdefault(group, {"hosts": {}})["hosts"][name] = {
                "address": f"10.0.0.{n + 10}"}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": groups}}))
    names = ["ssehub_unix_socket", "ssehub_bind_address", "__ssehub_binds",
             "nginx_upstream_servers", "caddy_upstream_servers", "__common_sysctl",
             "ssehub_ip_address_allow", "__ssekit_unit", *SHARED]
    # Later files win here: the roles' defaults, then the inventory over them.
    var_files = [str(ROOT / "roles" / role / kind / "main.yml")
                 for role in ("common", "ssehub", "nginx", "caddy")
                 for kind in ("defaults", "vars")
                 if (ROOT / "roles" / role / kind / "main.yml").exists()]
    var_files.append(str(ROOT / "inventories/single-host/group_vars/all/main.yml"))
    out = tmp_path / "out"
    content = "{{ {" + ", ".join(f"'{n}': {n}" for n in names) + "} | to_json }}"
    playbook = [{"hosts": "all", "connection": "local", "gather_facts": False,
                 "vars": {"ansible_python_interpreter": sys.executable,
                          "__ssekit_unit": UNIT_LOOKUP},
                 "tasks": [
                     {"name": "Load the inventory's and the roles' variables",
                      "ansible.builtin.include_vars": "{{ item }}", "loop": var_files},
                     {"name": "Give each host its address (the inventory's needs facts)",
                      "ansible.builtin.set_fact": {"ssekit_private_address": "{{ address }}"}},
                     {"name": "Write what the roles would use",
                      "ansible.builtin.copy": {
                          "dest": f"{out}-{{{{ inventory_hostname }}}}.json", "mode": "0644",
                          "content": content},
                      }]}]
    run = run_playbook(tmp_path, playbook, "-e", json.dumps(extra_vars or {}),
                       inventory=str(tmp_path / "hosts.yml"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    return {name: json.loads(Path(f"{out}-{name}.json").read_text()) for name in hosts}


def test_single_host_proxy_reaches_its_hub_over_the_unix_socket(tmp_path: Path) -> None:
    """Proxy and hub on one host: the hub binds the socket and TCP on
    loopback; nginx and Caddy name the socket, and nginx backs it up with that
    TCP listener (a full socket backlog fails a connect at once)."""
    sse1 = _render_layout(tmp_path, LAYOUTS["single-host"])["sse1"]
    assert sse1["ssehub_unix_socket"] == SOCKET
    assert sse1["__ssehub_binds"] == [f"unix:{SOCKET}", "127.0.0.1:8000"]
    assert sse1["nginx_upstream_servers"] == [f"unix:{SOCKET}", "127.0.0.1:8000 backup"]
    assert sse1["caddy_upstream_servers"] == [f"unix/{SOCKET}"]


def test_proxy_on_its_own_host_reaches_every_hub_over_tcp(tmp_path: Path) -> None:
    """The cluster and Vagrant layouts (which read the same group_vars): TCP
    on every address, no socket, the proxy to each app host's address."""
    rendered = _render_layout(tmp_path, LAYOUTS["proxy-apart"])
    for app in ("app1", "app2"):
        assert rendered[app]["ssehub_unix_socket"] == ""
        assert rendered[app]["__ssehub_binds"] == ["0.0.0.0:8000"]
    # app1, app2 in the group's order: a set in between (`difference`) shuffled
    # them from run to run, and a second deploy rewrote the upstream.
    wanted = ["10.0.0.10:8000", "10.0.0.11:8000"]
    assert rendered["proxy1"]["nginx_upstream_servers"] == wanted
    assert rendered["proxy1"]["caddy_upstream_servers"] == wanted


def test_what_two_roles_share_follows_the_one_value_the_inventory_sets(tmp_path: Path) -> None:
    """The hub's port, and Redis's and PostgreSQL's port, app user and
    database, set once in the inventory by the role that owns each: the other
    roles follow (the proxies' upstream, the firewall, the hub's URLs), where
    a copy would have kept the old value and broken the deploy silently."""
    owners = {"ssehub_port": 9000, "redis_port": 6400, "redis_app_user": "hub",
              "postgresql_port": 5440, "postgresql_app_database": "hubdb",
              "postgresql_app_user": "hubrole"}
    rendered = _render_layout(tmp_path, LAYOUTS["proxy-apart"], owners)
    app1, proxy1 = rendered["app1"], rendered["proxy1"]
    assert app1["__ssehub_binds"] == ["0.0.0.0:9000"]
    assert proxy1["nginx_upstream_servers"] == ["10.0.0.10:9000", "10.0.0.11:9000"]
    assert proxy1["caddy_upstream_servers"] == ["10.0.0.10:9000", "10.0.0.11:9000"]
    assert {name: app1[name] for name in SHARED} == {
        "common_firewall_app_port": 9000, "common_firewall_redis_port": 6400,
        "common_firewall_postgresql_port": 5440, "ssehub_redis_port": 6400,
        "ssehub_redis_user": "hub", "ssehub_database_port": 5440,
        "ssehub_database_name": "hubdb", "ssehub_database_user": "hubrole"}


def test_only_a_proxy_apart_from_its_app_hosts_gets_the_proxy_keepalive(tmp_path: Path) -> None:
    """TCP keepalive ends a proxy's streams to a lost app host (common_proxy_sysctl
    over common_sysctl); app hosts, and a single host whose proxy reaches only
    itself, keep common_sysctl (their sshd and Redis connections)."""
    common, proxy = _defaults("common")["common_sysctl"], _defaults("common")["common_proxy_sysctl"]
    assert set(proxy) < set(common), "the proxy's values override keys of common_sysctl"
    (tmp_path / "apart").mkdir()
    (tmp_path / "single").mkdir()
    apart = _render_layout(tmp_path / "apart", LAYOUTS["proxy-apart"])
    assert apart["proxy1"]["__common_sysctl"] == {**common, **proxy}
    assert apart["app1"]["__common_sysctl"] == common
    single = _render_layout(tmp_path / "single", LAYOUTS["single-host"])
    assert single["sse1"]["__common_sysctl"] == common


# The unit's sandbox as `systemd-analyze security --offline` rates it (0 to 10,
# lower is better); the deployed unit's figure is checked in the cluster tests.
UNIT_EXPOSURE = 1.3


def _unit(rendered: dict[str, dict], name: str) -> list[str]:
    """The host's rendered ssehub unit, without comments and blank lines."""
    return [line for line in rendered[name]["__ssekit_unit"].splitlines()
            if line.strip() and not line.startswith("#")]


def _exposure(tmp_path: Path, unit: list[str]) -> float:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here")
    path = tmp_path / "ssehub.service"
    path.write_text("\n".join(unit) + "\n")
    run = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(path)],
                         capture_output=True, text=True, timeout=60)
    if "--offline" in run.stderr:
        pytest.skip("this systemd-analyze has no --offline")
    # "-> Overall exposure level for ssehub.service: 1.2 OK"
    return float(re.findall(r"exposure level for \S+: ([0-9.]+)", run.stdout)[-1])


def test_the_unit_exchanges_packets_only_with_the_hubs_peers(tmp_path: Path) -> None:
    """IPAddressDeny=any, and allowed: loopback and the private address of every proxy,
    Redis and PostgreSQL host, from the inventory's groups; not another app host."""
    rendered = _render_layout(tmp_path, LAYOUTS["proxy-apart"])
    # app1 .10, app2 .11, db1 .12, proxy1 .13, redis1 .14
    for app in ("app1", "app2"):
        assert rendered[app]["ssehub_ip_address_allow"] == [
            "localhost", "10.0.0.13", "10.0.0.14", "10.0.0.12"]
        unit = _unit(rendered, app)
        assert "IPAddressDeny=any" in unit
        assert "IPAddressAllow=localhost 10.0.0.13 10.0.0.14 10.0.0.12" in unit
    (tmp_path / "single").mkdir()
    single = _render_layout(tmp_path / "single", LAYOUTS["single-host"])["sse1"]
    assert single["ssehub_ip_address_allow"] == ["localhost", "10.0.0.10"]


@pytest.mark.parametrize("layout,host,socket", [("proxy-apart", "app1", False),
                                                ("single-host", "sse1", True)])
def test_the_unit_denies_what_the_hub_never_calls(tmp_path: Path, layout: str, host: str,
                                                  socket: bool) -> None:
    """No writable executable memory, no privileged or resource-setting system
    calls (but chown where gunicorn binds a Unix socket), private mounts; the
    offline exposure at or below UNIT_EXPOSURE (it was 1.7 without them)."""
    unit = _unit(_render_layout(tmp_path, LAYOUTS[layout]), host)
    for line in ("MemoryDenyWriteExecute=yes", "PrivateMounts=yes",
                 "SystemCallFilter=@system-service", "SystemCallFilter=~@privileged @resources",
                 "SystemCallErrorNumber=EPERM"):
        assert line in unit
    assert ("SystemCallFilter=@chown" in unit) == socket
    assert _exposure(tmp_path, unit) <= UNIT_EXPOSURE


def _build_wheelhouse(tmp_path: Path, source: Path, umask: int) -> Path:
    """The ssehub role's build tasks on this machine, as a controller runs them."""
    playbook = [{"name": "Build a wheelhouse as the ssehub role does", "hosts": "localhost",
                 "connection": "local", "gather_facts": True,
                 "vars": {"ansible_python_interpreter": sys.executable},
                 "tasks": [{"name": "Run the role's build tasks",
                            "ansible.builtin.include_role": {"name": "ssehub",
                                                             "tasks_from": "build.yml"}}]}]
    extra = {"ssehub_source_dir": str(source), "ssehub_wheelhouse_cache": str(tmp_path / "wh")}
    run = run_playbook(tmp_path, playbook, "-e", json.dumps(extra), timeout=600,
                       env={"ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
                            "PIP_CACHE_DIR": str(tmp_path / "pip")},
                       preexec_fn=lambda: os.umask(umask))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    (tar,) = (tmp_path / "wh").glob("ssehub-*.tar")
    return tar


def test_a_fresh_controller_builds_the_same_wheelhouse(tmp_path: Path) -> None:
    """A release is the commit plus its lock: a copy of the source with new file times,
    group-writable files, umask 002 and an empty pip cache builds the same tar."""
    copy = tmp_path / "fresh" / "app"
    shutil.copytree(ROOT / "app", copy, copy_function=shutil.copy, ignore=shutil.ignore_patterns(
        "tests", "build", "*.egg-info", "__pycache__", ".mypy_cache"))
    for path in copy.rglob("*"):
        path.chmod(path.stat().st_mode | 0o020)
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    here = _build_wheelhouse(tmp_path / "here", ROOT / "app", 0o022)
    there = _build_wheelhouse(tmp_path / "there", copy, 0o002)
    assert here.name == there.name
    assert hashlib.sha256(here.read_bytes()).digest() == hashlib.sha256(there.read_bytes()).digest()


def test_the_chat_demo_is_on_only_in_the_vagrant_inventory() -> None:
    """Anyone may post to the demo: the role leaves it off, and so do the inventories
    users copy (single-host, which the cluster scenarios also read, and
    production.example); the Vagrant inventory turns it on for the URL make up prints."""
    assert _defaults("ssehub")["ssehub_demo"] is False
    inventories = ROOT / "inventories"
    for copied in ("single-host", "production.example"):
        for path in (inventories / copied / "group_vars").rglob("*.yml"):
            assert "ssehub_demo" not in (yaml.safe_load(path.read_text()) or {}), path
    vagrant = yaml.safe_load((inventories / "vagrant/group_vars/all/vagrant.yml").read_text())
    assert vagrant["ssehub_demo"] is True


def test_every_systemd_container_gets_the_same_docker_flags() -> None:
    """A host of the molecule scenarios and a machine of the Vagrantfile's docker
    provider run systemd the same way. Molecule merges its base config
    (.config/molecule/config.yml) into a scenario mapping by mapping but takes
    a list, `platforms`, whole, and YAML anchors stay in one file: each scenario
    names the flags once and this keeps them, and the Vagrantfile's, alike."""
    keys = ["image", "pre_build_image", "command", "capabilities", "security_opts",
            "tmpfs", "volumes", "cgroupns_mode"]
    platforms = [platform
                 for scenario in sorted((ROOT / "tests/cluster/molecule").glob("*/molecule.yml"))
                 for platform in yaml.safe_load(scenario.read_text())["platforms"]]
    assert len(platforms) >= 6, "both scenarios' hosts"
    flags = [{key: platform.get(key) for key in keys} for platform in platforms]
    assert all(one == flags[0] for one in flags), flags
    docker = flags[0]
    vagrantfile = (ROOT / "Vagrantfile").read_text()
    create_args = re.search(r"d\.create_args = \[(.*?)\]", vagrantfile, re.S)
    cmd = re.search(r"d\.cmd = \[(.*?)\]", vagrantfile)
    assert create_args and cmd
    assert re.findall(r'"([^"]*)"', cmd.group(1)) == [docker["command"]]
    assert re.findall(r'"([^"]*)"', create_args.group(1)) == [
        *(arg for cap in docker["capabilities"] for arg in ("--cap-add", cap)),
        *(arg for opt in docker["security_opts"] for arg in ("--security-opt", opt)),
        *(arg for path in docker["tmpfs"] for arg in ("--tmpfs", path)),
        *(arg for volume in docker["volumes"] for arg in ("--volume", volume)),
        f"--cgroupns={docker['cgroupns_mode']}",
    ]
