"""kube-proxy's Prometheus metrics (upstream ``pkg/proxy/metrics``): same names, types, label
names, buckets and ``[ALPHA]`` help text, so existing dashboards and alerts keep working.
kproxy's own additions use the ``kproxy_`` prefix.

Each `Metrics` has its own ``CollectorRegistry``: several proxies (tests, embedding) can live
in one process. As upstream, metrics every mode shares are registered at once; mode-specific
ones (iptables restore failures, rule counts, nftables failures) are registered when the mode
is iptables/ipvs/nftables, or at their first use by any other mode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase

#: The classic text format (what generate_latest writes), as upstream serves it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: ExponentialBuckets(0.001, 2, 15): 1ms .. ~16s.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
#: MergeBuckets starts with a 0 bucket, then 0.25s, 0.5s, 1..59s, 60..115s by 5, 2..5min by 30s.
NETWORK_PROGRAMMING_BUCKETS = (
    0.0,
    0.25,
    0.5,
    *(float(i) for i in range(1, 60)),
    *(float(60 + 5 * i) for i in range(12)),
    *(float(120 + 30 * i) for i in range(7)),
)

_ALPHA = "[ALPHA] "


class _WithoutCreated:
    """prometheus-client adds ``*_created`` series that upstream does not export."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """All metrics of one proxy. Methods are what the sync loop and servers call."""

    def __init__(self, mode: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._registered: set[int] = set()
        self._last_totals: dict[str, int] = {"services": 0, "endpoints": 0}
        r = None  # created unregistered; _use() registers

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"kubeproxy_{name}", _ALPHA + doc, buckets=buckets, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"kubeproxy_{name}", _ALPHA + doc, labelnames=labels, registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"kubeproxy_{name}", _ALPHA + doc, labelnames=labels, registry=r)

        # -- every mode (upstream RegisterMetrics' common part) ---------------------------------
        self.sync_duration = hist(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", SYNC_BUCKETS
        )
        self.last_queued = gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
        )
        self.last_synced = gauge(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
        )
        self.endpoint_changes_pending = gauge(
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes"
        )
        self.endpoint_changes_total = counter(
            "sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes"
        )
        self.service_changes_pending = gauge(
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes"
        )
        self.service_changes_total = counter(
            "sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes"
        )
        self.healthz_total = counter(
            "proxy_healthz_total", "Cumulative proxy healthz HTTP status", ("code",)
        )
        self.livez_total = counter(
            "proxy_livez_total", "Cumulative proxy livez HTTP status", ("code",)
        )
        self.network_programming = hist(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            NETWORK_PROGRAMMING_BUCKETS,
        )
        self.no_local_endpoints = gauge(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ("traffic_policy",),
        )
        # -- mode-specific ----------------------------------------------------------------------
        self.full_sync_duration = hist(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            SYNC_BUCKETS,
        )
        self.partial_sync_duration = hist(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            SYNC_BUCKETS,
        )
        self.restore_failures = counter(
            "sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures",
        )
        self.partial_restore_failures = counter(
            "sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures",
        )
        self.iptables_total = gauge(
            "sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            ("table",),
        )
        self.iptables_last = gauge(
            "sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync",
            ("table",),
        )
        self.nftables_sync_failures = counter(
            "sync_proxy_rules_nftables_sync_failures_total",
            "Cumulative proxy nftables sync failures",
        )
        self.nftables_cleanup_failures = counter(
            "sync_proxy_rules_nftables_cleanup_failures_total",
            "Cumulative proxy nftables cleanup failures",
        )
        # -- kproxy ------------------------------------------------------------------------------
        self.sync_errors = Counter(
            "kproxy_sync_errors_total",
            "Syncs that failed (the core retries with a full sync)",
            ("full",),
            registry=r,
        )
        self.invalid_objects = Counter(
            "kproxy_invalid_objects_total",
            "API objects ignored because they failed validation",
            ("kind",),
            registry=r,
        )
        self.backend_counters = Gauge(
            "kproxy_backend_objects",
            "Counters the proxy mode reported for its last sync",
            ("counter",),
            registry=r,
        )

        for metric in (
            self.sync_duration,
            self.last_queued,
            self.last_synced,
            self.endpoint_changes_pending,
            self.endpoint_changes_total,
            self.service_changes_pending,
            self.service_changes_total,
            self.healthz_total,
            self.livez_total,
            self.network_programming,
            self.no_local_endpoints,
            self.sync_errors,
            self.invalid_objects,
            self.backend_counters,
        ):
            self._use(metric)
        for metric in {
            "iptables": (
                self.full_sync_duration,
                self.partial_sync_duration,
                self.restore_failures,
                self.partial_restore_failures,
                self.iptables_total,
                self.iptables_last,
            ),
            "ipvs": (self.restore_failures,),
            "nftables": (self.nftables_sync_failures, self.nftables_cleanup_failures),
        }.get(mode or "", ()):
            self._use(metric)

    def _use(self, metric: MetricWrapperBase) -> Any:
        if id(metric) not in self._registered:
            with self._lock:
                if id(metric) not in self._registered:
                    self.registry.register(metric)
                    self._registered.add(id(metric))
        return metric

    # -- the sync loop -----------------------------------------------------------------------

    def queued(self, timestamp: float | None = None) -> None:
        """A change was queued for sync (upstream: last_queued_timestamp)."""
        self.last_queued.set(time.time() if timestamp is None else timestamp)

    def observe_sync(self, duration: float, full: bool | None = None) -> None:
        """One sync attempt took ``duration`` seconds (observed whether it succeeded or not,
        as upstream). ``full`` also feeds the full/partial histograms."""
        self.sync_duration.observe(duration)
        if full is not None:
            self._use(self.full_sync_duration if full else self.partial_sync_duration).observe(
                duration
            )

    def synced(self, timestamp: float | None = None) -> None:
        """A sync succeeded (upstream: last_timestamp_seconds)."""
        self.last_synced.set(time.time() if timestamp is None else timestamp)

    def sync_error(self, full: bool) -> None:
        self.sync_errors.labels(full="true" if full else "false").inc()

    def observe_network_programming(self, seconds: float) -> None:
        """From an EndpointSlice's last-change-trigger-time to programmed."""
        self.network_programming.observe(seconds)

    def set_pending(self, services: int, endpoints: int) -> None:
        self.service_changes_pending.set(services)
        self.endpoint_changes_pending.set(endpoints)

    def count_changes(self, services: int = 0, endpoints: int = 0) -> None:
        """Add to the cumulative change counters."""
        if services:
            self.service_changes_total.inc(services)
        if endpoints:
            self.endpoint_changes_total.inc(endpoints)

    def set_changes(
        self,
        pending_services: int,
        pending_endpoints: int,
        total_services: int,
        total_endpoints: int,
    ) -> None:
        """Pending gauges plus cumulative totals given as running counts (the counters advance
        by the difference since the last call; a count that went down is ignored)."""
        self.set_pending(pending_services, pending_endpoints)
        with self._lock:
            d_services = max(0, total_services - self._last_totals["services"])
            d_endpoints = max(0, total_endpoints - self._last_totals["endpoints"])
            self._last_totals = {
                "services": max(total_services, self._last_totals["services"]),
                "endpoints": max(total_endpoints, self._last_totals["endpoints"]),
            }
        self.count_changes(d_services, d_endpoints)

    def set_no_local_endpoints(self, internal: int, external: int) -> None:
        """Services with a Local traffic policy and no local endpoints, per policy."""
        self.no_local_endpoints.labels(traffic_policy="internal").set(internal)
        self.no_local_endpoints.labels(traffic_policy="external").set(external)

    def set_backend_counters(self, counters: Mapping[str, int]) -> None:
        for name, value in counters.items():
            self.backend_counters.labels(counter=name).set(value)

    def invalid_object(self, kind: str) -> None:
        self.invalid_objects.labels(kind=kind).inc()

    # -- mode-specific -------------------------------------------------------------------------

    def restore_failure(self, partial: bool = False) -> None:
        """An iptables-restore failed. As upstream, every failure counts in
        ``..._restore_failures_total`` and a partial one also in ``..._partial_...``."""
        self._use(self.restore_failures).inc()
        if partial:
            self._use(self.partial_restore_failures).inc()

    def set_table_rules(self, table: str, total: int, last: int | None = None) -> None:
        """Rules kproxy owns in ``table`` and (optionally) rules written in the last sync."""
        self._use(self.iptables_total).labels(table=table).set(total)
        if last is not None:
            self._use(self.iptables_last).labels(table=table).set(last)

    def nftables_failure(self, cleanup: bool = False) -> None:
        self._use(self.nftables_cleanup_failures if cleanup else self.nftables_sync_failures).inc()

    # -- servers -------------------------------------------------------------------------------

    def count_healthz(self, code: int) -> None:
        self.healthz_total.labels(code=str(code)).inc()

    def count_livez(self, code: int) -> None:
        self.livez_total.labels(code=str(code)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition (``CONTENT_TYPE``)."""
        return generate_latest(_WithoutCreated(self.registry))  # type: ignore[arg-type,unused-ignore]

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample's current value (tests, ``kproxy explain``)."""
        return self.registry.get_sample_value(name, dict(labels or {}))
