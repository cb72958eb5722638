"""`UserspaceProxier`: the userspace mode's `Backend`.

``sync`` (core sync thread) decides which listeners must exist, has the relay loop create or
update them (`DataPlane.call`), rewrites the portal chains so traffic reaches them, and only
then closes listeners that are no longer referenced, so no rule ever points at a closed port.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

from kproxy_core.backend import (
    AlgorithmSpec,
    Backend,
    BackendContext,
    BackendUnavailable,
    SyncError,
    SyncRequest,
    SyncResult,
)
from kproxy_core.model import ResolvedServicePort, ServicePortKey, ip_family
from kproxy_core.options import ModeConfigError
from kproxy_userspace import rules
from kproxy_userspace.relay import DataPlane, Limits, LoopUnavailable, RateLimitedLog

Role = Literal["internal", "external"]
ListenerId = tuple[ServicePortKey, Role]

DEFAULTS: Mapping[str, Any] = {
    "userspace.algorithm": "round-robin",
    "userspace.udpIdleTimeout": 0.25,
    "userspace.maxConnections": 0,
    "userspace.connectRetries": 4,
    "userspace.relay": "auto",
    "userspace.eventLoop": "auto",
}


def _option(context: BackendContext, path: str) -> Any:
    try:
        value = context.config.get(path)
    except (KeyError, LookupError):
        value = None
    return DEFAULTS[path] if value is None else value


def resolve_algorithm(context: BackendContext) -> AlgorithmSpec:
    name = _option(context, "userspace.algorithm")
    registry = context.plugins.algorithms()
    spec = registry.get(name)
    if spec is None:
        raise ModeConfigError(
            f"--userspace-algorithm={name!r} is not a registered load-balancing algorithm; "
            f"registered: {', '.join(registry.names()) or 'none'}"
        )
    return spec


class UserspaceProxier(Backend):
    name = "userspace"
    needs_conntrack_cleanup = False

    @classmethod
    def check_supported(cls, context: BackendContext) -> None:
        resolve_algorithm(context)
        if _option(context, "userspace.eventLoop") == "uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError as exc:
                raise BackendUnavailable(
                    "--userspace-event-loop=uvloop but uvloop is not installed "
                    "(pip install 'kproxy-userspace[uvloop]')") from exc
        for family in context.families:
            if family == 4:
                rules.make_writer(4)

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.algorithm = resolve_algorithm(context)
        self.limits = Limits(
            max_connections=int(_option(context, "userspace.maxConnections")),
            connect_retries=int(_option(context, "userspace.connectRetries")),
            udp_idle_timeout=float(_option(context, "userspace.udpIdleTimeout")),
            relay=_option(context, "userspace.relay"),
            event_loop=_option(context, "userspace.eventLoop"),
        )
        self.log = context.logger
        self._warn = RateLimitedLog(self.log, interval=300)
        if context.metrics is not None:
            # Served on the process's /metrics next to upstream's metrics.
            from kproxy_userspace.relay import METRICS

            for collector in METRICS:
                context.metrics.registry.register(collector)
        self.writers: dict[int, rules.Writer] = {}
        for family in context.families:
            try:
                self.writers[family] = rules.make_writer(family)
            except BackendUnavailable as exc:
                if family == 4 or len(context.families) == 1:
                    raise
                self.log.warning("userspace: IPv%d services are not proxied: %s", family, exc)
        try:
            self.plane = DataPlane(self.limits, self.log)
        except LoopUnavailable as exc:
            raise BackendUnavailable(str(exc)) from exc
        self.plane.start()
        #: What is programmed: service port → its portal (listener ports).
        self.portals: dict[ServicePortKey, rules.Portal] = {}
        self._ports: dict[ServicePortKey, ResolvedServicePort] = {}

    # -- sync --------------------------------------------------------------------------------

    def _wanted(self, port: ResolvedServicePort) -> dict[Role, tuple[Any, ...]]:
        wanted: dict[Role, tuple[Any, ...]] = {"internal": port.internal_endpoints}
        if port.is_external_facing and port.external_endpoints != port.internal_endpoints:
            wanted["external"] = port.external_endpoints
        return wanted

    def _apply(self, ports: dict[ServicePortKey, ResolvedServicePort | None],
               full: bool) -> tuple[dict[ServicePortKey, rules.Portal | None], list[ListenerId]]:
        """On the loop thread: create/update listeners; the new portals and the listeners to
        close once the rules no longer reference them."""
        plane = self.plane
        portals: dict[ServicePortKey, rules.Portal | None] = {}
        keep: set[ListenerId] = set()
        for key, port in ports.items():
            if port is None:
                portals[key] = None
                continue
            listener_ports: dict[Role, int] = {}
            for role, endpoints in self._wanted(port).items():
                lid: ListenerId = (key, role)
                keep.add(lid)
                listener_ports[role] = plane.set_listener(
                    lid, port.protocol, port.family, endpoints, self.algorithm,
                    port.session_affinity_timeout, str(port.name),
                )
            internal = listener_ports["internal"]
            portals[key] = rules.Portal(port, internal, listener_ports.get("external", internal))
        stale = [
            lid for lid in plane.listeners
            if lid not in keep and (full or lid[0] in ports)
        ]
        return portals, stale

    def _close(self, stale: list[ListenerId]) -> int:
        return sum(self.plane.remove_listener(lid) for lid in stale)

    def sync(self, request: SyncRequest) -> SyncResult:
        view = request.view
        services = view.services
        keys = set(services) if request.full else set(request.changed)
        if request.full:
            keys |= set(self.portals)
        wanted: dict[ServicePortKey, ResolvedServicePort | None] = {}
        for key in keys:
            port = services.get(key)
            if port is not None and (port.family not in self.writers
                                     or port.protocol == "SCTP"):
                self._warn.warning(f"skip:{port.family}:{port.protocol}",
                                   f"userspace: {port.protocol} over IPv{port.family} is not "
                                   f"proxied by this mode (first: {port.name})")
                port = None
            wanted[key] = port
        try:
            portals, stale = self.plane.call(self._apply, wanted, request.full)
        except OSError as exc:
            raise SyncError(f"userspace: cannot open a listener: {exc}") from exc
        for key, portal in portals.items():
            if portal is None:
                self.portals.pop(key, None)
            else:
                self.portals[key] = portal

        external_seconds = 0.0
        rule_total = 0
        written = 0
        for family, writer in self.writers.items():
            node_ip = next((ip for ip in view.node_ips if ip_family(ip) == family), None)
            if node_ip is None and any(p.port.family == family for p in self.portals.values()):
                self._warn.warning(f"nodeip:{family}",
                                   f"userspace: the node has no IPv{family} address: traffic "
                                   f"from the node itself to IPv{family} services is not "
                                   "proxied")
            data = rules.render(self.portals.values(), node_ip, family)
            started = time.monotonic()
            if request.full:
                written += rules.ensure_jumps(writer)
            writer.restore(data)
            external_seconds += time.monotonic() - started
            rule_total += rules.rule_count(data)
        written += len(portals)
        written += self.plane.call(self._close, stale)
        return SyncResult(
            objects_written=written,
            counters={"listeners": len(self.plane.listeners), "portal_rules": rule_total},
            external_seconds=external_seconds,
        )

    # -- the rest of the Backend interface ---------------------------------------------------

    def describe(self, key: ServicePortKey) -> Mapping[str, Any]:
        portal = self.portals.get(key)
        if portal is None:
            return {}

        def listener_info() -> dict[str, Any]:
            info: dict[str, Any] = {}
            for role in ("internal", "external"):
                listener = self.plane.listeners.get((key, role))
                if listener is not None:
                    info[role] = {
                        "port": listener.port,
                        "endpoints": [e.address for e in listener.balancer.endpoints],
                        "open_connections": len(listener.balancer.open),
                    }
            return info

        return {
            "algorithm": self.algorithm.name,
            "internal_listener": portal.internal_listener,
            "external_listener": portal.external_listener,
            "listeners": self.plane.call(listener_info),
        }

    def close(self) -> None:
        self.plane.stop()
