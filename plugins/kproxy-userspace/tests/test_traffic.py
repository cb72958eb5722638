"""Real traffic through the userspace mode, inside a `ClusterSandbox` (root, namespaces)."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import HERE, Holder, ProxyDriver, echo, pods_of, udp_connected

from kproxy_core.testing.netns import ClusterSandbox, Pod

pytestmark = pytest.mark.root

VIP = "10.96.0.10"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[ClusterSandbox]:
    import os

    if os.geteuid() != 0:
        pytest.fail("these tests need root: they create network namespaces")
    sb = ClusterSandbox(local_pods=3, remote_pods=1)
    try:
        # pod-1-4 runs nothing: a dead endpoint.
        for member in sb.pods:
            if member.name != "pod-1-4":
                sb.start_echo(member)
        yield sb
    finally:
        sb.close()


@pytest.fixture
def proxy(sandbox: ClusterSandbox, request: pytest.FixtureRequest) -> Iterator[ProxyDriver]:
    options: dict[str, Any] = getattr(request, "param", {})
    driver = ProxyDriver(sandbox.node, **options)
    yield driver
    driver.close()


def pod(sb: ClusterSandbox, name: str) -> Pod:
    return next(p for p in sb.pods if p.name == name)


def eps(sb: ClusterSandbox, *names: str) -> list[list[Any]]:
    return [[pod(sb, n).ip, 8080] for n in names]


def service(sb: ClusterSandbox, *names: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = dict(name="web", port_name="http", protocol="TCP", cluster_ip=VIP,
                                port=80, node_port=30080, endpoints=eps(sb, *names))
    spec.update(extra)
    return spec


@pytest.mark.parametrize("origin", ["pod", "node", "client"])
def test_tcp_and_udp_through_cluster_ip_and_node_port(sandbox: ClusterSandbox,
                                                      proxy: ProxyDriver, origin: str) -> None:
    names = ("pod-1-2", "pod-1-3", "pod-2-2")
    tcp = service(sandbox, *names)
    udp = service(sandbox, *names, protocol="UDP", port=53, node_port=30053)
    proxy.sync(tcp, udp, full=True)
    ns = {"pod": pod(sandbox, "pod-1-2").ns, "node": sandbox.node,
          "client": sandbox.client}[origin]
    for proto, port, node_port in (("tcp", 80, 30080), ("udp", 53, 30053)):
        through_vip = pods_of(echo(ns, proto, VIP, port, count=3))
        assert sorted(through_vip) == sorted(names), (proto, through_vip)
        through_node_port = pods_of(echo(ns, proto, sandbox.node_ip, node_port, count=3))
        assert sorted(through_node_port) == sorted(names), (proto, through_node_port)
    assert udp_connected(ns, VIP, 53).split()[0] in names
    assert udp_connected(ns, sandbox.node_ip, 30053).split()[0] in names


def test_endpoints_see_a_node_address_not_the_client(sandbox: ClusterSandbox,
                                                     proxy: ProxyDriver) -> None:
    proxy.sync(service(sandbox, "pod-1-2"), full=True)
    reply = echo(sandbox.client, "tcp", VIP, 80)[0]
    assert reply.split()[1] != "10.99.0.100"  # client IP is not preserved, as upstream


def test_dead_endpoint_is_retried_on_the_next(sandbox: ClusterSandbox,
                                              proxy: ProxyDriver) -> None:
    proxy.sync(service(sandbox, "pod-1-4", "pod-1-2", "pod-1-4", "pod-1-3"), full=True)
    replies = echo(sandbox.client, "tcp", VIP, 80, count=6)
    assert set(pods_of(replies)) == {"pod-1-2", "pod-1-3"}, replies


def test_only_dead_endpoints_reset_the_client(sandbox: ClusterSandbox,
                                              proxy: ProxyDriver) -> None:
    proxy.sync(service(sandbox, "pod-1-4"), full=True)
    reply = echo(sandbox.client, "tcp", VIP, 80)[0]
    assert reply.startswith("error") or reply == "refused", reply


def test_client_ip_affinity(sandbox: ClusterSandbox, proxy: ProxyDriver) -> None:
    proxy.sync(service(sandbox, "pod-1-2", "pod-1-3", "pod-2-2", affinity=60), full=True)
    replies = pods_of(echo(sandbox.client, "tcp", VIP, 80, count=5))
    assert len(set(replies)) == 1, replies
    udp = service(sandbox, "pod-1-2", "pod-1-3", "pod-2-2", protocol="UDP", port=53,
                  node_port=0, affinity=60)
    proxy.sync(udp, full=True)
    first = pods_of(echo(sandbox.client, "udp", VIP, 53))[0]
    time.sleep(0.4)  # past the UDP idle timeout: a new session, same endpoint
    assert pods_of(echo(sandbox.client, "udp", VIP, 53, count=2)) == [first, first]


@pytest.mark.parametrize("proxy", [{"userspace.algorithm": "least-connections"}],
                         indirect=True)
def test_least_connections_avoids_busy_endpoints(sandbox: ClusterSandbox,
                                                 proxy: ProxyDriver) -> None:
    proxy.sync(service(sandbox, "pod-1-2", "pod-1-3", "pod-2-2"), full=True)
    holder = Holder(sandbox.client, VIP, 80, 2)
    try:
        busy = set(holder.pods)
        assert len(busy) == 2
        (idle,) = {"pod-1-2", "pod-1-3", "pod-2-2"} - busy
        # One client process per request: the previous short connection is closed by the
        # time the next one is picked.
        assert [pods_of(echo(sandbox.client, "tcp", VIP, 80))[0] for _ in range(3)] == [idle] * 3
        # An endpoint change keeps the counts of connections still open.
        proxy.sync(service(sandbox, "pod-2-2", "pod-1-3", "pod-1-2"))
        assert [pods_of(echo(sandbox.client, "tcp", VIP, 80))[0] for _ in range(2)] == [idle] * 2
    finally:
        holder.close()


def test_removed_endpoint_drains_and_removed_service_closes(sandbox: ClusterSandbox,
                                                            proxy: ProxyDriver) -> None:
    proxy.sync(service(sandbox, "pod-1-2"), full=True)
    listener = proxy.describe()["internal_listener"]
    holder = Holder(sandbox.client, VIP, 80, 1)
    try:
        assert holder.pods == ["pod-1-2"]
        proxy.sync(service(sandbox, "pod-1-3"))
        assert proxy.describe()["internal_listener"] == listener  # same listener, no rule churn
        assert pods_of(echo(sandbox.client, "tcp", VIP, 80, count=2)) == ["pod-1-3"] * 2
        assert holder.echo() == ["ping"]  # the old connection still works
        proxy.sync()
        assert echo(sandbox.client, "tcp", VIP, 80, timeout=0.5) == ["timeout"]
        listening = sandbox.node.run(["ss", "-Hltn", f"sport = :{listener}"]).stdout
        assert listening.strip() == ""
        # Connections of a deleted service are not kept: on nf_tables hosts the flow stops
        # once its portal rule is gone (see docs/modes/userspace.md, "Limits").
    finally:
        holder.close()


def test_external_traffic_uses_external_endpoints(sandbox: ClusterSandbox,
                                                  proxy: ProxyDriver) -> None:
    spec = service(sandbox, "pod-2-2", external_endpoints=eps(sandbox, "pod-1-2"),
                   external_ips=["10.98.0.5"])
    proxy.sync(spec, full=True)
    described = proxy.describe()
    assert described["internal_listener"] != described["external_listener"]
    assert pods_of(echo(sandbox.client, "tcp", VIP, 80, count=2)) == ["pod-2-2"] * 2
    assert pods_of(echo(sandbox.client, "tcp", sandbox.node_ip, 30080, count=2)) == \
        ["pod-1-2"] * 2
    assert pods_of(echo(sandbox.client, "tcp", "10.98.0.5", 80, count=2)) == ["pod-1-2"] * 2


def test_load_balancer_source_ranges(sandbox: ClusterSandbox, proxy: ProxyDriver) -> None:
    proxy.sync(service(sandbox, "pod-1-2", node_port=0, lb_ips=["10.98.0.7"],
                       source_ranges=["10.99.0.100/32"]), full=True)
    assert pods_of(echo(sandbox.client, "tcp", "10.98.0.7", 80)) == ["pod-1-2"]
    proxy.sync(service(sandbox, "pod-1-2", node_port=0, lb_ips=["10.98.0.7"],
                       source_ranges=["10.1.0.0/16"]))
    assert echo(sandbox.client, "tcp", "10.98.0.7", 80, timeout=0.5) == ["timeout"]


@pytest.mark.parametrize("proxy", [{"userspace.maxConnections": 1}], indirect=True)
def test_connection_limit_resets_extra_clients(sandbox: ClusterSandbox,
                                               proxy: ProxyDriver) -> None:
    proxy.sync(service(sandbox, "pod-1-2"), full=True)
    holder = Holder(sandbox.client, VIP, 80, 1)
    try:
        reply = echo(sandbox.client, "tcp", VIP, 80)[0]
        assert reply.startswith("error") and "reset" in reply.lower(), reply
    finally:
        holder.close()
    time.sleep(0.2)
    assert pods_of(echo(sandbox.client, "tcp", VIP, 80)) == ["pod-1-2"]


@pytest.mark.parametrize("proxy", [{"userspace.relay": "auto"}, {"userspace.relay": "splice"},
                                   {"userspace.relay": "copy"}],
                         indirect=True, ids=["auto", "splice", "copy"])
def test_large_transfer_is_intact(sandbox: ClusterSandbox, proxy: ProxyDriver) -> None:
    proxy.sync(service(sandbox, "pod-1-2"), full=True)
    out = sandbox.client.run([sys.executable, str(HERE / "clients.py"), "bulk", VIP, "80", "50"],
                             timeout=120).stdout.split()
    sent, received, count = out
    assert int(count) == 50 * 1024 * 1024
    assert sent == received
    assert len(hashlib.sha256().hexdigest()) == len(sent)
