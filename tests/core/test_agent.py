"""The embedding API (`kproxy_core.agent.Proxy`) end to end, with an in-memory backend and the
manifests source: no root, no network."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from kproxy_core import hookimpl
from kproxy_core.agent import ModeNotFound, Proxy, health_check_ports, no_local_endpoints
from kproxy_core.backend import Backend, BackendContext, SyncError, SyncRequest, SyncResult
from kproxy_core.config import load_config
from kproxy_core.plugins import KproxyPluginManager
from kproxy_core.sync import SyncReport

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "manifests"


class RecordingBackend(Backend):
    name = "recording"
    needs_conntrack_cleanup = False

    def __init__(self, context: BackendContext, *, fail_times: int = 0) -> None:
        super().__init__(context)
        self.requests: list[SyncRequest] = []
        self.fail_times = fail_times
        self.lock = threading.Lock()

    def sync(self, request: SyncRequest) -> SyncResult:
        with self.lock:
            self.requests.append(request)
            if self.fail_times > 0:
                self.fail_times -= 1
                raise SyncError("injected failure")
        return SyncResult(objects_written=len(request.changed), counters={"rows": 1})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _plugins() -> KproxyPluginManager:
    return KproxyPluginManager(load_entrypoints=False)


def _proxy(tmp_path: Path, **kwargs: object) -> tuple[Proxy, RecordingBackend, Path]:
    manifests = tmp_path / "manifests"
    shutil.copytree(EXAMPLES, manifests)
    services = manifests / "services.yaml"
    # healthCheckNodePort only counts for LoadBalancer services (with eTP Local), as upstream.
    services.write_text(services.read_text().replace("type: NodePort", "type: LoadBalancer"))
    plugins = _plugins()
    config = load_config(
        {"manifests": str(manifests), "hostnameOverride": "node",
         "iptables.minSyncPeriod": 0.0, "iptables.syncPeriod": 3600.0,
         "healthzBindAddress": f"127.0.0.1:{_free_port()}",
         "metricsBindAddress": f"127.0.0.1:{_free_port()}"},
        plugins.options(),
    )
    fail_times = int(kwargs.pop("fail_times", 0))  # type: ignore[call-overload]
    context = BackendContext(config=config, node_name="node",
                             logger=logging.getLogger("test"), plugins=plugins)
    backend = RecordingBackend(context, fail_times=fail_times)
    proxy = Proxy(config, plugins=plugins, backend=backend, **kwargs)  # type: ignore[arg-type]
    return proxy, backend, manifests


def test_first_sync_is_full_and_carries_the_resolved_view(tmp_path: Path) -> None:
    proxy, backend, _ = _proxy(tmp_path, serve_http=False)
    proxy.start()
    try:
        report = proxy.wait_until_synced(30)
        assert report.full and report.ok
        first = backend.requests[0]
        assert first.full
        names = {str(key.name) for key in first.view.services}
        assert "default/web:http" in names
        assert first.changed == frozenset(first.view.services)
        assert proxy.view().services.keys() == first.view.services.keys()
    finally:
        proxy.stop()


def test_a_manifest_change_reaches_the_backend_as_a_partial_sync(tmp_path: Path) -> None:
    proxy, backend, manifests = _proxy(tmp_path, serve_http=False)
    proxy.start()
    try:
        proxy.wait_until_synced(30)
        count = len(backend.requests)
        services = manifests / "services.yaml"
        services.write_text(services.read_text().replace("port: 80\n      targetPort: 8080",
                                                         "port: 81\n      targetPort: 8080"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with backend.lock:
                later = backend.requests[count:]
            if any(r.changed for r in later):
                break
            time.sleep(0.05)
        changed = [r for r in later if r.changed]
        assert changed, "no sync carried the change"
        request = changed[0]
        assert not request.full
        (key,) = [k for k in request.changed if k.name.name == "web"]
        assert request.view.services[key].port == 81
        previous = request.previous[key]
        assert previous is not None and previous.port == 80
    finally:
        proxy.stop()


def test_failed_syncs_are_retried_in_full_with_changes_kept(tmp_path: Path) -> None:
    reports: list[SyncReport] = []

    class Observer:
        @hookimpl
        def kproxy_sync_finished(self, report: SyncReport) -> None:
            reports.append(report)

    proxy, backend, _ = _proxy(tmp_path, serve_http=False, fail_times=1)
    proxy.plugins.register(Observer())
    proxy._backoff.initial = 0.05  # keep the test quick; the policy is tested in test_sync
    proxy.start()
    try:
        report = proxy.wait_until_synced(30)
        assert report.ok and report.full
        assert not reports[0].ok and "injected failure" in (reports[0].error or "")
        # The retry still carries every change the failed attempt had.
        assert backend.requests[1].changed == backend.requests[0].changed
        assert proxy.metrics.sample("kproxy_sync_errors_total", {"full": "true"}) == 1.0
    finally:
        proxy.stop()


def test_sync_now_forces_a_full_sync(tmp_path: Path) -> None:
    proxy, _backend, _ = _proxy(tmp_path, serve_http=False)
    proxy.start()
    try:
        proxy.wait_until_synced(30)
        report = proxy.sync_now(full=True)
        assert report.full and report.changed == 0
    finally:
        proxy.stop()


def test_servers_answer_healthz_proxymode_and_metrics(tmp_path: Path) -> None:
    proxy, _backend, _ = _proxy(tmp_path)
    proxy.start()
    try:
        proxy.wait_until_synced(30)
        servers = proxy._servers
        healthz = f"http://{servers.healthz_address}/healthz"
        metrics = f"http://{servers.metrics_address}"
        with urllib.request.urlopen(healthz) as response:
            assert response.status == 200
            assert "lastUpdated" in json.loads(response.read())
        with urllib.request.urlopen(f"{metrics}/proxyMode") as response:
            assert response.read().decode() == "recording"
        with urllib.request.urlopen(f"{metrics}/metrics") as response:
            text = response.read().decode()
        assert "kubeproxy_sync_proxy_rules_duration_seconds_count" in text
        # The example NodePort service has eTP Local and a health-check node port.
        assert proxy._service_health.ports() == {("default", "api"): 32000}
    finally:
        proxy.stop()


def test_unknown_mode_names_installed_modes() -> None:
    plugins = _plugins()
    config = load_config({"mode": "nonexistent"}, plugins.options())
    with pytest.raises(ModeNotFound, match="installed modes: none"):
        Proxy(config, plugins=plugins)


def test_health_check_ports_and_no_local_endpoint_counts(tmp_path: Path) -> None:
    proxy, _backend, _ = _proxy(tmp_path, serve_http=False)
    proxy.start()
    try:
        proxy.wait_until_synced(30)
        view = proxy.view()
        # api: eTP Local, endpoints 10.244.1.2 on this node and 10.244.2.2 on node2.
        assert health_check_ports(view) == {("default", "api"): (32000, 1)}
        assert no_local_endpoints(view) == (0, 0)
    finally:
        proxy.stop()


def test_no_local_endpoints_counts_local_policies_without_local_endpoints() -> None:
    from kproxy_core.testing.conformance import endpoint, node_view, service_port

    remote = endpoint("10.244.2.2")
    view = node_view(
        service_port("itp", "10.96.0.1", 80, [remote], internal_policy_local=True),
        service_port("etp", "10.96.0.2", 80, [remote], external_policy_local=True,
                     node_port=30001),
        service_port("etp-no-external", "10.96.0.3", 80, [remote],
                     external_policy_local=True),
        service_port("empty", "10.96.0.4", 80, [], internal_policy_local=True),
    )
    assert no_local_endpoints(view) == (1, 1)
