"""Stale UDP conntrack cleanup over netlink (pyroute2), for the kernel NAT modes.

UDP has no connection teardown: a conntrack entry DNATed to an endpoint that went away keeps
steering the client's packets there (DNS black holes), and an entry created while a service
had no endpoints (REJECTed, not DNATed) keeps bypassing the new DNAT rules. Both are fixed by
deleting the entries, as upstream ``pkg/proxy/conntrack/cleanup.go`` does: for a UDP service
with serving endpoints, delete entries whose original destination is one of its IPs and port
(cluster IP, external IPs, load-balancer IPs) or its NodePort, and whose reply source is not a
serving endpoint.

One difference from upstream, on purpose: NodePort entries are only matched when their
original destination is a node IP (``node_ips``, plus loopback), so a pod's unrelated UDP flow
to some remote host on the same port number is not cut. With empty ``node_ips`` any
destination matches, as upstream.

All functions act on the network namespace of the calling process and return the number of
entries deleted.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kproxy_core.model import ResolvedServicePort, ip_family

IPPROTO_UDP = 17


class ConntrackUnavailable(RuntimeError):
    """The conntrack netlink interface cannot be used on this host."""


def _norm(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _af(family: int) -> int:
    return socket.AF_INET6 if family == 6 else socket.AF_INET


# (orig dst, orig dport, reply src) -> delete?
Predicate = Callable[[str, int, str], bool]


def delete_udp_entries(family: int, predicate: Predicate) -> int:
    """Delete the UDP entries of ``family`` (4 or 6) for which ``predicate(orig_dst,
    orig_dport, reply_src)`` is true; one dump, then one delete per entry."""
    try:
        from pyroute2 import Conntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
    except ImportError as exc:
        raise ConntrackUnavailable(f"pyroute2 with conntrack support is needed: {exc}") from None
    try:
        ct: Any = Conntrack()
    except OSError as exc:
        raise ConntrackUnavailable(
            f"cannot open the netfilter netlink socket ({exc}): load nf_conntrack "
            "(modprobe nf_conntrack) or run with CAP_NET_ADMIN") from None
    deleted = 0
    try:
        try:
            entries = list(ct.dump_entries(
                tuple_orig=NFCTAttrTuple(family=_af(family), proto=IPPROTO_UDP)))
        except OSError as exc:
            raise ConntrackUnavailable(
                f"listing conntrack entries failed ({exc}): is nf_conntrack loaded "
                "(modprobe nf_conntrack)?") from None
        for entry in entries:
            orig, reply = entry.tuple_orig, entry.tuple_reply
            if orig.proto != IPPROTO_UDP or orig.daddr is None or reply.saddr is None:
                continue
            if not predicate(_norm(orig.daddr), int(orig.dport or 0), _norm(reply.saddr)):
                continue
            try:
                ct.delete(entry)
                deleted += 1
            except OSError as exc:
                if exc.errno != 2:  # ENOENT: it expired meanwhile
                    raise
    finally:
        ct.close()
    return deleted


def clear_udp_service(ip: str, port: int) -> int:
    """Entries whose original destination is ``ip:port``/UDP."""
    target = _norm(ip)
    return delete_udp_entries(ip_family(ip), lambda dst, dport, _src: dst == target and
                              dport == port)


def clear_udp_nodeport(port: int, family: int = 4) -> int:
    """Entries whose original destination port is ``port``/UDP (any address)."""
    return delete_udp_entries(family, lambda _dst, dport, _src: dport == port)


def clear_udp_endpoint(service_ip: str, port: int, endpoint_ip: str) -> int:
    """Entries to ``service_ip:port``/UDP that were DNATed to ``endpoint_ip``."""
    target, endpoint = _norm(service_ip), _norm(endpoint_ip)
    return delete_udp_entries(ip_family(service_ip), lambda dst, dport, src: (
        dst == target and dport == port and src == endpoint))


def _service_ips(port: ResolvedServicePort) -> set[str]:
    ips = {port.cluster_ip, *port.external_ips, *port.load_balancer_ips}
    return {_norm(ip) for ip in ips if ip}


def _serving_endpoint_ips(port: ResolvedServicePort) -> set[str]:
    # Like upstream, every serving endpoint counts whatever traffic policy or topology says:
    # a policy change must not cut existing flows.
    endpoints = (*port.cluster_endpoints, *port.local_endpoints, *port.all_reachable_endpoints)
    return {_norm(ep.ip) for ep in endpoints if ep.serving or ep.ready}


def stale_udp_predicate(current: ResolvedServicePort, node_ips: Iterable[str]) -> Predicate | None:
    """The deletion rule for one service port (None: nothing to clean)."""
    if current.protocol != "UDP":
        return None
    serving = _serving_endpoint_ips(current)
    if not serving:
        # Without endpoints the traffic is REJECTed; entries get cleaned once some appear.
        return None
    service_ips = _service_ips(current)
    port = current.port
    node_port = current.node_port
    family = current.family
    local = {_norm(ip) for ip in node_ips if ip_family(ip) == family}

    def predicate(dst: str, dport: int, reply_src: str) -> bool:
        if reply_src in serving:
            return False
        if dport == port and dst in service_ips:
            return True
        if node_port and dport == node_port:
            return not local or dst in local or ipaddress.ip_address(dst).is_loopback
        return False

    return predicate


def cleanup_stale_udp(previous: ResolvedServicePort | None,
                      current: ResolvedServicePort | None,
                      node_ips: Sequence[str]) -> int:
    """Delete stale UDP entries of one service port after a sync (see the module docstring).

    ``previous`` is accepted so callers can pass what they have; the rule only needs the
    current state: a removed service (``current`` None) leaves its entries to time out, as
    upstream, and a service that had no endpoints and now has some loses its REJECTed entries
    because their reply source (the service IP itself) is no endpoint.
    """
    del previous  # the current state decides, see above
    if current is None:
        return 0
    predicate = stale_udp_predicate(current, node_ips)
    if predicate is None:
        return 0
    return delete_udp_entries(current.family, predicate)


def cleanup_stale_udp_many(ports: Iterable[ResolvedServicePort], node_ips: Sequence[str],
                           family: int) -> int:
    """`cleanup_stale_udp` for many service ports of one family with a single dump."""
    predicates = [p for p in (stale_udp_predicate(port, node_ips) for port in ports
                              if port.family == family) if p is not None]
    if not predicates:
        return 0
    return delete_udp_entries(family, lambda dst, dport, src: any(
        pred(dst, dport, src) for pred in predicates))
