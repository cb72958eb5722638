"""Stale UDP conntrack cleanup against real conntrack entries in a namespace."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from kproxy_core.kernel.conntrack import (
    cleanup_stale_udp,
    cleanup_stale_udp_many,
    clear_udp_endpoint,
    clear_udp_nodeport,
    clear_udp_service,
    stale_udp_predicate,
)
from kproxy_core.model import Endpoint, ResolvedServicePort, ServicePortKey, ServicePortName
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import NetNS, Sandbox

NODE_IP = "10.1.0.1"
SERVING = "10.1.0.2"
GONE = "10.1.0.3"
VIP = "10.96.0.10"

# source port -> (destination, port, DNAT to or None)
FLOWS: dict[int, tuple[str, int, str | None]] = {
    1001: (VIP, 53, SERVING),          # to the live endpoint: kept
    1002: (VIP, 53, GONE),             # to a removed endpoint: deleted
    1003: (VIP, 53, None),             # sent while there were no endpoints: deleted
    1004: (NODE_IP, 30053, SERVING),   # NodePort to the live endpoint: kept
    1005: (NODE_IP, 30053, GONE),      # NodePort to a removed endpoint: deleted
    1006: ("10.50.0.1", 30053, None),  # a remote host on the NodePort number: kept
    1007: ("10.96.0.11", 53, None),    # another service: kept
    1008: ("10.98.0.7", 53, GONE),     # external IP to a removed endpoint: deleted
}


def endpoint(ip: str) -> Endpoint:
    return Endpoint(ip, 53, is_local=True, ready=True, serving=True, terminating=False)


def dns_port(endpoints: tuple[Endpoint, ...], protocol: str = "UDP") -> ResolvedServicePort:
    key = ServicePortKey(4, ServicePortName("kube-system", "dns", "dns", protocol))  # type: ignore[arg-type]
    return ResolvedServicePort(key, VIP, 53, node_port=30053, external_ips=("10.98.0.7",),
                               cluster_endpoints=endpoints, all_reachable_endpoints=endpoints,
                               has_any_endpoints=bool(endpoints))


@pytest.fixture
def ns() -> Iterator[NetNS]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to create network namespaces")
    with Sandbox() as sandbox:
        node = sandbox.netns("ct")
        # A veth pair with nobody behind it: packets are conntracked (and NATed) on the way
        # out, then die for lack of an ARP answer.
        node.run(["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"])
        node.run(["ip", "link", "set", "veth0", "up"])
        node.run(["ip", "link", "set", "veth1", "up"])
        node.run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", "veth0"])
        node.run(["ip", "route", "add", "10.0.0.0/8", "dev", "veth0"])
        rules = ["*nat"]
        for sport, (dst, dport, to) in FLOWS.items():
            if to is not None:
                rules.append(f"-A OUTPUT -p udp --sport {sport} -d {dst} --dport {dport} "
                             f"-j DNAT --to-destination {to}:53")
        rules.append("COMMIT\n")
        node.run(["iptables-nft-restore", "--noflush"], input="\n".join(rules))
        yield node


def make_flows() -> None:
    """One UDP packet per flow: locally generated packets create conntrack entries at once."""
    for sport, (dst, dport, _) in FLOWS.items():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("0.0.0.0", sport))
            sock.sendto(b"x", (dst, dport))


def remaining(ns: NetNS) -> set[int]:
    out = ns.run(["conntrack", "-L", "-p", "udp"]).stdout
    ports = set()
    for line in out.splitlines():
        for field in line.split():
            if field.startswith("sport="):
                ports.add(int(field[6:]))
                break
    return ports & set(FLOWS)


@pytest.mark.root
def test_cleanup_stale_udp_follows_upstream_rule(ns: NetNS) -> None:
    in_netns(ns.name, make_flows)
    assert remaining(ns) == set(FLOWS)
    current = dns_port((endpoint(SERVING),))
    deleted = in_netns(ns.name, lambda: cleanup_stale_udp(None, current, [NODE_IP]))
    assert remaining(ns) == {1001, 1004, 1006, 1007}
    assert deleted == 4


@pytest.mark.root
def test_many_services_in_one_dump_and_no_endpoint_case(ns: NetNS) -> None:
    in_netns(ns.name, make_flows)
    no_endpoints = dns_port(())
    # Nothing to do while the service has no endpoints (its traffic is REJECTed).
    assert in_netns(ns.name, lambda: cleanup_stale_udp(None, no_endpoints, [NODE_IP])) == 0
    assert in_netns(ns.name, lambda: cleanup_stale_udp(None, None, [NODE_IP])) == 0
    deleted = in_netns(ns.name, lambda: cleanup_stale_udp_many(
        [dns_port((endpoint(SERVING), endpoint(GONE))), dns_port((), "TCP")], [NODE_IP], 4))
    # Both endpoints serve: only the never-DNATed flow to the VIP is stale.
    assert deleted == 1 and remaining(ns) == set(FLOWS) - {1003}


@pytest.mark.root
def test_single_purpose_helpers(ns: NetNS) -> None:
    in_netns(ns.name, make_flows)
    assert in_netns(ns.name, lambda: clear_udp_endpoint(VIP, 53, GONE)) == 1
    assert remaining(ns) == set(FLOWS) - {1002}
    assert in_netns(ns.name, lambda: clear_udp_service(VIP, 53)) == 2
    assert remaining(ns) == set(FLOWS) - {1001, 1002, 1003}
    assert in_netns(ns.name, lambda: clear_udp_nodeport(30053)) == 3
    assert remaining(ns) == {1007, 1008}
    assert in_netns(ns.name, lambda: clear_udp_nodeport(30053)) == 0


def test_predicate_without_node_ips_matches_any_nodeport_destination() -> None:
    predicate = stale_udp_predicate(dns_port((endpoint(SERVING),)), [])
    assert predicate is not None
    assert predicate("10.50.0.1", 30053, "10.50.0.1")
    assert not predicate("10.50.0.1", 30053, SERVING)
    assert stale_udp_predicate(dns_port((endpoint(SERVING),), "TCP"), []) is None
    local_only = stale_udp_predicate(dns_port((endpoint(SERVING),)), [NODE_IP, "fd00::1"])
    assert local_only is not None
    assert not local_only("10.50.0.1", 30053, "10.50.0.1")
    assert local_only("127.0.0.1", 30053, "127.0.0.1")
