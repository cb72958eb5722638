"""deploy/: the DaemonSet, RBAC and ConfigMap parse, grant what kproxy's watches need, and the
ConfigMap's config.conf is accepted by kproxy's own config loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kproxy_core.config import load_config, read_config_file
from kproxy_core.plugins import KproxyPluginManager

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kproxy-daemonset.yaml").read_text()) if d]


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _documents() if d["kind"] == kind]
    return doc


def test_kinds_mirror_kubeadm() -> None:
    kinds = sorted(d["kind"] for d in _documents())
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet",
                     "ServiceAccount"]
    for doc in _documents():
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "kube-system"
            assert doc["metadata"]["name"] == "kube-proxy"


def test_rbac_grants_the_watches_and_events() -> None:
    granted: set[tuple[str, str, str]] = set()
    for rule in _one("ClusterRole")["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb))
    for group, resource in (("", "services"), ("", "nodes"),
                            ("discovery.k8s.io", "endpointslices")):
        assert {(group, resource, "list"), (group, resource, "watch")} <= granted
    assert ("", "events", "create") in granted or ("events.k8s.io", "events", "create") in granted
    binding = _one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == _one("ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kube-proxy",
                                    "namespace": "kube-system"}]


def test_daemonset_runs_kproxy_with_upstream_flags_and_mounts() -> None:
    spec = _one("DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["serviceAccountName"] == "kube-proxy"
    (container,) = spec["containers"]
    assert container["command"] == ["/usr/local/bin/kube-proxy",
                                    "--config=/var/lib/kube-proxy/config.conf",
                                    "--hostname-override=$(NODE_NAME)"]
    assert container["securityContext"]["privileged"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/kube-proxy", "/run/xtables.lock", "/lib/modules"} <= mounts
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 10256}


def test_configmap_config_conf_is_accepted_by_kproxy(tmp_path: Path) -> None:
    conf = tmp_path / "config.conf"
    conf.write_text(_one("ConfigMap")["data"]["config.conf"])
    assert read_config_file(str(conf))["kind"] == "KubeProxyConfiguration"
    options = KproxyPluginManager().options()
    config = load_config({"config": str(conf)}, options)
    # kubeadm's zero values mean "default", as upstream's defaulting does.
    assert config.get("iptables.syncPeriod") == 30.0
    assert config.get("iptables.masqueradeBit") == 14
    assert config.get("healthzBindAddress").endswith(":10256")
    assert config.get("clusterCIDR") == ("10.244.0.0/16",)


def test_container_build_file_installs_core_and_seed_modes() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    for part in ("/src/plugins/kproxy-iptables", "/src/plugins/kproxy-ipvs",
                 "/src/plugins/kproxy-userspace", "iptables", "ipset", "conntrack",
                 "/usr/local/bin/kube-proxy"):
        assert part in text
