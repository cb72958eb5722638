"""What a Service means on this node: the one place Service semantics live.

Pure functions from API records (`Service`, `EndpointSlice`) plus this node's name and zone to
`ResolvedServicePort` values. Mirrors upstream kube-proxy: ``serviceport.go``
(newBaseServiceInfo, UsesClusterEndpoints/UsesLocalEndpoints), ``endpointslicecache.go``
(merging slices, port matching by name and protocol, dedupe) and ``topology.go``
(CategorizeEndpoints, topologyModeFromHints).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import attrs

from kproxy_core.model import (
    Endpoint,
    EndpointSlice,
    IPFamily,
    ResolvedServicePort,
    Service,
    ServicePortKey,
    ServicePortName,
    ServicePortSpec,
)

__all__ = [
    "NodeInfo",
    "categorize",
    "endpoint_sort_key",
    "resolve_service",
]

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


@attrs.frozen
class NodeInfo:
    """The facts about this node that resolution depends on."""

    name: str
    zone: str = ""


class Candidate(NamedTuple):
    """An endpoint of one service port before categorisation, with its topology hints."""

    endpoint: Endpoint
    hints_zones: frozenset[str] = frozenset()
    hints_nodes: frozenset[str] = frozenset()


_NO_HINTS: frozenset[str] = frozenset()


def endpoint_sort_key(ep: Endpoint) -> str:
    """Upstream orders endpoints by their ``ip:port`` string; backends that reproduce
    upstream rule text (statistic probabilities are positional) depend on the same order."""
    return ep.address


def _family(ip: str) -> IPFamily:
    return 6 if ":" in ip else 4


def resolve_service(
    service: Service, slices: Iterable[EndpointSlice], node: NodeInfo
) -> dict[ServicePortKey, ResolvedServicePort]:
    """Every `ResolvedServicePort` of ``service`` on ``node``: one per cluster IP family and
    service port. ``slices`` are the service's EndpointSlices (any family; others' slices
    must not be passed). Headless and ExternalName services resolve to nothing."""
    if not service.cluster_ips or service.type == "ExternalName":
        return {}
    # Slices are merged in name order so that "first wins" dedupe is deterministic (upstream
    # iterates a map, i.e. randomly).
    ordered = sorted(slices, key=lambda s: s.name)
    out: dict[ServicePortKey, ResolvedServicePort] = {}
    for cluster_ip in service.cluster_ips:
        family = _family(cluster_ip)
        family_slices = [s for s in ordered if s.address_family == family]
        external_ips = tuple(ip for ip in service.external_ips if _family(ip) == family)
        lb_ips = tuple(ip for ip in service.load_balancer_ips if _family(ip) == family)
        ranges = tuple(c for c in service.load_balancer_source_ranges if _family(c) == family)
        for port in service.ports:
            key = ServicePortKey(
                family, ServicePortName(service.namespace, service.name, port.name, port.protocol)
            )
            candidates = collect_candidates(port, family_slices, node.name)
            externally_accessible = bool(port.node_port or external_ips or lb_ips)
            cat = categorize(
                candidates,
                internal_local=service.internal_traffic_policy_local,
                external_local=service.external_traffic_policy_local,
                externally_accessible=externally_accessible,
                node=node,
            )
            out[key] = ResolvedServicePort(
                key=key,
                cluster_ip=cluster_ip,
                port=port.port,
                node_port=port.node_port,
                external_ips=external_ips,
                load_balancer_ips=lb_ips,
                load_balancer_source_ranges=ranges,
                health_check_node_port=service.health_check_node_port,
                external_policy_local=service.external_traffic_policy_local,
                internal_policy_local=service.internal_traffic_policy_local,
                session_affinity_timeout=service.session_affinity_timeout,
                cluster_endpoints=cat.cluster,
                local_endpoints=cat.local,
                all_reachable_endpoints=cat.all_reachable,
                has_any_endpoints=cat.has_any,
                excluded_endpoints=cat.excluded,
            )
    return out


def collect_candidates(
    port: ServicePortSpec, slices: Iterable[EndpointSlice], node_name: str
) -> list[Candidate]:
    """The merged, deduplicated endpoints of one service port across ``slices``.

    A slice contributes only if it has a port with the service port's name and protocol; that
    slice port's number is the endpoint port (so a named targetPort resolves per slice).
    Duplicates (same ip:port) keep the first one seen, except that a local copy replaces a
    non-local one, as upstream.
    """
    by_addr: dict[tuple[str, int], Candidate] = {}
    for s in slices:
        number = 0
        for sp in s.ports:
            if sp.name == port.name and sp.protocol == port.protocol:
                number = sp.port
                break
        if not number:
            continue
        for se in s.endpoints:
            is_local = bool(node_name) and se.node_name == node_name
            ident = (se.address, number)
            prev = by_addr.get(ident)
            if prev is not None and (prev.endpoint.is_local or not is_local):
                continue
            by_addr[ident] = Candidate(
                Endpoint(
                    ip=se.address,
                    port=number,
                    is_local=is_local,
                    ready=se.ready,
                    serving=se.serving,
                    terminating=se.terminating,
                    node_name=se.node_name,
                    zone=se.zone,
                ),
                frozenset(se.hints_zones) if se.hints_zones else _NO_HINTS,
                frozenset(se.hints_nodes) if se.hints_nodes else _NO_HINTS,
            )
    return sorted(by_addr.values(), key=lambda c: endpoint_sort_key(c.endpoint))


@attrs.frozen
class Categorized:
    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    all_reachable: tuple[Endpoint, ...] = ()
    has_any: bool = False
    excluded: tuple[tuple[Endpoint, str], ...] = ()
    #: "", PreferSameZone or PreferSameNode: the topology filter applied to cluster endpoints.
    topology_mode: str = ""


def _serving_terminating(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


def topology_mode(candidates: Iterable[Candidate], node: NodeInfo) -> str:
    """upstream topologyModeFromHints: filter by node hints if every ready endpoint has one
    and one names this node; else by zone hints likewise; else no topology."""
    has_ready = False
    all_node_hints = True
    for_node = False
    all_zone_hints = True
    for_zone = False
    for c in candidates:
        if not c.endpoint.ready:
            continue
        has_ready = True
        if not c.hints_nodes:
            all_node_hints = False
        elif node.name in c.hints_nodes:
            for_node = True
        if not c.hints_zones:
            all_zone_hints = False
        elif node.zone in c.hints_zones:
            for_zone = True
    if not has_ready:
        return ""
    if all_node_hints and for_node:
        return PREFER_SAME_NODE
    if all_zone_hints and for_zone:
        return PREFER_SAME_ZONE
    return ""


def _available(c: Candidate, mode: str, node: NodeInfo) -> bool:
    if mode == PREFER_SAME_NODE:
        return node.name in c.hints_nodes
    if mode == PREFER_SAME_ZONE:
        return node.zone in c.hints_zones
    return True


def categorize(
    candidates: list[Candidate],
    *,
    internal_local: bool,
    external_local: bool,
    externally_accessible: bool,
    node: NodeInfo,
) -> Categorized:
    """upstream CategorizeEndpoints, plus a reason for every endpoint left out."""
    if not candidates:
        return Categorized()
    # Even with eTP Local an externally reachable port needs the cluster set: traffic from
    # pods and the node to its external IPs is short-circuited to it.
    uses_cluster = not internal_local or externally_accessible
    uses_local = internal_local or (external_local and externally_accessible)

    mode = ""
    cluster: list[Endpoint] = []
    has_any = False
    if uses_cluster:
        mode = topology_mode(candidates, node)
        cluster = [c.endpoint for c in candidates if c.endpoint.ready and _available(c, mode, node)]
        if not cluster:
            # topology already fell back if nothing ready matched it, so nothing is ready
            # anywhere: serving-terminating endpoints are better than none
            cluster = [c.endpoint for c in candidates if _serving_terminating(c.endpoint)]
        has_any = bool(cluster)

    local: list[Endpoint] = []
    if uses_local:
        local_ready = [c.endpoint for c in candidates if c.endpoint.is_local and c.endpoint.ready]
        if any(c.endpoint.ready or _serving_terminating(c.endpoint) for c in candidates):
            has_any = True
        local = local_ready or [
            c.endpoint
            for c in candidates
            if c.endpoint.is_local and not c.endpoint.ready and _serving_terminating(c.endpoint)
        ]

    reachable_set = {e.address for e in cluster} | {e.address for e in local}
    cluster_t = tuple(cluster)
    if local:
        by_addr = {e.address: e for e in local}
        by_addr.update({e.address: e for e in cluster})
        reachable = tuple(sorted(by_addr.values(), key=endpoint_sort_key))
    else:
        # Usually the cluster set in the same order: then one tuple serves both fields
        # (10k fewer tuples at 10k services).
        reachable = tuple(sorted(cluster_t, key=endpoint_sort_key))
        if reachable == cluster_t:
            reachable = cluster_t

    excluded = tuple(
        (c.endpoint, _exclusion_reason(c, mode, uses_cluster))
        for c in candidates
        if c.endpoint.address not in reachable_set
    )
    return Categorized(
        cluster=cluster_t,
        local=tuple(local),
        all_reachable=reachable,
        has_any=has_any,
        excluded=excluded,
        topology_mode=mode,
    )


def _exclusion_reason(c: Candidate, mode: str, uses_cluster: bool) -> str:
    ep = c.endpoint
    if not ep.ready and not _serving_terminating(ep):
        return "terminating, not serving" if ep.terminating else "not ready"
    if not uses_cluster and not ep.is_local:
        return "not local (iTP Local)"
    if not ep.ready:
        return "terminating (ready endpoints exist)"
    if mode == PREFER_SAME_NODE:
        return "node hint " + ",".join(sorted(c.hints_nodes))
    if mode == PREFER_SAME_ZONE:
        return "zone hint " + ",".join(sorted(c.hints_zones))
    # Only reachable when the categorisation above changes without this function following.
    return "not selected"
