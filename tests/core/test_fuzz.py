"""Property-based fuzzing of Service, EndpointSlice and Node objects through `ProxyState`.

Valid objects are generated, then copies of them are mutated at random paths (garbage of
any JSON type, removed fields, invalid IPs, ports out of range, unknown protocols, huge and
duplicated lists) and fed together with the valid ones, in random order, through ``upsert``,
``replace`` and ``delete``. Properties:

* nothing raises;
* an object is either accepted silently or skipped with exactly one one-line log record that
  names its kind, namespace/name and the offending field;
* every valid service still resolves: one port per service port, its cluster IP, endpoints
  only from its own slices, and some endpoint whenever its slices offer a ready one.

The normal run uses few examples; ``KPROXY_FUZZ_EXAMPLES=10000`` (tox -e fuzz) runs many.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy_core.model import ServicePortKey, ServicePortName
from kproxy_core.state import ProxyState

EXAMPLES = int(os.environ.get("KPROXY_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
NODE = "node-a"
JSON = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Valid objects
# --------------------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port_numbers = st.integers(1, 65535)
protocols = st.sampled_from(["TCP", "UDP", "SCTP"])


@st.composite
def valid_service(draw: st.DrawFn, index: int) -> tuple[JSON, list[JSON]]:
    """A valid Service in namespace "good" and 1-2 EndpointSlices for it (they may overlap:
    the same address in both, with different conditions)."""
    name = f"svc-{index}"
    svc_type = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    count = draw(st.integers(1, 3))
    ports = []
    for i in range(count):
        port: JSON = {"name": f"p{i}", "protocol": draw(protocols), "port": draw(port_numbers)}
        if draw(st.booleans()):
            port["targetPort"] = draw(port_numbers)
        if svc_type != "ClusterIP":
            port["nodePort"] = draw(st.integers(30000, 32767))
        ports.append(port)
    spec: JSON = {"type": svc_type, "clusterIP": draw(ipv4), "ports": ports}
    if draw(st.booleans()):
        spec["externalIPs"] = draw(st.lists(ipv4, max_size=2))
    if svc_type == "LoadBalancer" and draw(st.booleans()):
        spec["externalTrafficPolicy"] = "Local"
        spec["healthCheckNodePort"] = draw(st.integers(30000, 32767))
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "good"}, "spec": spec}
    addresses = draw(st.lists(ipv4, min_size=0, max_size=5))
    slices = []
    for s in range(draw(st.integers(1, 2))):
        chosen = draw(st.lists(st.sampled_from(addresses), max_size=5)) if addresses else []
        endpoints = [{"addresses": [a], "nodeName": draw(st.sampled_from([NODE, "node-b"])),
                      "conditions": {"ready": draw(st.booleans()),
                                     "serving": draw(st.booleans()),
                                     "terminating": draw(st.booleans())}}
                     for a in chosen]
        slices.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-{s}", "namespace": "good",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": p["name"], "protocol": p["protocol"],
                       "port": draw(port_numbers)} for p in ports],
        })
    return service, slices


def node_object(name: str) -> JSON:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "z1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]},
            "spec": {"podCIDRs": ["10.244.0.0/24"]}}


# --------------------------------------------------------------------------------------------
# Garbage
# --------------------------------------------------------------------------------------------

NASTY_STRINGS = ["", "None", "TCP", "tcp", "ICMP", "10.0.0.1", "::1", "fe80::1%eth0",
                 "999.1.1.1", "01.2.3.4", " 10.0.0.1", "1.2.3.4/33", "10.0.0.0/8", "²", "٣",
                 "80", "-1", "65536", "0", "Local", "Cluster", "ClientIP", "IPv4", "IPv6",
                 "FQDN", "ExternalName", "$(reboot)", "a\nb\r\nc", "'\";|&`", "\x00",
                 "x" * 300, "NodePort", "LoadBalancer", "http", "2026-13-45T99:00:00Z"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(NASTY_STRINGS), port_numbers, ipv4, ipv6)
garbage = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["name", "port", "ip", "addresses", "type", "protocol",
                                       "x", "conditions", "ready"]) | st.text(max_size=6),
                      children, max_size=4),
    max_leaves=8)

Path = tuple[str | int, ...]


def paths(value: Any, prefix: Path = ()) -> Iterator[Path]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


def _set(obj: Any, path: Path, make: Callable[[Any], Any]) -> Any:
    if not path:
        return make(obj)
    head, rest = path[0], path[1:]
    obj[head] = _set(obj[head], rest, make)
    return obj


def _const(value: Any) -> Callable[[Any], Any]:
    return lambda _old: value


def _delete(obj: Any, path: Path) -> Any:
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return obj


@st.composite
def mutated(draw: st.DrawFn, original: JSON, index: int) -> JSON:
    """``original`` renamed into namespace "fuzz" with 1-3 random mutations."""
    obj = copy.deepcopy(original)
    obj["metadata"]["namespace"] = "fuzz"
    obj["metadata"]["name"] = f"bad-{index}"
    for _ in range(draw(st.integers(1, 3))):
        candidates = [p for p in paths(obj) if p]
        path = draw(st.sampled_from(candidates))
        action = draw(st.sampled_from(["garbage", "garbage", "delete", "huge", "duplicate"]))
        if action == "garbage":
            value = draw(garbage)
            obj = _set(obj, path, _const(value))
        elif action == "delete":
            obj = _delete(obj, path)
        elif action == "huge":
            obj = _set(obj, path, _const([draw(scalars)] * 3000))
        else:
            obj = _set(obj, path, lambda old: [old, old] if not isinstance(old, list)
                       else old + old)
    # Keep a chance of renamed objects being reachable as their own, valid-looking names.
    meta = obj.get("metadata")
    if isinstance(meta, dict) and meta.get("namespace") == "good":
        meta["namespace"] = "fuzz"
    return obj


# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[tuple[JSON, list[JSON]]], list[JSON]]:
    valid = [draw(valid_service(i)) for i in range(draw(st.integers(1, 4)))]
    sources: list[JSON] = [obj for svc, slices in valid for obj in (svc, *slices)]
    sources.append(node_object(NODE))
    bad = [draw(mutated(draw(st.sampled_from(sources)), j))
           for j in range(draw(st.integers(1, 6)))]
    for obj in bad:
        if obj.get("kind") == "Node" and isinstance(obj.get("metadata"), dict):
            # A mutated copy of this node's object: it replaces this node's record.
            obj["metadata"]["name"] = NODE if draw(st.booleans()) else "node-z"
    return valid, bad


def _kind(obj: Any) -> str:
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return kind if kind in ("Service", "EndpointSlice", "Node") else "Service"


@FUZZ
@given(scenario(), st.randoms(use_true_random=False), st.sampled_from(["upsert", "replace"]))
def test_garbage_is_skipped_and_valid_services_resolve(
        case: tuple[list[tuple[JSON, list[JSON]]], list[JSON]], rand: Any, how: str) -> None:
    valid, bad = case
    handler = Records()
    logger = logging.getLogger(f"kproxy.fuzz.{id(handler)}")
    logger.propagate = False
    logger.addHandler(handler)
    state = ProxyState(NODE, logger=logger)
    good_objects = [obj for svc, slices in valid for obj in (svc, *slices)]
    feed = [("good", o) for o in good_objects] + [("bad", o) for o in bad]
    rand.shuffle(feed)

    if how == "upsert":
        for origin, obj in feed:
            before = len(handler.records)
            state.upsert(_kind(obj), obj)
            new = handler.records[before:]
            assert len(new) <= 1, [r.getMessage() for r in new]
            if origin == "good":
                assert not new, new[0].getMessage()
            for record in new:
                _check_record(record, obj)
        # Tombstones of garbage: deleting them must work whatever they contain.
        for obj in bad[: len(bad) // 2]:
            state.delete(_kind(obj), obj)
    else:
        for kind in ("Node", "Service", "EndpointSlice"):
            objs = [o for _, o in feed if _kind(o) == kind]
            if kind == "Node":
                objs = [o for o in objs if o is not None] or [node_object(NODE)]
            state.replace(kind, objs)
        assert len(handler.records) <= len(bad)
        for record in handler.records:
            _check_record(record, None)

    view = state.view()
    snapshot = state.take_snapshot()
    assert snapshot.view.services == view.services
    for svc, slices in valid:
        _check_resolved(view.services, svc, slices)
    assert not [k for k in view.services if k.name.namespace == "good"
                and k.name.name not in {s["metadata"]["name"] for s, _ in valid}]


def _check_record(record: logging.LogRecord, obj: Any) -> None:
    message = record.getMessage()
    assert "\n" not in message and "\r" not in message, repr(message)
    assert record.levelno == logging.WARNING, message
    detail = message.split("ignoring invalid object: ", 1)[-1]
    kind, _, rest = detail.partition(" ")
    assert kind in ("Service", "EndpointSlice", "Node"), message
    ref, _, reason = rest.partition(": ")
    assert ref and reason, message
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        name = obj["metadata"].get("name")
        if isinstance(name, str) and name and "\n" not in name:
            assert ref.endswith(name), (message, name)


def _check_resolved(services: Any, svc: JSON, slices: list[JSON]) -> None:
    name = svc["metadata"]["name"]
    listed = [a for s in slices for e in s["endpoints"] for a in e["addresses"]]
    addresses = set(listed)
    # An address listed twice resolves by upstream's rule (first wins, unless a later one is
    # local); only an address listed once is surely used when ready.
    ready = {a for s in slices for e in s["endpoints"] if e["conditions"]["ready"]
             for a in e["addresses"] if listed.count(a) == 1}
    for port in svc["spec"]["ports"]:
        key = ServicePortKey(4, ServicePortName("good", name, port["name"], port["protocol"]))
        resolved = services.get(key)
        assert resolved is not None, f"{key} not resolved"
        assert resolved.cluster_ip == svc["spec"]["clusterIP"]
        assert resolved.port == port["port"]
        reachable = {e.ip for e in resolved.all_reachable_endpoints}
        assert reachable <= addresses, (reachable, addresses)
        if ready and svc["spec"].get("externalTrafficPolicy") != "Local":
            assert resolved.cluster_endpoints, (key, ready)


# --------------------------------------------------------------------------------------------
# Specific shapes
# --------------------------------------------------------------------------------------------


def test_huge_lists_and_duplicates() -> None:
    handler = Records()
    logger = logging.getLogger("kproxy.fuzz.huge")
    logger.propagate = False
    logger.addHandler(handler)
    state = ProxyState(NODE, logger=logger)
    ports = [{"name": f"p{i}", "port": 1 + i, "protocol": "TCP"} for i in range(2000)]
    state.upsert("Service", {"metadata": {"name": "big", "namespace": "ns"},
                             "spec": {"clusterIP": "10.96.0.10", "ports": ports}})
    endpoints = [{"addresses": [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"],
                  "conditions": {"ready": True}} for i in range(20000)]
    endpoints += endpoints[:100]  # duplicates
    state.upsert("EndpointSlice", {
        "metadata": {"name": "big-1", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": "big"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "p7", "port": 8080, "protocol": "TCP"}]})
    # One bad address in a huge list: the whole slice is skipped, with one line.
    bad = [*endpoints[:5000], {"addresses": ["10.0.0.999"]}, *endpoints[5000:10000]]
    state.upsert("EndpointSlice", {
        "metadata": {"name": "big-2", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": "big"}},
        "addressType": "IPv4", "endpoints": bad,
        "ports": [{"name": "p7", "port": 8080, "protocol": "TCP"}]})
    view = state.view()
    assert len(view.services) == 2000
    key = ServicePortKey(4, ServicePortName("ns", "big", "p7", "TCP"))
    assert len(view.services[key].cluster_endpoints) == 20000
    messages = [r.getMessage() for r in handler.records]
    assert messages == ["ignoring invalid object: EndpointSlice ns/big-2: "
                        "endpoints[5000].addresses[0]: '10.0.0.999' is not a valid IP address"]
    assert state.invalid_objects() == 1


def test_an_object_that_becomes_invalid_is_dropped_and_comes_back() -> None:
    state = ProxyState(NODE)
    svc: JSON = {"metadata": {"name": "s", "namespace": "ns"},
                 "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}}
    state.upsert("Service", svc)
    assert len(state.view().services) == 1
    broken = copy.deepcopy(svc)
    broken["spec"]["ports"][0]["targetPort"] = "²"  # str.isdigit() but not int()
    state.upsert("Service", broken)
    assert len(state.view().services) == 0
    assert state.invalid_objects() == 1
    state.upsert("Service", svc)
    assert len(state.view().services) == 1
    assert state.invalid_objects() == 0
