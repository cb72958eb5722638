"""ProxyState: store, change tracking, filtering, invalid objects, threads."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

import kproxy_core.state as state_module
from kproxy_core.model import ServicePortKey, ServicePortName
from kproxy_core.resolve import resolve_service
from kproxy_core.state import ProxyState

NODE = "node-a"


def svc(
    name: str, ip: str, *, ns: str = "default", labels: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    s: dict[str, Any] = {
        "type": "ClusterIP",
        "clusterIPs": [ip],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    }
    s.update(spec)
    return {"metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "spec": s}


def eps(
    name: str,
    service: str,
    *ips: str,
    ns: str = "default",
    ready: bool = True,
    zones: tuple[str, ...] = (),
    labels: dict[str, str] | None = None,
    trigger: str | None = None,
    port: int = 8080,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ns,
        "labels": {"kubernetes.io/service-name": service, **(labels or {})},
    }
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    endpoint_hints = {"hints": {"forZones": [{"name": z} for z in zones]}} if zones else {}
    return {
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready},
                "nodeName": "node-b",
                **endpoint_hints,
            }
            for ip in ips
        ],
    }


def node(name: str = NODE, zone: str = "", ip: str = "192.168.0.1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone} if zone else {}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


def key(name: str, ns: str = "default") -> ServicePortKey:
    return ServicePortKey(4, ServicePortName(ns, name, "http", "TCP"))


class Calls:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def synced_state(
    services: list[dict[str, Any]], slices: list[dict[str, Any]]
) -> tuple[ProxyState, Calls]:
    calls = Calls()
    st = ProxyState(NODE, on_change=calls)
    st.replace("Service", services)
    st.replace("EndpointSlice", slices)
    return st, calls


def ips(st: ProxyState, name: str) -> list[str]:
    return [e.ip for e in st.view().services[key(name)].cluster_endpoints]


# --------------------------------------------------------------------------------------------
# Sync and basic tracking
# --------------------------------------------------------------------------------------------


def test_synced_only_after_both_lists() -> None:
    calls = Calls()
    st = ProxyState(NODE, on_change=calls)
    assert not st.is_synced()
    st.replace("Service", [])
    assert not st.is_synced()
    st.replace("Node", [])
    assert not st.is_synced()
    st.replace("EndpointSlice", [])
    assert st.is_synced()
    # the first (even empty) list of each kind wakes the sync loop: it may now write rules
    assert calls.count == 2


def test_first_snapshot_reports_everything_then_nothing() -> None:
    st, _ = synced_state(
        [svc("a", "10.0.0.1"), svc("b", "10.0.0.2")], [eps("a-1", "a", "10.1.0.1")]
    )
    snap = st.take_snapshot()
    assert snap.changed == {key("a"), key("b")}
    assert dict(snap.previous) == {key("a"): None, key("b"): None}
    assert [e.address for e in snap.view.services[key("a")].cluster_endpoints] == ["10.1.0.1:8080"]
    assert snap.view.services[key("b")].cluster_endpoints == ()
    again = st.take_snapshot()
    assert again.changed == frozenset()
    assert dict(again.previous) == {}
    assert set(again.view.services) == {key("a"), key("b")}


def test_endpoint_change_reports_only_that_service_with_previous_value() -> None:
    st, calls = synced_state(
        [svc("a", "10.0.0.1"), svc("b", "10.0.0.2")], [eps("a-1", "a", "10.1.0.1")]
    )
    first = st.take_snapshot()
    before = calls.count
    st.upsert("EndpointSlice", eps("a-1", "a", "10.1.0.1", "10.1.0.2"))
    assert calls.count == before + 1
    snap = st.take_snapshot()
    assert snap.changed == {key("a")}
    assert snap.previous[key("a")] == first.view.services[key("a")]
    assert [e.ip for e in snap.view.services[key("a")].cluster_endpoints] == [
        "10.1.0.1",
        "10.1.0.2",
    ]


def test_delete_service_reports_removed_key() -> None:
    st, _ = synced_state([svc("a", "10.0.0.1")], [])
    old = st.take_snapshot().view.services[key("a")]
    st.delete("Service", {"metadata": {"name": "a", "namespace": "default"}})
    snap = st.take_snapshot()
    assert snap.changed == {key("a")}
    assert snap.previous[key("a")] == old
    assert key("a") not in snap.view.services


def test_change_and_change_back_reports_nothing() -> None:
    st, _ = synced_state([svc("a", "10.0.0.1")], [eps("a-1", "a", "10.1.0.1")])
    st.take_snapshot()
    st.upsert("EndpointSlice", eps("a-1", "a", "10.1.0.9"))
    st.upsert("EndpointSlice", eps("a-1", "a", "10.1.0.1"))
    assert st.take_snapshot().changed == frozenset()


def test_service_port_change_removes_and_adds_keys() -> None:
    st, _ = synced_state([svc("a", "10.0.0.1")], [])
    st.take_snapshot()
    st.upsert("Service", svc("a", "10.0.0.1", ports=[{"name": "web", "port": 81}]))
    snap = st.take_snapshot()
    new_key = ServicePortKey(4, ServicePortName("default", "a", "web", "TCP"))
    assert snap.changed == {key("a"), new_key}
    assert snap.previous[new_key] is None
    assert set(snap.view.services) == {new_key}


def test_view_does_not_consume_changes() -> None:
    st, _ = synced_state([svc("a", "10.0.0.1")], [])
    assert set(st.view().services) == {key("a")}
    assert st.take_snapshot().changed == {key("a")}


def test_snapshot_views_are_independent() -> None:
    st, _ = synced_state([svc("a", "10.0.0.1")], [])
    first = st.take_snapshot()
    st.upsert("Service", svc("b", "10.0.0.2"))
    st.take_snapshot()
    assert set(first.view.services) == {key("a")}


def test_slice_moving_to_another_service() -> None:
    st, _ = synced_state([svc("a", "10.0.0.1"), svc("b", "10.0.0.2")], [eps("s", "a", "10.1.0.1")])
    st.take_snapshot()
    st.upsert("EndpointSlice", eps("s", "b", "10.1.0.1"))
    snap = st.take_snapshot()
    assert snap.changed == {key("a"), key("b")}
    assert ips(st, "a") == []
    assert ips(st, "b") == ["10.1.0.1"]


def test_slices_before_service_are_kept() -> None:
    st, _ = synced_state([], [eps("a-1", "a", "10.1.0.1")])
    assert st.take_snapshot().changed == frozenset()
    st.upsert("Service", svc("a", "10.0.0.1"))
    assert ips(st, "a") == ["10.1.0.1"]


# --------------------------------------------------------------------------------------------
# replace() diffs against the current set
# --------------------------------------------------------------------------------------------


def test_relist_unchanged_flags_nothing() -> None:
    services = [svc(f"s{i}", f"10.0.0.{i}") for i in range(1, 20)]
    slices = [eps(f"s{i}-1", f"s{i}", f"10.1.0.{i}") for i in range(1, 20)]
    st, calls = synced_state(services, slices)
    st.take_snapshot()
    before = calls.count
    st.replace("Service", services)
    st.replace("EndpointSlice", slices)
    assert calls.count == before
    assert st.pending() == (0, 0)
    assert st.take_snapshot().changed == frozenset()


def test_relist_removes_missing_and_adds_new() -> None:
    st, _ = synced_state(
        [svc("a", "10.0.0.1"), svc("b", "10.0.0.2")], [eps("a-1", "a", "10.1.0.1")]
    )
    st.take_snapshot()
    st.replace("Service", [svc("b", "10.0.0.2"), svc("c", "10.0.0.3")])
    st.replace("EndpointSlice", [])
    snap = st.take_snapshot()
    assert snap.changed == {key("a"), key("c")}
    assert set(snap.view.services) == {key("b"), key("c")}


# --------------------------------------------------------------------------------------------
# Label filters
# --------------------------------------------------------------------------------------------


def test_service_proxy_name_label_ignored_and_removes_previous() -> None:
    labelled = svc("a", "10.0.0.1", labels={"service.kubernetes.io/service-proxy-name": "other"})
    st, _ = synced_state([labelled, svc("b", "10.0.0.2")], [])
    assert set(st.view().services) == {key("b")}
    st.upsert("Service", svc("a", "10.0.0.1"))
    assert key("a") in st.view().services
    st.upsert("Service", labelled)
    assert key("a") not in st.view().services
    assert st.invalid_objects() == 0


def test_headless_slice_label_ignored() -> None:
    headless = eps("a-1", "a", "10.1.0.1", labels={"service.kubernetes.io/headless": ""})
    st, _ = synced_state([svc("a", "10.0.0.1")], [headless])
    assert ips(st, "a") == []


# --------------------------------------------------------------------------------------------
# Invalid objects
# --------------------------------------------------------------------------------------------


def test_invalid_object_logged_skipped_counted(caplog: pytest.LogCaptureFixture) -> None:
    st, _ = synced_state([svc("a", "10.0.0.1")], [eps("a-1", "a", "10.1.0.1")])
    st.take_snapshot()
    bad = svc("a", "10.0.0.1", ports=[{"name": "http", "port": 70000}])
    with caplog.at_level(logging.WARNING, logger="kproxy.state"):
        st.upsert("Service", bad)  # must not raise
    messages = [r.getMessage() for r in caplog.records]
    expected = "Service default/a: spec.ports[0].port: 70000 is out of range 1-65535"
    assert messages == [f"ignoring invalid object: {expected}"]
    assert st.invalid_objects() == 1
    # the previous valid version is not kept: the service is gone
    snap = st.take_snapshot()
    assert snap.changed == {key("a")}
    assert key("a") not in snap.view.services
    st.upsert("Service", svc("a", "10.0.0.1"))
    assert st.invalid_objects() == 0
    assert ips(st, "a") == ["10.1.0.1"]


def test_invalid_objects_in_replace_and_delete() -> None:
    bad_slice = eps("a-2", "a", "10.1.0.2")
    bad_slice["addressType"] = "FQDN"
    st, _ = synced_state([svc("a", "10.0.0.1")], [eps("a-1", "a", "10.1.0.1"), bad_slice])
    assert st.invalid_objects() == 1
    assert ips(st, "a") == ["10.1.0.1"]
    st.delete("EndpointSlice", {"metadata": {"name": "a-2", "namespace": "default"}})
    assert st.invalid_objects() == 0


def test_garbage_objects_never_raise() -> None:
    st, _ = synced_state([], [])
    st.upsert("Service", {"metadata": None})
    st.upsert("EndpointSlice", {"spec": 1})
    assert st.invalid_objects() == 2
    st.delete("Service", {"metadata": {"name": "never-seen"}})
    assert st.invalid_objects() == 2


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown object kind 'Pod'"):
        ProxyState(NODE).upsert("Pod", {})


# --------------------------------------------------------------------------------------------
# Node
# --------------------------------------------------------------------------------------------


def test_other_nodes_ignored() -> None:
    st, calls = synced_state([], [])
    before = calls.count
    st.upsert("Node", node("node-z"))
    assert st.node() is None
    assert calls.count == before
    st.upsert("Node", node())
    node_record = st.node()
    assert node_record is not None and node_record.addresses == ("192.168.0.1",)
    st.replace("Node", [node("node-z")])
    assert st.node() is None


def test_zone_change_reresolves_all() -> None:
    services = [svc(n, f"10.0.0.{i}") for i, n in enumerate(("a", "b"), 1)]
    slices = [
        eps(f"{n}-{z}", n, f"10.1.{i}.{j}", zones=(z,))
        for i, n in enumerate(("a", "b"), 1)
        for j, z in enumerate(("z1", "z2"), 1)
    ]
    st, _ = synced_state(services, slices)
    st.upsert("Node", node(zone="z1"))
    snap = st.take_snapshot()
    assert snap.node_changed
    assert snap.view.zone == "z1"
    assert ips(st, "a") == ["10.1.1.1"]
    st.upsert("Node", node(zone="z2"))
    snap = st.take_snapshot()
    assert snap.changed == {key("a"), key("b")}
    assert ips(st, "b") == ["10.1.2.2"]


def test_node_address_change_sets_node_changed_only() -> None:
    st, calls = synced_state([svc("a", "10.0.0.1")], [])
    st.upsert("Node", node())
    st.take_snapshot()
    before = calls.count
    st.upsert("Node", node(ip="192.168.0.2"))
    assert calls.count == before + 1
    snap = st.take_snapshot()
    assert snap.node_changed
    assert snap.changed == frozenset()
    assert snap.view.node_ips == ("192.168.0.2",)
    assert not st.take_snapshot().node_changed


def test_node_deleting_and_deleted() -> None:
    st, _ = synced_state([], [])
    obj = node()
    obj["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    st.upsert("Node", obj)
    node_record = st.node()
    assert node_record is not None and node_record.deleting
    st.delete("Node", {"metadata": {"name": NODE}})
    assert st.node() is None


# --------------------------------------------------------------------------------------------
# Counters, trigger times, O(changed)
# --------------------------------------------------------------------------------------------


def test_pending_and_totals() -> None:
    st, _ = synced_state([svc("a", "10.0.0.1")], [eps("a-1", "a", "10.1.0.1")])
    assert st.pending() == (1, 1)
    assert st.totals() == (1, 1)
    st.take_snapshot()
    assert st.pending() == (0, 0)
    st.upsert("Service", svc("a", "10.0.0.1"))  # unchanged: counted, not pending
    st.upsert("EndpointSlice", eps("a-1", "a", "10.1.0.2"))
    st.upsert("EndpointSlice", eps("a-2", "a", "10.1.0.3"))
    st.delete("EndpointSlice", {"metadata": {"name": "a-2", "namespace": "default"}})
    assert st.pending() == (0, 2)
    assert st.totals() == (2, 4)


def test_trigger_times_of_changed_slices() -> None:
    st, _ = synced_state([svc("a", "10.0.0.1")], [])
    st.take_snapshot()
    st.upsert("EndpointSlice", eps("a-1", "a", "10.1.0.1", trigger="2024-01-02T03:04:05Z"))
    st.upsert(
        "EndpointSlice", eps("a-1", "a", "10.1.0.1", trigger="2024-01-02T03:04:06Z")
    )  # no change
    st.upsert("EndpointSlice", eps("a-2", "a", "10.1.0.2"))
    assert st.take_snapshot().trigger_times == (1704164645.0,)
    assert st.take_snapshot().trigger_times == ()


def test_endpoint_change_resolves_only_that_service(monkeypatch: pytest.MonkeyPatch) -> None:
    services = [svc(f"s{i}", f"10.0.{i // 250}.{i % 250 + 1}") for i in range(50)]
    st, _ = synced_state(services, [])
    st.take_snapshot()
    resolved: list[str] = []

    def counting(service: Any, slices: Any, info: Any) -> Any:
        resolved.append(service.name)
        return resolve_service(service, slices, info)

    monkeypatch.setattr(state_module, "resolve_service", counting)
    st.upsert("EndpointSlice", eps("s7-1", "s7", "10.1.0.1"))
    st.upsert("EndpointSlice", eps("s7-1", "s7", "10.1.0.2"))
    st.take_snapshot()
    assert resolved == ["s7"]


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------


def test_on_change_called_outside_lock() -> None:
    seen: list[tuple[int, int]] = []
    st: ProxyState

    def callback() -> None:
        seen.append(st.pending())  # would deadlock if called under the lock

    st = ProxyState(NODE, on_change=callback)
    st.replace("Service", [svc("a", "10.0.0.1")])
    assert seen == [(1, 0)]


def test_concurrent_sources_and_snapshots_converge() -> None:
    st, _ = synced_state([svc(f"s{i}", f"10.0.0.{i + 1}") for i in range(20)], [])
    union: set[ServicePortKey] = set()
    stop = threading.Event()

    def writer(offset: int) -> None:
        for round_ in range(30):
            for i in range(offset, 20, 2):
                st.upsert("EndpointSlice", eps(f"s{i}-1", f"s{i}", f"10.1.{round_}.{i + 1}"))

    def reader() -> None:
        while not stop.is_set():
            union.update(st.take_snapshot().changed)

    threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    snapper = threading.Thread(target=reader)
    snapper.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    snapper.join()
    union.update(st.take_snapshot().changed)
    assert union == {key(f"s{i}") for i in range(20)}
    for i in range(20):
        assert ips(st, f"s{i}") == [f"10.1.29.{i + 1}"]


def test_node_pod_cidr_change_reaches_the_view_as_a_node_change() -> None:
    st, _ = synced_state([svc("a", "10.0.0.1")], [])
    st.upsert("Node", node())
    assert st.take_snapshot().view.pod_cidrs == ()
    with_cidr = node()
    with_cidr["spec"] = {"podCIDRs": ["10.244.1.0/24"]}
    st.upsert("Node", with_cidr)
    snap = st.take_snapshot()
    assert snap.node_changed and snap.view.pod_cidrs == ("10.244.1.0/24",)
