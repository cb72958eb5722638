"""Pure rendering of the resolved node model into upstream kube-proxy's iptables layout.

Nothing here touches the kernel: `render_service` turns one `ResolvedServicePort` into its
lines, `render_top_level` writes the chains every sync rewrites, and `assemble` puts both into
one `RestoreData` transaction. The rule text follows upstream ``pkg/proxy/iptables`` (v1.33)
token for token, so ``iptables-save`` of a kproxy node reads like one run by kube-proxy.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence

import attrs

from kproxy_core.kernel.iptables import RestoreData, quote
from kproxy_core.model import Endpoint, ResolvedServicePort, ServicePortKey, ServicePortName

# Top-level chains (upstream names).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
#: kubelet's anti-martian chain, duplicated by kube-proxy when localhost NodePorts are on.
KUBE_FIREWALL = "KUBE-FIREWALL"

FILTER_TOP_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS,
                     KUBE_PROXY_FIREWALL)
NAT_TOP_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")

#: Above this many endpoints upstream drops per-endpoint comments ("large cluster mode").
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

NODEPORTS_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


@attrs.frozen
class JumpRule:
    """A rule in a built-in chain that leads into one of ours (ensured on full syncs)."""

    table: str
    source: str
    target: str
    comment: str
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        args = list(self.extra)
        if self.comment:
            args += ["-m", "comment", "--comment", self.comment]
        return [*args, "-j", self.target]


_NEW = ("-m", "conntrack", "--ctstate", "NEW")
JUMP_RULES: tuple[JumpRule, ...] = (
    JumpRule("filter", "INPUT", KUBE_EXTERNAL_SERVICES,
             "kubernetes externally-visible service portals", _NEW),
    JumpRule("filter", "FORWARD", KUBE_EXTERNAL_SERVICES,
             "kubernetes externally-visible service portals", _NEW),
    JumpRule("filter", "INPUT", KUBE_NODEPORTS, "kubernetes health check service ports"),
    JumpRule("filter", "FORWARD", KUBE_SERVICES, "kubernetes service portals", _NEW),
    JumpRule("filter", "OUTPUT", KUBE_SERVICES, "kubernetes service portals", _NEW),
    JumpRule("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    JumpRule("filter", "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    JumpRule("filter", "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    JumpRule("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    JumpRule("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)
#: kubelet's own jumps: created (when localhost NodePorts are on) but never cleaned up, as
#: upstream, because kubelet owns them.
KUBELET_JUMP_RULES: tuple[JumpRule, ...] = (
    JumpRule("filter", "INPUT", KUBE_FIREWALL, ""),
    JumpRule("filter", "OUTPUT", KUBE_FIREWALL, ""),
)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def port_proto_hash(name: ServicePortName) -> str:
    """Upstream ``portProtoHash``: base32(sha256("ns/name:port" + "tcp"))[:16]."""
    return _hash16(f"{name}{name.protocol.lower()}")


def endpoint_chain(name: ServicePortName, endpoint: Endpoint | str) -> str:
    address = endpoint if isinstance(endpoint, str) else endpoint.address
    return "KUBE-SEP-" + _hash16(f"{name}{name.protocol.lower()}{address}")


def is_service_chain(chain: str) -> bool:
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


def probability(n: int) -> str:
    """``1/n`` with 10 decimals, as Go's ``%0.10f``."""
    return f"{1.0 / n:.10f}"


# --------------------------------------------------------------------------------------------
# Settings that shape rendering (fixed per proxier, except large-cluster mode)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class LocalDetector:
    """Upstream ``LocalTrafficDetector``: match arguments for "from a pod on this node/cluster".

    Empty tuples mean not implemented (no CIDR known): masquerade-by-locality and pod
    short-circuit rules are then not written, as upstream's no-op detector.
    """

    if_local: tuple[str, ...] = ()
    if_not_local: tuple[str, ...] = ()

    @property
    def implemented(self) -> bool:
        return bool(self.if_local)

    @classmethod
    def for_cidrs(cls, cidrs: Sequence[str]) -> LocalDetector:
        if not cidrs:
            return cls()
        # Upstream takes one CIDR per family; several would need several rules.
        return cls(("-s", cidrs[0]), ("!", "-s", cidrs[0]))

    @classmethod
    def for_interface(cls, name: str) -> LocalDetector:
        if not name:
            return cls()
        return cls(("-i", name), ("!", "-i", name))


@attrs.frozen
class RenderConfig:
    family: int = 4
    #: Hex mark, e.g. ``0x4000`` for bit 14.
    masquerade_mark: str = "0x4000"
    masquerade_all: bool = False
    local_detector: LocalDetector = LocalDetector()
    #: IPv4 only; already false when nodePortAddresses excludes loopback.
    localhost_nodeports: bool = True
    #: Empty: NodePorts on every local address. Else the exact addresses to accept them on.
    nodeport_ips: tuple[str, ...] | None = None
    #: This node's primary IP in this family ("" if none): LB source ranges allow it.
    node_ip: str = ""
    random_fully: bool = True
    #: nf_conntrack_tcp_be_liberal is set: no INVALID drop rule, as upstream.
    conntrack_tcp_liberal: bool = False
    large_cluster: bool = False
    #: Upstream ends KUBE-FW chains with a comment-only rule (no target). python-iptables
    #: crashes appending a rule without a target, so the libiptc writer gets an explicit
    #: ``-j RETURN`` there instead, which is what falling off the chain's end does anyway.
    targetless_rules: bool = True


def masquerade_mark(bit: int) -> str:
    if not 0 <= bit <= 31:
        raise ValueError(f"iptables.masqueradeBit must be within 0..31, got {bit}")
    return hex(1 << bit)


def nodeport_addresses(config_values: Sequence[str], node_ips: Sequence[str],
                       family: int) -> tuple[str, ...] | None:
    """The addresses NodePorts are accepted on for ``--nodeport-addresses``, or None for all.

    ``primary`` means this node's own IPs; a CIDR selects node IPs inside it (and loopback
    when the CIDR holds 127.0.0.1, like upstream reading interface addresses).
    """
    if not config_values:
        return None
    version_ips = [ip for ip in node_ips if ipaddress.ip_address(ip).version == family]
    selected: list[str] = []
    for value in config_values:
        if value == "primary":
            candidates = version_ips
        else:
            net = ipaddress.ip_network(value, strict=False)
            if net.version != family:
                continue
            candidates = [ip for ip in version_ips if ipaddress.ip_address(ip) in net]
            loopback = "127.0.0.1" if family == 4 else "::1"
            if ipaddress.ip_address(loopback) in net:
                candidates = [*candidates, loopback]
        selected.extend(ip for ip in candidates if ip not in selected)
    return tuple(selected)


# --------------------------------------------------------------------------------------------
# Per service port
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ServiceRules:
    """What one service port contributes to a transaction."""

    #: ``-A`` lines for the always-rewritten top-level chains.
    nat_top: tuple[str, ...]
    filter_top: tuple[str, ...]
    #: This port's own nat chains (SVC/SVL/EXT/FW/SEP) and their rules.
    chains: tuple[str, ...]
    chain_rules: tuple[str, ...]
    no_local_internal: bool = False
    no_local_external: bool = False


def _unique_endpoints(*groups: Iterable[Endpoint]) -> list[Endpoint]:
    seen: set[str] = set()
    out: list[Endpoint] = []
    for group in groups:
        for ep in group:
            if ep.address not in seen:
                seen.add(ep.address)
                out.append(ep)
    return out


def render_service(port: ResolvedServicePort, cfg: RenderConfig) -> ServiceRules:
    """Upstream's per-service part of ``syncProxyRules``, for one service port."""
    name = str(port.name)
    proto = port.protocol.lower()
    h = port_proto_hash(port.name)
    svc_chain = f"KUBE-SVC-{h}"
    svl_chain = f"KUBE-SVL-{h}"
    ext_chain = f"KUBE-EXT-{h}"
    fw_chain = f"KUBE-FW-{h}"
    mark_masq = KUBE_MARK_MASQ
    pp = f"-m {proto} -p {proto}"
    dport = f"--dport {port.port}"

    cluster_eps = port.cluster_endpoints
    local_eps = port.local_endpoints
    has_endpoints = port.has_any_endpoints
    uses_cluster_chain = bool(cluster_eps)
    uses_local_chain = bool(local_eps)

    internal_chain = svc_chain
    has_internal = has_endpoints
    if port.internal_policy_local:
        internal_chain = svl_chain
        has_internal = has_internal and bool(local_eps)
    external_policy_chain = svc_chain
    has_external = has_endpoints
    if port.external_policy_local:
        external_policy_chain = svl_chain
        has_external = has_external and bool(local_eps)
    # A chain is jumped to only if it will exist: the core could in theory hand us a port
    # with endpoints but none for a policy, and a jump to an undeclared chain fails the
    # whole transaction.
    if internal_chain == svc_chain and not uses_cluster_chain:
        has_internal = False
    if (external_policy_chain == svc_chain and not uses_cluster_chain
            and port.is_external_facing):
        has_external = False
    uses_ext_chain = has_endpoints and port.is_external_facing
    lb_chain = ext_chain
    uses_fw_chain = (has_endpoints and bool(port.load_balancer_ips)
                     and bool(port.load_balancer_source_ranges))
    if uses_fw_chain:
        lb_chain = fw_chain

    no_local_internal = no_local_external = False
    if not has_endpoints:
        int_target = ext_target = "REJECT"
        int_comment = ext_comment = quote(f"{name} has no endpoints")
    else:
        int_target = ext_target = ""
        int_comment = ext_comment = ""
        if not has_internal:
            int_target = "DROP"
            int_comment = quote(f"{name} has no local endpoints")
            no_local_internal = True
        if not has_external:
            ext_target = "DROP"
            ext_comment = quote(f"{name} has no local endpoints")
            no_local_external = True

    nat_top: list[str] = []
    filter_top: list[str] = []
    cluster_ip_comment = quote(f"{name} cluster IP")

    if has_internal:
        nat_top.append(f"-A {KUBE_SERVICES} -m comment --comment {cluster_ip_comment} {pp} "
                       f"-d {port.cluster_ip} {dport} -j {internal_chain}")
    else:
        filter_top.append(f"-A {KUBE_SERVICES} -m comment --comment {int_comment} {pp} "
                          f"-d {port.cluster_ip} {dport} -j {int_target}")

    ext_ip_comment = quote(f"{name} external IP")
    for ip in port.external_ips:
        if has_endpoints:
            nat_top.append(f"-A {KUBE_SERVICES} -m comment --comment {ext_ip_comment} {pp} "
                           f"-d {ip} {dport} -j {ext_chain}")
        if not has_external:
            filter_top.append(f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} "
                              f"{pp} -d {ip} {dport} -j {ext_target}")

    lb_comment = quote(f"{name} loadbalancer IP")
    fw_drop_comment = quote(f"{name} traffic not accepted by {fw_chain}")
    for ip in port.load_balancer_ips:
        if has_endpoints:
            nat_top.append(f"-A {KUBE_SERVICES} -m comment --comment {lb_comment} {pp} "
                           f"-d {ip} {dport} -j {lb_chain}")
        if uses_fw_chain:
            filter_top.append(f"-A {KUBE_PROXY_FIREWALL} -m comment --comment {fw_drop_comment} "
                              f"{pp} -d {ip} {dport} -j DROP")
    if not has_external:
        for ip in port.load_balancer_ips:
            filter_top.append(f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} "
                              f"{pp} -d {ip} {dport} -j {ext_target}")

    if port.node_port:
        name_comment = quote(name)
        if has_endpoints:
            nat_top.append(f"-A {KUBE_NODEPORTS} -m comment --comment {name_comment} {pp} "
                           f"--dport {port.node_port} -j {ext_chain}")
        if not has_external:
            filter_top.append(f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} "
                              f"-m addrtype --dst-type LOCAL {pp} --dport {port.node_port} "
                              f"-j {ext_target}")

    if port.health_check_node_port:
        hc_comment = quote(f"{name} health check node port")
        filter_top.append(f"-A {KUBE_NODEPORTS} -m comment --comment {hc_comment} "
                          f"-m tcp -p tcp --dport {port.health_check_node_port} -j ACCEPT")

    chains: list[str] = []
    rules: list[str] = []

    if has_internal:
        match = f"-m comment --comment {cluster_ip_comment} {pp} -d {port.cluster_ip} {dport}"
        if cfg.masquerade_all:
            rules.append(f"-A {internal_chain} {match} -j {mark_masq}")
        elif cfg.local_detector.implemented:
            not_local = " ".join(cfg.local_detector.if_not_local)
            rules.append(f"-A {internal_chain} {match} {not_local} -j {mark_masq}")

    if uses_ext_chain:
        chains.append(ext_chain)
        if not port.external_policy_local:
            c = quote(f"masquerade traffic for {name} external destinations")
            rules.append(f"-A {ext_chain} -m comment --comment {c} -j {mark_masq}")
        else:
            if cfg.local_detector.implemented and uses_cluster_chain:
                c = quote(f"pod traffic for {name} external destinations")
                local = " ".join(cfg.local_detector.if_local)
                rules.append(f"-A {ext_chain} -m comment --comment {c} {local} -j {svc_chain}")
            c = quote(f"masquerade LOCAL traffic for {name} external destinations")
            rules.append(f"-A {ext_chain} -m comment --comment {c} -m addrtype --src-type LOCAL "
                         f"-j {mark_masq}")
            if uses_cluster_chain:
                c = quote(f"route LOCAL traffic for {name} external destinations")
                rules.append(f"-A {ext_chain} -m comment --comment {c} "
                             f"-m addrtype --src-type LOCAL -j {svc_chain}")
        if has_external:
            rules.append(f"-A {ext_chain} -j {external_policy_chain}")

    if uses_fw_chain:
        chains.append(fw_chain)
        prefix = f"-A {fw_chain} -m comment --comment {lb_comment}"
        allow_from_node = False
        node_addr = ipaddress.ip_address(cfg.node_ip) if cfg.node_ip else None
        for cidr in port.load_balancer_source_ranges:
            rules.append(f"{prefix} -s {cidr} -j {ext_chain}")
            if node_addr is not None:
                net = ipaddress.ip_network(cidr, strict=False)
                if net.version == node_addr.version and node_addr in net:
                    allow_from_node = True
        if allow_from_node:
            for ip in port.load_balancer_ips:
                rules.append(f"{prefix} -s {ip} -j {ext_chain}")
        c = quote(f"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL")
        end = "" if cfg.targetless_rules else " -j RETURN"
        rules.append(f"-A {fw_chain} -m comment --comment {c}{end}")

    sep_names: dict[str, str] = {}
    for ep in _unique_endpoints(cluster_eps, local_eps):
        sep_names[ep.address] = endpoint_chain(port.name, ep)

    affinity = port.session_affinity_timeout
    large = cfg.large_cluster
    if uses_cluster_chain:
        chains.append(svc_chain)
        _write_lb_rules(rules, name, svc_chain, cluster_eps, sep_names, affinity, large)
    if uses_local_chain:
        chains.append(svl_chain)
        _write_lb_rules(rules, name, svl_chain, local_eps, sep_names, affinity, large)

    name_comment = "" if large else f" -m comment --comment {quote(name)}"
    for ep in _unique_endpoints(cluster_eps, local_eps):
        sep = sep_names[ep.address]
        chains.append(sep)
        rules.append(f"-A {sep}{name_comment} -s {ep.ip} -j {mark_masq}")
        recent = f" -m recent --name {sep} --set" if affinity is not None else ""
        rules.append(f"-A {sep}{name_comment}{recent} {pp} -j DNAT "
                     f"--to-destination {ep.address}")

    # The SVC chain's masquerade rule was written before the chain was "declared" in the
    # list above; order within `chains` is irrelevant to iptables-restore.
    return ServiceRules(tuple(nat_top), tuple(filter_top), tuple(chains), tuple(rules),
                        no_local_internal, no_local_external)


def _write_lb_rules(rules: list[str], name: str, chain: str, endpoints: Sequence[Endpoint],
                    sep_names: Mapping[str, str], affinity: int | None, large: bool) -> None:
    if affinity is not None:
        for ep in endpoints:
            sep = sep_names[ep.address]
            comment = "" if large else f" -m comment --comment {quote(f'{name} -> {ep.address}')}"
            rules.append(f"-A {chain}{comment} -m recent --name {sep} --rcheck "
                         f"--seconds {affinity} --reap -j {sep}")
    n = len(endpoints)
    for i, ep in enumerate(endpoints):
        sep = sep_names[ep.address]
        comment = "" if large else f" -m comment --comment {quote(f'{name} -> {ep.address}')}"
        stat = (f" -m statistic --mode random --probability {probability(n - i)}"
                if i < n - 1 else "")
        rules.append(f"-A {chain}{comment}{stat} -j {sep}")


def chain_names(port: ResolvedServicePort, cfg: RenderConfig) -> tuple[str, ...]:
    """The nat chains ``render_service`` would declare for ``port``."""
    return render_service(port, cfg).chains


# --------------------------------------------------------------------------------------------
# Top-level chains and assembly
# --------------------------------------------------------------------------------------------


def render_top_level(data: RestoreData, cfg: RenderConfig) -> None:
    """Declare the top-level chains and write the rules that do not depend on services
    (except the KUBE-SERVICES -> KUBE-NODEPORTS tail, see `render_tail`)."""
    nat = data.table("nat")
    flt = data.table("filter")
    for chain in FILTER_TOP_CHAINS:
        flt.chain(chain)
    for chain in NAT_TOP_CHAINS:
        nat.chain(chain)
    mark = cfg.masquerade_mark
    nat.raw_rules((
        f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
        f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}",
        f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT"'
        f" -j MASQUERADE{' --random-fully' if cfg.random_fully else ''}",
        f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}",
    ))
    if cfg.family == 4 and cfg.localhost_nodeports:
        flt.chain(KUBE_FIREWALL)
        flt.raw_rules((
            f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
            "-j DROP",
        ))


def render_tail(data: RestoreData, cfg: RenderConfig) -> None:
    """Rules that must come after every service's: the NodePort tail of nat KUBE-SERVICES and
    the KUBE-FORWARD chain."""
    nat = data.table("nat")
    flt = data.table("filter")
    if cfg.nodeport_ips is None:
        dest = "-m addrtype --dst-type LOCAL"
        if cfg.family == 6:
            dest += " ! -d ::1/128"
        elif not cfg.localhost_nodeports:
            dest += " ! -d 127.0.0.0/8"
        nat.rule(KUBE_SERVICES, "-m comment --comment", NODEPORTS_COMMENT, dest,
                 "-j", KUBE_NODEPORTS)
    else:
        for ip in cfg.nodeport_ips:
            addr = ipaddress.ip_address(ip)
            if addr.is_loopback and (cfg.family == 6 or not cfg.localhost_nodeports):
                continue
            nat.rule(KUBE_SERVICES, "-m comment --comment", NODEPORTS_COMMENT, "-d", ip,
                     "-j", KUBE_NODEPORTS)
    mark = cfg.masquerade_mark
    if not cfg.conntrack_tcp_liberal:
        flt.rule(KUBE_FORWARD, "-m conntrack --ctstate INVALID -j DROP")
    flt.raw_rules((
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {mark}/{mark} -j ACCEPT",
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ))


def canary(data: RestoreData) -> None:
    for table in ("mangle", "nat", "filter"):
        data.table(table).chain(KUBE_PROXY_CANARY)


def assemble(rendered: Mapping[ServicePortKey, ServiceRules], cfg: RenderConfig, *,
             write_chains_for: Iterable[ServicePortKey] | None = None,
             delete_chains: Iterable[str] = ()) -> RestoreData:
    """One transaction: top-level chains whole, per-service chains for ``write_chains_for``
    (every key when None: a full sync) and ``-X`` of ``delete_chains``."""
    data = RestoreData(cfg.family)
    render_top_level(data, cfg)
    nat = data.table("nat")
    flt = data.table("filter")
    # The view's order (not sorted: comparing 10k attrs keys costs more than all the
    # rendering of a partial sync); rules of different services never depend on each other.
    for r in rendered.values():
        nat.raw_rules(r.nat_top)
        flt.raw_rules(r.filter_top)
    chain_keys = rendered if write_chains_for is None else [
        k for k in write_chains_for if k in rendered]
    for key in chain_keys:
        r = rendered[key]
        for chain in r.chains:
            nat.chain(chain)
        nat.raw_rules(r.chain_rules)
    render_tail(data, cfg)
    for chain in delete_chains:
        if not nat.has_chain(chain):
            nat.chain(chain)  # flush first: -X needs an empty chain
            nat.delete_chain(chain)
    return data


# --------------------------------------------------------------------------------------------
# Full syncs on the nf_tables backend: several bounded transactions
# --------------------------------------------------------------------------------------------

#: Most per-service chains one nf_tables section declares (see `assemble_sections`).
NFT_SECTION_CHAINS = 1500


def nft_order(rendered: Mapping[ServicePortKey, ServiceRules]
                   ) -> dict[ServicePortKey, ServiceRules]:
    """``rendered`` by descending chain-name hash: the order in which iptables-nft-restore
    inserts the KUBE-SERVICES jump targets into its sorted chain list at the head, in full
    and partial syncs alike (see `assemble_sections`)."""
    return dict(sorted(rendered.items(),
                       key=lambda item: item[1].chains[0][-16:] if item[1].chains else "",
                       reverse=True))


def assemble_sections(rendered: Mapping[ServicePortKey, ServiceRules], cfg: RenderConfig, *,
                      delete_chains: Iterable[str] = (),
                      section_chains: int = NFT_SECTION_CHAINS) -> list[RestoreData]:
    """A full sync as several ``*nat ... COMMIT`` sections, for ``iptables-nft-restore``.

    Why: iptables-nft-restore 1.8.x (``nft_cache_level_set`` in iptables/nft-cache.c) keeps,
    per section, a list of every chain name a command names (the chain and the ``-j`` chain),
    sorted by ``strcmp`` and filled by insertion that walks it from the head. A command costs
    one ``strcmp`` (a cache miss) per listed name that sorts before its own. Every rule of a
    KUBE-SVC-* chain names a KUBE-SEP-* chain, and all SEP names sort before all SVC names, so
    one transaction holding the whole table costs (SVC rules) x (SEP chains): quadratic, 5
    minutes at 10k services x 5 endpoints. No command order avoids it inside one section; the
    list is reset at each COMMIT, so the work is split instead:

    1. KUBE-MARK-MASQ (the only outside chain service chains jump to), so it exists;
    2. the per-service chains, whole services at a time, at most ``section_chains`` chains
       per section. Each service's chains are flushed and refilled in one kernel
       transaction, so a live service is never seen half written; a new service's chains are
       not reachable yet;
    3. every top-level chain (nat and filter) and the canaries, in one transaction, so the
       switch to the new service set is atomic as upstream's. Its KUBE-SERVICES rules are
       ordered by descending chain name so that each jump target sorts first in the list;
    4. stale chains, which the new top level no longer references: flushed, then deleted
       (``-X``), in bounded sections of their own.

    A failure part-way leaves earlier sections applied and the proxier forces another full
    sync, as after any failed restore. Only the nf_tables backend needs this: the legacy
    backend rewrites the whole table blob at each COMMIT, so it keeps one transaction.
    """
    if section_chains < 1:
        raise ValueError(f"section_chains must be at least 1, not {section_chains}")
    ordered = nft_order(rendered)
    scratch = RestoreData(cfg.family)
    render_top_level(scratch, cfg)
    lead = RestoreData(cfg.family)
    lead_nat = lead.table("nat")
    lead_nat.chain(KUBE_MARK_MASQ)
    lead_nat.raw_rules(r for r in scratch.table("nat").rules
                       if r.startswith(f"-A {KUBE_MARK_MASQ} "))
    parts = [lead]
    current: RestoreData | None = None
    count = 0
    for r in ordered.values():
        if not r.chains:
            continue
        if current is None or (count and count + len(r.chains) > section_chains):
            current = RestoreData(cfg.family)
            parts.append(current)
            count = 0
        nat = current.table("nat")
        for chain in r.chains:
            nat.chain(chain)
        nat.raw_rules(r.chain_rules)
        count += len(r.chains)
    top = assemble(ordered, cfg, write_chains_for=())
    canary(top)
    parts.append(top)
    # Stale chains may jump to each other (EXT -> SVC -> SEP): all are flushed before any
    # is deleted, so the ``-X`` sections need no order.
    stale = sorted(set(delete_chains) - set(top.table("nat").chains), reverse=True)
    batches = [stale[i:i + section_chains] for i in range(0, len(stale), section_chains)]
    for batch in batches:
        flush = RestoreData(cfg.family)
        for chain in batch:
            flush.table("nat").chain(chain)
        parts.append(flush)
    for batch in batches:
        remove = RestoreData(cfg.family)
        remove.table("nat").deleted.extend(batch)
        parts.append(remove)
    return parts


def render_all(services: Mapping[ServicePortKey, ResolvedServicePort],
               cfg: RenderConfig) -> RestoreData:
    """Convenience for tests and benchmarks: a full-sync transaction for ``services``."""
    return assemble({k: render_service(v, cfg) for k, v in services.items()}, cfg)
