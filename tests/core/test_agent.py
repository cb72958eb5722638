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
from kproxy_core.agent import (
    FULL_SYNC_PERIOD,
    ModeNotFound,
    Proxy,
    health_check_ports,
    no_local_endpoints,
)
from kproxy_core.backend import Backend, BackendContext, SyncError, SyncRequest, SyncResult
from kproxy_core.config import load_config
from kproxy_core.plugins import KproxyPluginManager
from kproxy_core.sync import SyncReport, Trigger

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "manifests"


class RecordingBackend(Backend):
    name = "recording"
    needs_conntrack_cleanup = False

    def __init__(self, context: BackendContext, *, fail_times: int = 0) -> None:
        super().__init__(context)
        self.requests: list[SyncRequest] = []
        self.fail_times = fail_times
        self.lock = threading.Lock()
        #: Answer of `needs_full_sync` (a canary monitor's finding, in a real mode).
        self.disturbed = False
        #: When set, each `sync` releases `entered` once, then takes one permit of `gate`.
        self.gate: threading.Semaphore | None = None
        self.entered = threading.Semaphore(0)

    def sync(self, request: SyncRequest) -> SyncResult:
        gate = self.gate
        if gate is not None:
            self.entered.release()
            assert gate.acquire(timeout=10), "the test never let this sync through"
        with self.lock:
            self.requests.append(request)
            if self.fail_times > 0:
                self.fail_times -= 1
                raise SyncError("injected failure")
        return SyncResult(objects_written=len(request.changed), counters={"rows": 1})

    def needs_full_sync(self) -> bool:
        return self.disturbed


class PartialPeriodicBackend(RecordingBackend):
    """A mode like iptables/nftables: periodic syncs are partial."""

    name = "partial-periodic"
    periodic_full_sync = False


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


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
    backend_class = kwargs.pop("backend_class", RecordingBackend)
    assert isinstance(backend_class, type) and issubclass(backend_class, RecordingBackend)
    context = BackendContext(config=config, node_name="node",
                             logger=logging.getLogger("test"), plugins=plugins)
    backend = backend_class(context, fail_times=fail_times)
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


# -- full or partial: upstream's doFullSync ------------------------------------------------------


class Reports:
    """Every sync report, through the observation hook."""

    def __init__(self) -> None:
        self.reports: list[SyncReport] = []
        self.cond = threading.Condition()

    @hookimpl
    def kproxy_sync_finished(self, report: SyncReport) -> None:
        with self.cond:
            self.reports.append(report)
            self.cond.notify_all()

    def run(self, proxy: Proxy, trigger: Trigger) -> SyncReport:
        """Ask the running proxy's loop for a sync with ``trigger``; its report."""
        with self.cond:
            seen = len(self.reports)
            proxy.runner.request(trigger)
            assert self.cond.wait_for(
                lambda: any(r.trigger is trigger for r in self.reports[seen:]), 10
            ), f"no {trigger.value} sync"
            return next(r for r in self.reports[seen:] if r.trigger is trigger)


def _started(tmp_path: Path, **kwargs: object) -> tuple[Proxy, RecordingBackend, Reports]:
    proxy, backend, _ = _proxy(tmp_path, serve_http=False, **kwargs)
    reports = Reports()
    proxy.plugins.register(reports)
    proxy.start()
    proxy.wait_until_synced(30)
    # Drains the start-up requests: sync_now answers with a sync that started after it, so
    # nothing is pending to swallow the test's own trigger (requests coalesce).
    assert not proxy.sync_now().full
    first = reports.reports[0]
    assert first.full and first.full_reason == "first sync"
    return proxy, backend, reports


def _partial_count(proxy: Proxy) -> float:
    return proxy.metrics.sample("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") or 0


def _full_count(proxy: Proxy) -> float:
    return proxy.metrics.sample("kubeproxy_sync_full_proxy_rules_duration_seconds_count") or 0


def test_periodic_sync_is_partial_when_the_mode_says_so(tmp_path: Path) -> None:
    proxy, backend, reports = _started(tmp_path, backend_class=PartialPeriodicBackend)
    try:
        partial_before, full_before = _partial_count(proxy), _full_count(proxy)
        report = reports.run(proxy, Trigger.PERIODIC)
        assert report.ok and not report.full and report.full_reason == ""
        assert not backend.requests[-1].full
        assert backend.requests[-1].changed == frozenset()
        # Metrics and the histogram split follow the sync's kind, as upstream's.
        assert _partial_count(proxy) == partial_before + 1
        assert _full_count(proxy) == full_before
    finally:
        proxy.stop()


def test_periodic_sync_stays_full_for_modes_that_reconcile_every_period(
        tmp_path: Path) -> None:
    # The default (IPVS, third-party modes): as upstream's IPVS proxier, every period.
    proxy, backend, reports = _started(tmp_path)
    try:
        assert type(backend).periodic_full_sync is True
        full_before = _full_count(proxy)
        report = reports.run(proxy, Trigger.PERIODIC)
        assert report.ok and report.full and report.full_reason == "periodic"
        assert backend.requests[-1].full
        assert _full_count(proxy) == full_before + 1
        # Other triggers stay partial.
        assert not reports.run(proxy, Trigger.CHANGE).full
    finally:
        proxy.stop()


def test_a_full_sync_runs_once_the_last_is_older_than_the_full_sync_period(
        tmp_path: Path) -> None:
    clock = FakeClock()
    proxy, backend, reports = _started(tmp_path, backend_class=PartialPeriodicBackend,
                                       clock=clock)
    try:
        clock.now += FULL_SYNC_PERIOD  # not older yet: upstream's test is "more than"
        assert not reports.run(proxy, Trigger.PERIODIC).full
        clock.now += 1
        report = reports.run(proxy, Trigger.PERIODIC)
        assert report.full and report.full_reason == "full-sync period elapsed"
        assert backend.requests[-1].full
        # The clock restarts at that full sync.
        clock.now += FULL_SYNC_PERIOD / 2
        assert not reports.run(proxy, Trigger.PERIODIC).full
        # Any trigger counts: a node whose changes keep the loop busy never sees a
        # periodic one.
        clock.now += FULL_SYNC_PERIOD
        report = reports.run(proxy, Trigger.CHANGE)
        assert report.full and report.full_reason == "full-sync period elapsed"
    finally:
        proxy.stop()


def test_a_failed_partial_sync_makes_the_next_periodic_sync_full(tmp_path: Path) -> None:
    proxy, backend, reports = _started(tmp_path, backend_class=PartialPeriodicBackend)
    proxy._backoff.initial = 3600  # the retry would race the test's own periodic trigger
    try:
        backend.fail_times = 1
        failed = reports.run(proxy, Trigger.PERIODIC)
        assert not failed.ok and not failed.full
        report = reports.run(proxy, Trigger.PERIODIC)
        assert report.ok and report.full and report.full_reason == "after a failed sync"
        assert proxy.metrics.sample("kproxy_sync_errors_total", {"full": "false"}) == 1.0
        # Once repaired, periodic syncs are partial again.
        assert not reports.run(proxy, Trigger.PERIODIC).full
    finally:
        proxy.stop()


def test_a_disturbed_dataplane_makes_the_periodic_sync_full(tmp_path: Path) -> None:
    proxy, backend, reports = _started(tmp_path, backend_class=PartialPeriodicBackend)
    try:
        backend.disturbed = True
        report = reports.run(proxy, Trigger.PERIODIC)
        assert report.full and report.full_reason == "backend asked"
    finally:
        proxy.stop()


def test_sync_now_full_during_a_running_partial_sync_waits_for_a_full_one(
        tmp_path: Path) -> None:
    proxy, backend, reports = _started(tmp_path, backend_class=PartialPeriodicBackend)
    gate = threading.Semaphore(0)
    backend.gate = gate
    try:
        proxy.runner.request(Trigger.PERIODIC)
        assert backend.entered.acquire(timeout=10), "the periodic sync did not start"
        # The running sync decided "partial" before this request: it must not answer it.
        result: list[SyncReport] = []
        waiter = threading.Thread(target=lambda: result.append(proxy.sync_now(full=True)))
        waiter.start()
        gate.release()  # the partial sync ends...
        assert backend.entered.acquire(timeout=10), "the requested sync did not start"
        periodic = next(r for r in reports.reports if r.trigger is Trigger.PERIODIC)
        assert not periodic.full
        waiter.join(0.5)  # ...and would have woken a waiter content with any later report
        assert waiter.is_alive() and not result, f"sync_now answered with {result}"
        gate.release()
        waiter.join(10)
        assert result, "sync_now did not return"
        assert result[0].full and result[0].full_reason == "requested"
    finally:
        backend.gate = None
        for _ in range(4):
            gate.release()
        proxy.stop()
