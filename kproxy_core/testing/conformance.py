"""A conformance suite every backend (built-in or third-party) runs against itself.

The suite drives a backend through sequences of node-local states and compares what the
backend reports it programmed with what the model says must be reachable. Usage, in the
plugin's tests::

    from kproxy_core.testing.conformance import BackendConformance, Flow

    class TestMyModeConformance(BackendConformance):
        mode = "mymode"

        def dataplane(self, backend):
            # Read back what is programmed (kernel state, listener table...) as
            # {Flow(kind, protocol, address, port): frozenset({"10.0.0.1:80", ...})}
            ...

A kernel mode overrides `isolated` to run each scenario inside a network namespace it creates
(see ``kproxy_core.testing.innetns``), so the suite never touches the host.

Flows: ``Flow("cluster", "TCP", cluster_ip, port)`` for ClusterIP traffic,
``Flow("external", proto, ip, port)`` for externalIPs and load-balancer IPs and
``Flow("nodeport", proto, "", node_port)`` for node ports. The value is the set of endpoints
("ip:port") a new connection can reach; an empty set means the traffic is rejected or dropped.
A flow that the model does not contain must not appear.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

import attrs

from kproxy_core.backend import Backend, BackendContext, SyncRequest
from kproxy_core.model import (
    Endpoint,
    NodeView,
    ResolvedServicePort,
    ServicePortKey,
    ServicePortName,
)
from kproxy_core.plugins import KproxyPluginManager

T = TypeVar("T")


@attrs.frozen(order=True)
class Flow:
    kind: Literal["cluster", "external", "nodeport"]
    protocol: str
    address: str
    port: int


Dataplane = Mapping[Flow, frozenset[str]]


class OptionDefaults:
    """A `ConfigView` with every registered option at its default, plus overrides."""

    def __init__(self, plugins: KproxyPluginManager, overrides: Mapping[str, Any] | None = None):
        self._values = {option.path: option.default for option in plugins.options()}
        self._values.update(overrides or {})

    def get(self, path: str) -> Any:
        if path not in self._values:
            raise KeyError(f"no option {path!r} is registered")
        return self._values[path]


def expected_dataplane(view: NodeView) -> dict[Flow, frozenset[str]]:
    """What the model says each flow reaches."""
    flows: dict[Flow, frozenset[str]] = {}
    for port in view.services.values():
        proto = port.protocol
        internal = frozenset(ep.address for ep in port.internal_endpoints)
        external = frozenset(ep.address for ep in port.external_endpoints)
        flows[Flow("cluster", proto, port.cluster_ip, port.port)] = internal
        for ip in (*port.external_ips, *port.load_balancer_ips):
            flows[Flow("external", proto, ip, port.port)] = external
        if port.node_port:
            flows[Flow("nodeport", proto, f"v{port.family}", port.node_port)] = external
    return flows


def diff_views(
    old: NodeView | None, new: NodeView
) -> tuple[frozenset[ServicePortKey], dict[ServicePortKey, ResolvedServicePort | None]]:
    """The ``changed`` keys and ``previous`` values between two views, as the core computes."""
    before = dict(old.services) if old is not None else {}
    changed = {k for k in before.keys() | new.services.keys()
               if before.get(k) != new.services.get(k)}
    return frozenset(changed), {k: before.get(k) for k in changed}


# --------------------------------------------------------------------------------------------
# Scenario building blocks
# --------------------------------------------------------------------------------------------

NODE = "node-a"


def endpoint(ip: str, port: int = 8080, *, local: bool = False, ready: bool = True) -> Endpoint:
    return Endpoint(ip=ip, port=port, is_local=local, ready=ready, serving=ready,
                    terminating=False, node_name=NODE if local else "node-b")


def service_port(
    name: str,
    cluster_ip: str,
    port: int,
    endpoints: Iterable[Endpoint] = (),
    *,
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP",
    namespace: str = "default",
    port_name: str = "p",
    **fields: Any,
) -> ResolvedServicePort:
    eps = tuple(sorted(endpoints))
    family: Literal[4, 6] = 6 if ":" in cluster_ip else 4
    local = tuple(ep for ep in eps if ep.is_local)
    policy_local = fields.get("external_policy_local") or fields.get("internal_policy_local")
    return ResolvedServicePort(
        key=ServicePortKey(family, ServicePortName(namespace, name, port_name, protocol)),
        cluster_ip=cluster_ip,
        port=port,
        cluster_endpoints=eps,
        local_endpoints=local if policy_local else (),
        all_reachable_endpoints=eps,
        has_any_endpoints=bool(eps),
        **fields,
    )


def node_view(*ports: ResolvedServicePort, node_ips: tuple[str, ...] = ("10.99.0.1",)) -> NodeView:
    return NodeView(node_name=NODE, node_ips=node_ips, zone="",
                    services={p.key: p for p in ports})


EP1, EP2, EP3 = endpoint("10.244.1.2"), endpoint("10.244.2.2"), endpoint("10.244.2.3")
LOCAL1 = endpoint("10.244.1.3", local=True)


class BackendConformance:
    """Subclass it in a test module; pytest collects the ``test_*`` methods."""

    #: The mode name the plugin registers.
    mode: ClassVar[str]
    #: Option overrides for the backend's config (e.g. ``{"clusterCIDR": "10.244.0.0/16"}``).
    config_overrides: ClassVar[Mapping[str, Any]] = {}
    #: Families the backend is expected to program in this environment.
    families: ClassVar[tuple[int, ...]] = (4,)

    # -- what a subclass provides ---------------------------------------------------------------

    def dataplane(self, backend: Backend) -> Dataplane:
        raise NotImplementedError("a conformance subclass must read back its dataplane")

    def isolated(self, func: Callable[[], T]) -> T:
        """Run one scenario; kernel modes run ``func`` inside a fresh network namespace."""
        return func()

    def plugin_manager(self) -> KproxyPluginManager:
        return KproxyPluginManager()

    def make_backend(self) -> Backend:
        plugins = self.plugin_manager()
        spec = plugins.modes().get(self.mode)
        assert spec is not None, f"mode {self.mode!r} is not registered by any installed plugin"
        context = BackendContext(
            config=OptionDefaults(plugins, self.config_overrides),
            node_name=NODE,
            logger=logging.getLogger(f"kproxy.conformance.{self.mode}"),
            plugins=plugins,
        )
        backend_class = spec.load()
        backend_class.check_supported(context)
        return backend_class(context)

    # -- the driver -----------------------------------------------------------------------------

    def run_steps(self, steps: Iterable[tuple[NodeView, bool]]) -> None:
        """Sync each (view, full) in order on one backend; after each, the dataplane must
        equal the model's expectation."""
        steps = list(steps)

        def scenario() -> None:
            backend = self.make_backend()
            try:
                previous: NodeView | None = None
                for index, (view, full) in enumerate(steps):
                    changed, before = diff_views(previous, view)
                    backend.sync(SyncRequest(view=view, changed=changed, full=full,
                                             previous=before))
                    got = dict(self.dataplane(backend))
                    want = expected_dataplane(view)
                    wrong = {f: want[f] for f in want if got.get(f) != want[f]}
                    unexpected = {f: got[f] for f in got if f not in want}
                    assert got == want, (
                        f"step {index} ({'full' if full else 'partial'}): dataplane differs\n"
                        f"  missing or wrong: {wrong}\n  unexpected: {unexpected}"
                    )
                    previous = view
            finally:
                backend.close()

        self.isolated(scenario)

    # -- the suite --------------------------------------------------------------------------------

    def test_mode_is_registered(self) -> None:
        spec = self.plugin_manager().modes().get(self.mode)
        assert spec is not None, f"no installed plugin registers mode {self.mode!r}"
        assert spec.distribution, "the mode's distribution is unknown (not an entry point?)"
        assert spec.load().name == self.mode

    def test_entry_point_module_imports_nothing_native(self) -> None:
        plugins = self.plugin_manager()
        spec = plugins.modes().get(self.mode)
        assert spec is not None
        modules = [
            getattr(plugin, "__name__", "")
            for plugin in plugins.get_plugins()
            if plugins.distribution_of(plugin) == spec.distribution
        ]
        code = (
            "import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "bad = sorted(m for m in ('iptc', 'pyroute2', 'nftables') if m in sys.modules)\n"
            "print(','.join(bad))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == "", f"importing {modules} imported native libraries: {out}"

    def test_mode_options_use_the_mode_prefix(self) -> None:
        for option in self.plugin_manager().options():
            if option.owner == self.mode and option.flag is not None:
                assert option.flag.startswith(f"--{self.mode}-"), option.flag

    def test_cleanup_hook_is_implemented(self) -> None:
        plugins = self.plugin_manager()
        spec = plugins.modes().get(self.mode)
        assert spec is not None
        owners = {plugins.distribution_of(impl.plugin)
                  for impl in plugins.hook.kproxy_cleanup.get_hookimpls()}
        assert spec.distribution in owners, "the mode's plugin does not implement kproxy_cleanup"

    def test_first_full_sync(self) -> None:
        view = node_view(
            service_port("web", "10.96.0.10", 80, [EP1, EP2]),
            service_port("dns", "10.96.0.11", 53, [EP2, EP3], protocol="UDP"),
        )
        self.run_steps([(view, True)])

    def test_partial_syncs_follow_changes(self) -> None:
        a1 = service_port("web", "10.96.0.10", 80, [EP1])
        b1 = service_port("api", "10.96.0.12", 443, [EP2])
        a2 = service_port("web", "10.96.0.10", 80, [EP1, EP3])
        b2 = service_port("api", "10.96.0.12", 443, [EP3])
        self.run_steps([
            (node_view(a1), True),
            (node_view(a1, b1), False),      # service added
            (node_view(a2, b1), False),      # endpoint added
            (node_view(a2, b2), False),      # endpoint replaced
            (node_view(b2), False),          # service removed
        ])

    def test_service_without_endpoints_is_programmed_empty(self) -> None:
        self.run_steps([
            (node_view(service_port("empty", "10.96.0.20", 80, [])), True),
            (node_view(service_port("empty", "10.96.0.20", 80, [EP1])), False),
            (node_view(service_port("empty", "10.96.0.20", 80, [])), False),
        ])

    def test_full_sync_removes_stale_state(self) -> None:
        a = service_port("web", "10.96.0.10", 80, [EP1])
        b = service_port("api", "10.96.0.12", 443, [EP2])
        self.run_steps([(node_view(a, b), True), (node_view(b), True), (node_view(b), True)])

    def test_node_ports_and_external_addresses(self) -> None:
        port = service_port("np", "10.96.0.30", 80, [EP1, EP2], node_port=30080,
                            external_ips=("10.98.0.5",), load_balancer_ips=("10.98.1.5",))
        self.run_steps([(node_view(port), True)])

    def test_external_traffic_policy_local(self) -> None:
        port = service_port("local", "10.96.0.31", 80, [EP1, LOCAL1], node_port=30081,
                            external_policy_local=True)
        none_local = service_port("local", "10.96.0.31", 80, [EP1], node_port=30081,
                                  external_policy_local=True)
        self.run_steps([(node_view(port), True), (node_view(none_local), False)])

    def test_internal_traffic_policy_local(self) -> None:
        port = service_port("itp", "10.96.0.32", 80, [EP1, LOCAL1], internal_policy_local=True)
        self.run_steps([(node_view(port), True)])

    def test_session_affinity_keeps_the_endpoint_set(self) -> None:
        port = service_port("sticky", "10.96.0.33", 80, [EP1, EP2],
                            session_affinity_timeout=10800)
        changed = service_port("sticky", "10.96.0.33", 80, [EP1, EP2],
                               session_affinity_timeout=60)
        self.run_steps([(node_view(port), True), (node_view(changed), False)])
