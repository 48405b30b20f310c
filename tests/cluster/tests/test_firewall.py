"""The host firewall: Redis and PostgreSQL only from app hosts, the app port
only from proxies."""

import pytest
from conftest import get_host, hosts_in, setting


def reachable(src, dst, port):
    return get_host(src).run(f"nc -z -w 2 {dst} {port}").rc == 0


@pytest.mark.skipif(len(hosts_in("all")) < 2, reason="needs separate hosts")
@pytest.mark.parametrize(
    "target_group,port_var",
    [("redis", "common_firewall_redis_port"), ("postgres", "common_firewall_postgresql_port")],
)
def test_datastores_unreachable_from_proxy_but_reachable_from_app(target_group, port_var):
    port = setting(port_var)
    target = hosts_in(target_group)[0]
    assert not reachable(hosts_in("proxy")[0], target, port)
    assert reachable(hosts_in("app")[0], target, port)


@pytest.mark.skipif(len(hosts_in("all")) < 2, reason="needs separate hosts")
def test_app_port_only_from_proxy():
    port = setting("common_firewall_app_port")
    app = hosts_in("app")[0]
    assert reachable(hosts_in("proxy")[0], app, port)
    assert not reachable(hosts_in("redis")[0], app, port)
