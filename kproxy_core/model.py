"""Value types shared by the core and every backend.

Two layers, both immutable (attrs frozen, slotted):

* *API records* (`Service`, `EndpointSlice`, `Node`): the few fields kproxy needs from the
  Kubernetes objects, parsed once by `kproxy_core.objects`. The official client's generated
  models are not kept: at 10k services they cost hundreds of MB.
* *Node-local model* (`ResolvedServicePort`, `Endpoint`, `NodeView`): what a Service means on
  this node after the core applied traffic policies, topology, terminating fallback and
  affinity (`kproxy_core.resolve`). Backends render only this; they never look at API records.

Equality of these values is what change tracking compares, so every field that influences the
dataplane must be a field here (and nothing that does not, or a sync would touch unchanged
services).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Literal

import attrs

Protocol = Literal["TCP", "UDP", "SCTP"]
IPFamily = Literal[4, 6]

#: Default for ``sessionAffinityConfig.clientIP.timeoutSeconds`` (3 hours), as upstream.
DEFAULT_AFFINITY_TIMEOUT = 10800


def ip_family(address: str) -> IPFamily:
    """4 or 6 for an IP address or CIDR string (raises ValueError for anything else)."""
    if "/" in address:
        return 6 if ipaddress.ip_network(address, strict=False).version == 6 else 4
    return 6 if ipaddress.ip_address(address).version == 6 else 4


def of_family(values: Iterable[str], family: int) -> list[str]:
    """The addresses or CIDRs of ``values`` in IP ``family``, in order (invalid ones dropped)."""
    out = []
    for value in values:
        try:
            version = ipaddress.ip_network(value, strict=False).version
        except ValueError:
            continue
        if version == family:
            out.append(value)
    return out


# --------------------------------------------------------------------------------------------
# API records
# --------------------------------------------------------------------------------------------


class ObjectKind(StrEnum):
    SERVICE = "Service"
    ENDPOINT_SLICE = "EndpointSlice"
    NODE = "Node"


@attrs.frozen
class ServicePortSpec:
    """One entry of ``Service.spec.ports``."""

    name: str
    protocol: Protocol
    port: int
    #: ``targetPort``: a number, or a port name resolved per EndpointSlice port name.
    target_port: int | str
    node_port: int = 0


@attrs.frozen
class Service:
    namespace: str
    name: str
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]
    #: ``spec.clusterIPs`` (primary first); empty for headless and ExternalName services.
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePortSpec, ...]
    external_ips: tuple[str, ...] = ()
    #: ``status.loadBalancer.ingress[].ip``
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    external_traffic_policy_local: bool = False
    internal_traffic_policy_local: bool = False
    #: None without ClientIP affinity, else the timeout in seconds.
    session_affinity_timeout: int | None = None
    health_check_node_port: int = 0
    #: ``spec.trafficDistribution`` (PreferClose, PreferSameZone, PreferSameNode) or "".
    traffic_distribution: str = ""
    #: ``service.kubernetes.io/topology-mode`` (or the older topology-aware-hints) annotation.
    topology_mode: str = ""
    #: ``metadata.resourceVersion``; not compared by resolution (it changes on every write).
    resource_version: str = attrs.field(default="", eq=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@attrs.frozen
class EndpointPortSpec:
    """One entry of ``EndpointSlice.ports``."""

    name: str
    protocol: Protocol
    port: int


@attrs.frozen
class SliceEndpoint:
    """One address of one ``EndpointSlice.endpoints[]`` entry (multi-address entries are split)."""

    address: str
    ready: bool
    serving: bool
    terminating: bool
    node_name: str = ""
    zone: str = ""
    hints_zones: tuple[str, ...] = ()
    hints_nodes: tuple[str, ...] = ()


@attrs.frozen
class EndpointSlice:
    namespace: str
    name: str
    #: Label ``kubernetes.io/service-name``.
    service_name: str
    address_family: IPFamily
    ports: tuple[EndpointPortSpec, ...]
    endpoints: tuple[SliceEndpoint, ...]
    #: Annotation ``endpoints.kubernetes.io/last-change-trigger-time`` as a Unix time, or None.
    last_change_trigger_time: float | None = attrs.field(default=None, eq=False)
    resource_version: str = attrs.field(default="", eq=False)

    @property
    def service_key(self) -> tuple[str, str]:
        return (self.namespace, self.service_name)


@attrs.frozen
class Node:
    name: str
    labels: Mapping[str, str] = attrs.field(factory=dict, eq=False)
    #: ``status.addresses`` of type InternalIP/ExternalIP, in order.
    addresses: tuple[str, ...] = ()
    #: Label ``topology.kubernetes.io/zone`` (compared; labels as a whole are not).
    zone: str = ""
    #: ``spec.podCIDRs`` (``spec.podCIDR`` on old objects): what detectLocalMode NodeCIDR
    #: treats as local pod traffic.
    pod_cidrs: tuple[str, ...] = ()
    #: ``metadata.deletionTimestamp`` is set: /healthz reports unhealthy, like upstream.
    deleting: bool = False
    resource_version: str = attrs.field(default="", eq=False)


# --------------------------------------------------------------------------------------------
# Node-local model
# --------------------------------------------------------------------------------------------


@attrs.frozen(order=True)
class ServicePortName:
    """A service port, printed like upstream: ``ns/name:port`` (``ns/name`` if unnamed)."""

    namespace: str
    name: str
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


@attrs.frozen(order=True)
class ServicePortKey:
    """A service port in one IP family: the unit of change tracking and of backend state."""

    family: IPFamily
    name: ServicePortName

    def __str__(self) -> str:
        return f"{self.name}/{self.name.protocol.lower()} (IPv{self.family})"


@attrs.frozen(order=True)
class Endpoint:
    ip: str
    port: int
    is_local: bool
    ready: bool
    serving: bool
    terminating: bool
    node_name: str = ""
    zone: str = ""

    @property
    def address(self) -> str:
        """``ip:port`` (``[ip]:port`` for IPv6), the form upstream uses in names and hashes."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@attrs.frozen
class ResolvedServicePort:
    """Everything a backend needs to program one service port in one IP family on this node."""

    key: ServicePortKey
    cluster_ip: str
    port: int
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    health_check_node_port: int = 0
    external_policy_local: bool = False
    internal_policy_local: bool = False
    session_affinity_timeout: int | None = None
    #: Endpoints for traffic that uses the cluster-wide set (after topology and fallback).
    #: Empty when the service has none, or when no traffic category uses them.
    cluster_endpoints: tuple[Endpoint, ...] = ()
    #: Ready (or, if none, serving-terminating) endpoints on this node; only computed when a
    #: Local traffic policy applies.
    local_endpoints: tuple[Endpoint, ...] = ()
    #: Union of the endpoints any traffic may reach (for conntrack cleanup and explain).
    all_reachable_endpoints: tuple[Endpoint, ...] = ()
    #: True if some usable endpoint exists anywhere in the cluster.
    has_any_endpoints: bool = False
    #: Endpoints that were considered and not used, with a reason each (for ``kproxy explain``).
    #: Not compared: they do not change the dataplane.
    excluded_endpoints: tuple[tuple[Endpoint, str], ...] = attrs.field(default=(), eq=False)

    @property
    def name(self) -> ServicePortName:
        return self.key.name

    @property
    def family(self) -> IPFamily:
        return self.key.family

    @property
    def protocol(self) -> Protocol:
        return self.key.name.protocol

    @property
    def is_external_facing(self) -> bool:
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    @property
    def internal_endpoints(self) -> tuple[Endpoint, ...]:
        """Endpoints for ClusterIP traffic (internalTrafficPolicy applied)."""
        return self.local_endpoints if self.internal_policy_local else self.cluster_endpoints

    @property
    def external_endpoints(self) -> tuple[Endpoint, ...]:
        """Endpoints for NodePort/externalIP/LB traffic (externalTrafficPolicy applied)."""
        return self.local_endpoints if self.external_policy_local else self.cluster_endpoints


@attrs.frozen
class NodeView:
    """The resolved state of this node at one instant: what every backend sync renders."""

    node_name: str
    #: This node's addresses from the API (InternalIP first), both families.
    node_ips: tuple[str, ...]
    zone: str
    services: Mapping[ServicePortKey, ResolvedServicePort] = attrs.field(eq=False)
    #: This node's pod CIDRs from the Node object (both families), for detectLocalMode
    #: NodeCIDR.
    pod_cidrs: tuple[str, ...] = ()

    def family(self, family: IPFamily) -> dict[ServicePortKey, ResolvedServicePort]:
        return {k: v for k, v in self.services.items() if k.family == family}
