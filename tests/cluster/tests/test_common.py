"""common role, on every host: firewall loaded, limits and sysctl in place."""

from conftest import setting

testinfra_hosts = ["all"]


def test_nftables_runs_with_the_ssekit_table(host):
    assert host.service("nftables").is_enabled
    out = host.check_output("nft list table inet ssekit")
    assert "policy drop" in out


def test_systemd_default_nofile_limit_is_raised(host):
    value = host.check_output("systemctl show --property DefaultLimitNOFILE --value")
    assert int(value) == int(setting("common_nofile_limit"))


def test_sysctl_file_lists_connection_tuning(host):
    conf = host.file("/etc/sysctl.d/60-ssekit.conf")
    assert conf.exists
    for key in setting("common_sysctl"):
        assert key in conf.content_string
