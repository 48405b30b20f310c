"""The snippets ops copy (templates/) are what the roles render: one source of truth.

The nginx and caddy roles read the snippets with ``lookup('file')`` and change
only what an inventory must fill in: the upstream ``server`` lines and the
addresses of ``geo $ssehub_internal`` (nginx), the site address, ``tls internal``,
the ``reverse_proxy`` upstreams and the ``remote_ip`` allow-list (Caddy). This
renders the roles' own templates with Ansible (``ansible.builtin.template`` on
localhost, about two seconds) and fails when anything else differs, so an edit
to a snippet or to a role template that makes them drift is caught without a
cluster. (The cluster scenarios check the deployed files on the proxy too.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ssekit_testing.roles import ANSIBLE_PLAYBOOK, render_texts, role_defaults

ROOT = Path(__file__).resolve().parents[2]
SNIPPETS = ROOT / "templates"
UPSTREAMS = ["10.0.0.11:8000", "10.0.0.12:8000"]
SITE = "sse.example.org"
# Who may read /readyz and /metrics through the proxy: the default plus a scraper.
ALLOW = ["127.0.0.1", "::1", "10.0.0.5"]

NGINX = ROOT / "roles/nginx/templates/etc/nginx"
TEMPLATES = {
    "ssehub-http.conf": NGINX / "conf.d/ssehub-http.conf.j2",
    "ssehub-upstream.conf": NGINX / "conf.d/ssehub-upstream.conf.j2",
    "ssehub-locations.conf": NGINX / "snippets/ssehub-locations.conf.j2",
    "Caddyfile.ssehub": ROOT / "roles/caddy/templates/etc/caddy/Caddyfile.j2",
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.fail(f"{ANSIBLE_PLAYBOOK} is missing: `make venv` installs requirements-deploy.txt")
    out = tmp_path_factory.mktemp("rendered")
    variables = {**role_defaults("nginx"), **role_defaults("caddy"),
                 # what the inventory fills in: app hosts, the public name
                 "nginx_upstream_servers": UPSTREAMS, "caddy_upstream_servers": UPSTREAMS,
                 "caddy_site_address": SITE,
                 "nginx_internal_allow": ALLOW, "caddy_internal_allow": ALLOW,
                 "nginx_snippets_dir": str(SNIPPETS / "nginx"),
                 "caddy_snippets_dir": str(SNIPPETS / "caddy")}
    return render_texts(out, variables, TEMPLATES)


def snippet(name: str) -> list[str]:
    folder = "caddy" if name.startswith("Caddyfile") else "nginx"
    return (SNIPPETS / folder / name).read_text().splitlines()


def body(text: str, first: str) -> list[str]:
    """The rendered lines from the snippet's first line on (past the role's header)."""
    lines = text.splitlines()
    assert first in lines, f"the rendered file lost the snippet's first line {first!r}"
    return lines[lines.index(first):]


def test_nginx_locations_are_rendered_verbatim(rendered: dict[str, str]) -> None:
    source = snippet("ssehub-locations.conf")
    assert body(rendered["ssehub-locations.conf"], source[0]) == source


def test_nginx_http_conf_differs_only_in_the_internal_addresses(rendered: dict[str, str]) -> None:
    source = snippet("ssehub-http.conf")
    out = body(rendered["ssehub-http.conf"], source[0])

    def split(lines: list[str]) -> tuple[list[str], list[str]]:
        start = lines.index("geo $ssehub_internal {")
        end = lines.index("}", start)
        return lines[:start + 1] + lines[end:], lines[start + 1:end]

    (out_rest, out_geo), (source_rest, _) = split(out), split(source)
    assert out_rest == source_rest
    assert [line.strip() for line in out_geo] == ["default 0;"] + [f"{a} 1;" for a in ALLOW]


def test_nginx_upstream_differs_only_in_its_server_lines(rendered: dict[str, str]) -> None:
    source = snippet("ssehub-upstream.conf")
    out = body(rendered["ssehub-upstream.conf"], source[0])
    server = re.compile(r"^\s*server\s")
    assert [line for line in out if not server.match(line)] == \
        [line for line in source if not server.match(line)]
    options = role_defaults("nginx")["nginx_upstream_server_options"]
    assert [line.strip() for line in out if server.match(line)] == \
        [f"server {u} {options};" for u in UPSTREAMS]


def test_caddyfile_differs_only_in_site_address_tls_and_upstreams(rendered: dict[str, str]) -> None:
    source = snippet("Caddyfile.ssehub")
    out = body(rendered["Caddyfile.ssehub"], source[0])
    site = next(i for i, line in enumerate(source) if re.match(r"^\S+\s*\{\s*$", line)
                and not line.startswith("#"))
    site_out = out.index(f"{SITE} {{")
    assert out[:site_out] == source[:site], "the snippet's header comment changed"
    rest_out = [line for line in out[site_out + 1:] if line.strip() != "tls internal"]
    rest_source = source[site + 1:]
    assert len(rest_out) == len(rest_source), (rest_out, rest_source)
    proxy = re.compile(r"reverse_proxy\s+\S+")
    allow = re.compile(r"remote_ip\s.*$")
    for got, want in zip(rest_out, rest_source, strict=True):
        if proxy.search(want):
            assert got == proxy.sub("reverse_proxy " + " ".join(UPSTREAMS), want)
        elif want.strip().startswith("not remote_ip "):
            assert got == allow.sub("remote_ip " + " ".join(ALLOW), want)
        else:
            assert got == want
    assert "\ttls internal" in out  # caddy_tls_internal defaults to true
