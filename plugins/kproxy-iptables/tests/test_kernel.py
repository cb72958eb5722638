"""Real kernel, real traffic: the proxier runs inside the sandbox's ``node`` namespace, with
each writer, and echo servers in pods answer "<pod> <peer ip>"."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from iptables_helpers import ep, key, svc
from iptables_host import ProxierHost
from kproxy_iptables import rules as R

from kproxy_core.model import NodeView, ResolvedServicePort
from kproxy_core.testing.netns import ClusterSandbox, NetNS

pytestmark = pytest.mark.root

NODE_IP = "10.99.0.1"
CLIENT_IP = "10.99.0.100"
LOCAL_A, LOCAL_B, REMOTE = "10.244.1.2", "10.244.1.3", "10.244.2.2"

WEB = svc(key("default", "web", "http"), "10.96.0.10", 80, node_port=30080,
          external_ips=("10.98.0.5",), load_balancer_ips=("10.98.0.6",),
          load_balancer_source_ranges=(f"{CLIENT_IP}/32",),
          endpoints=[ep(LOCAL_A, 8080, True), ep(REMOTE, 8080)])
DNS = svc(key("default", "web", "dns", "UDP"), "10.96.0.10", 53,
          endpoints=[ep(LOCAL_A, 8080, True), ep(REMOTE, 8080)])
LOCAL = svc(key("default", "local", "http"), "10.96.0.11", 80, node_port=30081,
            external_policy_local=True, endpoints=[ep(LOCAL_B, 8080, True), ep(REMOTE, 8080)])
EMPTY = svc(key("default", "empty", "http"), "10.96.0.12", 80, node_port=30082)
STICKY = svc(key("default", "sticky", "http"), "10.96.0.13", 80, session_affinity_timeout=600,
             endpoints=[ep(LOCAL_A, 8080, True), ep(LOCAL_B, 8080, True), ep(REMOTE, 8080)])
HAIRPIN = svc(key("default", "hair", "http"), "10.96.0.14", 80,
              endpoints=[ep(LOCAL_A, 8080, True)])
FENCED = svc(key("default", "fenced", "http"), "10.96.0.15", 80,
             load_balancer_ips=("10.98.0.7",), load_balancer_source_ranges=("192.0.2.0/24",),
             endpoints=[ep(REMOTE, 8080)])
BASE = (WEB, DNS, LOCAL, EMPTY, STICKY, HAIRPIN, FENCED)


class Env:
    def __init__(self, cluster: ClusterSandbox, host: ProxierHost, writer: str) -> None:
        self.cluster = cluster
        self.host = host
        self.writer = writer

    def pod(self, ip: str) -> NetNS:
        return next(p.ns for p in self.cluster.pods if p.ip == ip)

    def ask(self, ns: NetNS, ip: str, port: int, *, proto: str = "tcp", count: int = 1,
            timeout: float = 1.0) -> list[str]:
        proc = ns.run([sys.executable, "-m", "kproxy_core.testing.echo", proto, ip, str(port),
                       "--timeout", str(timeout), "--count", str(count)], check=False)
        return proc.stdout.split("\n")[:-1]

    def sync(self, *ports: ResolvedServicePort, full: bool = False) -> None:
        self.host.sync(*ports, full=full)


@pytest.fixture(scope="module", params=["restore", "libiptc"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (they create network namespaces)")
    writer = str(request.param)
    cluster = ClusterSandbox(local_pods=2, remote_pods=1)
    host: ProxierHost | None = None
    try:
        for pod in cluster.pods:
            cluster.start_echo(pod)
        # The kernel rate-limits the ICMP errors REJECT sends; back-to-back "refused" checks
        # would otherwise see a timeout.
        cluster.node.sysctl("net.ipv4.icmp_ratelimit", "0")
        host = ProxierHost(cluster.node.name, {"clusterCIDR": "10.244.0.0/16",
                                               "iptables.writer": writer})
        # Another agent's chain and jump, which no sync or cleanup may touch.
        host.call("writer", ("ensure_chain", ("nat", "OTHER-AGENT")))
        host.call("writer", ("ensure_rule", ("nat", "OTHER-AGENT", ["-j", "RETURN"])))
        host.call("writer", ("ensure_rule", ("nat", "PREROUTING", ["-j", "OTHER-AGENT"])))
        host.sync(*BASE, full=True)
        yield Env(cluster, host, writer)
    finally:
        if host is not None:
            host.close()
        cluster.close()


def test_cluster_ip_from_pod_and_node(env: Env) -> None:
    replies = env.ask(env.pod(LOCAL_B), "10.96.0.10", 80, count=8)
    assert {r.split()[0] for r in replies} <= {"pod-1-2", "pod-2-2"}, replies
    # pod to service inside the cluster CIDR: no masquerade, the endpoint sees the pod
    assert all(r.split()[1] == LOCAL_B for r in replies), replies
    replies = env.ask(env.cluster.node, "10.96.0.10", 80, count=3)
    assert all(r.split()[0] in {"pod-1-2", "pod-2-2"} for r in replies), replies


def test_udp(env: Env) -> None:
    replies = env.ask(env.pod(LOCAL_B), "10.96.0.10", 53, proto="udp", count=3)
    assert all(r.split()[0] in {"pod-1-2", "pod-2-2"} for r in replies), replies


def test_nodeport_external_ip_and_lb_from_client(env: Env) -> None:
    for ip, port in ((NODE_IP, 30080), ("10.98.0.5", 80), ("10.98.0.6", 80)):
        replies = env.ask(env.cluster.client, ip, port, count=3)
        assert all(r.split()[0] in {"pod-1-2", "pod-2-2"} for r in replies), (ip, replies)
        # eTP Cluster: masqueraded, the client address is not seen
        assert all(r.split()[1] != CLIENT_IP for r in replies), (ip, replies)


def test_lb_source_ranges_drop_others(env: Env) -> None:
    assert env.ask(env.cluster.client, "10.98.0.7", 80, timeout=0.5) == ["timeout"]


def test_external_local_preserves_client_ip(env: Env) -> None:
    replies = env.ask(env.cluster.client, NODE_IP, 30081, count=4)
    assert replies == [f"pod-1-3 {CLIENT_IP}"] * 4


def test_no_endpoints_is_refused(env: Env) -> None:
    assert env.ask(env.pod(LOCAL_A), "10.96.0.12", 80) == ["refused"]
    assert env.ask(env.cluster.client, NODE_IP, 30082) == ["refused"]


def test_affinity_sticks(env: Env) -> None:
    replies = env.ask(env.pod(LOCAL_B), "10.96.0.13", 80, count=8)
    assert len({r.split()[0] for r in replies}) == 1, replies


def test_hairpin_is_masqueraded(env: Env) -> None:
    replies = env.ask(env.pod(LOCAL_A), "10.96.0.14", 80, count=2)
    assert all(r.split()[0] == "pod-1-2" and r.split()[1] != LOCAL_A for r in replies), replies


def test_partial_sync_touches_only_changed_chains(env: Env) -> None:
    env.ask(env.pod(LOCAL_B), "10.96.0.14", 80, count=3)
    hair_sep = R.endpoint_chain(HAIRPIN.name, f"{LOCAL_A}:8080")
    before = _dnat_packets(env, hair_sep)
    assert before >= 3
    extra = svc(key("default", "extra", "http"), "10.96.0.20", 80,
                endpoints=[ep(REMOTE, 8080)])
    env.sync(*BASE, extra)
    assert _dnat_packets(env, hair_sep) == before  # not flushed: counters survive
    assert env.ask(env.pod(LOCAL_B), "10.96.0.20", 80) == [f"pod-2-2 {LOCAL_B}"]
    env.sync(*BASE)
    assert "10.96.0.20" not in env.host.save("nat")
    assert not [c for c in _chains(env) if c.endswith(R.port_proto_hash(extra.name))]


def test_endpoint_removal_converges(env: Env) -> None:
    shrunk = svc(WEB.key, "10.96.0.10", 80, node_port=30080, external_ips=WEB.external_ips,
                 load_balancer_ips=WEB.load_balancer_ips,
                 load_balancer_source_ranges=WEB.load_balancer_source_ranges,
                 endpoints=[ep(LOCAL_A, 8080, True)])
    others = [p for p in BASE if p.key != WEB.key]
    env.sync(shrunk, *others)
    try:
        replies = env.ask(env.pod(LOCAL_B), "10.96.0.10", 80, count=6)
        assert {r.split()[0] for r in replies} == {"pod-1-2"}, replies
        gone = R.endpoint_chain(WEB.name, f"{REMOTE}:8080")
        assert gone not in _chains(env)
    finally:
        env.sync(*BASE)


def test_describe_reports_chains_with_counters(env: Env) -> None:
    env.ask(env.pod(LOCAL_B), "10.96.0.14", 80)
    info = env.host.call("describe", HAIRPIN.key)
    assert info["programmed"] is True
    sep = R.endpoint_chain(HAIRPIN.name, f"{LOCAL_A}:8080")
    assert sep in info["chains"]
    dnat = [r for r in info["tables"]["nat"][sep] if "DNAT" in r["rule"]]
    assert dnat and dnat[0]["packets"] >= 1
    assert any("10.96.0.14" in r["rule"] for r in info["tables"]["nat"]["KUBE-SERVICES"])


def test_trace_follows_the_live_rules(env: Env) -> None:
    """explain's packet verdicts: the tracer over the kernel's own iptables-save output agrees
    with what real packets did in the tests above."""
    web = env.host.call("trace", {"source_ip": LOCAL_B, "protocol": "TCP",
                                  "dest_ip": "10.96.0.10", "dest_port": 80})
    assert web["verdict"] == "ACCEPT" and not web["masquerade"]
    assert sorted(web["endpoints"]) == [f"{LOCAL_A}:8080", f"{REMOTE}:8080"]
    local = env.host.call("trace", {"source_ip": CLIENT_IP, "protocol": "TCP",
                                    "dest_ip": NODE_IP, "dest_port": 30081})
    assert local["endpoints"] == [f"{LOCAL_B}:8080"] and not local["masquerade"]
    empty = env.host.call("trace", {"source_ip": LOCAL_A, "protocol": "TCP",
                                    "dest_ip": "10.96.0.12", "dest_port": 80})
    assert empty["verdict"] == "REJECT" and empty["endpoints"] == []


def test_audit_reports_stale_and_missing_chains(env: Env) -> None:
    view = NodeView("node", env.host.node_ips, "", {p.key: p for p in BASE})
    assert env.host.call("audit", view) == []
    env.host.call("writer", ("ensure_chain", ("nat", "KUBE-SVC-STALESTALESTALE")))
    try:
        assert env.host.call("audit", view) == [
            "IPv4 nat chain KUBE-SVC-STALESTALESTALE is programmed but no service owns it"]
    finally:
        env.host.call("writer", ("delete_chain", ("nat", "KUBE-SVC-STALESTALESTALE")))


def test_canary_loss_asks_for_full_sync(env: Env) -> None:
    assert env.host.call("canary_check") is True
    assert env.host.call("needs_full_sync") is False
    env.host.call("writer", ("delete_chain", ("mangle", R.KUBE_PROXY_CANARY)))
    # The sync path does not look at the kernel: only the monitor's check notices.
    assert env.host.call("needs_full_sync") is False
    assert env.host.call("canary_check") is False
    assert env.host.call("needs_full_sync") is True
    env.sync(*BASE, full=True)
    assert env.host.call("needs_full_sync") is False
    assert env.host.call("canary_check") is True


def test_zz_cleanup_removes_ours_and_nothing_else(env: Env) -> None:
    removed = env.host.call("cleanup")
    assert removed, "cleanup reported nothing"
    nat = env.host.save("nat")
    flt = env.host.save("filter")
    ours = [c for c in _chains(env) + _names(flt)
            if c.startswith("KUBE-") and c != R.KUBE_FIREWALL]
    assert not ours, ours
    assert "-A PREROUTING -j OTHER-AGENT" in nat and ":OTHER-AGENT" in nat
    assert "KUBE-SERVICES" not in nat and "KUBE-SERVICES" not in flt
    env.sync(*BASE, full=True)  # leave the module's state usable


def _names(save: str) -> list[str]:
    return [line[1:].split()[0] for line in save.splitlines() if line.startswith(":")]


def _chains(env: Env) -> list[str]:
    return _names(env.host.save("nat"))


def _dnat_packets(env: Env, chain: str) -> int:
    info = env.host.call("describe", HAIRPIN.key)
    return sum(int(r["packets"]) for r in info["tables"]["nat"].get(chain, [])
               if "DNAT" in r["rule"])
