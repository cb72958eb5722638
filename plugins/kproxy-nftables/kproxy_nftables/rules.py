"""Pure rendering of the resolved model into upstream's nftables layout (no kernel access).

Layout (upstream ``pkg/proxy/nftables``), one table ``kube-proxy`` per family (``ip``/``ip6``):

* base chains ``filter-prerouting``, ``filter-input``, ``filter-forward``, ``filter-output``,
  ``filter-output-post-dnat``, ``nat-prerouting``, ``nat-output``, ``nat-postrouting``;
* dispatch: ``services`` looks the destination up in the verdict maps ``service-ips``
  (``addr . proto . port``) and ``service-nodeports`` (``proto . port``);
* filtering: ``service-endpoints-check``/``nodeport-endpoints-check`` with the maps
  ``no-endpoint-services``/``no-endpoint-nodeports`` (drop or ``goto reject-chain``),
  ``firewall-check`` with ``firewall-ips`` (loadBalancerSourceRanges), ``cluster-ips-check``
  with the set ``cluster-ips`` (reject traffic to ports a ClusterIP does not serve);
* per service port: ``service-HASH-ns/name/proto/port`` (cluster policy),
  ``local-…`` (Local policy), ``external-…``, ``firewall-…``; per endpoint
  ``endpoint-HASH-ns/name/proto/port__ip/port`` and, with ClientIP affinity, the dynamic set
  ``affinity-…`` with the affinity timeout.

`render_port` turns one `ResolvedServicePort` into a `PortRender` (its chains, affinity sets
and map elements); the backend diffs two renders to build an O(changed) transaction.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

from kproxy_core.model import Endpoint, ResolvedServicePort, ServicePortName

TABLE = "kube-proxy"

SERVICES_CHAIN = "services"
SERVICE_IPS_MAP = "service-ips"
SERVICE_NODEPORTS_MAP = "service-nodeports"
NODEPORT_IPS_SET = "nodeport-ips"
CLUSTER_IPS_SET = "cluster-ips"
CLUSTER_IPS_CHECK_CHAIN = "cluster-ips-check"
SERVICE_ENDPOINTS_CHECK_CHAIN = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK_CHAIN = "nodeport-endpoints-check"
NO_ENDPOINT_SERVICES_MAP = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS_MAP = "no-endpoint-nodeports"
REJECT_CHAIN = "reject-chain"
FIREWALL_IPS_MAP = "firewall-ips"
FIREWALL_CHECK_CHAIN = "firewall-check"
MARK_MASQ_CHAIN = "mark-for-masquerade"
MASQUERADING_CHAIN = "masquerading"

SERVICE_PREFIX = "service-"
LOCAL_PREFIX = "local-"
EXTERNAL_PREFIX = "external-"
ENDPOINT_PREFIX = "endpoint-"
AFFINITY_PREFIX = "affinity-"
FIREWALL_PREFIX = "firewall-"
#: Named verdict maps behind the service/local chains' ``numgen`` dispatch (see
#: `render_port`): ``endpoints-HASH-…`` for ``service-HASH-…``, ``local-endpoints-…`` for
#: ``local-…``.
ENDPOINTS_MAP_PREFIX = "endpoints-"
LOCAL_ENDPOINTS_MAP_PREFIX = "local-endpoints-"
#: Key type of the endpoint verdict maps of ClientIP-affinity ports (nft prints it back the
#: same way).
ENDPOINTS_MAP_TYPE = "typeof numgen random mod 2 : verdict"
#: Endpoint address maps (``endpoint-addrs-tcp-0``, ``-1``, … per protocol): numgen value
#: range -> the DNAT address . port. Each service/local chain owns a block of
#: `SLOT_VALUES` numgen values in one of them.
ADDRESS_MAP_PREFIX = "endpoint-addrs-"
#: Numgen values per chain (``numgen random mod SLOT_VALUES offset …``): the endpoint count
#: never appears in the rule; N endpoints split the block into ranges whose sizes differ by
#: at most one value, a bias below N / 16,777,216.
SLOT_VALUES = 1 << 24
#: Chains per address map. The kernel walks a map's elements for every rule it binds and
#: its bindings for every element added, and finds a set by a linear walk of the table's
#: sets: maps of ~128 chains keep all three small (one map per chain, or one for all,
#: made 10,000-service full syncs quadratic). 128 blocks use half of the 32-bit keys, so
#: every range's end + 1 (nft's interval encoding) still fits.
SLOTS_PER_MAP = 128
#: Set of ``endpoint . endpoint`` address pairs: a connection DNATed back to its own source
#: (hairpin) is masqueraded from ``masquerading`` (see `render_port`).
HAIRPIN_SET = "hairpin-endpoints"

#: The maps whose elements belong to service ports (flushed and refilled on full syncs).
SERVICE_MAPS = (SERVICE_IPS_MAP, SERVICE_NODEPORTS_MAP, NO_ENDPOINT_SERVICES_MAP,
                NO_ENDPOINT_NODEPORTS_MAP, FIREWALL_IPS_MAP)

# knftables.NameLengthMax (256) minus the longest prefix upstream reserves (16).
_CHAIN_NAME_BASE_MAX = 256 - 16

#: (name, type, hook, priority) as upstream: filtering sees pre-DNAT destinations. Upstream
#: writes "dstnat - 10" etc.; nft before 1.0.7 accepts the names only on some hooks, so the
#: numbers are written (dstnat = -100, srcnat = 100; nft lists them back by name).
BASE_CHAINS: tuple[tuple[str, str, str, str], ...] = (
    ("filter-prerouting", "filter", "prerouting", "-110"),
    ("filter-input", "filter", "input", "-110"),
    ("filter-forward", "filter", "forward", "-110"),
    ("filter-output", "filter", "output", "-110"),
    ("filter-output-post-dnat", "filter", "output", "-90"),
    ("nat-prerouting", "nat", "prerouting", "-100"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
)

#: (target, from base chain, match) jump rules, in upstream's order.
JUMP_CHAINS: tuple[tuple[str, str, str], ...] = (
    (NODEPORT_ENDPOINTS_CHECK_CHAIN, "filter-input", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK_CHAIN, "filter-input", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK_CHAIN, "filter-forward", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK_CHAIN, "filter-output", "ct state new"),
    (FIREWALL_CHECK_CHAIN, "filter-prerouting", "ct state new"),
    (FIREWALL_CHECK_CHAIN, "filter-output", "ct state new"),
    (SERVICES_CHAIN, "nat-output", ""),
    (SERVICES_CHAIN, "nat-prerouting", ""),
    (MASQUERADING_CHAIN, "nat-postrouting", ""),
    (CLUSTER_IPS_CHECK_CHAIN, "filter-forward", "ct state new"),
    (CLUSTER_IPS_CHECK_CHAIN, "filter-output-post-dnat", "ct state new"),
)


def nft_family(family: int) -> str:
    return "ip6" if family == 6 else "ip"


def _addr_type(family: int) -> str:
    return "ipv6_addr" if family == 6 else "ipv4_addr"


def hash_and_truncate(name: str) -> str:
    """Upstream's ``hashAndTruncate``: 8 base32 characters of SHA-256, a dash, the name."""
    digest = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()
    full = f"{digest[:8]}-{name}"
    if len(full) > _CHAIN_NAME_BASE_MAX:
        full = full[:_CHAIN_NAME_BASE_MAX - 3] + "..."
    return full


def chain_name_base(name: ServicePortName) -> str:
    """``HASH-ns/name/proto/port`` (e.g. ``ULMVA6XW-ns1/svc1/tcp/p80``)."""
    return hash_and_truncate(
        f"{name.namespace}/{name.name}/{name.protocol.lower()}/{name.port}")


def endpoint_chain_base(name: ServicePortName, endpoint: Endpoint) -> str:
    """``HASH-ns/name/proto/port__ip/port``; IPv6 colons become dots (not allowed in names)."""
    ip = endpoint.ip.replace(":", ".")
    return hash_and_truncate(f"{name.namespace}/{name.name}/{name.protocol.lower()}/"
                             f"{name.port}__{ip}/{endpoint.port}")


def endpoint_map_type(family: int, protocol: str) -> str:
    """Declaration of an endpoint address map: ``numgen`` value range -> address . port."""
    ipx = nft_family(family)
    return f"typeof numgen random mod 2 : {ipx} daddr . {protocol.lower()} dport ; flags interval"


def address_map(protocol: str, slot: int) -> str:
    """The address map holding numgen block ``slot`` for ``protocol``."""
    return f"{ADDRESS_MAP_PREFIX}{protocol.lower()}-{slot // SLOTS_PER_MAP}"


def slot_offset(slot: int) -> int:
    return slot % SLOTS_PER_MAP * SLOT_VALUES


def endpoint_ranges(count: int, offset: int = 0) -> list[tuple[int, int]]:
    """``count`` contiguous ranges splitting the block ``offset … offset + SLOT_VALUES - 1``;
    their sizes differ by at most one value."""
    if not 1 <= count <= SLOT_VALUES:
        raise ValueError(f"an endpoint map needs 1 to {SLOT_VALUES} endpoints, not {count}")
    bounds = [offset + i * SLOT_VALUES // count for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(count)]


def is_address_map(name: str) -> bool:
    return name.startswith(ADDRESS_MAP_PREFIX)


def hairpin_key(ip: str) -> str:
    """The `HAIRPIN_SET` element for endpoint ``ip``: source and destination both ``ip``."""
    return f"{ip} . {ip}"


def masquerade_mark(bit: int) -> str:
    """Go's ``%#08x`` of ``1 << bit``, as upstream formats it."""
    if not 0 <= bit <= 31:
        raise ValueError(f"masqueradeBit must be within [0, 31], not {bit}")
    return f"{1 << bit:#08x}"


@attrs.frozen
class LocalDetector:
    """Upstream's LocalTrafficDetector as two nft match fragments; empty when not
    implemented (no cluster CIDR for the family, no interface configured)."""

    if_local: str = ""
    if_not_local: str = ""

    @property
    def implemented(self) -> bool:
        return bool(self.if_local)

    @classmethod
    def for_cidrs(cls, family: int, cidrs: Sequence[str]) -> LocalDetector:
        if not cidrs:
            return cls()
        ipx = nft_family(family)
        value = cidrs[0] if len(cidrs) == 1 else "{ " + ", ".join(cidrs) + " }"
        return cls(f"{ipx} saddr {value}", f"{ipx} saddr != {value}")

    @classmethod
    def for_interface(cls, pattern: str) -> LocalDetector:
        if not pattern:
            return cls()
        return cls(f'iifname "{pattern}"', f'iifname != "{pattern}"')


@attrs.frozen
class FamilyConfig:
    """What the renderer needs to know about one family besides the model."""

    family: int
    masquerade_mark: str = "0x004000"
    masquerade_all: bool = False
    local: LocalDetector = LocalDetector()
    #: IPs accepting NodePort traffic; None means every local address (``fib daddr type
    #: local``), upstream's behaviour for a nodePortAddresses of 0.0.0.0/0 or ::/0.
    nodeport_ips: tuple[str, ...] | None = ()
    #: This node's primary IP in the family (loadBalancerSourceRanges "allow from node").
    node_ip: str = ""

    @property
    def ipx(self) -> str:
        return nft_family(self.family)


@attrs.frozen
class Element:
    """One map element: ``map``, ``key`` (nft syntax), verdict ``value``, optional comment."""

    map: str
    key: str
    value: str
    comment: str = ""

    def item(self) -> str:
        comment = f' comment "{self.comment}"' if self.comment else ""
        return f"{self.key}{comment} : {self.value}"

    def text(self, family: int) -> str:
        return f"{nft_family(family)} {TABLE} {self.map} {{ {self.item()} }}"


@attrs.frozen
class PortRender:
    """Everything one service port owns in its family's table."""

    #: Chain name -> rules (nft syntax, in order). Insertion order is creation order.
    chains: Mapping[str, tuple[str, ...]]
    #: Affinity set name -> timeout in seconds.
    affinity_sets: Mapping[str, int]
    elements: tuple[Element, ...]
    #: The ClusterIP (element of ``cluster-ips``), "" if none.
    cluster_ip: str
    #: Endpoint verdict map (ClientIP affinity) name -> {index: verdict}
    #: (``"0" -> "goto endpoint-…"``).
    maps: Mapping[str, Mapping[str, str]] = attrs.field(factory=dict)
    #: Endpoint IPs reached through address maps (elements of `HAIRPIN_SET`).
    hairpin: tuple[str, ...] = ()
    #: Chain -> the numgen block it owns in the address maps.
    slots: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def element_keys(self) -> dict[tuple[str, str], Element]:
        return {(e.map, e.key): e for e in self.elements}


EMPTY_RENDER = PortRender(chains={}, affinity_sets={}, elements=(), cluster_ip="")


def _unique(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    return list(dict.fromkeys(endpoints))


def render_port(port: ResolvedServicePort, cfg: FamilyConfig,
                slot: Callable[[str], int] | None = None) -> PortRender:
    """Upstream's per-service-port part of ``syncProxyRules`` for one resolved port;
    ``slot(chain)`` gives the numgen block a service/local chain owns (kept by the caller
    so that it stays the same from sync to sync; numbered from 0 when omitted)."""
    if slot is None:
        slot = _counting_slots()
    ipx = cfg.ipx
    name = port.name
    proto = port.protocol.lower()
    label = str(name)
    base = chain_name_base(name)
    cluster_chain = SERVICE_PREFIX + base
    local_chain = LOCAL_PREFIX + base
    external_chain = EXTERNAL_PREFIX + base
    firewall_chain = FIREWALL_PREFIX + base

    cluster_eps = _unique(port.cluster_endpoints)
    local_eps = _unique(port.local_endpoints)
    has_endpoints = port.has_any_endpoints and bool(cluster_eps or local_eps)
    uses_cluster = bool(cluster_eps)
    uses_local = bool(local_eps)

    internal_chain = local_chain if port.internal_policy_local else cluster_chain
    has_internal = bool(local_eps) if port.internal_policy_local else uses_cluster
    external_policy_chain = local_chain if port.external_policy_local else cluster_chain
    has_external = bool(local_eps) if port.external_policy_local else uses_cluster
    uses_external_chain = has_endpoints and port.is_external_facing

    if not has_endpoints:
        internal_verdict = external_verdict = f"goto {REJECT_CHAIN}"
    else:
        internal_verdict = "" if has_internal else "drop"
        external_verdict = "" if has_external else "drop"

    chains: dict[str, list[str]] = {}
    endpoints = _unique([*cluster_eps, *local_eps]) if has_endpoints else []
    affinity = port.session_affinity_timeout
    # Only ClientIP affinity needs endpoint chains (see below); their names cost a SHA-256
    # each, a third of a 10,000-service full sync's Python time if computed for nothing.
    bases = ({ep: endpoint_chain_base(name, ep) for ep in endpoints} if affinity is not None
             else {})
    ep_chain = {ep: ENDPOINT_PREFIX + b for ep, b in bases.items()}
    ep_affinity = {ep: AFFINITY_PREFIX + b for ep, b in bases.items()}
    # Creation order: endpoint chains first, so that a transaction adding the service chain
    # finds every goto target declared.
    for ep in ep_chain:
        chains[ep_chain[ep]] = []
    if uses_cluster and has_endpoints:
        chains[cluster_chain] = []
    if uses_local and has_endpoints:
        chains[local_chain] = []
    if uses_external_chain:
        chains[external_chain] = []

    elements: list[Element] = []
    port_key = f"{proto} . {port.port}"

    if has_internal and internal_chain in chains:
        elements.append(Element(SERVICE_IPS_MAP, f"{port.cluster_ip} . {port_key}",
                                f"goto {internal_chain}"))
    else:
        elements.append(Element(NO_ENDPOINT_SERVICES_MAP, f"{port.cluster_ip} . {port_key}",
                                internal_verdict or "drop", label))

    for ip in port.external_ips:
        if uses_external_chain:
            elements.append(Element(SERVICE_IPS_MAP, f"{ip} . {port_key}",
                                    f"goto {external_chain}"))
        if not has_external:
            elements.append(Element(NO_ENDPOINT_SERVICES_MAP, f"{ip} . {port_key}",
                                    external_verdict or "drop", label))

    uses_firewall = bool(port.load_balancer_ips and port.load_balancer_source_ranges)
    if uses_firewall:
        sources = list(port.load_balancer_source_ranges)
        if cfg.node_ip and any(_contains(cidr, cfg.node_ip)
                               for cidr in port.load_balancer_source_ranges):
            sources += list(port.load_balancer_ips)
        chains[firewall_chain] = [f"{ipx} saddr != {{ {', '.join(sources)} }} drop"]
    for ip in port.load_balancer_ips:
        if uses_external_chain:
            elements.append(Element(SERVICE_IPS_MAP, f"{ip} . {port_key}",
                                    f"goto {external_chain}"))
        if uses_firewall:
            elements.append(Element(FIREWALL_IPS_MAP, f"{ip} . {port_key}",
                                    f"goto {firewall_chain}", label))
    if not has_external:
        for ip in port.load_balancer_ips:
            elements.append(Element(NO_ENDPOINT_SERVICES_MAP, f"{ip} . {port_key}",
                                    external_verdict or "drop", label))

    if port.node_port:
        np_key = f"{proto} . {port.node_port}"
        if uses_external_chain:
            elements.append(Element(SERVICE_NODEPORTS_MAP, np_key, f"goto {external_chain}"))
        if not has_external:
            elements.append(Element(NO_ENDPOINT_NODEPORTS_MAP, np_key,
                                    external_verdict or "drop", label))

    if has_internal and internal_chain in chains:
        match = f"{ipx} daddr {port.cluster_ip} {proto} dport {port.port}"
        if cfg.masquerade_all:
            chains[internal_chain].append(f"{match} jump {MARK_MASQ_CHAIN}")
        elif cfg.local.implemented:
            # Off-cluster sources reaching a ClusterIP through this node may be answered by
            # an endpoint on another node: masquerade so replies come back here.
            chains[internal_chain].append(
                f"{match} {cfg.local.if_not_local} jump {MARK_MASQ_CHAIN}")

    if uses_external_chain:
        rules = chains[external_chain]
        if not port.external_policy_local:
            rules.append(f"jump {MARK_MASQ_CHAIN}")
        else:
            if cfg.local.implemented and cluster_chain in chains:
                rules.append(f'{cfg.local.if_local} goto {cluster_chain} '
                             f'comment "short-circuit pod traffic"')
            rules.append(f'fib saddr type local jump {MARK_MASQ_CHAIN} '
                         f'comment "masquerade local traffic"')
            if cluster_chain in chains:
                rules.append(f'fib saddr type local goto {cluster_chain} '
                             f'comment "short-circuit local traffic"')
        if has_external and external_policy_chain in chains:
            rules.append(f"goto {external_policy_chain}")

    affinity_sets: dict[str, int] = {}
    if affinity is not None:
        for ep in endpoints:
            affinity_sets[ep_affinity[ep]] = affinity

    # Upstream writes ``numgen random mod N vmap { 0 : goto endpoint-…, … }`` (an anonymous
    # verdict map) and one chain per endpoint (hairpin mark, ``dnat to``). Three kernel
    # costs make that slow at scale: binding each anonymous set walks the whole transaction
    # (``__nft_set_trans_bind``: quadratic full syncs); sets are found by a linear walk of
    # the table's set list (``nft_set_lookup``), so one named map per service is quadratic
    # too; and any rule with a jump/goto/dnat or verdict element added makes nf_tables
    # re-validate every chain reachable from the base chains at commit (~0.3 s at 10,000
    # services), which an endpoint change always did. So the endpoint is chosen from a
    # numgen value straight to the DNAT address in one shared interval map per protocol
    # (``dnat ip addr . port to numgen random mod 262144 offset O map @endpoint-addrs-tcp``,
    # each chain owning the block O … O + 262143): the rule never names the endpoint
    # count, and adding, removing or replacing an endpoint only changes map elements with
    # no verdict, which needs no validation. The hairpin masquerade moves to `HAIRPIN_SET`.
    # ClientIP affinity keeps upstream's endpoint chains (the affinity set is updated
    # there), with a named verdict map per chain instead of the anonymous one.
    maps: dict[str, dict[str, str]] = {}
    slots: dict[str, int] = {}
    hairpin: dict[str, None] = {}
    for chain, eps, prefix in ((cluster_chain, cluster_eps, ENDPOINTS_MAP_PREFIX),
                               (local_chain, local_eps, LOCAL_ENDPOINTS_MAP_PREFIX)):
        if chain not in chains:
            continue
        rules = chains[chain]
        map_name = prefix + base
        if affinity is not None:
            for ep in eps:
                rules.append(f"{ipx} saddr @{ep_affinity[ep]} goto {ep_chain[ep]}")
            maps[map_name] = {str(i): f"goto {ep_chain[ep]}" for i, ep in enumerate(eps)}
            rules.append(f"numgen random mod {len(eps)} vmap @{map_name}")
            continue
        owned = slots[chain] = slot(chain)
        addresses = address_map(proto, owned)
        offset = slot_offset(owned)
        elements.extend(Element(addresses, f"{start}-{end}", f"{ep.ip} . {ep.port}")
                        for (start, end), ep in zip(endpoint_ranges(len(eps), offset), eps,
                                                    strict=True))
        rules.append(f"meta l4proto {proto} dnat {ipx} addr . port to numgen random mod "
                     f"{SLOT_VALUES} offset {offset} map @{addresses}")
        hairpin.update((ep.ip, None) for ep in eps)

    for ep in endpoints if affinity is not None else ():
        rules = chains[ep_chain[ep]]
        rules.append(f"{ipx} saddr {ep.ip} jump {MARK_MASQ_CHAIN}")
        if affinity is not None:
            rules.append(f"update @{ep_affinity[ep]} {{ {ipx} saddr }}")
        rules.append(f"meta l4proto {proto} dnat to {ep.address}")

    return PortRender(
        chains={chain: tuple(rules) for chain, rules in chains.items()},
        affinity_sets=affinity_sets,
        elements=tuple(elements),
        cluster_ip=port.cluster_ip,
        maps=maps,
        hairpin=tuple(hairpin),
        slots=slots,
    )


def _counting_slots() -> Callable[[str], int]:
    given: dict[str, int] = {}
    return lambda chain: given.setdefault(chain, len(given))


def _contains(cidr: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# The fixed part of the table
# --------------------------------------------------------------------------------------------


def setup_lines(cfg: FamilyConfig) -> list[str]:
    """Declare the table and everything not owned by a service port, and (re)write the
    fixed chains' rules, as upstream's ``setupNFTables``. Idempotent: ``add`` of an existing
    object is a no-op and every fixed chain is flushed before its rules are added."""
    fam = f"{cfg.ipx} {TABLE}"
    ipx = cfg.ipx
    addr = _addr_type(cfg.family)
    no_localhost = "ip6 daddr != ::1" if cfg.family == 6 else "ip daddr != 127.0.0.0/8"
    lines = [f'add table {fam} {{ comment "rules for kube-proxy" ; }}']
    for name, kind, hook, priority in BASE_CHAINS:
        lines.append(f"add chain {fam} {name} {{ type {kind} hook {hook} priority {priority} ; }}")
        lines.append(f"flush chain {fam} {name}")
    created: list[str] = []

    def ensure(chain: str, comment: str = "") -> None:
        if chain in created:
            return
        created.append(chain)
        suffix = f' {{ comment "{comment}" ; }}' if comment else ""
        lines.append(f"add chain {fam} {chain}{suffix}")
        lines.append(f"flush chain {fam} {chain}")

    # The sets and maps come first: the check chains' rules refer to them.
    lines += [
        f'add set {fam} {CLUSTER_IPS_SET} {{ type {addr} ; comment "Active ClusterIPs" ; }}',
        f'add set {fam} {NODEPORT_IPS_SET} {{ type {addr} ; '
        f'comment "IPs that accept NodePort traffic" ; }}',
        f"add map {fam} {NO_ENDPOINT_SERVICES_MAP} {{ type {addr} . inet_proto . inet_service "
        f': verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }}',
        f"add map {fam} {NO_ENDPOINT_NODEPORTS_MAP} {{ type inet_proto . inet_service : verdict "
        f'; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }}',
        f"add map {fam} {FIREWALL_IPS_MAP} {{ type {addr} . inet_proto . inet_service : verdict "
        f'; comment "destinations that are subject to LoadBalancerSourceRanges" ; }}',
        f"add map {fam} {SERVICE_IPS_MAP} {{ type {addr} . inet_proto . inet_service : verdict "
        f'; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}',
        f"add map {fam} {SERVICE_NODEPORTS_MAP} {{ type inet_proto . inet_service : verdict ; "
        f'comment "NodePort traffic" ; }}',
        f"add set {fam} {HAIRPIN_SET} {{ type {addr} . {addr} ; "
        f'comment "endpoint . endpoint: hairpin connections to masquerade" ; }}',
    ]
    for target, source, match in JUMP_CHAINS:
        ensure(target)
        lines.append(f"add rule {fam} {source} {match + ' ' if match else ''}jump {target}")
    for chain in (SERVICES_CHAIN, MASQUERADING_CHAIN, MARK_MASQ_CHAIN):
        ensure(chain)
    mark = cfg.masquerade_mark
    lines += [
        f"add rule {fam} {MARK_MASQ_CHAIN} mark set mark or {mark}",
        # Hairpin: an endpoint reaching its own service and DNATed back to itself (upstream's
        # "ip saddr ENDPOINT jump mark-for-masquerade" in the endpoint chain).
        f"add rule {fam} {MASQUERADING_CHAIN} ct status dnat {ipx} saddr . {ipx} daddr "
        f"@{HAIRPIN_SET} jump {MARK_MASQ_CHAIN}",
        f"add rule {fam} {MASQUERADING_CHAIN} mark and {mark} == 0 return",
        f"add rule {fam} {MASQUERADING_CHAIN} mark set mark xor {mark}",
        f"add rule {fam} {MASQUERADING_CHAIN} masquerade fully-random",
    ]
    ensure(REJECT_CHAIN, "helper for @no-endpoint-services / @no-endpoint-nodeports")
    lines.append(f"add rule {fam} {REJECT_CHAIN} reject")
    lines.append(f'add rule {fam} {CLUSTER_IPS_CHECK_CHAIN} {ipx} daddr @{CLUSTER_IPS_SET} '
                 f'reject comment "Reject traffic to invalid ports of ClusterIPs"')
    lines.append(f"add rule {fam} {SERVICE_ENDPOINTS_CHECK_CHAIN} {ipx} daddr . meta l4proto "
                 f". th dport vmap @{NO_ENDPOINT_SERVICES_MAP}")
    nodeport_match = (f"fib daddr type local {no_localhost}" if cfg.nodeport_ips is None
                      else f"{ipx} daddr @{NODEPORT_IPS_SET}")
    lines.append(f"add rule {fam} {NODEPORT_ENDPOINTS_CHECK_CHAIN} {nodeport_match} "
                 f"meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS_MAP}")
    lines.append(f"add rule {fam} {FIREWALL_CHECK_CHAIN} {ipx} daddr . meta l4proto . th dport "
                 f"vmap @{FIREWALL_IPS_MAP}")
    lines.append(f"add rule {fam} {SERVICES_CHAIN} {ipx} daddr . meta l4proto . th dport "
                 f"vmap @{SERVICE_IPS_MAP}")
    lines.append(f"add rule {fam} {SERVICES_CHAIN} {nodeport_match} meta l4proto . th dport "
                 f"vmap @{SERVICE_NODEPORTS_MAP}")
    return lines


def nodeport_ips_lines(cfg: FamilyConfig) -> list[str]:
    """Refill ``nodeport-ips`` (left empty when every local address accepts NodePorts)."""
    fam = f"{cfg.ipx} {TABLE}"
    lines = [f"flush set {fam} {NODEPORT_IPS_SET}"]
    ips = [ip for ip in cfg.nodeport_ips or () if not ipaddress.ip_address(ip).is_loopback]
    if ips:
        lines.append(f"add element {fam} {NODEPORT_IPS_SET} {{ {', '.join(ips)} }}")
    return lines


def is_service_chain(name: str) -> bool:
    """Per-service and per-endpoint chains all contain a slash; fixed chains never do."""
    return "/" in name


def is_affinity_set(name: str) -> bool:
    return name.startswith(AFFINITY_PREFIX)


def is_endpoints_map(name: str) -> bool:
    return name.startswith((ENDPOINTS_MAP_PREFIX, LOCAL_ENDPOINTS_MAP_PREFIX))
