"""The in-process proxy: wires a source, the state store, the sync loop, one backend and the
servers together. The CLI is a thin shell around `Proxy`; node agents embed it directly::

    from kproxy_core.agent import Proxy
    from kproxy_core.config import load_config

    proxy = Proxy(load_config({"proxy-mode": "iptables", "manifests": "/etc/kproxy/services"}))
    proxy.start()                 # returns at once; syncs run in a background thread
    proxy.wait_until_synced(10)
    report = proxy.sync_now(full=True)
    print(proxy.view().services)  # the resolved node-local state
    proxy.stop()                  # rules stay programmed, as upstream

See ``docs/embedding.md``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kproxy_core.backend import (
    Backend,
    BackendContext,
    BackendUnavailable,
    ConfigView,
    Source,
    SyncRequest,
)
from kproxy_core.model import NodeView, ResolvedServicePort, ServicePortKey
from kproxy_core.plugins import KproxyPluginManager
from kproxy_core.state import ProxyState
from kproxy_core.sync import Backoff, BoundedFrequencyRunner, SyncReport, Trigger

log = logging.getLogger("kproxy")

DEFAULT_MODE = "iptables"

#: Seconds after which the next sync is a full one whatever triggered it: upstream's
#: ``proxyutil.FullSyncPeriod`` (1 h), a constant there too (no flag or config field). It
#: matters for modes whose periodic sync is partial (``Backend.periodic_full_sync = False``)
#: and for nodes whose changes never leave the sync loop idle for a whole sync period.
FULL_SYNC_PERIOD = 3600.0


class ModeNotFound(LookupError):
    """``--proxy-mode`` names a mode that no installed plugin registers."""


def node_name_from(config: ConfigView) -> str:
    """``hostnameOverride`` or the host name, lower-cased, as upstream's GetHostname."""
    name = str(config.get("hostnameOverride") or "").strip() or socket.gethostname()
    return name.strip().lower()


def resolve_mode(config: ConfigView, plugins: KproxyPluginManager) -> str:
    """The effective mode name; raises `ModeNotFound` with a one-line message."""
    mode = str(config.get("mode") or "") or DEFAULT_MODE
    if plugins.modes().get(mode) is None:
        installed = ", ".join(plugins.modes().names()) or "none"
        raise ModeNotFound(
            f"proxy mode {mode!r} is not installed; installed modes: {installed} "
            f"(install the kproxy-{mode} distribution to use it)"
        )
    return mode


class Proxy:
    """One kproxy instance. Thread-safe public methods; see the module docstring."""

    def __init__(
        self,
        config: ConfigView,
        *,
        plugins: KproxyPluginManager | None = None,
        backend: Backend | None = None,
        source: Source | None = None,
        serve_http: bool = True,
        cleanup_other_modes: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: the monotonic clock that ages the last full sync (tests inject one)."""
        self.config = config
        self.plugins = plugins or KproxyPluginManager()
        self.node_name = node_name_from(config)
        self.mode = backend.name if backend is not None else resolve_mode(config, self.plugins)
        self._serve_http = serve_http
        self._cleanup_other_modes = cleanup_other_modes and backend is None
        self.state = ProxyState(self.node_name, on_change=self._on_state_change, logger=log)
        self.metrics = self._make_metrics()
        self.backend = backend if backend is not None else self._make_backend()
        sync_path, min_sync_path = type(self.backend).sync_period_options
        self.sync_period = float(config.get(sync_path))
        self.min_sync_period = float(config.get(min_sync_path))
        self.runner = BoundedFrequencyRunner(
            self._sync, min_interval=self.min_sync_period, max_interval=self.sync_period
        )
        self.source = source if source is not None else self._make_source()
        self._backoff = Backoff(initial=max(1.0, self.min_sync_period), cap=self.sync_period)
        #: Why the next sync must be full (None: no reason yet); see `_full_sync_reason`.
        self._full_needed: str | None = "first sync"
        self._clock = clock
        #: When (``clock``) the last full sync succeeded; None before the first one.
        self._last_full_sync: float | None = None
        self._pending_changed: set[ServicePortKey] = set()
        self._pending_previous: dict[ServicePortKey, ResolvedServicePort | None] = {}
        self._pending_triggers: list[float] = []
        self._last_report: SyncReport | None = None
        #: Syncs that took a snapshot, and the number of the one `_last_report` is about:
        #: lets `sync_now` wait for a sync that started after its request.
        self._syncs_started = 0
        self._last_report_number = 0
        self._report_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._servers: Any = None
        self._service_health: Any = None
        self.health = self._make_health()

    # -- construction --------------------------------------------------------------------------

    def _backend_context(self) -> BackendContext:
        return BackendContext(
            config=self.config,
            node_name=self.node_name,
            logger=logging.getLogger(f"kproxy.{self.mode}"),
            plugins=self.plugins,
            metrics=self.metrics,
            request_sync=self._backend_requested_sync,
        )

    def _backend_requested_sync(self) -> None:
        # The backend is built before the runner; a request that early is covered by the
        # first sync anyway.
        runner: BoundedFrequencyRunner | None = getattr(self, "runner", None)
        if runner is not None:
            runner.request(Trigger.REQUESTED)

    def _make_backend(self) -> Backend:
        spec = self.plugins.modes().get(self.mode)
        assert spec is not None  # resolve_mode checked it
        backend_class = spec.load()
        from kproxy_core import capabilities

        problem = capabilities.check(self.mode, backend_class.required_capabilities)
        if problem is not None:
            raise BackendUnavailable(problem)
        context = self._backend_context()
        backend_class.check_supported(context)
        return backend_class(context)

    def _make_source(self) -> Source:
        name = "manifests" if self.config.get("manifests") else "kube"
        spec = self.plugins.sources().get(name)
        if spec is None:
            raise BackendUnavailable(f"source {name!r} is not registered")
        return spec.load()(self.config, self.node_name, self.state)

    def _make_metrics(self) -> Any:
        from kproxy_core.metrics import Metrics

        return Metrics(mode=self.mode)

    def _make_health(self) -> Any:
        from kproxy_core.servers import HealthState

        return HealthState(self.sync_period)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Clean other modes' leftovers, start servers, the source and the sync thread."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        if self._cleanup_other_modes:
            for line in self.plugins.cleanup(self.config, self.mode, log):
                log.info("cleaned up leftover: %s", line)
        self.plugins.configure(self.config)
        if self._serve_http:
            self._start_servers()
        self.source.start()
        self._thread = threading.Thread(target=self.runner.loop, name="kproxy-sync", daemon=True)
        self._thread.start()
        self.runner.request()
        log.info("kproxy started: mode=%s node=%s source=%s", self.mode, self.node_name,
                 self.source.name)

    def _start_servers(self) -> None:
        from kproxy_core.healthcheck import ServiceHealthServer
        from kproxy_core.servers import start_servers

        self._servers = start_servers(
            self.config,
            self.health,
            self.metrics,
            proxy_mode_name=self.mode,
            configz=self._configz,
            debug_handlers=self.debug_handlers(),
        )
        self._service_health = ServiceHealthServer(self.config, self.health)

    def debug_handlers(self) -> dict[str, Any]:
        """Prefix-routed handlers for the metrics server (``/debug/...``)."""
        from kproxy_core import explain

        return {explain.DEBUG_PREFIX: explain.debug_handler(self.view, self.backend)}

    def _configz(self) -> dict[str, Any]:
        as_file = getattr(self.config, "as_file_dict", None)
        return as_file() if callable(as_file) else {}

    def stop(self) -> None:
        """Stop threads and servers. Programmed rules stay (traffic keeps flowing)."""
        self.runner.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.source.stop()
        if self._service_health is not None:
            self._service_health.close()
        if self._servers is not None:
            self._servers.stop()
        self.backend.close()

    # -- state access --------------------------------------------------------------------------

    def view(self) -> NodeView:
        """The current resolved node-local state (what the next sync programs)."""
        return self.state.view()

    def last_report(self) -> SyncReport | None:
        return self._last_report

    def wait_until_synced(self, timeout: float) -> SyncReport:
        """Block until a sync succeeded after both initial lists arrived."""
        deadline = time.monotonic() + timeout
        with self._report_cond:
            while self._last_report is None or not self._last_report.ok:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    detail = self._last_report.error if self._last_report else "no sync yet"
                    raise TimeoutError(f"no successful sync within {timeout}s ({detail})")
                self._report_cond.wait(remaining)
            return self._last_report

    def sync_now(self, *, full: bool = False, timeout: float = 60) -> SyncReport:
        """Ask for a sync (full if ``full``) and wait for its report."""
        with self._report_cond:
            # A sync already running took its decision (and snapshot) before this request.
            wanted = self._syncs_started + 1
            if full:
                self._full_needed = "requested"
            self.runner.request(Trigger.REQUESTED)
            deadline = time.monotonic() + timeout
            while self._last_report_number < wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no sync within {timeout}s")
                self._report_cond.wait(remaining)
            assert self._last_report is not None
            return self._last_report

    # -- the sync loop -------------------------------------------------------------------------

    def _on_state_change(self) -> None:
        self.health.queued_update(time.time())
        self.metrics.queued(time.time())
        self.runner.request()

    def _sync(self, trigger: Trigger) -> None:
        if not self.state.is_synced():
            log.debug("not syncing: waiting for the initial Service and EndpointSlice lists")
            return
        with self._report_cond:
            self._syncs_started += 1
            number = self._syncs_started
            # Taken by this sync: a request arriving while it runs is kept for the next one.
            needed, self._full_needed = self._full_needed, None
        try:
            self._sync_once(trigger, number, needed)
        except BaseException:
            with self._report_cond:
                self._full_needed = self._full_needed or needed or "after a failed sync"
            raise

    def _sync_once(self, trigger: Trigger, number: int, needed: str | None) -> None:
        snapshot = self.state.take_snapshot()
        # Node addresses are not part of any service port (NodePorts render them), so a node
        # change rewrites everything rather than teaching every backend to diff them.
        if snapshot.node_changed:
            needed = needed or "node changed"
        reason = self._full_sync_reason(trigger, needed)
        for key in snapshot.changed:
            self._pending_previous.setdefault(key, snapshot.previous.get(key))
        self._pending_changed |= snapshot.changed
        self._pending_triggers.extend(snapshot.trigger_times)
        full = reason is not None
        view = snapshot.view
        request = SyncRequest(
            view=view,
            changed=frozenset(self._pending_changed),
            full=full,
            previous=dict(self._pending_previous),
        )
        started_wall = time.time()
        started = time.monotonic()
        error: str | None = None
        result = None
        try:
            result = self.backend.sync(request)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if type(exc).__name__ == "RestoreError":  # iptables-restore, in any mode using it
                self.metrics.restore_failure(partial=not full)
        duration = time.monotonic() - started
        report = SyncReport(
            mode=self.mode,
            trigger=trigger,
            full=full,
            full_reason=reason or "",
            started=started_wall,
            duration=duration,
            changed=len(request.changed),
            services=len(view.services),
            result=result,
            error=error,
        )
        if error is None:
            self._after_success(request, report)
        else:
            with self._report_cond:
                self._full_needed = "after a failed sync"
            delay = self._backoff.next_delay()
            self.metrics.sync_error(full)
            log.error("sync failed (%s sync, %d changed); retrying in %.1fs: %s",
                      "full" if full else "partial", len(request.changed), delay, error)
            self.runner.retry_after(delay)
        self.plugins.sync_finished(report)
        with self._report_cond:
            self._last_report = report
            self._last_report_number = number
            self._report_cond.notify_all()

    def _full_sync_reason(self, trigger: Trigger, needed: str | None) -> str | None:
        """Why this sync must be full, or None for a partial one.

        As upstream's iptables/nftables proxiers (``doFullSync``): full when something asked
        for it (start-up, a failed sync, ``sync_now(full=True)``, a node address change), when
        the last full sync is older than `FULL_SYNC_PERIOD` whatever the trigger (a busy node
        may never see a periodic trigger), and, for a backend that reconciles everything every
        period as upstream's IPVS proxier, on the periodic trigger. The backend's own
        ``needs_full_sync`` is asked last: it may read the kernel."""
        if needed is not None:
            return needed
        if self._last_full_sync is None or (
                self._clock() - self._last_full_sync > FULL_SYNC_PERIOD):
            return "full-sync period elapsed"
        if trigger is Trigger.PERIODIC and type(self.backend).periodic_full_sync:
            return "periodic"
        if self.backend.needs_full_sync():
            return "backend asked"
        return None

    def _after_success(self, request: SyncRequest, report: SyncReport) -> None:
        now = time.time()
        if report.full:
            self._last_full_sync = self._clock()
        self._backoff.reset()
        if self.backend.needs_conntrack_cleanup:
            self._clear_stale_conntrack(request)
        if self._service_health is not None:
            self._service_health.sync(health_check_ports(request.view))
        node = self.state.node()
        self.health.sync_node(node.deleting if node is not None else False)
        self.health.updated(now)
        self.metrics.set_no_local_endpoints(*no_local_endpoints(request.view))
        self.metrics.observe_sync(report.duration, report.full)
        self.metrics.synced(now)
        for trigger_time in self._pending_triggers:
            self.metrics.observe_network_programming(max(0.0, now - trigger_time))
        pending_services, pending_endpoints = self.state.pending()
        total_services, total_endpoints = self.state.totals()
        self.metrics.set_changes(pending_services, pending_endpoints, total_services,
                                 total_endpoints)
        if report.result is not None:
            self.metrics.set_backend_counters(report.result.counters)
        self._pending_changed.clear()
        self._pending_previous.clear()
        self._pending_triggers.clear()
        level = logging.INFO if report.full else logging.DEBUG
        # The reason goes last: benchmarks parse the line's head ("synced full: ...").
        log.log(level, "synced %s: %d service ports, %d changed, %.3fs (external %.3fs), "
                "%d objects written%s",
                "full" if report.full else "partial", report.services, report.changed,
                report.duration, report.result.external_seconds if report.result else 0.0,
                report.result.objects_written if report.result else 0,
                f" ({report.full_reason})" if report.full_reason else "")

    def _clear_stale_conntrack(self, request: SyncRequest) -> None:
        udp_keys = [key for key in request.changed if key.name.protocol == "UDP"]
        if not udp_keys:
            return
        try:
            from kproxy_core.kernel import conntrack

            for key in udp_keys:
                conntrack.cleanup_stale_udp(
                    request.previous.get(key), request.view.services.get(key),
                    request.view.node_ips,
                )
        except Exception as exc:  # conntrack trouble must never stop programming
            log.warning("UDP conntrack cleanup failed: %s", exc)


def health_check_ports(view: NodeView) -> Mapping[tuple[str, str], tuple[int, int]]:
    """Per service with a healthCheckNodePort: (port, local endpoints), for the service health
    servers. A service's ports and families share one health port; count distinct local
    endpoint IPs, as upstream counts local endpoints per service."""
    ports: dict[tuple[str, str], int] = {}
    local_ips: dict[tuple[str, str], set[str]] = {}
    for key, port in view.services.items():
        if not port.health_check_node_port:
            continue
        service = (key.name.namespace, key.name.name)
        ports[service] = port.health_check_node_port
        local_ips.setdefault(service, set()).update(
            ep.ip for ep in port.local_endpoints if ep.ready
        )
    return {service: (ports[service], len(local_ips[service])) for service in ports}


def no_local_endpoints(view: NodeView) -> tuple[int, int]:
    """Services whose Local traffic policy leaves no endpoint on this node while the cluster
    has some (upstream's sync_proxy_rules_no_local_endpoints_total, internal and external)."""
    internal = external = 0
    for port in view.services.values():
        if not port.has_any_endpoints or port.local_endpoints:
            continue
        if port.internal_policy_local:
            internal += 1
        if port.external_policy_local and port.is_external_facing:
            external += 1
    return internal, external
