"""Parsing raw API dicts into records: one table per rule."""

from __future__ import annotations

import copy
from typing import Any

import attrs
import pytest

from kproxy_core.model import (
    EndpointPortSpec,
    Node,
    ServicePortSpec,
    SliceEndpoint,
)
from kproxy_core.objects import (
    InvalidObject,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)


def svc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "resourceVersion": "7"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.0.0.10",
            "clusterIPs": ["10.0.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }
    base["spec"].update(spec)
    return base


def eps(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abc",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}}],
    }
    base.update(fields)
    return base


def with_meta(obj: dict[str, Any], **meta: Any) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"].update(meta)
    return obj


# --------------------------------------------------------------------------------------------
# InvalidObject formatting
# --------------------------------------------------------------------------------------------


def test_invalid_object_message_is_one_line_naming_object_and_field() -> None:
    obj = svc(ports=[{"port": 80}, {"port": 70000}])
    with pytest.raises(InvalidObject) as info:
        parse_service(obj)
    assert (
        str(info.value) == "Service default/web: spec.ports[1].port: 70000 is out of range 1-65535"
    )
    assert info.value.field == "spec.ports[1].port"


def test_invalid_object_reason_newlines_are_flattened() -> None:
    err = InvalidObject("Node", "", "n1", "status", "bad\nthing")
    assert str(err) == "Node n1: status: bad thing"


# --------------------------------------------------------------------------------------------
# Service
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, ("10.0.0.10",)),
        ({"clusterIPs": ["10.0.0.10", "fd00::a"]}, ("10.0.0.10", "fd00::a")),
        ({"clusterIPs": None, "clusterIP": "10.0.0.11"}, ("10.0.0.11",)),
        ({"clusterIPs": [], "clusterIP": "10.0.0.11"}, ("10.0.0.11",)),
        ({"clusterIPs": ["None"], "clusterIP": "None"}, ()),
        ({"clusterIPs": None, "clusterIP": "None"}, ()),
        ({"clusterIPs": None, "clusterIP": None}, ()),
        ({"clusterIPs": ["fd00:0::0a"]}, ("fd00::a",)),
        ({"type": "ExternalName", "externalName": "x.example", "clusterIPs": None}, ()),
        ({"type": "ExternalName", "clusterIPs": ["10.0.0.10"]}, ()),
    ],
)
def test_service_cluster_ips(spec: dict[str, Any], expected: tuple[str, ...]) -> None:
    assert parse_service(svc(**spec)).cluster_ips == expected


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        ({"clusterIPs": ["10.0.0.300"]}, "spec.clusterIPs[0]", "'10.0.0.300' is not a valid IP"),
        ({"clusterIPs": None, "clusterIP": "x"}, "spec.clusterIP", "'x' is not a valid IP"),
        ({"clusterIPs": ["10.0.0.1", "10.0.0.2"]}, "spec.clusterIPs[1]", "second IPv4"),
        ({"clusterIPs": "10.0.0.1"}, "spec.clusterIPs", "expected a list, got string"),
        ({"clusterIPs": [5]}, "spec.clusterIPs[0]", "expected an IP address string"),
        ({"type": "Weird"}, "spec.type", "unknown service type 'Weird'"),
        ({"externalIPs": ["1.2.3"]}, "spec.externalIPs[0]", "not a valid IP"),
        ({"loadBalancerSourceRanges": ["10.0.0.0/33"]}, "spec.loadBalancerSourceRanges[0]", "CIDR"),
        ({"externalTrafficPolicy": "Nope"}, "spec.externalTrafficPolicy", "unknown traffic"),
        ({"internalTrafficPolicy": "Nope"}, "spec.internalTrafficPolicy", "unknown traffic"),
        ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity", "unknown affinity"),
        (
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
            },
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "0 is out of range 1-86400",
        ),
        ({"ports": "80"}, "spec.ports", "expected a list"),
        ({"ports": [80]}, "spec.ports[0]", "expected an object, got number"),
        ({"ports": [{"name": "a"}]}, "spec.ports[0].port", "is required"),
        ({"ports": [{"port": 0}]}, "spec.ports[0].port", "0 is out of range 1-65535"),
        ({"ports": [{"port": "80"}]}, "spec.ports[0].port", "expected an integer, got string"),
        ({"ports": [{"port": True}]}, "spec.ports[0].port", "expected an integer, got boolean"),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol", "'ICMP'"),
        ({"ports": [{"port": 80, "targetPort": 99999}]}, "spec.ports[0].targetPort", "99999"),
        ({"ports": [{"port": 80, "targetPort": 1.5}]}, "spec.ports[0].targetPort", "number"),
        (
            {"type": "NodePort", "ports": [{"port": 80, "nodePort": 65536}]},
            "spec.ports[0].nodePort",
            "65536 is out of range",
        ),
        ({"ports": [{"port": 80}, {"port": 80}]}, "spec.ports[1]", "duplicate port"),
        ({"ports": [{"port": 80, "name": 3}]}, "spec.ports[0].name", "expected a string"),
    ],
)
def test_service_invalid(spec: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidObject) as info:
        parse_service(svc(**spec))
    assert info.value.field == field
    assert reason in info.value.reason
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"metadata": {"namespace": "a"}, "spec": {}}, "metadata.name"),
        ({"metadata": {"name": ""}, "spec": {}}, "metadata.name"),
        ({"metadata": "x"}, "metadata"),
        ({"metadata": {"name": "a"}, "spec": []}, "spec"),
        ({"metadata": {"name": "a", "annotations": {"x": 1}}}, "metadata.annotations[x]"),
    ],
)
def test_service_invalid_shape(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject) as info:
        parse_service(obj)
    assert info.value.field == field


def test_service_not_a_mapping() -> None:
    with pytest.raises(InvalidObject, match="expected an object, got list"):
        parse_service([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"port": 80}, ServicePortSpec("", "TCP", 80, 80)),
        ({"port": 80, "protocol": "UDP"}, ServicePortSpec("", "UDP", 80, 80)),
        ({"port": 80, "protocol": "SCTP", "name": "s"}, ServicePortSpec("s", "SCTP", 80, 80)),
        ({"port": 80, "targetPort": 8080}, ServicePortSpec("", "TCP", 80, 8080)),
        ({"port": 80, "targetPort": "http"}, ServicePortSpec("", "TCP", 80, "http")),
        ({"port": 80, "targetPort": "8081"}, ServicePortSpec("", "TCP", 80, 8081)),
        ({"port": 80, "targetPort": 0}, ServicePortSpec("", "TCP", 80, 80)),
        ({"port": 80, "nodePort": 30080}, ServicePortSpec("", "TCP", 80, 80, 0)),
        ({"port": 53, "protocol": None}, ServicePortSpec("", "TCP", 53, 53)),
    ],
)
def test_service_ports(port: dict[str, Any], expected: ServicePortSpec) -> None:
    assert parse_service(svc(ports=[port])).ports == (expected,)


@pytest.mark.parametrize("svc_type", ["NodePort", "LoadBalancer"])
def test_service_node_port_kept_for_external_types(svc_type: str) -> None:
    parsed = parse_service(svc(type=svc_type, ports=[{"port": 80, "nodePort": 30080}]))
    assert parsed.ports[0].node_port == 30080


@pytest.mark.parametrize(
    ("spec", "etp_local", "hc_port"),
    [
        (
            {
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "healthCheckNodePort": 32000,
            },
            True,
            32000,
        ),
        (
            {
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Cluster",
                "healthCheckNodePort": 32000,
            },
            False,
            0,
        ),
        (
            {"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000},
            True,
            0,
        ),
        ({"type": "ClusterIP", "externalTrafficPolicy": "Local"}, False, 0),
        (
            {"type": "ClusterIP", "externalTrafficPolicy": "Local", "externalIPs": ["1.2.3.4"]},
            True,
            0,
        ),
        ({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}, True, 0),
        ({"type": "LoadBalancer"}, False, 0),
    ],
)
def test_service_external_policy_and_health_check(
    spec: dict[str, Any], etp_local: bool, hc_port: int
) -> None:
    parsed = parse_service(svc(**spec))
    assert parsed.external_traffic_policy_local is etp_local
    assert parsed.health_check_node_port == hc_port


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, False),
        ({"internalTrafficPolicy": "Cluster"}, False),
        ({"internalTrafficPolicy": "Local"}, True),
    ],
)
def test_service_internal_policy(spec: dict[str, Any], expected: bool) -> None:
    assert parse_service(svc(**spec)).internal_traffic_policy_local is expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, None),
        ({"sessionAffinity": "None"}, None),
        ({"sessionAffinity": "ClientIP"}, 10800),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {}}}, 10800),
        (
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            },
            60,
        ),
    ],
)
def test_service_affinity(spec: dict[str, Any], expected: int | None) -> None:
    assert parse_service(svc(**spec)).session_affinity_timeout == expected


@pytest.mark.parametrize(
    ("ingress", "expected"),
    [
        ([{"ip": "5.5.5.5"}], ("5.5.5.5",)),
        ([{"hostname": "lb.example"}], ()),
        ([{"hostname": "lb.example", "ip": ""}, {"ip": "fd00::5"}], ("fd00::5",)),
        ([{"ip": "5.5.5.5", "ipMode": "Proxy"}, {"ip": "6.6.6.6", "ipMode": "VIP"}], ("6.6.6.6",)),
    ],
)
def test_service_load_balancer_ips(
    ingress: list[dict[str, Any]], expected: tuple[str, ...]
) -> None:
    obj = svc(type="LoadBalancer")
    obj["status"] = {"loadBalancer": {"ingress": ingress}}
    assert parse_service(obj).load_balancer_ips == expected


def test_service_invalid_load_balancer_ip() -> None:
    obj = svc(type="LoadBalancer")
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "nope"}]}}
    with pytest.raises(InvalidObject, match=r"status.loadBalancer.ingress\[0\].ip"):
        parse_service(obj)


def test_service_source_ranges_trimmed() -> None:
    parsed = parse_service(svc(loadBalancerSourceRanges=[" 10.0.0.0/8 ", "fd00::/64"]))
    assert parsed.load_balancer_source_ranges == ("10.0.0.0/8", "fd00::/64")


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({}, ""),
        ({"service.kubernetes.io/topology-mode": "Auto"}, "Auto"),
        ({"service.kubernetes.io/topology-aware-hints": "auto"}, "auto"),
        (
            {
                "service.kubernetes.io/topology-mode": "Auto",
                "service.kubernetes.io/topology-aware-hints": "Disabled",
            },
            "Auto",
        ),
    ],
)
def test_service_topology_annotation(annotations: dict[str, str], expected: str) -> None:
    assert parse_service(with_meta(svc(), annotations=annotations)).topology_mode == expected


def test_service_misc_fields_and_leniency() -> None:
    obj = svc(trafficDistribution="PreferClose", unknownField={"x": 1})
    obj["metadata"].pop("namespace")
    parsed = parse_service(obj)
    assert parsed.namespace == "default"
    assert parsed.traffic_distribution == "PreferClose"
    assert parsed.resource_version == "7"
    assert parsed.type == "ClusterIP"


# --------------------------------------------------------------------------------------------
# EndpointSlice
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        (None, (True, True, False)),
        ({}, (True, True, False)),
        ({"ready": False}, (False, True, False)),
        ({"ready": False, "terminating": True}, (False, True, True)),
        ({"ready": True, "serving": False}, (True, False, False)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
        ({"ready": False, "serving": False, "terminating": True}, (False, False, True)),
        ({"terminating": None}, (True, True, False)),
    ],
)
def test_slice_conditions(
    conditions: dict[str, Any] | None, expected: tuple[bool, bool, bool]
) -> None:
    parsed = parse_endpoint_slice(
        eps(endpoints=[{"addresses": ["10.1.0.5"], "conditions": conditions}])
    )
    ep = parsed.endpoints[0]
    assert (ep.ready, ep.serving, ep.terminating) == expected


def test_slice_full_endpoint() -> None:
    obj = eps(
        endpoints=[
            {
                "addresses": ["10.1.0.5", "10.1.0.6"],
                "conditions": {"ready": True},
                "nodeName": "n1",
                "zone": "z1",
                "hints": {
                    "forZones": [{"name": "z1"}, {"name": "z2"}],
                    "forNodes": [{"name": "n1"}],
                },
            }
        ]
    )
    obj["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": "2024-01-02T03:04:05Z"
    }
    parsed = parse_endpoint_slice(obj)
    one = SliceEndpoint("10.1.0.5", True, True, False, "n1", "z1", ("z1", "z2"), ("n1",))
    assert parsed.endpoints == (one, attrs_evolve(one, address="10.1.0.6"))
    assert parsed.service_name == "web"
    assert parsed.service_key == ("default", "web")
    assert parsed.address_family == 4
    assert parsed.last_change_trigger_time == 1704164645.0


def attrs_evolve(ep: SliceEndpoint, **changes: Any) -> SliceEndpoint:
    return attrs.evolve(ep, **changes)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-01-02T03:04:05Z", 1704164645.0),
        ("2024-01-02T03:04:05.5+00:00", 1704164645.5),
        ("2024-01-02T04:04:05+01:00", 1704164645.0),
        ("yesterday", None),
        ("2024-01-02T03:04:05", None),
        ("", None),
    ],
)
def test_slice_trigger_time(value: str, expected: float | None) -> None:
    obj = with_meta(
        eps(),
        annotations={"endpoints.kubernetes.io/last-change-trigger-time": value},
    )
    assert parse_endpoint_slice(obj).last_change_trigger_time == expected


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ([{"name": "http", "port": 8080}], (EndpointPortSpec("http", "TCP", 8080),)),
        ([{"port": 53, "protocol": "UDP"}], (EndpointPortSpec("", "UDP", 53),)),
        ([{"name": "all"}], ()),
        (None, ()),
    ],
)
def test_slice_ports(ports: Any, expected: tuple[EndpointPortSpec, ...]) -> None:
    assert parse_endpoint_slice(eps(ports=ports)).ports == expected


def test_slice_ipv6_canonical() -> None:
    parsed = parse_endpoint_slice(
        eps(addressType="IPv6", endpoints=[{"addresses": ["FD00:0:0::0005"]}])
    )
    assert parsed.address_family == 6
    assert parsed.endpoints[0].address == "fd00::5"


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"addressType": "FQDN"}, "addressType", "FQDN slices are not proxied"),
        ({"addressType": None}, "addressType", "is required"),
        ({"addressType": "IPX"}, "addressType", "unknown address type"),
        ({"endpoints": [{"addresses": ["fd00::1"]}]}, "endpoints[0].addresses[0]", "not an IPv4"),
        ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses", "at least one"),
        ({"endpoints": [{"addresses": ["10.1.0.999"]}]}, "endpoints[0].addresses[0]", "valid IP"),
        (
            {"endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": "yes"}}]},
            "endpoints[0].conditions.ready",
            "true or false",
        ),
        (
            {"endpoints": [{"addresses": ["10.1.0.1"], "hints": {"forZones": [{}]}}]},
            "endpoints[0].hints.forZones[0].name",
            "is required",
        ),
        ({"ports": [{"port": 0}]}, "ports[0].port", "out of range"),
        ({"ports": [{"port": 80, "protocol": "tcp"}]}, "ports[0].protocol", "unknown protocol"),
        ({"endpoints": {"a": 1}}, "endpoints", "expected a list"),
    ],
)
def test_slice_invalid(fields: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidObject) as info:
        parse_endpoint_slice(eps(**fields))
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(info.value).startswith("EndpointSlice default/web-abc: ")


@pytest.mark.parametrize("labels", [None, {}, {"kubernetes.io/service-name": ""}])
def test_slice_requires_service_name_label(labels: dict[str, str] | None) -> None:
    with pytest.raises(InvalidObject) as info:
        parse_endpoint_slice(with_meta(eps(), labels=labels))
    assert info.value.field == "metadata.labels[kubernetes.io/service-name]"


# --------------------------------------------------------------------------------------------
# Node
# --------------------------------------------------------------------------------------------


def node(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1", "a": "b"}},
        "status": status,
    }


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        ([], ()),
        (
            [
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "5.5.5.5"},
                {"type": "InternalIP", "address": "10.0.0.1"},
                {"type": "InternalIP", "address": "fd00::1"},
            ],
            ("10.0.0.1", "fd00::1", "5.5.5.5"),
        ),
        (
            [
                {"type": "InternalIP", "address": "10.0.0.1"},
                {"type": "ExternalIP", "address": "10.0.0.1"},
            ],
            ("10.0.0.1",),
        ),
    ],
)
def test_node_addresses(addresses: list[dict[str, str]], expected: tuple[str, ...]) -> None:
    assert parse_node(node(addresses=addresses)).addresses == expected


def test_node_fields() -> None:
    obj = node()
    parsed = parse_node(obj)
    assert parsed == Node("n1", addresses=(), zone="z1")
    assert parsed.labels["a"] == "b"
    assert not parsed.deleting
    obj["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert parse_node(obj).deleting


def test_node_invalid_address() -> None:
    with pytest.raises(InvalidObject) as info:
        parse_node(node(addresses=[{"type": "InternalIP", "address": "bogus"}]))
    assert (
        str(info.value) == "Node n1: status.addresses[0].address: 'bogus' is not a valid IP address"
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, ()),
        ({"podCIDR": "10.244.1.0/24"}, ("10.244.1.0/24",)),
        ({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
         ("10.244.1.0/24", "fd00:1::/64")),
    ],
)
def test_node_pod_cidrs(spec: dict[str, Any], expected: tuple[str, ...]) -> None:
    obj = node()
    obj["spec"] = spec
    assert parse_node(obj).pod_cidrs == expected


def test_node_invalid_pod_cidr_names_the_field() -> None:
    obj = node()
    obj["spec"] = {"podCIDRs": ["10.244.1.0/24", "nope"]}
    with pytest.raises(InvalidObject, match=r"spec.podCIDRs\[1\]: 'nope' is not a valid CIDR"):
        parse_node(obj)
