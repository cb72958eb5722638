"""IPv6 traffic through the userspace mode (root, namespaces).

The shared `ClusterSandbox` built dual-stack (``ipv6=True``): the same routed layout as IPv4 in
ULA prefixes.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator

import pytest
from helpers import HERE, ProxyDriver, echo, pods_of, udp_connected

from kproxy_core.testing.netns import ClusterSandbox

pytestmark = pytest.mark.root

VIP6 = "fd00:96::10"
# The node-side gateway of pods on node 1 (ClusterSandbox's layout).
POD_GATEWAY6 = "fd00:244:1::1"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[tuple[ClusterSandbox, dict[str, str]]]:
    if os.geteuid() != 0:
        pytest.fail("these tests need root: they create network namespaces")
    sb = ClusterSandbox(local_pods=2, remote_pods=0, ipv6=True)
    try:
        pods6: dict[str, str] = {}
        for member in sb.pods:
            assert member.ip6 is not None
            sb.start_echo(member)
            pods6[member.name] = member.ip6
        yield sb, pods6
    finally:
        sb.close()


@pytest.fixture
def proxy(sandbox: tuple[ClusterSandbox, dict[str, str]]) -> Iterator[ProxyDriver]:
    sb, _pods = sandbox
    driver = ProxyDriver(sb.node, node_ips=[sb.node_ip, sb.node_ip6], families=[4, 6])
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
        assert {line.split()[1] for line in replies} <= {sb.node_ip6, POD_GATEWAY6}, replies
        replies = echo(ns, proto, sb.node_ip6, node_port, count=2)
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
