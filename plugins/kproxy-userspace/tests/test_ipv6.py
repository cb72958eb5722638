"""IPv6 traffic through the userspace mode (root, namespaces).

The shared `ClusterSandbox` wires IPv4 only, so this module adds IPv6 addresses and routes to
the namespaces of its own sandbox: ULA prefixes, ``nodad`` so addresses work at once, and the
same routed layout as IPv4 (a pod has a /128 and a default route via a gateway address on its
node-side veth).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator

import pytest
from helpers import HERE, ProxyDriver, echo, pods_of, udp_connected

from kproxy_core.testing.netns import ClusterSandbox, NetNS

pytestmark = pytest.mark.root

NODE6 = "fd00:99::1"
CLIENT6 = "fd00:99::100"
VIP6 = "fd00:96::10"
POD_GATEWAY6 = "fd00:244:1::1"


def add6(ns: NetNS, *args: str) -> None:
    ns.run(["ip", "-6", *args])


@pytest.fixture(scope="module")
def sandbox() -> Iterator[tuple[ClusterSandbox, dict[str, str]]]:
    if os.geteuid() != 0:
        pytest.fail("these tests need root: they create network namespaces")
    sb = ClusterSandbox(local_pods=2, remote_pods=0)
    try:
        add6(sb.node, "addr", "add", f"{NODE6}/64", "dev", "eth0", "nodad")
        add6(sb.client, "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
        sb.node.sysctl("net.ipv6.conf.all.forwarding", "1")
        # As for IPv4: the node needs some route to VIPs for its own connects to reach the
        # OUTPUT hook; the gateway exists nowhere.
        add6(sb.node, "route", "add", "default", "via", "fd00:99::254")
        add6(sb.client, "route", "add", "fd00:96::/112", "via", NODE6)
        pods6: dict[str, str] = {}
        for index, member in enumerate(sb.pods):
            ip6 = f"fd00:244:1::{index + 2}"
            # The node-side veth of this pod (what its IPv4 /32 route points at).
            host_if = sb.node.run(["ip", "-o", "route", "get", member.ip]).stdout.split(
                " dev ")[1].split()[0]
            add6(sb.node, "addr", "add", f"{POD_GATEWAY6}/128", "dev", host_if, "nodad")
            add6(sb.node, "route", "add", f"{ip6}/128", "dev", host_if)
            add6(member.ns, "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad")
            add6(member.ns, "route", "add", POD_GATEWAY6, "dev", "eth0")
            add6(member.ns, "route", "add", "default", "via", POD_GATEWAY6)
            sb.start_echo(member)
            pods6[member.name] = ip6
        yield sb, pods6
    finally:
        sb.close()


@pytest.fixture
def proxy(sandbox: tuple[ClusterSandbox, dict[str, str]]) -> Iterator[ProxyDriver]:
    sb, _pods = sandbox
    driver = ProxyDriver(sb.node, node_ips=[sb.node_ip, NODE6], families=[4, 6])
    yield driver
    driver.close()


def services(pods6: dict[str, str]) -> list[dict[str, object]]:
    endpoints = [[ip, 8080] for ip in pods6.values()]
    return [
        dict(name="web6", port_name="http", protocol="TCP", cluster_ip=VIP6, port=80,
             node_port=30080, endpoints=endpoints),
        dict(name="dns6", port_name="dns", protocol="UDP", cluster_ip=VIP6, port=53,
             node_port=30053, endpoints=endpoints),
    ]


@pytest.mark.parametrize("origin", ["pod", "node", "client"])
def test_tcp_and_udp_over_ipv6(sandbox: tuple[ClusterSandbox, dict[str, str]],
                               proxy: ProxyDriver, origin: str) -> None:
    sb, pods6 = sandbox
    proxy.sync(*services(pods6), full=True)
    ns = {"pod": sb.pods[0].ns, "node": sb.node, "client": sb.client}[origin]
    names = sorted(pods6)
    for proto, port, node_port in (("tcp", 80, 30080), ("udp", 53, 30053)):
        replies = echo(ns, proto, VIP6, port, count=2)
        assert sorted(pods_of(replies)) == names, (proto, replies)
        # Endpoints see one of the node's IPv6 addresses, never the client's (not preserved).
        assert {line.split()[1] for line in replies} <= {NODE6, POD_GATEWAY6}, replies
        replies = echo(ns, proto, NODE6, node_port, count=2)
        assert sorted(pods_of(replies)) == names, (proto, replies)
    # The answer comes back from the address the client sent to.
    assert udp_connected(ns, VIP6, 53).split()[0] in names


def test_large_ipv6_transfer_is_intact(sandbox: tuple[ClusterSandbox, dict[str, str]],
                                       proxy: ProxyDriver) -> None:
    sb, pods6 = sandbox
    proxy.sync(*services(pods6), full=True)
    out = sb.client.run([sys.executable, str(HERE / "clients.py"), "bulk", VIP6, "80", "20"],
                        timeout=120).stdout.split()
    sent, received, count = out
    assert int(count) == 20 * 1024 * 1024
    assert sent == received
    assert len(sent) == len(hashlib.sha256().hexdigest())
