"""The two HTTP servers of upstream kube-proxy.

* healthz (``healthzBindAddress``, 0.0.0.0:10256): ``/healthz`` and ``/livez``, with upstream's
  ProxyHealthServer rule: unhealthy once a queued change has waited longer than the health
  timeout (2 x sync period) without a successful sync; ``/healthz`` is also unhealthy while the
  Node is being deleted (or tainted ToBeDeletedByClusterAutoscaler), ``/livez`` ignores that.
* metrics (``metricsBindAddress``, 127.0.0.1:10249): ``/metrics``, ``/proxyMode``, ``/configz``,
  ``/healthz`` (plain "ok", as upstream's mux) and prefix-routed debug handlers.

An empty address disables a server. A bind failure is fatal with ``bindAddressHardFail``;
otherwise it is logged and retried every 5 seconds, as upstream.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs

from kproxy_core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kproxy_core.metrics import Metrics

log = logging.getLogger(__name__)

#: Taint the cluster autoscaler sets before deleting a node.
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
RETRY_INTERVAL = 5.0

DebugHandler = Callable[[str], tuple[int, str, bytes]]


class ServerError(RuntimeError):
    """A server could not start (one line, names the address)."""


def go_time(timestamp: float | None) -> str:
    """A timestamp as Go's ``time.Time`` marshals to JSON (RFC 3339 with nanoseconds, trailing
    zeros trimmed); None is Go's zero time."""
    if timestamp is None:
        return "0001-01-01T00:00:00Z"
    # Microseconds: a float timestamp carries no more, and rounding there avoids ".249999872".
    nanos = round(timestamp * 1e6) * 1000
    seconds, frac = divmod(nanos, 1_000_000_000)
    base = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f".{frac:09d}".rstrip("0") if frac else ""
    return f"{base}{fraction}Z"


# --------------------------------------------------------------------------------------------
# Health state
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ProxyHealth:
    healthy: bool
    #: The most recent successful sync of any family (None: never).
    last_updated: float | None
    current_time: float
    #: Per family ("IPv4", "IPv6"): (last updated, healthy).
    status: Mapping[str, tuple[float | None, bool]]


def _family_name(family: int | str) -> str:
    return family if isinstance(family, str) else f"IPv{family}"


class HealthState:
    """Upstream's ProxyHealthServer bookkeeping, without the HTTP part.

    ``queued_update`` when a change is queued, ``updated`` after a successful sync. A family
    is unhealthy when its oldest unprogrammed change is older than the health timeout. Before
    the first ``updated`` the proxy is healthy (it is starting up), as upstream.
    """

    def __init__(
        self,
        sync_period: float,
        *,
        families: Iterable[int | str] = (4,),
        health_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.health_timeout = 2 * sync_period if health_timeout is None else health_timeout
        self.families = tuple(_family_name(f) for f in families)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_updated: dict[str, float] = {}
        self._oldest_queued: dict[str, float] = {}
        self._node_eligible = True

    def _pick(self, family: int | str | None) -> tuple[str, ...]:
        return self.families if family is None else (_family_name(family),)

    def queued_update(self, now: float | None = None, family: int | str | None = None) -> None:
        now = self._clock() if now is None else now
        with self._lock:
            for name in self._pick(family):
                self._oldest_queued.setdefault(name, now)

    def updated(self, now: float | None = None, family: int | str | None = None) -> None:
        now = self._clock() if now is None else now
        with self._lock:
            for name in self._pick(family):
                self._oldest_queued.pop(name, None)
                self._last_updated[name] = now

    def sync_node(self, deleting: bool, taints: Iterable[str] = ()) -> None:
        """Node eligibility: not being deleted and not tainted for deletion."""
        eligible = not deleting and TO_BE_DELETED_TAINT not in set(taints)
        with self._lock:
            self._node_eligible = eligible

    @property
    def node_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    def health(self, now: float | None = None) -> ProxyHealth:
        now = self._clock() if now is None else now
        with self._lock:
            status: dict[str, tuple[float | None, bool]] = {}
            healthy = True
            for name, last in self._last_updated.items():
                queued = self._oldest_queued.get(name)
                ok = queued is None or now - queued < self.health_timeout
                status[name] = (last, ok)
                healthy = healthy and ok
            last_updated = max(self._last_updated.values(), default=None)
        return ProxyHealth(healthy, last_updated, now, status)

    def is_healthy(self, now: float | None = None) -> bool:
        """The proxier's health, ignoring the Node (what service health checks use)."""
        return self.health(now).healthy

    def body(self, *, include_node: bool, now: float | None = None) -> tuple[int, bytes]:
        """Status code and JSON body of ``/healthz`` (``include_node``) or ``/livez``, in the
        field order upstream's ``json.Marshal`` produces."""
        health = self.health(now)
        healthy = health.healthy
        document: dict[str, Any] = {}
        last_updated = health.last_updated
        if include_node:
            healthy = healthy and self.node_eligible
        if healthy:
            # Upstream reports "now" when healthy, for compatibility with older releases.
            last_updated = health.current_time
        document["lastUpdated"] = go_time(last_updated)
        document["currentTime"] = go_time(health.current_time)
        if include_node:
            document["nodeEligible"] = self.node_eligible
        document["healthy"] = health.healthy
        if health.status:
            document["status"] = {
                name: {"lastUpdated": go_time(last), "healthy": ok}
                for name, (last, ok) in sorted(health.status.items())
            }
        return (200 if healthy else 503), json.dumps(document, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


Route = Callable[[str], tuple[int, Mapping[str, str], bytes]]


def send_reply(handler: BaseHTTPRequestHandler, code: int, headers: Mapping[str, str],
               body: bytes) -> None:
    """Write one complete response (no body for HEAD). Shared by every server the core runs."""
    handler.send_response(code)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path
        try:
            code, headers, body = self.server.route(path)
        except Exception:
            log.exception("handler for %s failed", path)
            code, headers, body = 500, {"Content-Type": "text/plain"}, b"internal error\n"
        send_reply(self, code, headers, body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], family: int, route: Route) -> None:
        self.address_family = family
        self.route = route
        super().__init__(address, _Handler)


def _split(address: str) -> tuple[str, int, int]:
    from kproxy_core.config import split_host_port

    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return host, port, family


class _Listener:
    """One HTTP server that binds now, or keeps retrying in the background."""

    def __init__(
        self, name: str, address: str, route: Route, hard_fail: bool, retry_interval: float
    ) -> None:
        self.name = name
        self.address = address
        self._route = route
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        error = self._try_bind()
        if error is not None:
            message = f"failed to start {name} server on {address}: {error}"
            if hard_fail:
                raise ServerError(message)
            log.error("%s; retrying every %.0fs", message, retry_interval)
            self._thread = threading.Thread(
                target=self._retry, args=(retry_interval,), name=f"kproxy-{name}-retry", daemon=True
            )
            self._thread.start()

    def _try_bind(self) -> str | None:
        host, port, family = _split(self.address)
        try:
            server = _Server((host, port), family, self._route)
        except OSError as exc:
            return exc.strerror or str(exc)
        with self._lock:
            if self._stop.is_set():
                server.server_close()
                return None
            self._server = server
            threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name=f"kproxy-{self.name}",
                daemon=True,
            ).start()
        log.info("serving %s on %s", self.name, self.bound_address)
        return None

    def _retry(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self._try_bind() is None:
                return

    @property
    def bound_address(self) -> str | None:
        """``host:port`` actually bound (resolves port 0), or None while not bound."""
        with self._lock:
            if self._server is None:
                return None
            raw_host, port = self._server.server_address[:2]
        host = raw_host.decode() if isinstance(raw_host, bytes) else str(raw_host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Servers:
    """The running servers; ``stop()`` closes them."""

    def __init__(self, healthz: _Listener | None, metrics: _Listener | None) -> None:
        self._healthz = healthz
        self._metrics = metrics

    @property
    def healthz_address(self) -> str | None:
        return self._healthz.bound_address if self._healthz else None

    @property
    def metrics_address(self) -> str | None:
        return self._metrics.bound_address if self._metrics else None

    def stop(self) -> None:
        for listener in (self._healthz, self._metrics):
            if listener is not None:
                listener.stop()


_JSON = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}
_TEXT = {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"}


def healthz_routes(health: HealthState, metrics: Metrics) -> Route:
    def route(raw_path: str) -> tuple[int, Mapping[str, str], bytes]:
        path = raw_path.split("?", 1)[0]
        if path in ("/healthz", "/livez"):
            code, body = health.body(include_node=path == "/healthz")
            (metrics.count_healthz if path == "/healthz" else metrics.count_livez)(code)
            return code, _JSON, body
        return 404, _TEXT, b"404 page not found\n"

    return route


def metrics_routes(
    metrics: Metrics,
    proxy_mode_name: str,
    configz: Callable[[], Mapping[str, Any]],
    debug_handlers: Mapping[str, DebugHandler],
) -> Route:
    prefixes = sorted(debug_handlers, key=len, reverse=True)

    def route(raw_path: str) -> tuple[int, Mapping[str, str], bytes]:
        path = raw_path.split("?", 1)[0]
        if path == "/metrics":
            return 200, {"Content-Type": METRICS_CONTENT_TYPE}, metrics.render()
        if path == "/proxyMode":
            return 200, _TEXT, proxy_mode_name.encode()
        if path == "/configz":
            body = json.dumps({"kubeproxy.config.k8s.io": configz()}, indent=2).encode()
            return 200, _JSON, body
        if path == "/healthz":
            return 200, _TEXT, b"ok"
        for prefix in prefixes:
            if path.startswith(prefix):
                # Debug handlers get the query string too (explain's ?from=IP).
                code, content_type, body = debug_handlers[prefix](raw_path)
                return code, {"Content-Type": content_type}, body
        return 404, _TEXT, b"404 page not found\n"

    return route


def start_servers(
    config: Any,
    health: HealthState,
    metrics: Metrics,
    *,
    proxy_mode_name: str,
    configz: Callable[[], Mapping[str, Any]],
    debug_handlers: Mapping[str, DebugHandler] | None = None,
    retry_interval: float = RETRY_INTERVAL,
) -> Servers:
    """Start the healthz and metrics servers of ``config`` (a `kproxy_core.config.Config` or
    any ConfigView with ``healthzBindAddress``, ``metricsBindAddress`` and
    ``bindAddressHardFail``). Raises `ServerError` on a bind failure with hard-fail set.

    ``configz`` returns the configuration shown at ``/configz`` (wrapped in
    ``{"kubeproxy.config.k8s.io": ...}`` as upstream). ``debug_handlers`` maps a path prefix
    (``"/debug/services/"``) to ``handler(path) -> (status, content type, body)``.
    """
    hard_fail = bool(config.get("bindAddressHardFail"))
    healthz_address = str(config.get("healthzBindAddress") or "")
    metrics_address = str(config.get("metricsBindAddress") or "")
    healthz = metrics_listener = None
    if healthz_address:
        healthz = _Listener(
            "healthz", healthz_address, healthz_routes(health, metrics), hard_fail, retry_interval
        )
    if metrics_address:
        try:
            metrics_listener = _Listener(
                "metrics",
                metrics_address,
                metrics_routes(metrics, proxy_mode_name, configz, debug_handlers or {}),
                hard_fail,
                retry_interval,
            )
        except ServerError:
            if healthz is not None:
                healthz.stop()
            raise
    return Servers(healthz, metrics_listener)
