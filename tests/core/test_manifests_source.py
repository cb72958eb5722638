"""ManifestSource: YAML/JSON directory → replace() of all kinds at start, then only the
objects that changed."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from kproxy_core.sources.manifests import (
    ManifestError,
    ManifestSource,
    ManifestSourceError,
    load_file,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "manifests"


class Events:
    """Records every call and keeps the state the calls add up to, as the core would."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.replaced: list[tuple[str, list[Mapping[str, Any]]]] = []
        self.calls: list[tuple[str, str, str]] = []
        self.state: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = {}

    @staticmethod
    def _ref(obj: Mapping[str, Any]) -> tuple[str, str]:
        meta = obj["metadata"]
        return (meta.get("namespace", ""), meta["name"])

    def replace(self, kind: str, objects: Sequence[Mapping[str, Any]]) -> None:
        with self.lock:
            self.replaced.append((kind, list(objects)))
            self.calls.append(("replace", kind, ""))
            self.state[kind] = {self._ref(o): o for o in objects}

    def upsert(self, kind: str, obj: Mapping[str, Any]) -> None:
        with self.lock:
            self.calls.append(("upsert", kind, obj["metadata"]["name"]))
            self.state[kind][self._ref(obj)] = obj

    def delete(self, kind: str, obj: Mapping[str, Any]) -> None:
        with self.lock:
            self.calls.append(("delete", kind, obj["metadata"]["name"]))
            del self.state[kind][self._ref(obj)]

    def latest(self, kind: str) -> list[Mapping[str, Any]]:
        with self.lock:
            return list(self.state[kind].values())

    def names(self, kind: str) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.latest(kind))

    def since(self, mark: int) -> list[tuple[str, str, str]]:
        with self.lock:
            return self.calls[mark:]


class Config:
    def __init__(self, manifests: str) -> None:
        self.manifests = manifests

    def get(self, path: str) -> Any:
        assert path == "manifests"
        return self.manifests


@pytest.fixture
def sources() -> Iterator[list[ManifestSource]]:
    started: list[ManifestSource] = []
    yield started
    for source in started:
        source.stop()


def start(directory: Path, sources: list[ManifestSource], node: str = "node",
          poll: float = 1.0) -> tuple[ManifestSource, Events]:
    events = Events()
    source = ManifestSource(Config(str(directory)), node, events)
    source.poll_interval = poll
    source.start()
    sources.append(source)
    return source, events


def svc_yaml(name: str, ip: str, extra: str = "") -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n{extra}"
            f"spec:\n  clusterIP: {ip}\n  ports:\n  - port: 80\n")


def bump_mtime(path: Path) -> None:
    """Make a rewrite visible even on filesystems with coarse timestamps."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


def test_example_manifests(sources: list[ManifestSource]) -> None:
    source, events = start(EXAMPLES, sources)
    assert events.names("Service") == ["api", "sticky", "web"]
    assert events.names("EndpointSlice") == ["api-def34", "sticky-ghi56", "web-abc12"]
    assert events.names("Node") == ["node"], "only this node's Node"
    node = events.latest("Node")[0]
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "10.99.0.1"}
    services = {o["metadata"]["name"]: o for o in events.latest("Service")}
    assert all(o["metadata"]["namespace"] == "default" for o in services.values())
    assert services["api"]["spec"]["externalTrafficPolicy"] == "Local"
    assert services["sticky"]["spec"]["sessionAffinity"] == "ClientIP"
    slices = {o["metadata"]["name"]: o for o in events.latest("EndpointSlice")}
    web_ips = [a for e in slices["web-abc12"]["endpoints"] for a in e["addresses"]]
    assert web_ips == ["10.244.1.2", "10.244.1.3"]
    assert source.connected()


def test_multi_document_lists_json_and_ignored_kinds(tmp_path: Path,
                                                     sources: list[ManifestSource],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.yaml").write_text(
        svc_yaml("one", "10.96.0.1") + "---\n" + "apiVersion: v1\nkind: ConfigMap\n"
        "metadata: {name: cm}\n---\n# empty document\n")
    (tmp_path / "b.yml").write_text(
        "apiVersion: v1\nkind: List\nitems:\n"
        "- apiVersion: v1\n  kind: Service\n  metadata: {name: two, namespace: web}\n"
        "  spec: {clusterIP: 10.96.0.2}\n"
        "- apiVersion: discovery.k8s.io/v1beta1\n  kind: EndpointSlice\n"
        "  metadata: {name: old-api}\n")
    (tmp_path / "c.json").write_text(json.dumps({
        "kind": "ServiceList", "apiVersion": "v1",
        "items": [{"metadata": {"name": "three"}, "spec": {"clusterIP": "10.96.0.3"}}]}))
    (tmp_path / "notes.txt").write_text("not a manifest")
    with caplog.at_level(logging.DEBUG, logger="kproxy_core.sources.manifests"):
        _, events = start(tmp_path, sources)
    assert events.names("Service") == ["one", "three", "two"]
    assert events.names("EndpointSlice") == []
    assert events.names("Node") == [], "no Node given: none is synthesized"
    assert "ConfigMap" in caplog.text and "discovery.k8s.io/v1beta1" in caplog.text
    two = next(o for o in events.latest("Service") if o["metadata"]["name"] == "two")
    assert two["metadata"]["namespace"] == "web"


def test_upstream_selectors_are_applied(tmp_path: Path, sources: list[ManifestSource]) -> None:
    (tmp_path / "s.yaml").write_text(
        svc_yaml("plain", "10.96.0.1") + "---\n" + svc_yaml("headless", "None") + "---\n"
        + svc_yaml("other", "10.96.0.3", "  labels:\n"
                   "    service.kubernetes.io/service-proxy-name: x\n") + "---\n"
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: h-1\n"
        "  labels: {service.kubernetes.io/headless: ''}\naddressType: IPv4\nendpoints: []\n")
    _, events = start(tmp_path, sources)
    assert events.names("Service") == ["plain"]
    assert events.names("EndpointSlice") == []


def test_changes_are_picked_up_by_polling(tmp_path: Path, sources: list[ManifestSource]) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(svc_yaml("a", "10.96.0.1"))
    _, events = start(tmp_path, sources, poll=0.02)
    assert events.names("Service") == ["a"]
    path.write_text(svc_yaml("a", "10.96.0.9"))
    bump_mtime(path)
    deadline = time.monotonic() + 5
    while events.latest("Service")[0]["spec"]["clusterIP"] != "10.96.0.9":
        assert time.monotonic() < deadline, "change not picked up"
        time.sleep(0.01)


def test_scan_delivers_only_on_change(tmp_path: Path, sources: list[ManifestSource]) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(svc_yaml("a", "10.96.0.1"))
    source, events = start(tmp_path, sources, poll=3600)
    assert [c[:2] for c in events.calls] == [("replace", "Service"),
                                             ("replace", "EndpointSlice"), ("replace", "Node")]
    mark = len(events.calls)
    assert source.scan() is False and events.since(mark) == []
    (tmp_path / "t.yaml").write_text(svc_yaml("b", "10.96.0.2"))
    assert source.scan() is True
    assert events.since(mark) == [("upsert", "Service", "b")]
    assert events.names("Service") == ["a", "b"]
    mark = len(events.calls)
    (tmp_path / "t.yaml").unlink()
    assert source.scan() is True
    assert events.since(mark) == [("delete", "Service", "b")]
    assert events.names("Service") == ["a"]
    # Rewritten with the same content: read again, nothing delivered.
    mark = len(events.calls)
    path.write_text(svc_yaml("a", "10.96.0.1"))
    bump_mtime(path)
    assert source.scan() is False and events.since(mark) == []


def slice_doc(name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name.split("-")[0]}},
            "addressType": "IPv4", "ports": [{"name": "", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip]}]}


def test_one_object_edited_in_a_large_file_is_one_upsert(
        tmp_path: Path, sources: list[ManifestSource]) -> None:
    path = tmp_path / "slices.json"
    items = [slice_doc(f"s{i}-x", f"10.1.{i // 250}.{i % 250 + 1}") for i in range(500)]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    source, events = start(tmp_path, sources, poll=3600)
    assert len(events.names("EndpointSlice")) == 500
    mark = len(events.calls)
    items[321] = slice_doc("s321-x", "10.9.9.9")
    items[7]["metadata"] = {"namespace": "default", "name": "s7-x",
                            "labels": {"kubernetes.io/service-name": "s7"}}  # same content
    del items[400]
    items.append(slice_doc("new-x", "10.9.9.10"))
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    bump_mtime(path)
    assert source.scan() is True
    assert sorted(events.since(mark)) == [("delete", "EndpointSlice", "s400-x"),
                                          ("upsert", "EndpointSlice", "new-x"),
                                          ("upsert", "EndpointSlice", "s321-x")]
    delivered = {o["metadata"]["name"]: o for o in events.latest("EndpointSlice")}
    assert delivered["s321-x"]["endpoints"] == [{"addresses": ["10.9.9.9"]}]
    assert len(delivered) == 500


def test_duplicates_across_files_last_path_wins(tmp_path: Path,
                                                sources: list[ManifestSource]) -> None:
    (tmp_path / "a.yaml").write_text(svc_yaml("dup", "10.96.0.1"))
    (tmp_path / "b.yaml").write_text(svc_yaml("dup", "10.96.0.2"))
    source, events = start(tmp_path, sources, poll=3600)
    assert [o["spec"]["clusterIP"] for o in events.latest("Service")] == ["10.96.0.2"]
    # Editing the losing definition changes nothing...
    mark = len(events.calls)
    (tmp_path / "a.yaml").write_text(svc_yaml("dup", "10.96.0.3"))
    bump_mtime(tmp_path / "a.yaml")
    assert source.scan() is False and events.since(mark) == []
    # ...until the winning one goes away: the earlier file's (current) definition is back.
    (tmp_path / "b.yaml").unlink()
    assert source.scan() is True
    assert events.since(mark) == [("upsert", "Service", "dup")]
    assert [o["spec"]["clusterIP"] for o in events.latest("Service")] == ["10.96.0.3"]
    (tmp_path / "a.yaml").unlink()
    assert source.scan() is True
    assert events.since(mark)[-1] == ("delete", "Service", "dup")
    assert events.names("Service") == []


def test_selection_and_node_changes_become_upserts_and_deletes(
        tmp_path: Path, sources: list[ManifestSource]) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(svc_yaml("a", "10.96.0.1"))
    node = tmp_path / "node.yaml"
    node.write_text("apiVersion: v1\nkind: Node\nmetadata: {name: node}\n---\n"
                    "apiVersion: v1\nkind: Node\nmetadata: {name: other}\n")
    source, events = start(tmp_path, sources, poll=3600)
    assert events.names("Node") == ["node"]
    mark = len(events.calls)
    # Labelled for another proxy: kube-proxy's selector drops it, so the core must too.
    path.write_text(svc_yaml("a", "10.96.0.1", "  labels:\n"
                             "    service.kubernetes.io/service-proxy-name: x\n"))
    bump_mtime(path)
    node.write_text("apiVersion: v1\nkind: Node\nmetadata: {name: node, labels: {z: a}}\n")
    bump_mtime(node)
    assert source.scan() is True
    assert events.since(mark) == [("upsert", "Node", "node"), ("delete", "Service", "a")]
    assert events.latest("Node")[0]["metadata"]["labels"] == {"z": "a"}
    assert events.names("Service") == []


def test_force_upserts_everything_again(tmp_path: Path, sources: list[ManifestSource]) -> None:
    (tmp_path / "s.yaml").write_text(svc_yaml("a", "10.96.0.1") + "---\n"
                                     + svc_yaml("b", "10.96.0.2"))
    source, events = start(tmp_path, sources, poll=3600)
    mark = len(events.calls)
    assert source.scan(force=True) is True
    assert sorted(events.since(mark)) == [("upsert", "Service", "a"), ("upsert", "Service", "b")]


def test_parse_error_keeps_previous_content(tmp_path: Path, sources: list[ManifestSource],
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(svc_yaml("a", "10.96.0.1"))
    source, events = start(tmp_path, sources, poll=3600)
    path.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: [broken\n")
    bump_mtime(path)
    with caplog.at_level(logging.ERROR):
        assert source.scan() is False
        assert source.scan() is False
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "one error line per bad version of the file"
    assert str(path) in errors[0].getMessage()
    assert events.names("Service") == ["a"]
    path.write_text(svc_yaml("a", "10.96.0.7"))
    bump_mtime(path)
    assert source.scan() is True
    assert events.latest("Service")[0]["spec"]["clusterIP"] == "10.96.0.7"


def test_new_broken_file_changes_nothing(tmp_path: Path, sources: list[ManifestSource]) -> None:
    (tmp_path / "s.yaml").write_text(svc_yaml("a", "10.96.0.1"))
    source, _ = start(tmp_path, sources, poll=3600)
    (tmp_path / "bad.json").write_text("{not json")
    assert source.scan() is False
    assert source.scan() is False


def test_hidden_entries_are_skipped(tmp_path: Path, sources: list[ManifestSource]) -> None:
    # The layout of a mounted ConfigMap: visible symlinks into a hidden ..data directory.
    data = tmp_path / "..data"
    data.mkdir()
    (data / "s.yaml").write_text(svc_yaml("a", "10.96.0.1"))
    (tmp_path / "s.yaml").symlink_to(data / "s.yaml")
    (tmp_path / ".hidden.yaml").write_text(svc_yaml("hidden", "10.96.0.2"))
    sub = tmp_path / "more"
    sub.mkdir()
    (sub / "t.yaml").write_text(svc_yaml("b", "10.96.0.3"))
    _, events = start(tmp_path, sources)
    assert events.names("Service") == ["a", "b"]


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    source = ManifestSource(Config(str(tmp_path / "nope")), "node", Events())
    with pytest.raises(ManifestSourceError, match="no such directory"):
        source.start()
    with pytest.raises(ManifestSourceError, match="--manifests"):
        ManifestSource(Config(""), "node", Events()).start()


def test_load_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ManifestError, match=r"x\.yaml: document 0 is a list"):
        load_file(path)
