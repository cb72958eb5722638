"""Pieces of the userspace mode that need no root: rule text, options, balancer, relay on
loopback."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator

import pytest
from kproxy_userspace import plugin, rules
from kproxy_userspace.proxier import resolve_algorithm
from kproxy_userspace.relay import (
    REGISTRY,
    SPLICE_AFTER,
    Balancer,
    DataPlane,
    Limits,
    RateLimitedLog,
    RelayMode,
)

from kproxy_core.algorithms import BUILTIN_ALGORITHMS
from kproxy_core.backend import BackendContext, BackendUnavailable
from kproxy_core.model import Endpoint, ResolvedServicePort, ServicePortKey, ServicePortName
from kproxy_core.options import OptionError, OptionRegistry
from kproxy_core.plugins import KproxyPluginManager

ALGORITHMS = {spec.name: spec for spec in BUILTIN_ALGORITHMS}


def ep(ip: str, port: int = 8080) -> Endpoint:
    return Endpoint(ip, port, is_local=True, ready=True, serving=True, terminating=False)


def port(**extra: object) -> ResolvedServicePort:
    key = ServicePortKey(4, ServicePortName("ns1", "svc1", "p80", "TCP"))
    fields: dict[str, object] = dict(key=key, cluster_ip="10.96.0.10", port=80,
                                     cluster_endpoints=(ep("10.244.1.2"),))
    fields.update(extra)
    return ResolvedServicePort(**fields)  # type: ignore[arg-type]


def test_render_matches_upstream_rule_shapes() -> None:
    portal = rules.Portal(port(node_port=30080, external_ips=("10.98.0.5",),
                               load_balancer_ips=("10.98.0.7",),
                               load_balancer_source_ranges=("10.1.0.0/16",)), 40001, 40002)
    text = rules.render([portal], "10.99.0.1", 4).render()
    common = "-m comment --comment ns1/svc1:p80 -p tcp -m tcp --dport"
    expected = [
        "*filter",
        ":KUBE-NODEPORT-NON-LOCAL - [0:0]",
        ":KUBE-PORTALS-REJECT - [0:0]",
        f"-A KUBE-NODEPORT-NON-LOCAL {common} 40002 -m state --state NEW -j ACCEPT",
        "COMMIT",
        "*nat",
        ":KUBE-PORTALS-CONTAINER - [0:0]",
        ":KUBE-PORTALS-HOST - [0:0]",
        ":KUBE-NODEPORT-CONTAINER - [0:0]",
        ":KUBE-NODEPORT-HOST - [0:0]",
        f"-A KUBE-PORTALS-CONTAINER {common} 80 -d 10.96.0.10/32 -j REDIRECT --to-ports 40001",
        f"-A KUBE-PORTALS-HOST {common} 80 -d 10.96.0.10/32 -j DNAT --to-destination "
        "10.99.0.1:40001",
        f"-A KUBE-PORTALS-CONTAINER {common} 80 -d 10.98.0.5/32 -j REDIRECT --to-ports 40002",
        f"-A KUBE-PORTALS-HOST {common} 80 -d 10.98.0.5/32 -j DNAT --to-destination "
        "10.99.0.1:40002",
        f"-A KUBE-PORTALS-CONTAINER {common} 80 -s 10.1.0.0/16 -d 10.98.0.7/32 -j REDIRECT "
        "--to-ports 40002",
        f"-A KUBE-PORTALS-HOST {common} 80 -s 10.1.0.0/16 -d 10.98.0.7/32 -j DNAT "
        "--to-destination 10.99.0.1:40002",
        f"-A KUBE-NODEPORT-CONTAINER {common} 30080 -j REDIRECT --to-ports 40002",
        f"-A KUBE-NODEPORT-HOST {common} 30080 -j DNAT --to-destination 10.99.0.1:40002",
        "COMMIT",
        "",
    ]
    assert text.split("\n") == expected


def test_render_filters_family_and_skips_host_rules_without_node_ip() -> None:
    data = rules.render([rules.Portal(port(), 1, 1)], None, 4)
    assert [r for t in data.tables.values() for r in t.rules] == [
        "-A KUBE-PORTALS-CONTAINER -m comment --comment ns1/svc1:p80 -p tcp -m tcp --dport 80 "
        "-d 10.96.0.10/32 -j REDIRECT --to-ports 1"
    ]
    assert rules.rule_count(rules.render([rules.Portal(port(), 1, 1)], "fd00::1", 6)) == 0


def test_services_without_endpoints_get_reject_or_drop_instead_of_a_portal() -> None:
    common = "-m comment --comment ns1/svc1:p80 -p tcp -m tcp --dport"
    nothing = rules.render([rules.Portal(port(cluster_endpoints=(), node_port=30080), 1, 2)],
                           "10.99.0.1", 4)
    assert nothing.tables["nat"].rules == []
    assert nothing.tables["filter"].rules == [
        f"-A KUBE-PORTALS-REJECT {common} 80 -d 10.96.0.10/32 -j REJECT",
        f"-A KUBE-PORTALS-REJECT {common} 30080 -m addrtype --dst-type LOCAL -j REJECT",
    ]
    # eTP Local without a local endpoint: ClusterIP still served, external traffic dropped.
    local = rules.render([rules.Portal(port(node_port=30080, external_policy_local=True,
                                            has_any_endpoints=True), 1, 2)], "10.99.0.1", 4)
    assert local.tables["filter"].rules == [
        f"-A KUBE-PORTALS-REJECT {common} 30080 -m addrtype --dst-type LOCAL -j DROP"]
    assert len(local.tables["nat"].rules) == 2  # the ClusterIP portal (container + host)


def test_plugin_registers_mode_and_options() -> None:
    pm = KproxyPluginManager(load_entrypoints=False)
    pm.register(plugin, name="kproxy-userspace")
    assert "userspace" in pm.modes().names()
    registry = OptionRegistry()
    plugin.kproxy_add_options(registry)
    timeout = registry.by_flag("--userspace-udp-idle-timeout")
    assert timeout is not None and timeout.default == 0.25 and timeout.owner == "userspace"
    assert timeout.parse("1s") == 1.0
    with pytest.raises(OptionError):
        timeout.parse("0s")
    relay = registry.get("userspace.relay")
    assert relay is not None
    with pytest.raises(OptionError):
        relay.parse("zerocopy")
    event_loop = registry.get("userspace.eventLoop")
    assert event_loop is not None and event_loop.default == "auto"
    with pytest.raises(OptionError):
        event_loop.parse("trio")
    assert plugin.kproxy_cleanup(config=None, keep_mode="userspace",  # type: ignore[arg-type]
                                 logger=logging.getLogger()) == []


class _Config:
    def __init__(self, **values: object) -> None:
        self.values = values

    def get(self, path: str) -> object:
        return self.values.get(path)


def test_unknown_algorithm_is_one_clear_error() -> None:
    context = BackendContext(config=_Config(**{"userspace.algorithm": "fastest"}),
                             node_name="n", logger=logging.getLogger(),
                             plugins=KproxyPluginManager(load_entrypoints=False))
    with pytest.raises(BackendUnavailable) as info:
        resolve_algorithm(context)
    assert str(info.value) == (
        "--userspace-algorithm='fastest' is not a registered load-balancing algorithm; "
        "registered: least-connections, random, round-robin")


def test_balancer_keeps_counts_and_affinity_across_endpoint_changes() -> None:
    a, b, c = ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")
    balancer = Balancer(ALGORITHMS["least-connections"], [a, b], None)
    conn = object()
    balancer.opened(conn, balancer.pick("x", []) or a)
    first = balancer.open[conn]
    balancer.update([a, b, c], None)
    picks = {balancer.pick("x", []) for _ in range(2)}
    assert first not in picks  # the open connection still counts after the rebuild
    balancer.closed(conn)
    assert balancer.open == {}

    sticky = Balancer(ALGORITHMS["round-robin"], [a, b, c], 60)
    chosen = sticky.pick("1.1.1.1", [])
    sticky.update([c, b, a], 60)
    assert sticky.pick("1.1.1.1", []) == chosen


def test_rate_limited_log_counts_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("t"), interval=3600)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            log.warning("k", "too many")
    assert [r.getMessage() for r in caplog.records] == ["too many"]


# -- the relay on loopback ---------------------------------------------------------------------


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def echo(c: socket.socket = conn) -> None:
                # A relay cut by DataPlane.stop resets its endpoint side: not an error here.
                with c, contextlib.suppress(ConnectionResetError):
                    while data := c.recv(65536):
                        c.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.fixture(params=[("splice", "asyncio"), ("copy", "asyncio"), ("auto", "asyncio"),
                        ("auto", "uvloop"), ("copy", "uvloop")],
                ids=lambda p: "-".join(p))
def plane(request: pytest.FixtureRequest) -> Iterator[DataPlane]:
    relay, loop = request.param
    if loop == "uvloop":
        pytest.importorskip("uvloop")  # the optional extra kproxy-userspace[uvloop]
    dp = DataPlane(Limits(relay=relay, event_loop=loop), logging.getLogger("relay"))
    assert dp.loop_name == loop
    dp.start()
    yield dp
    dp.stop()


def test_relay_moves_bytes_and_retries_dead_endpoints(plane: DataPlane) -> None:
    server, live = _echo_server()
    dead_sock = socket.socket()
    dead_sock.bind(("127.0.0.1", 0))
    dead = dead_sock.getsockname()[1]
    dead_sock.close()  # nothing listens there: connection refused
    try:
        endpoints = [ep("127.0.0.1", dead), ep("127.0.0.1", live)]
        listen = plane.call(plane.set_listener, "k", "TCP", 4, endpoints,
                            ALGORITHMS["round-robin"], None, "ns/loop:tcp")
        payload = bytes(range(256)) * 4096
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", listen), timeout=5) as client:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := client.recv(65536):
                    received += chunk
            assert received == payload
        failures = REGISTRY.get_sample_value("kproxy_userspace_connect_failures_total",
                                             {"service": "ns/loop:tcp", "protocol": "TCP"})
        assert failures is not None and failures >= 1
        assert plane.call(plane.remove_listener, "k")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listen), timeout=2)
    finally:
        server.close()


def test_udp_sessions_expire_after_idle_timeout(plane: DataPlane) -> None:
    backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    backend.bind(("127.0.0.1", 0))
    backend.settimeout(2)
    try:
        listen = plane.call(plane.set_listener, "u", "UDP", 4,
                            [ep("127.0.0.1", backend.getsockname()[1])],
                            ALGORITHMS["round-robin"], None, "ns/loop:udp")
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(2)
        client.connect(("127.0.0.1", listen))
        client.send(b"hello")
        data, peer = backend.recvfrom(100)
        assert data == b"hello"
        backend.sendto(b"world", peer)
        assert client.recv(100) == b"world"  # connected socket: came from the listener
        assert plane.call(lambda: plane.active) == 1
        threading.Event().wait(0.6)  # default idle timeout is 250 ms
        assert plane.call(lambda: plane.active) == 0
        client.close()
    finally:
        backend.close()


def test_per_service_metrics_are_served_with_the_core_metrics() -> None:
    from kproxy_core.metrics import Metrics
    from kproxy_core.testing.conformance import OptionDefaults
    from kproxy_core.testing.innetns import in_netns
    from kproxy_core.testing.netns import Sandbox

    def build_and_render() -> bytes:
        from kproxy_userspace.proxier import UserspaceProxier

        plugins = KproxyPluginManager()
        metrics = Metrics(mode="userspace")
        proxier = UserspaceProxier(BackendContext(
            config=OptionDefaults(plugins), node_name="node", logger=logging.getLogger("t"),
            plugins=plugins, families=(4,), metrics=metrics))
        try:
            return metrics.render()
        finally:
            proxier.close()

    with Sandbox() as sandbox:
        text = in_netns(sandbox.netns("node").name, build_and_render).decode()
    assert "# TYPE kproxy_userspace_active_connections gauge" in text
    assert "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram" in text


def test_event_loop_falls_back_to_asyncio_and_refuses_a_missing_uvloop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import sys

    from kproxy_userspace.relay import LoopUnavailable, new_event_loop

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    loop, name = new_event_loop("auto")
    try:
        assert name == "asyncio"
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()
    with pytest.raises(LoopUnavailable, match=r"kproxy-userspace\[uvloop\]"):
        new_event_loop("uvloop")


@pytest.mark.parametrize("relay", ["auto", "splice"])
def test_auto_relay_takes_pipes_only_for_bulk(relay: RelayMode) -> None:
    """Under ``auto`` a connection that only exchanges small messages holds no pipe (two fds
    and up to a MiB of pipe memory per direction); bulk directions still splice."""
    dp = DataPlane(Limits(relay=relay, event_loop="asyncio"), logging.getLogger("relay"))
    dp.start()
    server, port = _echo_server()
    try:
        listen = dp.call(dp.set_listener, "k", "TCP", 4, [ep("127.0.0.1", port)],
                         ALGORITHMS["round-robin"], None, "ns/pipes:tcp")
        with socket.create_connection(("127.0.0.1", listen), timeout=5) as client:
            client.sendall(b"ping\n")
            assert client.recv(100) == b"ping\n"
            small = dp.call(dp.stats)["pipes_in_use"]
            payload = b"x" * (4 * SPLICE_AFTER)
            sender = threading.Thread(target=client.sendall, args=(payload,))
            sender.start()
            received = 0
            while received < len(payload):
                received += len(client.recv(1 << 20))
            sender.join()
            bulk = dp.call(dp.stats)["pipes_in_use"]
        assert (small, bulk) == ((0, 2) if relay == "auto" else (2, 2))
    finally:
        server.close()
        dp.stop()
