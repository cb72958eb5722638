"""KubeSource against the fake apiserver: list, watch, resume, relist, faults, selectors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from kproxy_core.sources.kube import KubeSource, KubeSourceError, RateLimiter
from kproxy_core.testing.apiserver import ApiServer


class Events:
    """Records what a source delivers; keeps a current view per kind like the core would."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, str]] = []
        self.state: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = {}

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
        meta = obj["metadata"]
        return (meta.get("namespace", ""), meta["name"])

    def replace(self, kind: str, objects: Sequence[Mapping[str, Any]]) -> None:
        with self.lock:
            self.calls.append(("replace", kind, ",".join(o["metadata"]["name"] for o in objects)))
            self.state[kind] = {self._key(o): o for o in objects}

    def upsert(self, kind: str, obj: Mapping[str, Any]) -> None:
        with self.lock:
            self.calls.append(("upsert", kind, obj["metadata"]["name"]))
            self.state.setdefault(kind, {})[self._key(obj)] = obj

    def delete(self, kind: str, obj: Mapping[str, Any]) -> None:
        with self.lock:
            self.calls.append(("delete", kind, obj["metadata"]["name"]))
            self.state.setdefault(kind, {}).pop(self._key(obj), None)

    def names(self, kind: str) -> list[str]:
        with self.lock:
            return sorted(name for _, name in self.state.get(kind, {}))

    def replaces(self, kind: str) -> int:
        with self.lock:
            return sum(1 for call in self.calls if call[:2] == ("replace", kind))


class Config:
    def __init__(self, **values: Any) -> None:
        self.values = {"clientConnection.kubeconfig": "", "master": "",
                       "clientConnection.qps": 0, "clientConnection.burst": 10,
                       "clientConnection.contentType": "application/json",
                       "configSyncPeriod": 0.0, **values}

    def get(self, path: str) -> Any:
        return self.values[path]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def svc(name: str, ip: str = "10.96.0.10", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "labels": labels or {}},
            "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]}}


def eps(name: str, service: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service, **(labels or {})}},
            "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": True}}]}


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer(bookmark_interval=0.1) as server:
        yield server


@pytest.fixture
def make_source(
    api: ApiServer, tmp_path: Path
) -> Iterator[Callable[..., tuple[KubeSource, Events]]]:
    sources: list[KubeSource] = []
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")

    def make(node: str = "node", start: bool = True, **config: Any) -> tuple[KubeSource, Events]:
        events = Events()
        cfg = Config(**{"clientConnection.kubeconfig": str(kubeconfig), **config})
        source = KubeSource(cfg, node, events)
        source.backoff_initial = 0.02
        source.backoff_cap = 0.1
        source.read_timeout = 5.0
        sources.append(source)
        if start:
            source.start()
        return source, events

    yield make
    for source in sources:
        source.stop()
        for watcher in source.watchers.values():
            assert not watcher.thread.is_alive(), f"{watcher.kind} watcher outlived stop()"


def test_initial_list_applies_upstream_selectors(api: ApiServer, make_source: Any) -> None:
    api.create("Service", svc("web"))
    api.create("Service", svc("headless", ip="None"))
    api.create("Service", svc("other-proxy", labels={
        "service.kubernetes.io/service-proxy-name": "someone-else"}))
    api.create("EndpointSlice", eps("web-1", "web"))
    api.create("EndpointSlice", eps("headless-1", "headless", {
        "service.kubernetes.io/headless": ""}))
    api.create("Node", {"metadata": {"name": "node"}})
    api.create("Node", {"metadata": {"name": "node2"}})
    source, events = make_source()
    wait_for(source.connected, "connected")
    wait_for(lambda: all(events.replaces(k) for k in ("Service", "EndpointSlice", "Node")),
             "initial replace of every kind")
    assert events.names("Service") == ["web"]
    assert events.names("EndpointSlice") == ["web-1"]
    assert events.names("Node") == ["node"]


def test_changes_propagate_as_upsert_and_delete(api: ApiServer, make_source: Any) -> None:
    source, events = make_source()
    wait_for(source.connected, "connected")
    api.create("Service", svc("a"))
    api.create("EndpointSlice", eps("a-1", "a"))
    api.create("Node", {"metadata": {"name": "node", "labels": {"zone": "1"}}})
    wait_for(lambda: events.names("Node") == ["node"], "node added")
    api.update("Service", svc("a", ip="10.96.0.99"))
    # The ADDED event may still be in flight when the update is made: wait for either order.
    wait_for(lambda: events.state["Service"].get(("default", "a"), {}).get("spec", {})
             .get("clusterIP") == "10.96.0.99", "service modified")
    api.delete("EndpointSlice", eps("a-1", "a"))
    wait_for(lambda: events.names("EndpointSlice") == [], "slice deleted")
    # Gaining the service-proxy-name label removes it from kproxy's view, like upstream.
    api.update("Service", svc("a", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    wait_for(lambda: events.names("Service") == [], "service left the selector")
    assert all(events.replaces(k) == 1 for k in ("Service", "EndpointSlice", "Node"))


def test_disconnect_resumes_without_relist(api: ApiServer, make_source: Any) -> None:
    api.create("Service", svc("a"))
    source, events = make_source()
    wait_for(lambda: events.names("Service") == ["a"], "initial list")
    api.set_fault(refuse=True)
    wait_for(lambda: not source.connected(), "disconnect noticed")
    # Changes while the source is cut off; the last good state stays meanwhile.
    api.create("Service", svc("b"))
    api.delete("Service", svc("a"))
    time.sleep(0.2)
    assert events.names("Service") == ["a"]
    api.set_fault(refuse=False)
    wait_for(lambda: events.names("Service") == ["b"], "changes made while down")
    wait_for(source.connected, "reconnected")
    assert events.replaces("Service") == 1, "resumed the watch, no relist"
    assert source.watchers["Service"].lists == 1


def test_dropped_stream_resumes_from_last_resource_version(
    api: ApiServer, make_source: Any
) -> None:
    source, events = make_source()
    wait_for(source.connected, "connected")
    api.create("Service", svc("a"))
    wait_for(lambda: events.names("Service") == ["a"], "a")
    seen_rv = source.watchers["Service"].resource_version
    api.drop_watches()
    api.create("Service", svc("b"))
    wait_for(lambda: events.names("Service") == ["a", "b"], "b after the drop")
    resumed = [q for m, p, q in api.requests if p == "/api/v1/services" and q.get("watch")]
    assert int(resumed[-1]["resourceVersion"]) >= int(seen_rv)
    assert [c for c in events.calls if c[1] == "Service"].count(("upsert", "Service", "a")) == 1


def test_expired_resource_version_relists(api: ApiServer, make_source: Any) -> None:
    api.create("Service", svc("a"))
    _, events = make_source()
    wait_for(lambda: events.names("Service") == ["a"], "initial list")
    api.set_fault(refuse=True)
    api.create("Service", svc("b"))
    api.delete("Service", svc("a"))
    api.compact()
    api.set_fault(refuse=False)
    wait_for(lambda: events.replaces("Service") == 2, "relist after 410")
    assert events.names("Service") == ["b"]
    lists = [q for m, p, q in api.requests if p == "/api/v1/services" and not q.get("watch")]
    assert lists[0]["resourceVersion"] == "0", "first list from the watch cache, like client-go"
    assert "resourceVersion" not in lists[1], "relist after 410 is a consistent read"
    # And it keeps watching afterwards.
    api.create("Service", svc("c"))
    wait_for(lambda: events.names("Service") == ["b", "c"], "watch after relist")


def test_bookmark_resume_avoids_relist(api: ApiServer, make_source: Any) -> None:
    api.create("Node", {"metadata": {"name": "node"}})
    source, events = make_source()
    node = source.watchers["Node"]
    wait_for(lambda: node.lists == 1 and node.connected, "node listed")
    listed_rv = int(node.resource_version)
    # Traffic on other kinds moves the global RV; only bookmarks tell the Node watcher.
    for i in range(5):
        api.create("Service", svc(f"s{i}"))
    target = api.resource_version
    wait_for(lambda: int(node.resource_version) == target, "bookmark advanced the node RV")
    assert target > listed_rv
    api.compact()  # resuming from the listed RV would now be 410
    api.drop_watches()
    wait_for(lambda: node.watches >= 2 and node.connected, "node watch resumed")
    assert node.lists == 1 and events.replaces("Node") == 1
    watch_rvs = [q["resourceVersion"] for m, p, q in api.requests
                 if p == "/api/v1/nodes" and q.get("watch")]
    assert watch_rvs[-1] == str(target)


def test_slow_server_still_delivers_in_order(api: ApiServer, make_source: Any) -> None:
    source, events = make_source()
    wait_for(source.connected, "connected")
    api.set_fault(delay=0.05)
    for i in range(4):
        api.create("Service", svc(f"s{i}"))
    wait_for(lambda: len(events.names("Service")) == 4, "all events")
    upserts = [name for op, kind, name in events.calls if op == "upsert" and kind == "Service"]
    assert upserts == ["s0", "s1", "s2", "s3"]
    assert source.connected()


def test_silent_server_is_detected_by_read_timeout(api: ApiServer, make_source: Any) -> None:
    api.bookmark_interval = 3600  # nothing at all flows on the streams
    source, events = make_source(start=False)
    source.read_timeout = 0.3
    source.start()
    wait_for(lambda: source.watchers["Service"].watches >= 3, "watch re-established", 10)
    assert source.watchers["Service"].lists == 1
    api.create("Service", svc("after"))
    wait_for(lambda: events.names("Service") == ["after"], "events after reconnects")


def test_server_down_at_start_then_up(make_source: Any, tmp_path: Path) -> None:
    api = ApiServer()
    api.set_fault(refuse=True)
    api.start()
    try:
        api.create("Service", svc("a"))
        events = Events()
        kubeconfig = api.write_kubeconfig(tmp_path / "down-kubeconfig")
        source = KubeSource(Config(**{"clientConnection.kubeconfig": str(kubeconfig)}),
                            "node", events)
        source.backoff_initial, source.backoff_cap = 0.02, 0.1
        source.start()
        try:
            time.sleep(0.3)
            assert not source.connected() and events.calls == []
            api.set_fault(refuse=False)
            wait_for(lambda: events.names("Service") == ["a"], "list once the server is up")
            wait_for(source.connected, "connected")
        finally:
            source.stop()
    finally:
        api.stop()


def test_http_500_backs_off_and_recovers(api: ApiServer, make_source: Any) -> None:
    api.set_fault(http_500=True)
    source, events = make_source()
    wait_for(lambda: sum(1 for r in api.requests if r[1] == "/api/v1/services") >= 3,
             "retries while failing")
    assert events.calls == []
    api.set_fault(http_500=False)
    wait_for(lambda: events.replaces("Service") == 1, "list after recovery")
    wait_for(source.connected, "connected")


def test_master_overrides_kubeconfig_server(api: ApiServer, make_source: Any,
                                           tmp_path: Path) -> None:
    api.create("Service", svc("a"))
    wrong = ApiServer()
    wrong.port = 1  # never started: the kubeconfig points nowhere useful
    kubeconfig = wrong.write_kubeconfig(tmp_path / "wrong")
    _, events = make_source(**{"clientConnection.kubeconfig": str(kubeconfig),
                               "master": api.url})
    wait_for(lambda: events.names("Service") == ["a"], "list through --master")


def test_master_without_kubeconfig(api: ApiServer, make_source: Any) -> None:
    api.create("Node", {"metadata": {"name": "n1"}})
    _, events = make_source(node="n1", **{"clientConnection.kubeconfig": "",
                                          "master": api.url})
    wait_for(lambda: events.names("Node") == ["n1"], "node through --master")


def test_bad_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    source = KubeSource(Config(**{"clientConnection.kubeconfig": str(missing)}), "n", Events())
    with pytest.raises(KubeSourceError, match="cannot load kubeconfig"):
        source.start()


def test_periodic_resync_relists(api: ApiServer, make_source: Any) -> None:
    api.create("Service", svc("a"))
    _, events = make_source(configSyncPeriod=0.3)
    wait_for(lambda: events.replaces("Service") >= 2, "periodic relist")
    assert events.names("Service") == ["a"]


def test_stop_interrupts_open_watches(api: ApiServer, make_source: Any) -> None:
    source, _ = make_source()
    wait_for(lambda: api.watch_count() == 3, "three open watches")
    source.stop()
    for watcher in source.watchers.values():
        assert not watcher.thread.is_alive()
    assert not source.connected()


def test_rate_limiter_burst_then_waits() -> None:
    stop = threading.Event()
    limiter = RateLimiter(qps=0.001, burst=2)
    assert limiter.acquire(stop) and limiter.acquire(stop)
    timer = threading.Timer(0.1, stop.set)
    timer.start()
    assert not limiter.acquire(stop), "third token needs ~1000 s; stop must cut the wait"
    timer.join()
    assert RateLimiter(qps=0, burst=0).acquire(threading.Event()), "qps 0: unlimited"
