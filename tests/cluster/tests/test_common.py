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


def test_the_kernel_runs_the_keepalive_values_the_role_wrote(host):
    """The proxy's probes of its connections to the app hosts (a lost host's
    streams end 3 s after its last packet) take the kernel's keepalive values.
    Containers cannot apply /etc/sysctl.d: the scenario sets them at creation,
    and this catches a drift from what the role writes."""
    written = dict(
        (key.strip(), value.strip())
        for key, _, value in (
            line.partition("=")
            for line in host.file("/etc/sysctl.d/60-ssekit.conf").content_string.splitlines()
            if "=" in line and not line.startswith("#")
        )
        if key.strip().startswith("net.ipv4.tcp_keepalive_")
    )
    assert len(written) == 3, written
    running = {key: host.check_output(f"sysctl -n {key}").strip() for key in written}
    assert running == written
