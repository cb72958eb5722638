"""IPVS mode against a real kernel with real traffic between namespaces (run in the VM:
``plugins/kproxy-ipvs/vm/run-tests.sh``). Each test programs the ``node`` namespace of a
`ClusterSandbox` from a forked child that joined it, and checks traffic from the client,
pods and node2."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import kproxy_ipvs.cleanup
import kproxy_ipvs.proxier
import pyroute2
import pytest
from ipvs_helpers import context, ep, request, svc, view

from kproxy_core.backend import SyncRequest
from kproxy_core.model import NodeView
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import ClusterSandbox, NetNS, wait_for_port

pytestmark = pytest.mark.root

# Imported once, here: every scenario runs in a forked child, which inherits them; under TCG
# importing pyroute2 (which the netlink layer does lazily) takes tens of seconds per child.
_PRELOADED = (kproxy_ipvs.proxier, kproxy_ipvs.cleanup, pyroute2.IPVS, pyroute2.IPRoute,
              pyroute2.IPSet, pyroute2.IPVSService, pyroute2.IPVSDest)

CONFIG = {"clusterCIDR": "10.244.0.0/16"}
LOCAL1, LOCAL2, REMOTE = "10.244.1.2", "10.244.1.3", "10.244.2.2"
#: Bound on one scenario in a namespace: generous, the VM emulates the CPU (TCG).
NETNS_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSandbox]:
    if not os.path.exists("/proc/net/ip_vs") and subprocess.run(
            ["modprobe", "ip_vs"], check=False).returncode != 0:
        pytest.fail("this kernel has no IPVS (ip_vs): run these tests with vm/run-tests.sh")
    with ClusterSandbox(local_pods=2, remote_pods=1) as sandbox:
        for pod in sandbox.pods:
            # Under TCG emulation a Python start takes seconds: wait longer than start_echo.
            pod.ns.python("kproxy_core.testing.echo", "serve", "--name", pod.name,
                          "--tcp", "8080", "--udp", "8080", stdout=subprocess.DEVNULL)
        for pod in sandbox.pods:
            wait_for_port(pod.ns, pod.ip, 8080, timeout=120)
        yield sandbox


def echo(ns: NetNS, proto: str, host: str, port: int, count: int = 1,
         timeout: float = 1.0) -> list[str]:
    """``count`` requests from ``ns``: reply lines, or ``refused``/``timeout``/``error …``.
    In a forked child, not a new interpreter: under TCG a Python start takes seconds, and the
    suite makes dozens of requests."""
    from kproxy_core.testing.echo import tcp_request, udp_request

    request_once = tcp_request if proto == "tcp" else udp_request

    def run() -> list[str]:
        lines = []
        for _ in range(count):
            try:
                lines.append(request_once(host, port, timeout))
            except ConnectionRefusedError:
                lines.append("refused")
            except TimeoutError:
                lines.append("timeout")
            except OSError as exc:
                lines.append(f"error {exc}")
        return lines

    return in_netns(ns.name, run, timeout=NETNS_TIMEOUT)


def program(cluster: ClusterSandbox, steps: list[NodeView], check: Callable[[Any], Any],
            config: dict[str, Any] | None = None, full_each: bool = False) -> Any:
    """In the node namespace: sync each view in turn (partial after the first), then call
    ``check(proxier)`` there and return its result."""

    def scenario() -> Any:
        from kproxy_ipvs.proxier import IpvsProxier

        proxier = IpvsProxier(context({**CONFIG, **(config or {})}))
        results = []
        previous: NodeView | None = None
        for node_view in steps:
            req: SyncRequest = request(node_view, previous, full=full_each)
            results.append(dict(proxier.sync(req).counters))
            previous = node_view
        out = check(proxier)
        proxier.close()
        return results, out

    return in_netns(cluster.node.name, scenario, timeout=NETNS_TIMEOUT)


def names(lines: list[str]) -> set[str]:
    return {line.split()[0] for line in lines if line.startswith("pod-")}


def sources(lines: list[str]) -> set[str]:
    return {line.split()[1] for line in lines if line.startswith("pod-")}


def cleanup_node(cluster: ClusterSandbox) -> list[str]:
    def run() -> list[str]:
        from ipvs_helpers import FakeConfig
        from kproxy_ipvs.cleanup import cleanup

        removed: list[str] = cleanup(FakeConfig({}), logging.getLogger("t"))
        return removed

    return in_netns(cluster.node.name, run, timeout=NETNS_TIMEOUT)


@pytest.fixture(autouse=True)
def _clean(cluster: ClusterSandbox) -> Iterator[None]:
    yield
    cleanup_node(cluster)


ALL = (ep(LOCAL1), ep(LOCAL2), ep(REMOTE, local=False))


def test_clusterip_nodeport_udp_and_masquerade(cluster: ClusterSandbox) -> None:
    web = svc("web", "10.96.0.10", 80, ALL, node_port=30080)
    dns = svc("dns", "10.96.0.53", 53, ALL, protocol="UDP")

    def check(_p: Any) -> dict[str, Any]:
        client = cluster.client
        pod1 = cluster.pods[0].ns
        return {
            "cip": echo(client, "tcp", "10.96.0.10", 80, count=6),
            "np": echo(client, "tcp", cluster.node_ip, 30080, count=3),
            "udp": echo(client, "udp", "10.96.0.53", 53, count=3),
            "from_pod": echo(pod1, "tcp", "10.96.0.10", 80, count=6),
            "ipvsadm": cluster.node.run(["ipvsadm", "-Ln"]).stdout,
            "addr": cluster.node.run(["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]).stdout,
            "sets": cluster.node.run(["ipset", "save"]).stdout,
        }

    _counters, out = program(cluster, [view(web, dns)], check)
    assert len(names(out["cip"])) >= 2, out["cip"]
    # The client is outside the cluster CIDR: masqueraded to the node.
    assert sources(out["cip"]) <= {"10.99.0.1", "10.244.1.1"}, out["cip"]
    assert len(names(out["np"])) >= 2 and sources(out["np"]) <= {"10.99.0.1", "10.244.1.1"}
    assert names(out["udp"]), out["udp"]
    # Pod traffic keeps its source, except hairpin (KUBE-LOOP-BACK masquerades it).
    assert "10.244.1.2" in sources(out["from_pod"]) or "10.244.1.1" in sources(out["from_pod"])
    assert "TCP  10.96.0.10:80 rr" in out["ipvsadm"]
    assert "-> 10.244.2.2:8080" in out["ipvsadm"] and "Masq" in out["ipvsadm"]
    assert "10.96.0.10/32" in out["addr"] and "10.96.0.53/32" in out["addr"]
    assert "add KUBE-CLUSTER-IP 10.96.0.10,tcp:80" in out["sets"]
    assert "add KUBE-NODE-PORT-TCP 30080" in out["sets"]
    assert "add KUBE-LOOP-BACK 10.244.1.2,tcp:8080,10.244.1.2" in out["sets"]


def test_external_traffic_policy_local_keeps_client_ip(cluster: ClusterSandbox) -> None:
    web = svc("web", "10.96.0.11", 80, ALL, node_port=30081, local_only_external=True,
              external_ips=("10.98.0.7",))

    def check(_p: Any) -> dict[str, Any]:
        return {"np": echo(cluster.client, "tcp", cluster.node_ip, 30081, count=6),
                "eip": echo(cluster.client, "tcp", "10.98.0.7", 80, count=4)}

    _c, out = program(cluster, [view(web)], check)
    assert names(out["np"]) <= {"pod-1-2", "pod-1-3"} and names(out["np"]), out["np"]
    assert sources(out["np"]) == {"10.99.0.100"}, out["np"]
    assert names(out["eip"]) <= {"pod-1-2", "pod-1-3"} and names(out["eip"]), out["eip"]
    assert sources(out["eip"]) == {"10.99.0.100"}


def test_external_traffic_policy_local_without_local_endpoints(cluster: ClusterSandbox) -> None:
    remote = svc("remote", "10.96.0.20", 80, (ep(REMOTE, local=False),), node_port=30083,
                 local_only_external=True, external_ips=("10.98.0.8",))

    def check(_p: Any) -> dict[str, Any]:
        pod1 = cluster.pods[0].ns
        return {"np": echo(cluster.client, "tcp", cluster.node_ip, 30083, timeout=2),
                "eip": echo(cluster.client, "tcp", "10.98.0.8", 80, timeout=2),
                "pod_np": echo(pod1, "tcp", cluster.node_ip, 30083, count=2),
                "cip": echo(cluster.client, "tcp", "10.96.0.20", 80, count=2)}

    _c, out = program(cluster, [view(remote)], check)
    # External clients are dropped (not rejected)...
    assert out["np"] == ["timeout"], out
    assert out["eip"] == ["timeout"], out
    # ...while a pod on the node still reaches the remote endpoint, and the ClusterIP works.
    assert names(out["pod_np"]) == {"pod-2-2"}, out
    assert names(out["cip"]) == {"pod-2-2"}, out


NODE_SOURCES = {"10.99.0.1", "10.244.1.1"}  # the node, as masquerade picks its address


@pytest.mark.parametrize(("config", "remote_sources"), [
    # The remote pod is in the cluster CIDR: kept as is.
    ({}, {REMOTE}),
    # Not in this node's pod CIDR / not in through a pod interface (veth*): masqueraded.
    ({"detectLocalMode": "NodeCIDR"}, NODE_SOURCES),
    ({"detectLocalMode": "InterfaceNamePrefix", "detectLocal.interfaceNamePrefix": "veth"},
     NODE_SOURCES),
], ids=["ClusterCIDR", "NodeCIDR", "InterfaceNamePrefix"])
def test_detect_local_mode_decides_cluster_ip_masquerade(
        cluster: ClusterSandbox, config: dict[str, Any], remote_sources: set[str]) -> None:
    web = svc("detect", "10.96.0.21", 80, (ep(LOCAL2),))
    node_view = view(web, pod_cidrs=("10.244.1.0/24",))

    def check(_p: Any) -> dict[str, Any]:
        return {"local": echo(cluster.pods[0].ns, "tcp", "10.96.0.21", 80, count=2),
                "remote": echo(cluster.pods[2].ns, "tcp", "10.96.0.21", 80, count=2),
                "client": echo(cluster.client, "tcp", "10.96.0.21", 80, count=2)}

    _c, out = program(cluster, [node_view], check, config=config)
    assert sources(out["local"]) == {LOCAL1}, out
    assert sources(out["remote"]) and sources(out["remote"]) <= remote_sources, out
    assert sources(out["client"]) and sources(out["client"]) <= NODE_SOURCES, out


def test_load_balancer_source_ranges_and_external_ip(cluster: ClusterSandbox) -> None:
    allowed = svc("lb-ok", "10.96.0.12", 80, ALL, load_balancer_ips=("10.98.0.1",),
                  load_balancer_source_ranges=("10.99.0.100/32",))
    denied = svc("lb-no", "10.96.0.13", 80, ALL, load_balancer_ips=("10.98.0.2",),
                 load_balancer_source_ranges=("192.0.2.0/24",))
    eip = svc("eip", "10.96.0.14", 80, ALL, external_ips=("10.98.0.3",))

    def check(_p: Any) -> dict[str, Any]:
        return {"ok": echo(cluster.client, "tcp", "10.98.0.1", 80, count=2),
                "no": echo(cluster.client, "tcp", "10.98.0.2", 80, count=1),
                "eip": echo(cluster.client, "tcp", "10.98.0.3", 80, count=2)}

    _c, out = program(cluster, [view(allowed, denied, eip)], check)
    assert names(out["ok"]), out
    assert out["no"] == ["timeout"], out
    assert names(out["eip"]), out


def test_session_affinity(cluster: ClusterSandbox) -> None:
    sticky = svc("sticky", "10.96.0.15", 80, ALL, session_affinity_timeout=600)

    def check(_p: Any) -> dict[str, Any]:
        return {"lines": echo(cluster.client, "tcp", "10.96.0.15", 80, count=6),
                "ipvsadm": cluster.node.run(["ipvsadm", "-Ln"]).stdout}

    _c, out = program(cluster, [view(sticky)], check)
    assert len(names(out["lines"])) == 1, out["lines"]
    assert "persistent 600" in out["ipvsadm"]


def test_no_endpoints_rejects(cluster: ClusterSandbox) -> None:
    empty = svc("empty", "10.96.0.16", 80, ())

    def check(_p: Any) -> list[str]:
        return echo(cluster.client, "tcp", "10.96.0.16", 80, timeout=2)

    _c, out = program(cluster, [view(empty)], check)
    assert out == ["refused"]


def test_incremental_change_and_graceful_termination(cluster: ClusterSandbox) -> None:
    before = svc("web", "10.96.0.17", 80, (ep(LOCAL1), ep(LOCAL2)))
    other = svc("other", "10.96.0.18", 80, (ep(REMOTE, local=False),))

    def scenario() -> Any:
        from kproxy_ipvs.proxier import IpvsProxier
        from kproxy_ipvs.rules import RealServer, VSKey

        proxier = IpvsProxier(context(CONFIG))
        proxier.sync(request(view(before, other)))
        # A long-lived connection from the client, pinned to whichever pod it reached.
        holder = cluster.client.spawn(
            [sys.executable, "-c",
             "import socket,time;s=socket.create_connection(('10.96.0.17',80));"
             "print(s.recv(100).decode().split()[0],flush=True);time.sleep(30)"],
            stdout=subprocess.PIPE)
        assert holder.stdout is not None
        pinned = holder.stdout.readline().decode().strip()
        first = ep(LOCAL1) if pinned == "pod-1-2" else ep(LOCAL2)
        keep = ep(LOCAL2) if pinned == "pod-1-2" else ep(LOCAL1)
        changed = svc("web", "10.96.0.17", 80, (keep,))
        counters = dict(proxier.sync(request(view(changed, other), view(before, other))).counters)
        vs = VSKey("TCP", "10.96.0.17", 80)
        dests = proxier.kernel.list_dests(vs)
        weight_removed = dests[RealServer(first.ip, 8080)].weight
        new_conns = names(echo(cluster.client, "tcp", "10.96.0.17", 80, count=4))
        holder.kill()
        holder.wait()
        proxier.close()
        return counters, weight_removed, new_conns, pinned

    counters, weight, new_conns, pinned = in_netns(cluster.node.name, scenario,
                                                   timeout=NETNS_TIMEOUT)
    assert weight == 0
    assert pinned not in new_conns and new_conns, new_conns
    # One changed port: the removed endpoint's weight goes to 0 and its hairpin entry
    # (KUBE-LOOP-BACK) goes; no virtual server, address or other set churn.
    assert counters["kernel_ops"] == 2, counters
    assert counters.get("real_server_update") == 1 and counters.get("set_entry_del") == 1


def test_bulk_first_sync(cluster: ClusterSandbox) -> None:
    """Enough objects for the bulk paths (ipvsadm --restore, ip -batch, ipset restore)."""
    count = 40  # > netlink.BULK_MIN addresses and set entries
    many = [svc(f"bulk{i}", f"10.96.1.{i}", 80, ALL,
                session_affinity_timeout=60 if i % 2 else None) for i in range(1, count + 1)]

    def check(_p: Any) -> dict[str, Any]:
        return {"lines": echo(cluster.client, "tcp", "10.96.1.7", 80, count=2),
                "ipvsadm": cluster.node.run(["ipvsadm", "-Ln"]).stdout,
                "addr": cluster.node.run(["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]).stdout,
                "sets": cluster.node.run(["ipset", "save", "KUBE-CLUSTER-IP"]).stdout}

    counters, out = program(cluster, [view(*many)], check)
    assert counters[0]["virtual_server_add"] == count
    assert counters[0]["real_server_add"] == 3 * count
    assert out["ipvsadm"].count("Masq") == 3 * count, out["ipvsadm"]
    assert out["ipvsadm"].count("persistent 60") == count // 2, out["ipvsadm"]
    assert all(f"10.96.1.{i}/32" in out["addr"] for i in range(1, count + 1)), out["addr"]
    assert all(f"add KUBE-CLUSTER-IP 10.96.1.{i},tcp:80" in out["sets"]
               for i in range(1, count + 1)), out["sets"]
    assert len(names(out["lines"])) == 1, out["lines"]


def test_cleanup_removes_everything(cluster: ClusterSandbox) -> None:
    web = svc("web", "10.96.0.19", 80, ALL, node_port=30082)
    program(cluster, [view(web)], lambda _p: None)
    removed = cleanup_node(cluster)
    assert any("virtual servers" in line for line in removed), removed
    listing = cluster.node.run(["ipvsadm", "-Ln"]).stdout.splitlines()
    # Past the three header lines (the last one is "  -> RemoteAddress:Port ...").
    assert listing[3:] == [], listing
    assert cluster.node.run(["ip", "link", "show", "kube-ipvs0"], check=False).returncode != 0
    assert "KUBE-" not in cluster.node.run(["ipset", "list", "-n"]).stdout
    assert "KUBE-SERVICES" not in cluster.node.run(["iptables-save", "-t", "nat"]).stdout
