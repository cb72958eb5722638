"""Service semantics on one node: one table per rule (upstream topology_test.go and
endpointslicecache_test.go cover the same ground)."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy_core.model import (
    EndpointPortSpec,
    EndpointSlice,
    IPFamily,
    ResolvedServicePort,
    Service,
    ServicePortKey,
    ServicePortName,
    ServicePortSpec,
    SliceEndpoint,
)
from kproxy_core.resolve import NodeInfo, resolve_service

NODE = NodeInfo("node-a", "zone-a")
P80 = ServicePortSpec("p80", "TCP", 80, 80)


def service(**kw: Any) -> Service:
    fields: dict[str, Any] = {
        "namespace": "ns",
        "name": "svc",
        "type": "ClusterIP",
        "cluster_ips": ("10.0.0.1",),
        "ports": (P80,),
    }
    fields.update(kw)
    return Service(**fields)


def ep(
    address: str,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    node: str = "",
    zone: str = "",
    zones: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
) -> SliceEndpoint:
    return SliceEndpoint(
        address,
        ready,
        ready if serving is None else serving,
        terminating,
        node,
        zone,
        zones,
        nodes,
    )


def slice_(
    name: str,
    *endpoints: SliceEndpoint,
    ports: tuple[EndpointPortSpec, ...] = (EndpointPortSpec("p80", "TCP", 8080),),
    family: IPFamily = 4,
) -> EndpointSlice:
    return EndpointSlice("ns", name, "svc", family, ports, endpoints)


def key(port: str = "p80", family: IPFamily = 4, protocol: Any = "TCP") -> ServicePortKey:
    return ServicePortKey(family, ServicePortName("ns", "svc", port, protocol))


def only(result: dict[ServicePortKey, ResolvedServicePort]) -> ResolvedServicePort:
    assert len(result) == 1, result
    return next(iter(result.values()))


def addrs(endpoints: Any) -> list[str]:
    return [e.address for e in endpoints]


# --------------------------------------------------------------------------------------------
# Rule: one entry per cluster IP family x service port; addresses filtered by family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("svc", "expected_keys"),
    [
        (service(), [key()]),
        (service(cluster_ips=("fd00::1",)), [key(family=6)]),
        (service(cluster_ips=("10.0.0.1", "fd00::1")), [key(), key(family=6)]),
        (
            service(ports=(P80, ServicePortSpec("dns", "UDP", 53, 53))),
            [key(), key("dns", protocol="UDP")],
        ),
        (service(cluster_ips=()), []),
        (service(type="ExternalName", cluster_ips=()), []),
        (service(ports=()), []),
    ],
)
def test_keys(svc: Service, expected_keys: list[ServicePortKey]) -> None:
    assert sorted(resolve_service(svc, [], NODE)) == sorted(expected_keys)


def test_addresses_filtered_by_family() -> None:
    svc = service(
        type="LoadBalancer",
        cluster_ips=("10.0.0.1", "fd00::1"),
        ports=(ServicePortSpec("p80", "TCP", 80, 80, 30080),),
        external_ips=("1.1.1.1", "fd00::e"),
        load_balancer_ips=("2.2.2.2", "fd00::b"),
        load_balancer_source_ranges=("3.0.0.0/8", "fd01::/64"),
        session_affinity_timeout=60,
        health_check_node_port=32000,
        external_traffic_policy_local=True,
    )
    result = resolve_service(svc, [], NODE)
    v4, v6 = result[key()], result[key(family=6)]
    assert (
        v4.cluster_ip,
        v4.external_ips,
        v4.load_balancer_ips,
        v4.load_balancer_source_ranges,
    ) == (
        "10.0.0.1",
        ("1.1.1.1",),
        ("2.2.2.2",),
        ("3.0.0.0/8",),
    )
    assert (
        v6.cluster_ip,
        v6.external_ips,
        v6.load_balancer_ips,
        v6.load_balancer_source_ranges,
    ) == (
        "fd00::1",
        ("fd00::e",),
        ("fd00::b",),
        ("fd01::/64",),
    )
    for r in (v4, v6):
        assert (r.port, r.node_port, r.session_affinity_timeout, r.health_check_node_port) == (
            80,
            30080,
            60,
            32000,
        )
        assert r.external_policy_local and not r.internal_policy_local


# --------------------------------------------------------------------------------------------
# Rule: slices merged, port matched by name+protocol, deduped, family-separated
# --------------------------------------------------------------------------------------------

PORT_HTTP_9000 = (EndpointPortSpec("p80", "TCP", 9000),)


@pytest.mark.parametrize(
    ("slices", "expected"),
    [
        (
            [slice_("a", ep("10.1.0.1")), slice_("b", ep("10.1.0.2"))],
            ["10.1.0.1:8080", "10.1.0.2:8080"],
        ),
        # a named targetPort resolves per slice: each slice has its own number
        (
            [slice_("a", ep("10.1.0.1")), slice_("b", ep("10.1.0.2"), ports=PORT_HTTP_9000)],
            ["10.1.0.1:8080", "10.1.0.2:9000"],
        ),
        # same ip, different port numbers are different endpoints
        (
            [slice_("a", ep("10.1.0.1")), slice_("b", ep("10.1.0.1"), ports=PORT_HTTP_9000)],
            ["10.1.0.1:8080", "10.1.0.1:9000"],
        ),
        # a slice without the port by name contributes nothing
        (
            [
                slice_("a", ep("10.1.0.1")),
                slice_("b", ep("10.1.0.2"), ports=(EndpointPortSpec("x", "TCP", 1),)),
            ],
            ["10.1.0.1:8080"],
        ),
        # protocol must match too
        ([slice_("a", ep("10.1.0.1"), ports=(EndpointPortSpec("p80", "UDP", 8080),))], []),
        # slices of the other family are not this family's endpoints
        ([slice_("a", ep("fd00::1"), family=6)], []),
        # duplicates across slices collapse
        ([slice_("a", ep("10.1.0.1")), slice_("b", ep("10.1.0.1"))], ["10.1.0.1:8080"]),
        ([], []),
    ],
)
def test_merge(slices: list[EndpointSlice], expected: list[str]) -> None:
    assert addrs(only(resolve_service(service(), slices, NODE)).all_reachable_endpoints) == expected


@pytest.mark.parametrize(
    ("slices", "expected_ready", "expected_local"),
    [
        # first slice (by name) wins
        ([slice_("b", ep("10.1.0.1", ready=False)), slice_("a", ep("10.1.0.1"))], True, False),
        ([slice_("a", ep("10.1.0.1", ready=False)), slice_("b", ep("10.1.0.1"))], False, False),
        # ... unless a later copy is local (upstream favours isLocal)
        ([slice_("a", ep("10.1.0.1")), slice_("b", ep("10.1.0.1", node="node-a"))], True, True),
        ([slice_("a", ep("10.1.0.1", node="node-a")), slice_("b", ep("10.1.0.1"))], True, True),
    ],
)
def test_dedupe(slices: list[EndpointSlice], expected_ready: bool, expected_local: bool) -> None:
    result = only(resolve_service(service(), slices, NODE))
    merged = [*result.all_reachable_endpoints, *(e for e, _ in result.excluded_endpoints)]
    assert len(merged) == 1
    assert (merged[0].ready, merged[0].is_local) == (expected_ready, expected_local)


def test_ipv6_endpoints_for_ipv6_cluster_ip() -> None:
    svc = service(cluster_ips=("10.0.0.1", "fd00::1"))
    slices = [slice_("a", ep("10.1.0.1")), slice_("b", ep("fd00::10"), family=6)]
    result = resolve_service(svc, slices, NODE)
    assert addrs(result[key()].cluster_endpoints) == ["10.1.0.1:8080"]
    assert addrs(result[key(family=6)].cluster_endpoints) == ["[fd00::10]:8080"]


@pytest.mark.parametrize(
    ("node_name", "endpoint_node", "expected"),
    [
        ("node-a", "node-a", True),
        ("node-a", "node-b", False),
        ("node-a", "", False),
        ("", "", False),
    ],
)
def test_is_local(node_name: str, endpoint_node: str, expected: bool) -> None:
    result = only(
        resolve_service(
            service(), [slice_("a", ep("10.1.0.1", node=endpoint_node))], NodeInfo(node_name)
        )
    )
    assert result.cluster_endpoints[0].is_local is expected
    assert result.cluster_endpoints[0].node_name == endpoint_node


def test_sorted_by_upstream_endpoint_string_and_order_independent() -> None:
    eps = [ep("10.1.0.10"), ep("10.1.0.2"), ep("10.1.0.1"), ep("9.0.0.1")]
    forward = only(resolve_service(service(), [slice_("a", *eps)], NODE))
    backward = only(resolve_service(service(), [slice_("a", *reversed(eps))], NODE))
    assert forward == backward
    # "10.1.0.10:8080" < "10.1.0.1:8080" as strings (':' sorts after '0'), as upstream
    assert addrs(forward.cluster_endpoints) == [
        "10.1.0.10:8080",
        "10.1.0.1:8080",
        "10.1.0.2:8080",
        "9.0.0.1:8080",
    ]


# --------------------------------------------------------------------------------------------
# Rule: CategorizeEndpoints (traffic policies, terminating fallback, has_any_endpoints)
# --------------------------------------------------------------------------------------------

L = "node-a"  # local node
R = "node-b"  # remote node
READY_L = ep("10.1.0.1", node=L)
READY_R = ep("10.1.0.2", node=R)
TERM_L = ep("10.1.0.3", ready=False, serving=True, terminating=True, node=L)
TERM_R = ep("10.1.0.4", ready=False, serving=True, terminating=True, node=R)
DEAD_L = ep("10.1.0.5", ready=False, serving=False, terminating=True, node=L)
UNREADY_R = ep("10.1.0.6", ready=False, node=R)

CLUSTER = service()
ITP_LOCAL = service(internal_traffic_policy_local=True)
NODEPORT = (ServicePortSpec("p80", "TCP", 80, 80, 30080),)
ETP_LOCAL = service(type="NodePort", ports=NODEPORT, external_traffic_policy_local=True)
ETP_LOCAL_ITP_LOCAL = attrs.evolve(ETP_LOCAL, internal_traffic_policy_local=True)
# eTP Local on a port with no external address: nothing uses local endpoints
ETP_LOCAL_NOT_EXTERNAL = service(external_traffic_policy_local=True)


def _ips(*eps: SliceEndpoint) -> list[str]:
    return [f"{e.address}:8080" for e in eps]


@pytest.mark.parametrize(
    ("svc", "endpoints", "cluster", "local", "reachable", "has_any"),
    [
        pytest.param(CLUSTER, [], [], [], [], False, id="no endpoints"),
        pytest.param(
            CLUSTER,
            [READY_L, READY_R],
            [READY_L, READY_R],
            [],
            [READY_L, READY_R],
            True,
            id="cluster ready",
        ),
        pytest.param(
            CLUSTER, [READY_R, TERM_L], [READY_R], [], [READY_R], True, id="ready beats terminating"
        ),
        pytest.param(
            CLUSTER,
            [TERM_L, TERM_R, UNREADY_R],
            [TERM_L, TERM_R],
            [],
            [TERM_L, TERM_R],
            True,
            id="terminating fallback",
        ),
        pytest.param(CLUSTER, [DEAD_L, UNREADY_R], [], [], [], False, id="nothing serving"),
        pytest.param(
            ITP_LOCAL, [READY_L, READY_R], [], [READY_L], [READY_L], True, id="iTP local ready"
        ),
        pytest.param(ITP_LOCAL, [READY_R], [], [], [], True, id="iTP local none here, some remote"),
        pytest.param(
            ITP_LOCAL, [TERM_R], [], [], [], True, id="iTP local remote terminating counts as any"
        ),
        pytest.param(
            ITP_LOCAL,
            [TERM_L, READY_R],
            [],
            [TERM_L],
            [TERM_L],
            True,
            id="iTP local terminating fallback is local-only",
        ),
        pytest.param(ITP_LOCAL, [DEAD_L], [], [], [], False, id="iTP local nothing serving"),
        pytest.param(
            ETP_LOCAL,
            [READY_L, READY_R],
            [READY_L, READY_R],
            [READY_L],
            [READY_L, READY_R],
            True,
            id="eTP local",
        ),
        pytest.param(
            ETP_LOCAL, [READY_R], [READY_R], [], [READY_R], True, id="eTP local no local endpoints"
        ),
        pytest.param(
            ETP_LOCAL,
            [TERM_L, READY_R],
            [READY_R],
            [TERM_L],
            [READY_R, TERM_L],
            True,
            id="eTP local union with local terminating",
        ),
        pytest.param(
            ETP_LOCAL,
            [TERM_L, TERM_R],
            [TERM_L, TERM_R],
            [TERM_L],
            [TERM_L, TERM_R],
            True,
            id="eTP local all terminating",
        ),
        pytest.param(
            ETP_LOCAL_ITP_LOCAL,
            [READY_L, READY_R],
            [READY_L, READY_R],
            [READY_L],
            [READY_L, READY_R],
            True,
            id="both local, external port",
        ),
        pytest.param(
            ETP_LOCAL_NOT_EXTERNAL,
            [READY_L, READY_R],
            [READY_L, READY_R],
            [],
            [READY_L, READY_R],
            True,
            id="eTP local without external address",
        ),
    ],
)
def test_categorize(
    svc: Service,
    endpoints: list[SliceEndpoint],
    cluster: list[SliceEndpoint],
    local: list[SliceEndpoint],
    reachable: list[SliceEndpoint],
    has_any: bool,
) -> None:
    r = only(resolve_service(svc, [slice_("a", *endpoints)], NODE))
    assert addrs(r.cluster_endpoints) == _ips(*cluster)
    assert addrs(r.local_endpoints) == _ips(*local)
    assert addrs(r.all_reachable_endpoints) == _ips(*reachable)
    assert r.has_any_endpoints is has_any
    assert addrs(r.internal_endpoints) == (
        _ips(*local) if svc.internal_traffic_policy_local else _ips(*cluster)
    )


def test_external_ip_makes_port_externally_accessible() -> None:
    svc = service(internal_traffic_policy_local=True, external_ips=("1.1.1.1",))
    r = only(resolve_service(svc, [slice_("a", READY_L, READY_R)], NODE))
    # the external IP needs the cluster-wide set even though iTP is Local
    assert addrs(r.cluster_endpoints) == _ips(READY_L, READY_R)
    assert addrs(r.local_endpoints) == _ips(READY_L)


# --------------------------------------------------------------------------------------------
# Rule: topology hints
# --------------------------------------------------------------------------------------------


def hinted(
    address: str, zones: tuple[str, ...] = (), nodes: tuple[str, ...] = (), **kw: Any
) -> SliceEndpoint:
    return ep(address, zones=zones, nodes=nodes, **kw)


@pytest.mark.parametrize(
    ("node", "endpoints", "expected"),
    [
        pytest.param(
            NODE,
            [hinted("10.1.0.1", ("zone-a",)), hinted("10.1.0.2", ("zone-b",))],
            ["10.1.0.1"],
            id="zone hints select own zone",
        ),
        pytest.param(
            NODE,
            [hinted("10.1.0.1", ("zone-a", "zone-b")), hinted("10.1.0.2", ("zone-b",))],
            ["10.1.0.1"],
            id="multi-zone hint",
        ),
        pytest.param(
            NODE,
            [hinted("10.1.0.1", ("zone-a",)), hinted("10.1.0.2")],
            ["10.1.0.1", "10.1.0.2"],
            id="one endpoint without hints disables topology",
        ),
        pytest.param(
            NODE,
            [hinted("10.1.0.1", ("zone-b",)), hinted("10.1.0.2", ("zone-c",))],
            ["10.1.0.1", "10.1.0.2"],
            id="no hint for my zone falls back to all",
        ),
        pytest.param(
            NodeInfo("node-a", ""),
            [hinted("10.1.0.1", ("zone-a",)), hinted("10.1.0.2", ("zone-b",))],
            ["10.1.0.1", "10.1.0.2"],
            id="node without zone label ignores zone hints",
        ),
        pytest.param(
            NODE,
            [hinted("10.1.0.1", ("zone-a",)), hinted("10.1.0.2", ready=False)],
            ["10.1.0.1"],
            id="unready endpoints without hints do not disable topology",
        ),
        pytest.param(
            NODE,
            [
                hinted("10.1.0.1", ("zone-a",), ("node-a",)),
                hinted("10.1.0.2", ("zone-a",), ("node-c",)),
                hinted("10.1.0.3", ("zone-b",), ("node-b",)),
            ],
            ["10.1.0.1"],
            id="node hints win over zone hints",
        ),
        pytest.param(
            NODE,
            [
                hinted("10.1.0.1", ("zone-a",), ("node-b",)),
                hinted("10.1.0.2", ("zone-a",), ("node-c",)),
                hinted("10.1.0.3", ("zone-b",), ("node-d",)),
            ],
            ["10.1.0.1", "10.1.0.2"],
            id="no node hint for me falls back to zone",
        ),
        pytest.param(
            NODE,
            [hinted("10.1.0.1", ("zone-a",), ("node-a",)), hinted("10.1.0.2", ("zone-b",))],
            ["10.1.0.1"],
            id="partial node hints fall back to zone",
        ),
        pytest.param(
            NODE,
            [
                hinted("10.1.0.1", ("zone-b",), ready=False, serving=True, terminating=True),
                hinted("10.1.0.2", ("zone-b",), ready=False, serving=True, terminating=True),
            ],
            ["10.1.0.1", "10.1.0.2"],
            id="terminating fallback ignores topology",
        ),
    ],
)
def test_topology(node: NodeInfo, endpoints: list[SliceEndpoint], expected: list[str]) -> None:
    r = only(resolve_service(service(), [slice_("a", *endpoints)], node))
    assert [e.ip for e in r.cluster_endpoints] == expected


def test_topology_does_not_filter_local_endpoints() -> None:
    svc = ETP_LOCAL
    endpoints = [
        hinted("10.1.0.1", ("zone-b",), node="node-a"),
        hinted("10.1.0.2", ("zone-a",), node="node-b"),
    ]
    r = only(resolve_service(svc, [slice_("a", *endpoints)], NODE))
    assert [e.ip for e in r.cluster_endpoints] == ["10.1.0.2"]
    assert [e.ip for e in r.local_endpoints] == ["10.1.0.1"]
    assert [e.ip for e in r.all_reachable_endpoints] == ["10.1.0.1", "10.1.0.2"]


# --------------------------------------------------------------------------------------------
# Rule: every endpoint left out has a reason
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("svc", "endpoints", "expected"),
    [
        (CLUSTER, [READY_R, UNREADY_R], {"10.1.0.6": "not ready"}),
        (CLUSTER, [READY_R, DEAD_L], {"10.1.0.5": "terminating, not serving"}),
        (CLUSTER, [READY_R, TERM_L], {"10.1.0.3": "terminating (ready endpoints exist)"}),
        (ITP_LOCAL, [READY_L, READY_R], {"10.1.0.2": "not local (iTP Local)"}),
        (ITP_LOCAL, [TERM_L, TERM_R], {"10.1.0.4": "not local (iTP Local)"}),
        (
            CLUSTER,
            [hinted("10.1.0.1", ("zone-a",)), hinted("10.1.0.2", ("zone-b", "zone-c"))],
            {"10.1.0.2": "zone hint zone-b,zone-c"},
        ),
        (
            CLUSTER,
            [hinted("10.1.0.1", nodes=("node-a",)), hinted("10.1.0.2", nodes=("node-b",))],
            {"10.1.0.2": "node hint node-b"},
        ),
        (
            ETP_LOCAL,
            [READY_L, READY_R, TERM_L],
            {"10.1.0.3": "terminating (ready endpoints exist)"},
        ),
        (CLUSTER, [READY_L, READY_R], {}),
    ],
)
def test_excluded_reasons(
    svc: Service, endpoints: list[SliceEndpoint], expected: dict[str, str]
) -> None:
    r = only(resolve_service(svc, [slice_("a", *endpoints)], NODE))
    assert {e.ip: reason for e, reason in r.excluded_endpoints} == expected
    reachable = {e.ip for e in r.all_reachable_endpoints}
    assert reachable.isdisjoint(expected)
    assert len(reachable) + len(expected) == len(endpoints)


def test_excluded_endpoints_do_not_affect_equality() -> None:
    a = only(resolve_service(service(), [slice_("a", READY_R)], NODE))
    b = only(resolve_service(service(), [slice_("a", READY_R, UNREADY_R)], NODE))
    assert a == b
    assert a.excluded_endpoints != b.excluded_endpoints


# --------------------------------------------------------------------------------------------
# Invariants over random inputs
# --------------------------------------------------------------------------------------------

_endpoint_strategy = st.builds(
    ep,
    st.sampled_from([f"10.1.0.{i}" for i in range(1, 7)]),
    ready=st.booleans(),
    serving=st.booleans(),
    terminating=st.booleans(),
    node=st.sampled_from(["", "node-a", "node-b"]),
    zones=st.sampled_from([(), ("zone-a",), ("zone-b",), ("zone-a", "zone-b")]),
    nodes=st.sampled_from([(), ("node-a",), ("node-b",)]),
)


@settings(max_examples=150, deadline=None)
@given(
    endpoints=st.lists(_endpoint_strategy, max_size=8),
    itp=st.booleans(),
    etp=st.booleans(),
    node_port=st.sampled_from([0, 30080]),
    split=st.integers(0, 8),
)
def test_invariants(
    endpoints: list[SliceEndpoint], itp: bool, etp: bool, node_port: int, split: int
) -> None:
    svc = service(
        type="NodePort" if node_port else "ClusterIP",
        ports=(ServicePortSpec("p80", "TCP", 80, 80, node_port),),
        internal_traffic_policy_local=itp,
        external_traffic_policy_local=etp,
    )
    slices = [slice_("a", *endpoints[:split]), slice_("b", *endpoints[split:])]
    r = only(resolve_service(svc, slices, NODE))
    assert r == only(resolve_service(svc, list(reversed(slices)), NODE))

    reachable = set(addrs(r.all_reachable_endpoints))
    assert reachable == set(addrs(r.cluster_endpoints)) | set(addrs(r.local_endpoints))
    excluded = [e.address for e, _ in r.excluded_endpoints]
    assert reachable.isdisjoint(excluded)
    distinct = {f"{e.address}:8080" for e in endpoints}
    assert reachable | set(excluded) == distinct
    assert all(e.is_local for e in r.local_endpoints)
    for group in (r.cluster_endpoints, r.local_endpoints, r.all_reachable_endpoints):
        assert list(group) == sorted(group, key=lambda e: e.address)
    if itp and not node_port:
        assert r.cluster_endpoints == ()
    if not itp and not (etp and node_port):
        assert r.local_endpoints == ()
    usable = [e for e in endpoints if e.ready or (e.serving and e.terminating)]
    # de-duplication may hide a usable copy behind an unusable one with the same address
    if r.has_any_endpoints:
        assert usable
    if not usable:
        assert not r.has_any_endpoints and not reachable
