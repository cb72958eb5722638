from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy_core.config import (
    CORE_OPTIONS,
    Config,
    ConfigError,
    build_parser,
    load_config,
    write_config,
)
from kproxy_core.options import DURATION, Option, OptionRegistry

DATA = Path(__file__).parent / "data"


def registry(*extra: Option) -> OptionRegistry:
    options = OptionRegistry()
    for option in [*CORE_OPTIONS, *extra]:
        options.add(option)
    return options


def parse(argv: list[str], options: OptionRegistry | None = None) -> Config:
    options = options or registry()
    args = build_parser(options, ["iptables", "ipvs"]).parse_args(argv)
    return load_config(args, options)


def test_defaults_match_upstream() -> None:
    config = parse([])
    assert config.get("iptables.syncPeriod") == 30.0
    assert config.get("iptables.minSyncPeriod") == 1.0
    assert config.get("iptables.masqueradeBit") == 14
    assert config.get("iptables.localhostNodePorts") is True
    assert config.get("healthzBindAddress") == "0.0.0.0:10256"
    assert config.get("metricsBindAddress") == "127.0.0.1:10249"
    assert config.get("oomScoreAdj") == -999
    assert config.get("conntrack.maxPerCore") == 32768
    assert config.get("conntrack.min") == 131072
    assert config.get("conntrack.tcpEstablishedTimeout") == 86400.0
    assert config.get("conntrack.tcpCloseWaitTimeout") == 3600.0
    assert config.get("configSyncPeriod") == 900.0
    assert config.get("clientConnection.qps") == 5.0
    assert config.get("clientConnection.burst") == 10
    assert config.mode == "iptables"
    assert config.health_timeout == 60.0


def test_default_file_equals_upstream_roundtrip_file() -> None:
    """Upstream's testdata roundtrip/default/v1alpha1.yaml is our default file, field for field
    (minus fields upstream added after it and ipvs, which belongs to the ipvs plugin)."""
    upstream = yaml.safe_load((DATA / "upstream-defaults.yaml").read_text())
    ours = parse([]).as_file_dict()
    upstream.pop("ipvs")
    for section, newer in (("conntrack", ("tcpBeLiberal", "udpTimeout", "udpStreamTimeout")),
                           ("iptables", ("snatNodeInternalIP",))):
        for field in newer:
            ours[section].pop(field)
    ours.pop("logging")
    assert ours == upstream


def test_kubeadm_configmap_parses_unchanged() -> None:
    config = parse(["--config", str(DATA / "kubeadm-config.conf")])
    # Zero values and nulls mean "default", as upstream's defaulting.
    assert config.get("iptables.syncPeriod") == 30.0
    assert config.get("iptables.minSyncPeriod") == 1.0
    assert config.get("iptables.masqueradeBit") == 14
    assert config.get("iptables.localhostNodePorts") is True
    assert config.get("healthzBindAddress") == "0.0.0.0:10256"
    assert config.get("metricsBindAddress") == "127.0.0.1:10249"
    assert config.get("clientConnection.qps") == 5.0
    assert config.get("clientConnection.contentType") == "application/vnd.kubernetes.protobuf"
    assert config.get("clientConnection.kubeconfig") == "/var/lib/kube-proxy/kubeconfig.conf"
    assert config.get("conntrack.min") == 131072
    assert config.get("oomScoreAdj") == -999
    assert config.cluster_cidrs == ("10.244.0.0/16",)
    assert config.node_port_addresses == ()
    # ipvs/nftables sections belong to plugins not loaded here: kept, not rejected.
    assert set(config.passthrough) == {"ipvs", "nftables"}
    assert config.as_file_dict()["ipvs"]["scheduler"] == ""
    assert config.source("clusterCIDR") == "file"
    assert config.source("iptables.syncPeriod") == "default"


def test_flags_win_over_file(tmp_path: Path) -> None:
    config = parse(["--config", str(DATA / "custom.json"), "--iptables-sync-period=45s",
                    "--proxy-mode", "ipvs"])
    assert config.get("iptables.syncPeriod") == 45.0
    assert config.source("iptables.syncPeriod") == "flag"
    assert config.get("iptables.minSyncPeriod") == 2.0
    assert config.get("iptables.masqueradeBit") == 10
    assert config.get("mode") == "ipvs"
    assert config.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/56")
    assert config.get("metricsBindAddress") == "0.0.0.0:10249"  # port appended
    assert config.feature_gates == {"ContextualLogging": True}


def test_boolean_flags_like_pflag() -> None:
    assert parse(["--masquerade-all"]).masquerade_all is True
    assert parse(["--masquerade-all=false"]).masquerade_all is False
    assert parse(["--iptables-localhost-nodeports=false"]).get(
        "iptables.localhostNodePorts") is False


def test_aliases_used_by_cli() -> None:
    config = parse(["--v=4", "--log-format", "json", "--write-config-to", "/tmp/x"])
    assert config.get("v") == 4
    assert config.get("logFormat") == "json"
    assert config.get("writeConfigTo") == "/tmp/x"
    assert config.verbosity == 4


def test_dict_input_with_flag_names() -> None:
    options = registry()
    config = load_config({"proxy-mode": "ipvs", "manifests": "/srv", "--masquerade-all": "true",
                          "iptables.syncPeriod": "10s"}, options)
    assert config.mode == "ipvs"
    assert config.get("manifests") == "/srv"
    assert config.masquerade_all is True
    assert config.sync_period == 10.0


def test_hostname_override_flag_is_lowercased() -> None:
    assert parse(["--hostname-override", " Node-A "]).node_name == "node-a"
    with pytest.raises(ConfigError, match="hostname-override"):
        parse(["--hostname-override", "  "])


def test_deprecated_port_flags() -> None:
    assert parse(["--healthz-port=0"]).healthz_bind_address == ""
    assert parse(["--metrics-port=9999"]).metrics_bind_address == "127.0.0.1:9999"


def test_ipv6_bind_address_defaults_servers_to_ipv6() -> None:
    config = parse(["--bind-address", "::"])
    assert config.healthz_bind_address == "[::]:10256"
    assert config.metrics_bind_address == "[::1]:10249"


def write(tmp_path: Path, body: dict[str, Any]) -> str:
    doc = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}
    doc.update(body)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"iptables": {"syncPeriod": "soon"}},
         "invalid configuration: iptables.syncPeriod: expected a duration like '30s' or '1m0s', "
         "got 'soon'"),
        ({"iptables": {"masqueradeBit": 32}},
         "invalid configuration: iptables.masqueradeBit: must be within the range [0, 31], got 32"),
        ({"iptables": {"syncPeriod": "5s", "minSyncPeriod": "10s"}},
         "invalid configuration: iptables.syncPeriod: must be greater than or equal to "
         "iptables.minSyncPeriod (10s), got 5s"),
        ({"iptabels": {}}, "invalid configuration: iptabels: unknown field (did you mean"),
        ({"iptables": {"syncperiod": "1s"}},
         "invalid configuration: iptables.syncperiod: unknown field (did you mean "
         "iptables.syncPeriod?)"),
        ({"clusterCIDR": "10.0.0.0/8,10.1.0.0/16"},
         "invalid configuration: clusterCIDR: must be a valid DualStack CIDR"),
        ({"clusterCIDR": "banana"}, "invalid configuration: clusterCIDR: 'banana' is not a valid"),
        ({"healthzBindAddress": "1.2.3.4:99999"},
         "invalid configuration: healthzBindAddress: must be a valid port"),
        ({"metricsBindAddress": "localhost:10249"},
         "invalid configuration: metricsBindAddress: 'localhost' is not a valid"),
        ({"bindAddress": "nope"}, "invalid configuration: bindAddress: 'nope' is not a valid"),
        ({"detectLocalMode": "Magic"},
         "invalid configuration: detectLocalMode: 'Magic' is not one of"),
        ({"detectLocalMode": "BridgeInterface"},
         "invalid configuration: detectLocal.bridgeInterface: must be set"),
        ({"nodePortAddresses": ["10.0.0.1"]},
         "invalid configuration: nodePortAddresses: '10.0.0.1' must be a CIDR"),
        ({"oomScoreAdj": 2000}, "invalid configuration: oomScoreAdj: must be within the range"),
        ({"configSyncPeriod": "-1s"},
         "invalid configuration: configSyncPeriod: must be greater than 0"),
        ({"conntrack": {"min": -1}},
         "invalid configuration: conntrack.min: must be greater than or"),
        ({"featureGates": {"ContextualLogging": "maybe"}},
         "invalid configuration: featureGates: invalid value of ContextualLogging=maybe"),
        ({"ipvs": {"schedular": "rr"}}, "invalid configuration: ipvs.schedular: unknown field"),
        ({"portRange": "9-2"}, "invalid configuration: portRange: must be a valid port range"),
    ],
)
def test_file_errors_are_one_line_naming_the_field(
    tmp_path: Path, body: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(["--config", write(tmp_path, body)])
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        parse(["--iptables-sync-period", "soon"])
    assert str(info.value) == (
        "invalid configuration: --iptables-sync-period: expected a duration like '30s' or "
        "'1m0s', got 'soon'"
    )
    with pytest.raises(ConfigError) as info:
        parse(["--iptables-min-sync-period=1m"])
    assert str(info.value) == (
        "invalid configuration: --iptables-min-sync-period: must be less than or equal to "
        "iptables.syncPeriod (30s), got 1m0s"
    )


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n",
         "invalid configuration: apiVersion: expected 'kubeproxy.config.k8s.io/v1alpha1', "
         "got 'kubeproxy.config.k8s.io/v1alpha2'"),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n",
         "invalid configuration: kind: expected 'KubeProxyConfiguration', got "
         "'KubeletConfiguration'"),
        ("apiVersion: [unclosed\n", "invalid configuration: --config:"),
        ("- a\n- b\n", "invalid configuration: --config:"),
    ],
)
def test_bad_documents(tmp_path: Path, head: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(head)
    with pytest.raises(ConfigError) as info:
        parse(["--config", str(path)])
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="invalid configuration: --config: cannot read"):
        parse(["--config", "/nonexistent/kproxy.yaml"])


def test_retired_fields_warn(tmp_path: Path) -> None:
    config = parse(["--config", write(tmp_path, {"udpIdleTimeout": "250ms"})])
    assert config.warnings == ("udpIdleTimeout: retired upstream field, ignored",)


def test_mode_must_be_installed() -> None:
    options = registry()
    with pytest.raises(ConfigError, match="'nftables' is not an installed proxy mode"):
        load_config({"proxy-mode": "nftables"}, options, modes=["iptables"])


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_write_config_round_trip(tmp_path: Path, suffix: str) -> None:
    ipvs_sync = Option("ipvs.syncPeriod", "--ipvs-sync-period", DURATION, 30.0, "x", owner="ipvs")
    options = registry(ipvs_sync)
    config = parse(["--config", str(DATA / "kubeadm-config.conf").replace("kubeadm-config.conf",
                                                                             "custom.json"),
                    "--masquerade-all", "--v=3",
                    "--feature-gates=ContextualLogging=false,WatchListClient=true",
                    "--nodeport-addresses=primary,10.0.0.0/8", "--ipvs-sync-period=1m"],
                   options)
    target = tmp_path / f"out.{suffix}"
    write_config(config, str(target))
    again = parse(["--config", str(target)], options)
    assert again == config
    assert again.as_file_dict() == config.as_file_dict()
    assert again.get("ipvs.syncPeriod") == 60.0


def test_file_durations_in_go_form() -> None:
    data = parse(["--iptables-sync-period=90s", "--iptables-min-sync-period=500ms"]).as_file_dict()
    assert data["iptables"]["syncPeriod"] == "1m30s"
    assert data["iptables"]["minSyncPeriod"] == "500ms"
    assert data["conntrack"]["tcpEstablishedTimeout"] == "24h0m0s"
    assert data["apiVersion"] == "kubeproxy.config.k8s.io/v1alpha1"
    assert "featureGates" not in data and "manifests" not in data


def test_mode_sections_drive_sync_period() -> None:
    ipvs_sync = Option("ipvs.syncPeriod", "--ipvs-sync-period", DURATION, 30.0, "x", owner="ipvs")
    options = registry(ipvs_sync)
    config = load_config({"proxy-mode": "ipvs", "ipvs-sync-period": "5s"}, options)
    assert config.sync_period == 5.0
    assert config.min_sync_period == 1.0  # no ipvs.minSyncPeriod declared: iptables fallback


def test_help_groups_mode_options() -> None:
    option = Option("ipvs.scheduler", "--ipvs-scheduler", DURATION, 30.0, "the scheduler",
                    owner="ipvs")
    text = build_parser(registry(option), ["iptables", "ipvs"]).format_help()
    assert "ipvs mode options:" in text
    assert "--ipvs-scheduler" in text
    assert "Installed modes: iptables, ipvs" in text


def test_unknown_dict_key() -> None:
    with pytest.raises(ConfigError, match="proxy-mood: unknown field"):
        load_config({"proxy-mood": "x"}, registry())


def test_namespace_without_values() -> None:
    assert load_config(argparse.Namespace(), registry()).mode == "iptables"


def test_kubeadm_zero_sync_periods_default_for_plugin_sections(tmp_path: Path) -> None:
    """With the ipvs/nftables plugins installed their sections are parsed, and kubeadm's
    ``syncPeriod: 0s`` still means the default, as upstream."""

    def positive(value: float) -> None:
        if value <= 0:
            raise ValueError("must be greater than 0")

    extra = [
        Option("ipvs.syncPeriod", "--ipvs-sync-period", DURATION, 30.0, "x", owner="ipvs",
               check=positive),
        Option("ipvs.minSyncPeriod", "--ipvs-min-sync-period", DURATION, 0.0, "x", owner="ipvs"),
        Option("nftables.syncPeriod", None, DURATION, 30.0, "x", owner="nftables"),
        Option("nftables.minSyncPeriod", None, DURATION, 1.0, "x", owner="nftables"),
    ]
    options = registry(*extra)
    with pytest.raises(ConfigError, match=r"ipvs\.excludeCIDRs: unknown field"):
        parse(["--config", str(DATA / "kubeadm-config.conf")], options)
    text = (DATA / "kubeadm-config.conf").read_text()
    keep = {"syncPeriod", "minSyncPeriod"}
    doc = yaml.safe_load(text)
    doc["ipvs"] = {k: v for k, v in doc["ipvs"].items() if k in keep}
    doc["nftables"] = {k: v for k, v in doc["nftables"].items() if k in keep}
    path = tmp_path / "kubeadm-trimmed.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = parse(["--config", str(path)], options)
    assert config.get("ipvs.syncPeriod") == 30.0
    assert config.get("ipvs.minSyncPeriod") == 0.0
    assert config.get("nftables.minSyncPeriod") == 1.0
    assert config.passthrough == {}


def test_bare_number_duration_in_a_file_is_rejected(tmp_path: Any) -> None:
    conf = tmp_path / "config.conf"
    conf.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                    "kind: KubeProxyConfiguration\niptables:\n  syncPeriod: 30\n")
    with pytest.raises(ConfigError, match=r"iptables\.syncPeriod: expected a duration"):
        load_config({"config": str(conf)}, registry())
