"""What IPVS mode programs for the resolved model: pure functions, no kernel access.

One `PortState` per `ServicePortKey` (virtual servers with their real servers, addresses for
``kube-ipvs0`` and ipset entries) so a partial sync recomputes only changed ports; and the
fixed iptables rules that match the sets (`iptables_rules`), following upstream's
``pkg/proxy/ipvs/proxier.go`` (chains, set names, comments, match types).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import attrs

from kproxy_core.kernel.iptables import RestoreData, quote
from kproxy_core.localtraffic import LocalTraffic
from kproxy_core.model import Endpoint, IPFamily, Protocol, ResolvedServicePort

DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
#: Kernel schedulers upstream documents (the kernel also has ``mh``, ``fo``, ``ovf``, ``twos``).
KNOWN_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh",
                    "fo", "ovf", "twos")

# IPVS service flags (include/uapi/linux/ip_vs.h).
FLAG_PERSISTENT = 0x0001
FLAG_SCHED_SH_PORT = 0x0010  # upstream's FlagSourceHash, needed by "mh"

# Chains (upstream names).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"

#: (table, chain) every sync declares (creates and rewrites).
CHAINS: tuple[tuple[str, str], ...] = (
    ("nat", KUBE_SERVICES), ("nat", KUBE_POSTROUTING), ("nat", KUBE_NODE_PORT),
    ("nat", KUBE_LOAD_BALANCER), ("nat", KUBE_MARK_MASQ),
    ("filter", KUBE_FORWARD), ("filter", KUBE_NODE_PORT), ("filter", KUBE_PROXY_FIREWALL),
    ("filter", KUBE_SOURCE_RANGES_FIREWALL), ("filter", KUBE_IPVS_FILTER),
    ("filter", KUBE_IPVS_OUT_FILTER),
)

#: (table, built-in chain, our chain, comment): jumps kept at the top of built-in chains.
JUMPS: tuple[tuple[str, str, str, str], ...] = (
    ("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    ("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    ("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    ("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    ("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    ("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    ("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    ("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    ("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)


def jump_args(chain: str, comment: str) -> list[str]:
    return ["-m", "comment", "--comment", comment, "-j", chain]


@attrs.frozen
class SetSpec:
    name: str
    type: str
    comment: str


def _s(name: str, set_type: str, comment: str) -> SetSpec:
    return SetSpec(name, set_type, comment)


LOOP_BACK = _s("KUBE-LOOP-BACK", "hash:ip,port,ip",
               "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose")
CLUSTER_IP = _s("KUBE-CLUSTER-IP", "hash:ip,port",
                "Kubernetes service cluster ip + port for masquerade purpose")
EXTERNAL_IP = _s("KUBE-EXTERNAL-IP", "hash:ip,port",
                 "Kubernetes service external ip + port for masquerade and filter purpose")
EXTERNAL_IP_LOCAL = _s("KUBE-EXTERNAL-IP-LOCAL", "hash:ip,port",
                       "Kubernetes service external ip + port with externalTrafficPolicy=local")
LOAD_BALANCER = _s("KUBE-LOAD-BALANCER", "hash:ip,port", "Kubernetes service lb portal")
LOAD_BALANCER_FW = _s("KUBE-LOAD-BALANCER-FW", "hash:ip,port",
                      "Kubernetes service load balancer ip + port for load balancer with "
                      "sourceRange")
LOAD_BALANCER_LOCAL = _s("KUBE-LOAD-BALANCER-LOCAL", "hash:ip,port",
                         "Kubernetes service load balancer ip + port with "
                         "externalTrafficPolicy=local")
LOAD_BALANCER_SOURCE_IP = _s("KUBE-LOAD-BALANCER-SOURCE-IP", "hash:ip,port,ip",
                             "Kubernetes service load balancer ip + port + source IP for packet "
                             "filter purpose")
LOAD_BALANCER_SOURCE_CIDR = _s("KUBE-LOAD-BALANCER-SOURCE-CIDR", "hash:ip,port,net",
                               "Kubernetes service load balancer ip + port + source cidr for "
                               "packet filter purpose")
NODE_PORT_TCP = _s("KUBE-NODE-PORT-TCP", "bitmap:port",
                   "Kubernetes nodeport TCP port for masquerade purpose")
NODE_PORT_LOCAL_TCP = _s("KUBE-NODE-PORT-LOCAL-TCP", "bitmap:port",
                         "Kubernetes nodeport TCP port with externalTrafficPolicy=local")
NODE_PORT_UDP = _s("KUBE-NODE-PORT-UDP", "bitmap:port",
                   "Kubernetes nodeport UDP port for masquerade purpose")
NODE_PORT_LOCAL_UDP = _s("KUBE-NODE-PORT-LOCAL-UDP", "bitmap:port",
                         "Kubernetes nodeport UDP port with externalTrafficPolicy=local")
NODE_PORT_SCTP = _s("KUBE-NODE-PORT-SCTP-HASH", "hash:ip,port",
                    "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'")
NODE_PORT_LOCAL_SCTP = _s("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "hash:ip,port",
                          "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with "
                          "type 'hash ip:port'")
HEALTH_CHECK_NODE_PORT = _s("KUBE-HEALTH-CHECK-NODE-PORT", "bitmap:port",
                            "Kubernetes health check node port")
IPVS_IPS = _s("KUBE-IPVS-IPS", "hash:ip", "Addresses on the ipvs interface")

SETS: tuple[SetSpec, ...] = (
    LOOP_BACK, CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL, LOAD_BALANCER, LOAD_BALANCER_FW,
    LOAD_BALANCER_LOCAL, LOAD_BALANCER_SOURCE_IP, LOAD_BALANCER_SOURCE_CIDR, NODE_PORT_TCP,
    NODE_PORT_LOCAL_TCP, NODE_PORT_UDP, NODE_PORT_LOCAL_UDP, NODE_PORT_SCTP,
    NODE_PORT_LOCAL_SCTP, HEALTH_CHECK_NODE_PORT, IPVS_IPS,
)
SETS_BY_NAME = {spec.name: spec for spec in SETS}


#: The kernel's limit on an ipset name (IPSET_MAXNAMELEN - 1).
IPSET_NAME_MAX = 31


def set_name(base: str, family: int) -> str:
    """Upstream's per-family name: IPv6 sets are ``KUBE-6-<rest>``, cut to the kernel's 31
    characters as upstream cuts them (``KUBE-6-LOAD-BALANCER-SOURCE-CID``)."""
    if family == 4:
        return base
    return ("KUBE-6-" + base.removeprefix("KUBE-"))[:IPSET_NAME_MAX]


# (set, table, from chain, to, match type, protocol match): upstream ipsetWithIptablesChain.
# Local sets come before their plain sets (RETURN first, then mark for masquerade).
SET_JUMPS: tuple[tuple[SetSpec, str, str, str, str, str], ...] = (
    (LOOP_BACK, "nat", KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src", ""),
    (LOAD_BALANCER, "nat", KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst", ""),
    (LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "RETURN", "dst,dst", ""),
    (NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, "nat", KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp"),
    (LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst", ""),
    (LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src",
     ""),
    (LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
)


# --------------------------------------------------------------------------------------------
# IPVS objects
# --------------------------------------------------------------------------------------------


# VSKey and RealServer are named tuples, not attrs classes: a first sync of a big node builds
# one per virtual/real server (60 000 at 10 000 services x 5), and tuples are built and hashed
# in C, several times faster; they stay immutable values.
class VSKey(NamedTuple):
    """Identifies a virtual server: what IPVS keys services by."""

    protocol: Protocol
    address: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol}/{host}:{self.port}"

    @property
    def family(self) -> IPFamily:
        return 6 if ":" in self.address else 4


@attrs.frozen
class VirtualServer:
    key: VSKey
    scheduler: str
    flags: int = 0
    #: Persistence timeout in seconds (ClientIP affinity); 0 without affinity.
    timeout: int = 0


class RealServer(NamedTuple):
    address: str
    port: int

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else \
            f"{self.address}:{self.port}"


@attrs.frozen(order=True)
class ExternalDrop:
    """One external destination (node port: ``address`` "", matched as any local address)
    whose new connections from outside the node are dropped."""

    family: int
    service: str
    address: str
    protocol: str
    port: int


@attrs.frozen
class PortState:
    """Everything one service port (one family) contributes to the kernel."""

    #: Virtual server -> its real servers.
    services: Mapping[VSKey, tuple[VirtualServer, frozenset[RealServer]]]
    #: Addresses this port needs on kube-ipvs0.
    addresses: frozenset[str]
    #: Set base name (family-independent) -> entries.
    entries: Mapping[str, frozenset[str]]
    #: (lb ip, protocol, port) reachable from no node: dropped in KUBE-IPVS-OUT-FILTER.
    no_node_access: frozenset[tuple[str, str, int]] = frozenset()
    #: External destinations of an externalTrafficPolicy Local service without local endpoints
    #: (see `ExternalDrop`): new connections from outside the node and its pods are dropped.
    external_drops: frozenset[ExternalDrop] = frozenset()


@attrs.frozen
class Settings:
    scheduler: str = DEFAULT_SCHEDULER
    #: Node addresses NodePorts are served on (one family each call).
    node_ips: tuple[str, ...] = ()


def _reals(endpoints: Sequence[Endpoint]) -> frozenset[RealServer]:
    return frozenset(RealServer(ep.ip, ep.port) for ep in endpoints)


def _in_cidr(address: str, cidr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


def port_state(port: ResolvedServicePort, settings: Settings) -> PortState:
    """Render one resolved service port (see `PortState`)."""
    proto = port.protocol
    lproto = proto.lower()
    flags = 0
    timeout = 0
    if port.session_affinity_timeout is not None:
        flags |= FLAG_PERSISTENT
        timeout = port.session_affinity_timeout
    if settings.scheduler == "mh":
        flags |= FLAG_SCHED_SH_PORT
    services: dict[VSKey, tuple[VirtualServer, frozenset[RealServer]]] = {}
    entries: dict[str, set[str]] = {}
    addresses: set[str] = set()
    no_node_access: set[tuple[str, str, int]] = set()

    def add(set_spec: SetSpec, entry: str) -> None:
        entries.setdefault(set_spec.name, set()).add(entry)

    def vs(address: str, number: int, endpoints: Sequence[Endpoint], bind: bool) -> None:
        key = VSKey(proto, address, number)
        services[key] = (VirtualServer(key, settings.scheduler, flags, timeout), _reals(endpoints))
        if bind:
            addresses.add(address)

    for ep in port.all_reachable_endpoints:
        if ep.is_local:
            add(LOOP_BACK, f"{ep.ip},{lproto}:{ep.port},{ep.ip}")

    if port.cluster_ip:
        add(CLUSTER_IP, f"{port.cluster_ip},{lproto}:{port.port}")
        vs(port.cluster_ip, port.port, port.internal_endpoints, True)

    external = port.external_endpoints
    # externalTrafficPolicy Local without a local endpoint (but with endpoints elsewhere): as
    # upstream, the external virtual servers get the cluster endpoints so the node and its pods
    # still reach the service, and external clients are dropped (upstream relies on the
    # asymmetric reply being lost; an explicit DROP is what the model and iptables mode say).
    drop_external = (port.external_policy_local and not external and port.has_any_endpoints
                     and port.is_external_facing)
    drops: set[ExternalDrop] = set()
    if drop_external:
        external = port.cluster_endpoints
        for address in (*port.external_ips, *port.load_balancer_ips):
            drops.add(ExternalDrop(port.family, str(port.name), address, lproto, port.port))
        if port.node_port:
            drops.add(ExternalDrop(port.family, str(port.name), "", lproto, port.node_port))
    for ip in port.external_ips:
        add(EXTERNAL_IP_LOCAL if port.external_policy_local else EXTERNAL_IP,
            f"{ip},{lproto}:{port.port}")
        # Upstream binds external IPs unless they are the node's own addresses.
        vs(ip, port.port, external, ip not in settings.node_ips)

    for ip in port.load_balancer_ips:
        entry = f"{ip},{lproto}:{port.port}"
        add(LOAD_BALANCER, entry)
        if port.external_policy_local:
            add(LOAD_BALANCER_LOCAL, entry)
        if port.load_balancer_source_ranges:
            add(LOAD_BALANCER_FW, entry)
            allow_from_node = False
            for cidr in port.load_balancer_source_ranges:
                add(LOAD_BALANCER_SOURCE_CIDR, f"{entry},{cidr}")
                if any(_in_cidr(node_ip, cidr) for node_ip in settings.node_ips):
                    allow_from_node = True
            if allow_from_node:
                # Traffic from the node itself reaches the VIP with the VIP as source.
                add(LOAD_BALANCER_SOURCE_IP, f"{entry},{ip}")
            else:
                no_node_access.add((ip, lproto, port.port))
        vs(ip, port.port, external, ip not in settings.node_ips)

    if port.node_port:
        if proto == "SCTP":
            for node_ip in settings.node_ips:
                add(NODE_PORT_SCTP, f"{node_ip},sctp:{port.node_port}")
                if port.external_policy_local:
                    add(NODE_PORT_LOCAL_SCTP, f"{node_ip},sctp:{port.node_port}")
        else:
            add(NODE_PORT_TCP if proto == "TCP" else NODE_PORT_UDP, str(port.node_port))
            if port.external_policy_local:
                add(NODE_PORT_LOCAL_TCP if proto == "TCP" else NODE_PORT_LOCAL_UDP,
                    str(port.node_port))
        for node_ip in settings.node_ips:
            vs(node_ip, port.node_port, external, False)

    if port.health_check_node_port:
        add(HEALTH_CHECK_NODE_PORT, str(port.health_check_node_port))

    return PortState(
        services=services,
        addresses=frozenset(addresses),
        entries={name: frozenset(values) for name, values in entries.items()},
        no_node_access=frozenset(no_node_access),
        external_drops=frozenset(drops),
    )


# --------------------------------------------------------------------------------------------
# iptables
# --------------------------------------------------------------------------------------------


def not_local_match(local: LocalTraffic) -> tuple[str, ...]:
    """Upstream's ``LocalTrafficDetector.IfNotLocal()`` for the core's detect-local answer:
    not from a local pod's CIDR, or not in through the pod bridge / a pod interface (``+``
    is iptables' name-prefix wildcard). Empty when nothing can be told (no-op detector)."""
    if local.cidr:
        return ("!", "-s", local.cidr)
    if local.interface:
        return ("!", "-i", local.interface + ("+" if local.prefix else ""))
    return ()


@attrs.frozen
class IptablesSettings:
    family: IPFamily
    masquerade_all: bool = False
    masquerade_bit: int = 14
    #: `not_local_match` of this family's local-traffic detector; () when not implemented.
    not_local: tuple[str, ...] = ()
    random_fully: bool = True


def iptables_rules(settings: IptablesSettings, nonempty: Iterable[str],
                   no_node_access: Iterable[tuple[str, str, int]] = (),
                   external_drops: Iterable[ExternalDrop] = ()) -> RestoreData:
    """The whole ruleset for one family. ``nonempty`` names (base names) the sets that have
    entries: as upstream, a set's rule is only written while the set is in use."""
    used = set(nonempty)
    fam = settings.family
    data = RestoreData(fam)
    nat = data.table("nat")
    flt = data.table("filter")
    for table, chain in CHAINS:
        (nat if table == "nat" else flt).chain(chain)
    mark = f"{1 << settings.masquerade_bit:#010x}"

    def match(spec: SetSpec, kind: str) -> list[str]:
        return ["-m", "set", "--match-set", set_name(spec.name, fam), kind]

    def comment(spec: SetSpec) -> list[str]:
        return ["-m", "comment", "--comment", quote(spec.comment)]

    nat.rule(KUBE_SERVICES, "-s", "127.0.0.0/8" if fam == 4 else "::1/128", "-j", "RETURN")
    for spec, table, src, to, kind, proto in SET_JUMPS:
        if spec.name not in used:
            continue
        args = ["-p", proto] if proto else []
        (nat if table == "nat" else flt).rule(src, *args, *comment(spec), *match(spec, kind),
                                              "-j", to)
    if CLUSTER_IP.name in used:
        base = [*comment(CLUSTER_IP), "-m", "set", "--match-set", set_name(CLUSTER_IP.name, fam)]
        if settings.masquerade_all:
            nat.rule(KUBE_SERVICES, *base, "dst,dst", "-j", KUBE_MARK_MASQ)
        elif settings.not_local:
            # Off-cluster (or, per detector, off-node) traffic to a VIP may be routed back
            # out to another node: masquerade it so replies come back here.
            nat.rule(KUBE_SERVICES, *base, "dst,dst", *settings.not_local, "-j", KUBE_MARK_MASQ)
        else:
            nat.rule(KUBE_SERVICES, *base, "src,dst", "-j", KUBE_MARK_MASQ)

    def external_accept(args: list[str]) -> None:
        nat.rule(KUBE_SERVICES, *args, "-m", "physdev", "!", "--physdev-is-in",
                 "-m", "addrtype", "!", "--src-type", "LOCAL", "-j", "ACCEPT")
        nat.rule(KUBE_SERVICES, *args, "-m", "addrtype", "--dst-type", "LOCAL", "-j", "ACCEPT")

    if EXTERNAL_IP.name in used:
        args = [*comment(EXTERNAL_IP), *match(EXTERNAL_IP, "dst,dst")]
        nat.rule(KUBE_SERVICES, *args, "-j", KUBE_MARK_MASQ)
        external_accept(args)
    if EXTERNAL_IP_LOCAL.name in used:
        external_accept([*comment(EXTERNAL_IP_LOCAL), *match(EXTERNAL_IP_LOCAL, "dst,dst")])

    nat.rule(KUBE_SERVICES, "-m", "addrtype", "--dst-type", "LOCAL", "-j", KUBE_NODE_PORT)
    nat.rule(KUBE_LOAD_BALANCER, "-j", KUBE_MARK_MASQ)
    flt.rule(KUBE_SOURCE_RANGES_FIREWALL, "-j", "DROP")
    # Filter INPUT runs before IPVS schedules (LOCAL_IN), so this sees the external address.
    for drop in sorted(external_drops):
        dest = (["-m", "addrtype", "--dst-type", "LOCAL"] if not drop.address
                else ["-d", drop.address])
        flt.rule(KUBE_PROXY_FIREWALL, "-m", "comment", "--comment",
                 quote(f"{drop.service} has no local endpoints"), "-m", "conntrack",
                 "--ctstate", "NEW", *dest, "-p", drop.protocol, "--dport", str(drop.port),
                 *settings.not_local, "-m", "addrtype", "!", "--src-type", "LOCAL", "-j", "DROP")
    for ip, proto, number in sorted(no_node_access):
        flt.rule(KUBE_IPVS_OUT_FILTER, "-s", ip, "-m", "ipvs", "--vaddr", ip, "--vproto", proto,
                 "--vport", str(number), "-j", "DROP")
    for spec in (CLUSTER_IP, LOAD_BALANCER):
        if spec.name in used:
            nat.rule(KUBE_SERVICES, *match(spec, "dst,dst"), "-j", "ACCEPT")

    flt.rule(KUBE_FORWARD, "-m", "comment", "--comment", quote("kubernetes forwarding rules"),
             "-m", "mark", "--mark", f"{mark}/{mark}", "-j", "ACCEPT")
    flt.rule(KUBE_FORWARD, "-m", "comment", "--comment",
             quote("kubernetes forwarding conntrack rule"), "-m", "conntrack", "--ctstate",
             "RELATED,ESTABLISHED", "-j", "ACCEPT")
    # Sets referenced below always exist (every sync creates all of them).
    flt.rule(KUBE_NODE_PORT, *comment(HEALTH_CHECK_NODE_PORT),
             *match(HEALTH_CHECK_NODE_PORT, "dst"), "-j", "ACCEPT")
    for spec, kind in ((LOAD_BALANCER, "dst,dst"), (CLUSTER_IP, "dst,dst"),
                       (EXTERNAL_IP, "dst,dst"), (EXTERNAL_IP_LOCAL, "dst,dst"),
                       (HEALTH_CHECK_NODE_PORT, "dst")):
        flt.rule(KUBE_IPVS_FILTER, *match(spec, kind), "-j", "RETURN")
    flt.rule(KUBE_IPVS_FILTER, "-m", "conntrack", "--ctstate", "NEW", *match(IPVS_IPS, "dst"),
             "-j", "REJECT")

    nat.rule(KUBE_POSTROUTING, "-m", "mark", "!", "--mark", f"{mark}/{mark}", "-j", "RETURN")
    nat.rule(KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", mark)
    masq = ["-m", "comment", "--comment", quote("kubernetes service traffic requiring SNAT"),
            "-j", "MASQUERADE"]
    if settings.random_fully:
        masq.append("--random-fully")
    nat.rule(KUBE_POSTROUTING, *masq)
    nat.rule(KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", mark)
    return data
