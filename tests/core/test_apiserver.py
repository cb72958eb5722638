"""The fake apiserver speaks list/watch like kube-apiserver (over real HTTP)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from kproxy_core.testing.apiserver import (
    RESOURCES,
    ApiError,
    ApiServer,
    load_manifests,
    parse_field_selector,
    parse_label_selector,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "manifests"


def svc(name: str, ns: str = "default", labels: dict[str, str] | None = None,
        cluster_ip: str = "10.96.0.10") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80, "protocol": "TCP"}]}}


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer(bookmark_interval=0.1) as server:
        yield server


def request(api: ApiServer, method: str, path: str, body: Any = None,
            **query: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(api.host, api.port, timeout=5)
    try:
        url = path + ("?" + urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, url, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def watch(api: ApiServer, path: str, **query: str) -> tuple[int, list[dict[str, Any]]]:
    """Run a watch until the server ends it (tests pass timeoutSeconds)."""
    conn = http.client.HTTPConnection(api.host, api.port, timeout=10)
    try:
        conn.request("GET", path + "?" + urlencode({"watch": "1", **query}))
        resp = conn.getresponse()
        lines = resp.read().splitlines()
        return resp.status, [json.loads(line) for line in lines if line.strip()]
    finally:
        conn.close()


def test_list_stamps_resource_versions_uid_and_timestamp(api: ApiServer) -> None:
    created = api.create("Service", svc("a"))
    updated = api.update("Service", {**svc("a"), "spec": {"clusterIP": "10.96.0.11"}})
    status, body = request(api, "GET", "/api/v1/services")
    assert status == 200
    assert body["kind"] == "ServiceList" and body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == updated["metadata"]["resourceVersion"]
    (item,) = body["items"]
    assert int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert item["metadata"]["uid"] == created["metadata"]["uid"]
    assert item["metadata"]["creationTimestamp"] == created["metadata"]["creationTimestamp"]
    assert "kind" not in item, "list items carry no kind, as on the real apiserver"


def test_global_resource_version_spans_kinds(api: ApiServer) -> None:
    s = api.create("Service", svc("a"))
    n = api.create("Node", {"metadata": {"name": "node", "namespace": "ignored"}})
    assert int(n["metadata"]["resourceVersion"]) == int(s["metadata"]["resourceVersion"]) + 1
    assert "namespace" not in n["metadata"]
    _, body = request(api, "GET", "/api/v1/nodes/node")
    assert body["metadata"]["name"] == "node" and body["kind"] == "Node"


def test_namespaced_paths_filter(api: ApiServer) -> None:
    api.create("Service", svc("a", "one"))
    api.create("Service", svc("b", "two"))
    api.create("EndpointSlice", {"metadata": {"name": "b-1", "namespace": "two"},
                                 "addressType": "IPv4", "endpoints": []})
    _, body = request(api, "GET", "/api/v1/namespaces/two/services")
    assert [i["metadata"]["name"] for i in body["items"]] == ["b"]
    _, body = request(api, "GET", "/apis/discovery.k8s.io/v1/namespaces/two/endpointslices")
    assert [i["metadata"]["name"] for i in body["items"]] == ["b-1"]
    assert body["kind"] == "EndpointSliceList"
    status, body = request(api, "GET", "/api/v1/namespaces/x/nodes")
    assert status == 404 and body["kind"] == "Status"


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", ["plain", "proxied", "tier-a", "tier-b"]),
        ("!service.kubernetes.io/service-proxy-name", ["plain", "tier-a", "tier-b"]),
        ("service.kubernetes.io/service-proxy-name", ["proxied"]),
        ("tier=a", ["tier-a"]),
        ("tier==a", ["tier-a"]),
        ("tier!=a", ["plain", "proxied", "tier-b"]),
        ("tier in (a, b)", ["tier-a", "tier-b"]),
        ("tier notin (a)", ["plain", "proxied", "tier-b"]),
        ("tier,tier!=b", ["tier-a"]),
    ],
)
def test_label_selectors(api: ApiServer, selector: str, expected: list[str]) -> None:
    api.create("Service", svc("plain"))
    api.create("Service", svc("proxied", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    api.create("Service", svc("tier-a", labels={"tier": "a"}))
    api.create("Service", svc("tier-b", labels={"tier": "b"}))
    status, body = request(api, "GET", "/api/v1/services", labelSelector=selector)
    assert status == 200
    assert sorted(i["metadata"]["name"] for i in body["items"]) == expected


def test_field_selectors(api: ApiServer) -> None:
    api.create("Service", svc("a"))
    api.create("Service", svc("headless", cluster_ip="None"))
    api.create("Node", {"metadata": {"name": "node"}})
    api.create("Node", {"metadata": {"name": "node2"}})
    _, body = request(api, "GET", "/api/v1/services", fieldSelector="spec.clusterIP!=None")
    assert [i["metadata"]["name"] for i in body["items"]] == ["a"]
    _, body = request(api, "GET", "/api/v1/nodes", fieldSelector="metadata.name=node2")
    assert [i["metadata"]["name"] for i in body["items"]] == ["node2"]
    _, body = request(api, "GET", "/api/v1/services",
                      fieldSelector="metadata.namespace=default,metadata.name==a")
    assert [i["metadata"]["name"] for i in body["items"]] == ["a"]


def test_bad_selectors_are_400() -> None:
    with pytest.raises(ApiError, match="unable to parse requirement"):
        parse_label_selector("a b c")
    with pytest.raises(ApiError, match="field label not supported"):
        parse_field_selector("spec.nothing=x", RESOURCES["Service"])
    with pytest.raises(ApiError, match="invalid field selector"):
        parse_field_selector("justaname", RESOURCES["Node"])


def test_bad_selector_over_http(api: ApiServer) -> None:
    status, body = request(api, "GET", "/api/v1/nodes", fieldSelector="spec.clusterIP=x")
    assert status == 400 and body["reason"] == "BadRequest"
    assert "field label not supported" in body["message"]


def test_watch_replays_from_resource_version(api: ApiServer) -> None:
    start = api.resource_version
    api.create("Service", svc("a"))
    api.update("Service", {**svc("a"), "metadata": {**svc("a")["metadata"], "labels": {"x": "1"}}})
    api.create("Node", {"metadata": {"name": "n"}})  # another kind: not in this watch
    api.delete("Service", svc("a"))
    status, events = watch(api, "/api/v1/services", resourceVersion=str(start),
                           timeoutSeconds="0.3")
    assert status == 200
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert [e["object"]["kind"] for e in events] == ["Service"] * 3
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[-1] == api.resource_version


def test_watch_without_resource_version_starts_with_current_state(api: ApiServer) -> None:
    api.create("Service", svc("a"))
    api.create("Service", svc("b"))
    _, events = watch(api, "/api/v1/services", timeoutSeconds="0.3")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"), ("ADDED", "b")]


def test_watch_live_events_and_timeout(api: ApiServer) -> None:
    rv = api.resource_version

    # (The fake accepts fractional timeoutSeconds so tests stay fast.)
    def later() -> None:
        time.sleep(0.2)
        api.create("Service", svc("late"))

    thread = threading.Thread(target=later)
    thread.start()
    begin = time.monotonic()
    _, events = watch(api, "/api/v1/services", resourceVersion=str(rv), timeoutSeconds="0.6")
    elapsed = time.monotonic() - begin
    thread.join()
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "late")]
    assert elapsed >= 0.55, "timeoutSeconds ended the stream, not something else"


def test_watch_selector_transitions_become_added_and_deleted(api: ApiServer) -> None:
    rv = api.resource_version
    api.create("Service", svc("a"))
    api.update("Service", svc("a", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    api.update("Service", svc("a"))
    _, events = watch(api, "/api/v1/services", resourceVersion=str(rv), timeoutSeconds="0.3",
                      labelSelector="!service.kubernetes.io/service-proxy-name")
    assert [e["type"] for e in events] == ["ADDED", "DELETED", "ADDED"]
    deleted = events[1]["object"]
    assert deleted["metadata"]["labels"] == {}, "DELETED carries the last matching state"
    assert int(deleted["metadata"]["resourceVersion"]) == rv + 2, "at the change's revision"


def test_too_old_resource_version_is_410_expired_event(api: ApiServer) -> None:
    rv = api.resource_version
    api.create("Service", svc("a"))
    api.compact()
    status, events = watch(api, "/api/v1/services", resourceVersion=str(rv))
    assert status == 200, "the apiserver reports expiry inside the stream"
    (event,) = events
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    # The current RV is still watchable after compaction.
    status, events = watch(api, "/api/v1/services", resourceVersion=str(api.resource_version),
                           timeoutSeconds="0.3")
    assert status == 200 and events == []


def test_bounded_history_expires_old_versions() -> None:
    with ApiServer(history=3) as api:
        rv = api.resource_version
        for i in range(5):
            api.create("Service", svc(f"s{i}"))
        _, events = watch(api, "/api/v1/services", resourceVersion=str(rv))
        assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410
        _, events = watch(api, "/api/v1/services", resourceVersion=str(rv + 2),
                          timeoutSeconds="0.3")
        assert [e["object"]["metadata"]["name"] for e in events] == ["s2", "s3", "s4"]


def test_bookmarks(api: ApiServer) -> None:
    rv = api.resource_version
    api.create("Node", {"metadata": {"name": "n"}})
    _, events = watch(api, "/api/v1/services", resourceVersion=str(rv), timeoutSeconds="0.35",
                      allowWatchBookmarks="true")
    assert events and {e["type"] for e in events} == {"BOOKMARK"}
    bookmark = events[-1]["object"]
    assert set(bookmark) == {"kind", "apiVersion", "metadata"}
    assert bookmark["metadata"] == {"resourceVersion": str(api.resource_version)}
    _, events = watch(api, "/api/v1/services", resourceVersion=str(rv), timeoutSeconds="0.35")
    assert events == [], "no bookmarks unless asked for"


def test_list_resource_version_match(api: ApiServer) -> None:
    api.create("Service", svc("a"))
    current = api.resource_version
    status, body = request(api, "GET", "/api/v1/services", resourceVersion=str(current - 1),
                           resourceVersionMatch="NotOlderThan")
    assert status == 200 and body["metadata"]["resourceVersion"] == str(current)
    status, body = request(api, "GET", "/api/v1/services", resourceVersion=str(current - 1),
                           resourceVersionMatch="Exact")
    assert status == 410 and body["reason"] == "Expired"
    status, body = request(api, "GET", "/api/v1/services", resourceVersion=str(current + 5),
                           resourceVersionMatch="NotOlderThan")
    assert status == 504 and "Too large resource version" in body["message"]
    status, body = request(api, "GET", "/api/v1/services", resourceVersion="abc")
    assert status == 400


def test_http_create_update_delete(api: ApiServer) -> None:
    status, created = request(api, "POST", "/api/v1/namespaces/web/services",
                              {"metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.5"}})
    assert status == 201 and created["metadata"]["namespace"] == "web"
    status, body = request(api, "POST", "/api/v1/namespaces/web/services", created)
    assert status == 409 and body["reason"] == "AlreadyExists"
    changed = {**created, "spec": {"clusterIP": "10.96.0.6"}}
    status, updated = request(api, "PUT", "/api/v1/namespaces/web/services/a", changed)
    assert status == 200 and updated["spec"]["clusterIP"] == "10.96.0.6"
    status, body = request(api, "PUT", "/api/v1/namespaces/web/services/a", changed)
    assert status == 409 and body["reason"] == "Conflict", "stale resourceVersion"
    status, body = request(api, "PUT", "/api/v1/namespaces/web/services/b", changed)
    assert status == 400, "name in body and URL differ"
    status, gone = request(api, "DELETE", "/api/v1/namespaces/web/services/a")
    assert status == 200 and gone["metadata"]["name"] == "a"
    status, body = request(api, "DELETE", "/api/v1/namespaces/web/services/a")
    assert status == 404 and body["reason"] == "NotFound"
    status, body = request(api, "POST", "/api/v1/nodes", {"metadata": {"name": "n"}})
    assert status == 201
    status, body = request(api, "POST", "/api/v1/nodes", {"metadata": {}})
    assert status == 422


def test_fault_http_500_and_delay(api: ApiServer) -> None:
    api.set_fault(http_500=True)
    status, body = request(api, "GET", "/api/v1/services")
    assert status == 500 and body["reason"] == "InternalError"
    api.set_fault(http_500=False, delay=0.3)
    begin = time.monotonic()
    status, _ = request(api, "GET", "/api/v1/services")
    assert status == 200 and time.monotonic() - begin >= 0.3


def test_fault_refuse_then_listen_again_on_same_port(api: ApiServer) -> None:
    port = api.port
    api.set_fault(refuse=True)
    with pytest.raises(ConnectionRefusedError):
        request(api, "GET", "/api/v1/services")
    api.create("Service", svc("while-down"))
    api.set_fault(refuse=False)
    assert api.port == port
    _, body = request(api, "GET", "/api/v1/services")
    assert [i["metadata"]["name"] for i in body["items"]] == ["while-down"]


def test_drop_watches_breaks_streams(api: ApiServer) -> None:
    conn = http.client.HTTPConnection(api.host, api.port, timeout=5)
    conn.request("GET", "/api/v1/services?watch=1&resourceVersion=1")
    resp = conn.getresponse()
    deadline = time.monotonic() + 5
    while api.watch_count("Service") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    api.drop_watches()
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    assert api.watch_count() == 0


def test_official_client_reads_kubeconfig_and_lists(api: ApiServer, tmp_path: Path) -> None:
    api.create("Service", svc("a"))
    api.create("Node", {"metadata": {"name": "node"},
                        "status": {"addresses": [{"type": "InternalIP", "address": "10.99.0.1"}]}})
    path = api.write_kubeconfig(tmp_path / "kubeconfig")
    cfg = k8s_client.Configuration()
    load: Callable[..., None] = k8s_config.load_kube_config
    load(config_file=str(path), client_configuration=cfg, persist_config=False)
    with k8s_client.ApiClient(cfg) as client:
        core = k8s_client.CoreV1Api(client)
        services: Any = core.list_service_for_all_namespaces()
        assert [s.metadata.name for s in services.items] == ["a"]
        node: Any = core.read_node("node")
        assert node.status.addresses[0].address == "10.99.0.1"
        assert urlsplit(cfg.host).port == api.port


def test_load_manifests_and_standalone_command(tmp_path: Path) -> None:
    with ApiServer() as api:
        assert load_manifests(api, EXAMPLES) > 0
        assert api.get("Node", "", "node") is not None
    kubeconfig = tmp_path / "kubeconfig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kproxy_core.testing.apiserver", "--port", "0",
         "--manifests", str(EXAMPLES), "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not kubeconfig.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kubeconfig.exists(), "the standalone server never wrote its kubeconfig"
        server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        url = urlsplit(server)
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
        conn.request("GET", "/api/v1/nodes")
        body = json.loads(conn.getresponse().read())
        conn.close()
        assert sorted(n["metadata"]["name"] for n in body["items"]) == ["node", "node2"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.root
def test_listening_again_stays_in_the_original_network_namespace() -> None:
    from kproxy_core.testing import apiserver as apiserver_module
    from kproxy_core.testing.netns import Sandbox

    with Sandbox() as sb:
        ns = sb.netns("api")
        api = ApiServer()

        def start_inside() -> None:
            api.start()

        fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
        try:
            apiserver_module._in_netns_thread(fd, start_inside)
        finally:
            os.close(fd)
        try:
            probe = (f"import urllib.request; print(urllib.request.urlopen("
                     f"'{api.url}/api/v1/nodes', timeout=5).status)")
            assert ns.run([sys.executable, "-c", probe]).stdout.strip() == "200"
            # Called from this thread, which is in the host namespace.
            api.set_fault(refuse=True)
            api.set_fault(refuse=False)
            assert ns.run([sys.executable, "-c", probe]).stdout.strip() == "200"
        finally:
            api.stop()
