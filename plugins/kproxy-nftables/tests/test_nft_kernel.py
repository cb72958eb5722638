"""Real kernel, real traffic: the proxier runs inside the sandbox's ``node`` namespace and
echo servers in pods answer "<pod> <peer ip>"."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from kproxy_nftables import rules as R
from kproxy_nftables.proxier import endpoints_of
from nft_helpers import ep, key, svc
from nft_host import ProxierHost

from kproxy_core.model import ResolvedServicePort
from kproxy_core.testing.conformance import Flow
from kproxy_core.testing.netns import ClusterSandbox, NetNS, Sandbox

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

OTHER_TABLE = ("table ip other-agent {\n chain pre {\n  type nat hook prerouting priority 0;\n"
               " }\n}\n")


class Env:
    def __init__(self, cluster: ClusterSandbox, host: ProxierHost) -> None:
        self.cluster = cluster
        self.host = host

    def pod(self, ip: str) -> NetNS:
        return next(p.ns for p in self.cluster.pods if p.ip == ip)

    def ask(self, ns: NetNS, ip: str, port: int, *, proto: str = "tcp", count: int = 1,
            timeout: float = 1.0) -> list[str]:
        proc = ns.run([sys.executable, "-m", "kproxy_core.testing.echo", proto, ip, str(port),
                       "--timeout", str(timeout), "--count", str(count)], check=False)
        return proc.stdout.split("\n")[:-1]

    def sync(self, *ports: ResolvedServicePort, full: bool = False) -> None:
        self.host.sync(*ports, full=full)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (they create network namespaces)")
    cluster = ClusterSandbox(local_pods=2, remote_pods=1)
    host: ProxierHost | None = None
    try:
        for pod in cluster.pods:
            cluster.start_echo(pod)
        # REJECT's ICMP errors are rate-limited; back-to-back "refused" checks need them all.
        cluster.node.sysctl("net.ipv4.icmp_ratelimit", "0")
        cluster.node.run(["nft", "-f", "-"], input=OTHER_TABLE)
        host = ProxierHost(cluster.node.name, {"clusterCIDR": ("10.244.0.0/16",)})
        host.sync(*BASE, full=True)
        yield Env(cluster, host)
    finally:
        if host is not None:
            host.close()
        cluster.close()


def _handles(env: Env, chain: str) -> list[int]:
    out = env.host.run("nft", "-a", "list", "chain", "ip", R.TABLE, chain)
    return [int(line.rsplit("# handle ", 1)[1]) for line in out.splitlines()
            if "# handle " in line and not line.strip().startswith("chain")]


def test_dataplane_matches_the_model(env: Env) -> None:
    flows = env.host.call("dataplane")
    assert flows[Flow("cluster", "TCP", "10.96.0.10", 80)] == {f"{LOCAL_A}:8080",
                                                               f"{REMOTE}:8080"}
    assert flows[Flow("nodeport", "TCP", "v4", 30081)] == {f"{LOCAL_B}:8080"}
    assert flows[Flow("nodeport", "TCP", "v4", 30082)] == frozenset()


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
    # a port the ClusterIP does not serve is rejected by cluster-ips-check
    assert env.ask(env.pod(LOCAL_A), "10.96.0.10", 81) == ["refused"]


def test_affinity_sticks(env: Env) -> None:
    replies = env.ask(env.pod(LOCAL_B), "10.96.0.13", 80, count=8)
    assert len({r.split()[0] for r in replies}) == 1, replies


def test_hairpin_is_masqueraded(env: Env) -> None:
    replies = env.ask(env.pod(LOCAL_A), "10.96.0.14", 80, count=2)
    assert all(r.split()[0] == "pod-1-2" and r.split()[1] != LOCAL_A for r in replies), replies


def test_partial_sync_touches_only_changed_objects(env: Env) -> None:
    hair = R.SERVICE_PREFIX + R.chain_name_base(HAIRPIN.name)
    before = _handles(env, hair)
    assert before
    extra = svc(key("default", "extra", "http"), "10.96.0.20", 80,
                endpoints=[ep(REMOTE, 8080)])
    env.sync(*BASE, extra)
    sent = env.host.call("last_transaction")
    # Besides the port's own objects: its block in the shared address map (declared again:
    # a no-op for an existing map).
    assert sent and all("extra" in line or "10.96.0.20" in line
                        or line.startswith(f"add map ip {R.TABLE} endpoint-addrs-tcp-0 {{ ")
                        or (line.startswith(f"add element ip {R.TABLE} endpoint-addrs-tcp-0 {{ ")
                        and line.endswith(f" : {REMOTE} . 8080 }}")) for line in sent), sent
    assert env.host.call("last_writer") == "netlink"
    assert _handles(env, hair) == before  # not flushed: same rules, same handles
    assert env.ask(env.pod(LOCAL_B), "10.96.0.20", 80) == [f"pod-2-2 {LOCAL_B}"]
    env.sync(*BASE)
    table = env.host.call("table", 4)
    assert not [c for c in table.chains if "/extra/" in c]
    assert ("10.96.0.20", "tcp", 80) not in table.maps[R.SERVICE_IPS_MAP]
    assert "10.96.0.20" not in table.sets[R.CLUSTER_IPS_SET]


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
        table = env.host.call("table", 4)
        chain = R.SERVICE_PREFIX + R.chain_name_base(WEB.name)
        assert endpoints_of(table, chain) == {f"{LOCAL_A}:8080"}
        # Other services still reach REMOTE: its hairpin element stays.
        assert {"concat": [REMOTE, REMOTE]} in table.sets[R.HAIRPIN_SET]
    finally:
        env.sync(*BASE)


def test_describe_and_audit(env: Env) -> None:
    info = env.host.call("describe", HAIRPIN.key)
    assert info["missing_chains"] == [] and all(e["present"] for e in info["elements"])
    assert info["endpoints"] == [f"{LOCAL_A}:8080"]
    assert env.host.call("audit", env.host.view(*BASE)) == []
    stale = "service-STALE000-ns/gone/tcp/p"
    env.host.run("nft", "add", "chain", "ip", R.TABLE, stale)
    try:
        assert env.host.call("audit", env.host.view(*BASE)) == [f"ip: stale chain {stale}"]
    finally:
        env.host.run("nft", "delete", "chain", "ip", R.TABLE, stale)


def test_trace_follows_the_live_rules(env: Env) -> None:
    def trace(**kw: Any) -> dict[str, Any]:
        result: dict[str, Any] = env.host.call("trace", kw)
        return result

    web = trace(source_ip=LOCAL_B, protocol="TCP", dest_ip="10.96.0.10", dest_port=80)
    assert web["verdict"] == "ACCEPT" and not web["masquerade"]
    assert web["endpoints"] == [f"{LOCAL_A}:8080", f"{REMOTE}:8080"]
    local = trace(source_ip=CLIENT_IP, protocol="TCP", dest_ip=NODE_IP, dest_port=30081)
    assert local["endpoints"] == [f"{LOCAL_B}:8080"] and not local["masquerade"]
    cluster = trace(source_ip=CLIENT_IP, protocol="TCP", dest_ip=NODE_IP, dest_port=30080)
    assert cluster["masquerade"] and len(cluster["endpoints"]) == 2
    empty = trace(source_ip=LOCAL_A, protocol="TCP", dest_ip="10.96.0.12", dest_port=80)
    assert empty["verdict"] == "REJECT" and empty["endpoints"] == []
    fenced = trace(source_ip=CLIENT_IP, protocol="TCP", dest_ip="10.98.0.7", dest_port=80)
    assert fenced["verdict"] == "DROP"


@pytest.mark.parametrize("disturb", ["delete table", "flush ruleset"])
def test_lost_table_makes_the_next_sync_full_and_traffic_returns(env: Env,
                                                                 disturb: str) -> None:
    assert env.host.call("needs_full_sync") is False
    assert env.ask(env.pod(LOCAL_B), "10.96.0.14", 80) == [f"pod-1-2 {LOCAL_B}"]
    if disturb == "delete table":
        env.host.run("nft", "delete", "table", "ip", R.TABLE)
    else:
        env.host.run("nft", "flush", "ruleset")
        env.cluster.node.run(["nft", "-f", "-"], input=OTHER_TABLE)  # cleanup test's witness
    assert env.ask(env.pod(LOCAL_B), "10.96.0.14", 80, timeout=0.5) == ["timeout"]  # no DNAT
    # The core's choice for the next sync (nothing changed: a periodic one).
    full = env.host.call("needs_full_sync")
    assert full is True
    env.sync(*BASE, full=full)
    assert env.host.call("needs_full_sync") is False
    assert env.ask(env.pod(LOCAL_B), "10.96.0.14", 80) == [f"pod-1-2 {LOCAL_B}"]


def test_full_sync_removes_objects_of_a_previous_run(env: Env) -> None:
    # What a crashed earlier process left: chains and an affinity set no service owns.
    env.host.run("nft", "-f", "-", stdin=(
        f"add chain ip {R.TABLE} endpoint-OLD00000-ns/old/tcp/p__10.1.1.1/80\n"
        f"add set ip {R.TABLE} affinity-OLD00000-ns/old/tcp/p__10.1.1.1/80 "
        "{ type ipv4_addr ; flags dynamic,timeout ; timeout 60s ; }\n"))
    env.sync(*BASE, full=True)
    table = env.host.call("table", 4)
    assert not [c for c in table.chains if "OLD00000" in c]
    assert not [s for s in table.sets if "OLD00000" in s]


def test_zz_cleanup_removes_ours_and_nothing_else(env: Env) -> None:
    removed = env.host.call("cleanup")
    assert removed == [f"nftables: deleted table ip {R.TABLE}"]
    tables = env.host.run("nft", "list", "tables")
    assert "other-agent" in tables and R.TABLE not in tables
    assert env.host.call("cleanup") == []


def test_dual_stack_tables() -> None:
    """Both families in one transaction, each in its own table."""
    v6 = svc(key("default", "web", "http", family=6), "fd00:96::10", 80,
             endpoints=[ep("fd00:244::2", 8080)], node_port=30080)
    with Sandbox() as sandbox:
        ns = sandbox.netns("nftv6")
        host = ProxierHost(ns.name, {"clusterCIDR": ("10.244.0.0/16", "fd00:244::/64")},
                           families=(4, 6))
        host.node_ips = ("10.99.0.1", "fd00:99::1")
        try:
            host.sync(WEB, v6, full=True)
            flows = host.call("dataplane")
            assert flows[Flow("cluster", "TCP", "fd00:96::10", 80)] == {"[fd00:244::2]:8080"}
            assert flows[Flow("nodeport", "TCP", "v6", 30080)] == {"[fd00:244::2]:8080"}
            assert flows[Flow("cluster", "TCP", "10.96.0.10", 80)] == {f"{LOCAL_A}:8080",
                                                                       f"{REMOTE}:8080"}
            six = host.call("table", 6)
            assert "fd00:99::1" in {str(e) for e in six.sets[R.NODEPORT_IPS_SET]}
            host.sync(WEB)
            assert host.call("table", 6).maps[R.SERVICE_IPS_MAP] == {}
        finally:
            host.close()
