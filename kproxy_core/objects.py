"""Raw Kubernetes API objects (JSON-shaped mappings, camelCase) -> the records in `model`.

Strict where the dataplane depends on a value (IPs, ports, protocols, policies, conditions):
such a value is checked and a bad one raises `InvalidObject` naming the field. Lenient
elsewhere: unknown fields are ignored and purely informational values that fail to parse
(e.g. the last-change-trigger-time annotation) become "unknown".
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, NoReturn, cast

from kproxy_core.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    EndpointPortSpec,
    EndpointSlice,
    IPFamily,
    Node,
    Protocol,
    Service,
    ServicePortSpec,
    SliceEndpoint,
)

__all__ = [
    "LABEL_HEADLESS",
    "LABEL_SERVICE_NAME",
    "LABEL_SERVICE_PROXY_NAME",
    "LABEL_ZONE",
    "InvalidObject",
    "object_ref",
    "parse_endpoint_slice",
    "parse_node",
    "parse_service",
]

LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
LABEL_ZONE = "topology.kubernetes.io/zone"
ANNOTATION_TOPOLOGY_MODE = "service.kubernetes.io/topology-mode"
ANNOTATION_TOPOLOGY_HINTS = "service.kubernetes.io/topology-aware-hints"
ANNOTATION_TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"

_PROTOCOLS: frozenset[str] = frozenset(("TCP", "UDP", "SCTP"))
_SERVICE_TYPES: frozenset[str] = frozenset(
    ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
)
_EXTERNAL_TYPES: frozenset[str] = frozenset(("NodePort", "LoadBalancer"))
#: upstream's IsValidPortName (IANA_SVC_NAME): 1-15 of [a-z0-9-], a letter, no edge or double "-"
_PORT_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,13}[a-z0-9])?")
#: upstream validation caps ClientIP affinity at one day
_MAX_AFFINITY_TIMEOUT = 86400


def _intern(value: str) -> str:
    """One shared copy of strings that repeat across objects (namespaces, names, protocols,
    port names, node names, zones): at 10k services x 5 endpoints each was ~50k copies."""
    return sys.intern(str(value))


class InvalidObject(ValueError):
    """An API object kproxy cannot program; ``str()`` is one line naming object and field."""

    def __init__(self, kind: str, namespace: str, name: str, field: str, reason: str) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field = field
        # One line, whatever the input contained: it goes straight into a log line.
        self.reason = " ".join(reason.split())
        super().__init__(str(self))

    def __str__(self) -> str:
        name = self.name or "<unnamed>"
        ref = f"{self.namespace}/{name}" if self.namespace else name
        return f"{self.kind} {ref}: {self.field}: {self.reason}"


def object_ref(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of a raw object, as far as it can be read ("" when missing).

    Used for deletes and tombstones, which must work even when the rest of the object is
    garbage.
    """
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return ("", "")
    ns = meta.get("namespace")
    name = meta.get("name")
    return (ns if isinstance(ns, str) else "", name if isinstance(name, str) else "")


class _Reader:
    """Typed access to one raw object, raising `InvalidObject` with the field path."""

    __slots__ = ("kind", "name", "namespace")

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name

    def fail(self, field: str, reason: str) -> NoReturn:
        raise InvalidObject(self.kind, self.namespace, self.name, field, reason)

    def mapping(self, parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, f"expected an object, got {_type_name(value)}")
        return value

    def seq(self, parent: Mapping[str, Any], key: str, path: str) -> Sequence[Any]:
        value = parent.get(key)
        if value is None:
            return ()
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            self.fail(path, f"expected a list, got {_type_name(value)}")
        return value

    def item_mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected an object, got {_type_name(value)}")
        return value

    def string(self, parent: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
        value = parent.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_type_name(value)}")
        return value

    def integer(self, parent: Mapping[str, Any], key: str, path: str, default: int = 0) -> int:
        value = parent.get(key)
        if value is None:
            return default
        # bool is an int subclass in Python; JSON true is never a valid port.
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {_type_name(value)}")
        return value

    def boolean(self, parent: Mapping[str, Any], key: str, path: str) -> bool | None:
        value = parent.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {_type_name(value)}")
        return value

    def port(self, parent: Mapping[str, Any], key: str, path: str, *, required: bool) -> int:
        if parent.get(key) is None:
            if required:
                self.fail(path, "is required")
            return 0
        value = self.integer(parent, key, path)
        if not 1 <= value <= 65535:
            self.fail(path, f"{value} is out of range 1-65535")
        return value

    def protocol(self, parent: Mapping[str, Any], path: str) -> Protocol:
        value = self.string(parent, "protocol", path, "TCP")
        if value not in _PROTOCOLS:
            self.fail(path, f"unknown protocol {value!r} (expected TCP, UDP or SCTP)")
        return cast(Protocol, _intern(value))

    def ip(self, value: Any, path: str, family: IPFamily | None = None) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected an IP address string, got {_type_name(value)}")
        canonical = canonical_ip(value)
        if canonical is None:
            self.fail(path, f"{value!r} is not a valid IP address")
        if family is not None and (6 if ":" in canonical else 4) != family:
            self.fail(path, f"{value} is not an IPv{family} address")
        return canonical

    def cidr(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a CIDR string, got {_type_name(value)}")
        # upstream validation accidentally allows whitespace padding; kube-proxy trims it
        text = value.strip()
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.fail(path, f"{value!r} is not a valid CIDR")
        return text


def canonical_ip(text: str) -> str | None:
    """The canonical spelling of an IP address, or None if ``text`` is not one.

    inet_pton is strict (no leading zeros, no zone index, no whitespace) and an order of
    magnitude faster than `ipaddress`, which matters at 50k endpoint addresses per relist.
    IPv6 has many spellings of one address; dedupe and rule text need the canonical one.
    """
    try:
        socket.inet_pton(socket.AF_INET, text)
        return text
    except OSError:
        pass
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        return None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, Sequence):
        return "list"
    return type(value).__name__


def _metadata(
    kind: str, obj: Mapping[str, Any], *, namespaced: bool
) -> tuple[_Reader, Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        raise InvalidObject(kind, "", "", "<object>", f"expected an object, got {_type_name(obj)}")
    namespace, name = object_ref(obj)
    # Manifests may omit the namespace; kubectl's default applies.
    if namespaced and not namespace:
        namespace = "default"
    reader = _Reader(kind, _intern(namespace) if namespaced else "", _intern(name))
    meta = reader.mapping(obj, "metadata", "metadata")
    if not name:
        reader.fail("metadata.name", "is required")
    if namespaced and meta.get("namespace") is not None and not isinstance(meta["namespace"], str):
        reader.fail("metadata.namespace", f"expected a string, got {_type_name(meta['namespace'])}")
    return reader, meta


def _string_map(reader: _Reader, meta: Mapping[str, Any], key: str) -> dict[str, str]:
    raw = reader.mapping(meta, key, f"metadata.{key}")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(v, str):
            reader.fail(f"metadata.{key}[{k}]", f"expected a string, got {_type_name(v)}")
        out[str(k)] = v
    return out


# --------------------------------------------------------------------------------------------
# Service
# --------------------------------------------------------------------------------------------


def parse_service(obj: Mapping[str, Any]) -> Service:
    """Parse a ``v1/Service``. Raises `InvalidObject`."""
    r, meta = _metadata("Service", obj, namespaced=True)
    annotations = _string_map(r, meta, "annotations")
    spec = r.mapping(obj, "spec", "spec")
    svc_type = r.string(spec, "type", "spec.type", "ClusterIP") or "ClusterIP"
    if svc_type not in _SERVICE_TYPES:
        r.fail("spec.type", f"unknown service type {svc_type!r}")

    cluster_ips = _cluster_ips(r, spec, svc_type)
    ports = _service_ports(r, spec, svc_type)

    external_ips = tuple(
        r.ip(ip, f"spec.externalIPs[{i}]")
        for i, ip in enumerate(r.seq(spec, "externalIPs", "spec.externalIPs"))
    )
    source_ranges = tuple(
        r.cidr(c, f"spec.loadBalancerSourceRanges[{i}]")
        for i, c in enumerate(
            r.seq(spec, "loadBalancerSourceRanges", "spec.loadBalancerSourceRanges")
        )
    )
    lb_ips = _load_balancer_ips(r, obj)

    etp = r.string(spec, "externalTrafficPolicy", "spec.externalTrafficPolicy", "Cluster")
    itp = r.string(spec, "internalTrafficPolicy", "spec.internalTrafficPolicy", "Cluster")
    for path, policy in (("spec.externalTrafficPolicy", etp), ("spec.internalTrafficPolicy", itp)):
        if policy not in ("", "Cluster", "Local"):
            r.fail(path, f"unknown traffic policy {policy!r} (expected Cluster or Local)")
    # upstream apiservice.ExternalPolicyLocal: eTP only means something when the service is
    # reachable from outside (NodePort, LoadBalancer, or ClusterIP with externalIPs)
    externally_accessible = svc_type in _EXTERNAL_TYPES or (
        svc_type == "ClusterIP" and bool(external_ips)
    )
    etp_local = etp == "Local" and externally_accessible

    health_check_node_port = 0
    if svc_type == "LoadBalancer" and etp_local:
        health_check_node_port = r.port(
            spec, "healthCheckNodePort", "spec.healthCheckNodePort", required=False
        )

    return Service(
        namespace=r.namespace,
        name=r.name,
        type=cast(Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"], svc_type),
        cluster_ips=cluster_ips,
        ports=ports,
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        load_balancer_source_ranges=source_ranges,
        external_traffic_policy_local=etp_local,
        internal_traffic_policy_local=itp == "Local",
        session_affinity_timeout=_affinity(r, spec),
        health_check_node_port=health_check_node_port,
        traffic_distribution=r.string(spec, "trafficDistribution", "spec.trafficDistribution"),
        topology_mode=annotations.get(ANNOTATION_TOPOLOGY_MODE)
        or annotations.get(ANNOTATION_TOPOLOGY_HINTS, ""),
        resource_version=r.string(meta, "resourceVersion", "metadata.resourceVersion"),
    )


def _cluster_ips(r: _Reader, spec: Mapping[str, Any], svc_type: str) -> tuple[str, ...]:
    if svc_type == "ExternalName":
        return ()
    raw = r.seq(spec, "clusterIPs", "spec.clusterIPs")
    path = "spec.clusterIPs"
    if not raw:
        single = r.string(spec, "clusterIP", "spec.clusterIP")
        raw = (single,) if single else ()
        path = "spec.clusterIP"
    # "None" marks a headless service; "" is one whose IP was never allocated (manifests).
    if not raw or raw[0] in ("None", ""):
        return ()
    ips: list[str] = []
    families: set[int] = set()
    for i, value in enumerate(raw):
        field = f"{path}[{i}]" if path == "spec.clusterIPs" else path
        ip = r.ip(value, field)
        family = 6 if ":" in ip else 4
        if family in families:
            r.fail(field, f"second IPv{family} cluster IP {ip} (at most one per family)")
        families.add(family)
        ips.append(ip)
    return tuple(ips)


def _service_ports(
    r: _Reader, spec: Mapping[str, Any], svc_type: str
) -> tuple[ServicePortSpec, ...]:
    out: list[ServicePortSpec] = []
    seen: set[tuple[str, str, int]] = set()
    for i, raw in enumerate(r.seq(spec, "ports", "spec.ports")):
        path = f"spec.ports[{i}]"
        p = r.item_mapping(raw, path)
        name = _intern(r.string(p, "name", f"{path}.name"))
        protocol = r.protocol(p, f"{path}.protocol")
        port = r.port(p, "port", f"{path}.port", required=True)
        target = _target_port(r, p, f"{path}.targetPort", port)
        node_port = 0
        if svc_type in _EXTERNAL_TYPES:
            node_port = r.port(p, "nodePort", f"{path}.nodePort", required=False)
        ident = (name, protocol, port)
        if ident in seen:
            r.fail(path, f"duplicate port {name or '<unnamed>'} {port}/{protocol}")
        seen.add(ident)
        out.append(ServicePortSpec(name, protocol, port, target, node_port))
    return tuple(out)


def _target_port(r: _Reader, p: Mapping[str, Any], path: str, port: int) -> int | str:
    value = p.get("targetPort")
    if value is None or value == 0 or value == "":
        return port
    if isinstance(value, str):
        # YAML authors often quote numbers; the API would reject it, we read it as meant.
        # (isascii: "²".isdigit() is true but int() rejects it.)
        if value.isascii() and value.isdigit():
            value = int(value)
        elif _PORT_NAME.fullmatch(value) and "--" not in value and not value.isdigit():
            return value
        else:
            r.fail(path, f"{value!r} is neither a port number nor a port name (IANA_SVC_NAME)")
    if isinstance(value, bool) or not isinstance(value, int):
        r.fail(path, f"expected a port number or name, got {_type_name(value)}")
    if not 1 <= value <= 65535:
        r.fail(path, f"{value} is out of range 1-65535")
    return value


def _load_balancer_ips(r: _Reader, obj: Mapping[str, Any]) -> tuple[str, ...]:
    status = r.mapping(obj, "status", "status")
    lb = r.mapping(status, "loadBalancer", "status.loadBalancer")
    ips: list[str] = []
    for i, raw in enumerate(r.seq(lb, "ingress", "status.loadBalancer.ingress")):
        path = f"status.loadBalancer.ingress[{i}]"
        ing = r.item_mapping(raw, path)
        ip = r.string(ing, "ip", f"{path}.ip")
        # Hostname-only ingresses and ipMode Proxy load balancers are not VIPs kube-proxy
        # captures (upstream proxyutil.IsVIPMode).
        if not ip or r.string(ing, "ipMode", f"{path}.ipMode", "VIP") == "Proxy":
            continue
        ips.append(r.ip(ip, f"{path}.ip"))
    return tuple(ips)


def _affinity(r: _Reader, spec: Mapping[str, Any]) -> int | None:
    affinity = r.string(spec, "sessionAffinity", "spec.sessionAffinity", "None")
    if affinity in ("", "None"):
        return None
    if affinity != "ClientIP":
        r.fail("spec.sessionAffinity", f"unknown affinity {affinity!r} (expected None or ClientIP)")
    config = r.mapping(spec, "sessionAffinityConfig", "spec.sessionAffinityConfig")
    client = r.mapping(config, "clientIP", "spec.sessionAffinityConfig.clientIP")
    path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    timeout = r.integer(client, "timeoutSeconds", path, DEFAULT_AFFINITY_TIMEOUT)
    if not 1 <= timeout <= _MAX_AFFINITY_TIMEOUT:
        r.fail(path, f"{timeout} is out of range 1-{_MAX_AFFINITY_TIMEOUT}")
    return timeout


# --------------------------------------------------------------------------------------------
# EndpointSlice
# --------------------------------------------------------------------------------------------


def parse_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice:
    """Parse a ``discovery.k8s.io/v1 EndpointSlice``. Raises `InvalidObject` (also for FQDN
    slices, which kube-proxy does not program)."""
    r, meta = _metadata("EndpointSlice", obj, namespaced=True)
    labels = _string_map(r, meta, "labels")
    annotations = _string_map(r, meta, "annotations")
    service_name = _intern(labels.get(LABEL_SERVICE_NAME, ""))
    if not service_name:
        r.fail(f"metadata.labels[{LABEL_SERVICE_NAME}]", "is required")

    address_type = r.string(obj, "addressType", "addressType")
    family: IPFamily
    if address_type == "IPv4":
        family = 4
    elif address_type == "IPv6":
        family = 6
    elif address_type == "FQDN":
        r.fail("addressType", "FQDN slices are not proxied")
    elif not address_type:
        r.fail("addressType", "is required")
    else:
        r.fail("addressType", f"unknown address type {address_type!r} (expected IPv4 or IPv6)")

    ports: list[EndpointPortSpec] = []
    for i, raw in enumerate(r.seq(obj, "ports", "ports")):
        path = f"ports[{i}]"
        p = r.item_mapping(raw, path)
        name = _intern(r.string(p, "name", f"{path}.name"))
        protocol = r.protocol(p, f"{path}.protocol")
        # A port without a number means "all ports", which upstream does not implement
        # either: the entry is skipped.
        number = r.port(p, "port", f"{path}.port", required=False)
        if number:
            ports.append(EndpointPortSpec(name, protocol, number))

    endpoints: list[SliceEndpoint] = []
    for i, raw in enumerate(r.seq(obj, "endpoints", "endpoints")):
        endpoints.extend(_slice_endpoints(r, raw, f"endpoints[{i}]", family))

    return EndpointSlice(
        namespace=r.namespace,
        name=r.name,
        service_name=service_name,
        address_family=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        last_change_trigger_time=_rfc3339(annotations.get(ANNOTATION_TRIGGER_TIME)),
        resource_version=r.string(meta, "resourceVersion", "metadata.resourceVersion"),
    )


def _slice_endpoints(r: _Reader, raw: Any, path: str, family: IPFamily) -> list[SliceEndpoint]:
    ep = r.item_mapping(raw, path)
    addresses = r.seq(ep, "addresses", f"{path}.addresses")
    if not addresses:
        r.fail(f"{path}.addresses", "must list at least one address")
    cond = r.mapping(ep, "conditions", f"{path}.conditions")
    ready_raw = r.boolean(cond, "ready", f"{path}.conditions.ready")
    serving_raw = r.boolean(cond, "serving", f"{path}.conditions.serving")
    terminating_raw = r.boolean(cond, "terminating", f"{path}.conditions.terminating")
    # As upstream kube-proxy (endpointslicecache.go): ready and serving unknown -> true;
    # terminating unknown -> not terminating. (A terminating endpoint whose controller did not
    # set serving still counts for the terminating fallback, as upstream.)
    ready = True if ready_raw is None else ready_raw
    serving = True if serving_raw is None else serving_raw
    terminating = bool(terminating_raw)
    node_name = _intern(r.string(ep, "nodeName", f"{path}.nodeName"))
    zone = _intern(r.string(ep, "zone", f"{path}.zone"))
    hints = r.mapping(ep, "hints", f"{path}.hints")
    hints_zones = _hint_names(r, hints, "forZones", f"{path}.hints.forZones")
    hints_nodes = _hint_names(r, hints, "forNodes", f"{path}.hints.forNodes")
    return [
        SliceEndpoint(
            address=r.ip(a, f"{path}.addresses[{j}]", family),
            ready=ready,
            serving=serving,
            terminating=terminating,
            node_name=node_name,
            zone=zone,
            hints_zones=hints_zones,
            hints_nodes=hints_nodes,
        )
        for j, a in enumerate(addresses)
    ]


def _hint_names(r: _Reader, hints: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    names: list[str] = []
    for i, raw in enumerate(r.seq(hints, key, path)):
        item = r.item_mapping(raw, f"{path}[{i}]")
        name = r.string(item, "name", f"{path}[{i}].name")
        if not name:
            r.fail(f"{path}[{i}].name", "is required")
        names.append(_intern(name))
    return tuple(names)


def _rfc3339(value: str | None) -> float | None:
    """Unix time of an RFC 3339 timestamp; None when absent or unreadable (informational)."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


# --------------------------------------------------------------------------------------------
# Node
# --------------------------------------------------------------------------------------------


def parse_node(obj: Mapping[str, Any]) -> Node:
    """Parse a ``v1/Node``. Raises `InvalidObject`."""
    r, meta = _metadata("Node", obj, namespaced=False)
    labels = _string_map(r, meta, "labels")
    status = r.mapping(obj, "status", "status")
    internal: list[str] = []
    external: list[str] = []
    for i, raw in enumerate(r.seq(status, "addresses", "status.addresses")):
        path = f"status.addresses[{i}]"
        item = r.item_mapping(raw, path)
        kind = r.string(item, "type", f"{path}.type")
        if kind not in ("InternalIP", "ExternalIP"):
            continue
        ip = r.ip(item.get("address"), f"{path}.address")
        (internal if kind == "InternalIP" else external).append(ip)
    addresses: list[str] = []
    for ip in (*internal, *external):
        if ip not in addresses:
            addresses.append(ip)
    spec = r.mapping(obj, "spec", "spec")
    raw_cidrs = r.seq(spec, "podCIDRs", "spec.podCIDRs") or (
        [spec["podCIDR"]] if spec.get("podCIDR") else [])
    pod_cidrs = tuple(r.cidr(cidr, f"spec.podCIDRs[{i}]") for i, cidr in enumerate(raw_cidrs))
    return Node(
        name=r.name,
        labels=labels,
        addresses=tuple(addresses),
        pod_cidrs=pod_cidrs,
        zone=labels.get(LABEL_ZONE, ""),
        deleting=meta.get("deletionTimestamp") is not None,
        resource_version=r.string(meta, "resourceVersion", "metadata.resourceVersion"),
    )
