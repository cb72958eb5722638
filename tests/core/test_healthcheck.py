from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from kproxy_core.config import CORE_OPTIONS, load_config
from kproxy_core.healthcheck import ServiceHealthServer, health_body, node_addresses
from kproxy_core.options import OptionRegistry
from kproxy_core.servers import HealthState


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Iterator[tuple[ServiceHealthServer, HealthState]]:
    health = HealthState(30, clock=clock)
    hc = ServiceHealthServer(None, health, addresses=["127.0.0.1"])
    yield hc, health
    hc.close()


def test_body_is_upstream_bytes() -> None:
    assert health_body("ns", "svc", 2, True) == (
        b'{\n\t"service": {\n\t\t"namespace": "ns",\n\t\t"name": "svc"\n\t},\n'
        b'\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'
    )


def test_200_with_local_endpoints_503_without(
    server: tuple[ServiceHealthServer, HealthState],
) -> None:
    hc, _health = server
    a, b = free_port(), free_port()
    assert hc.sync({("ns", "a"): (a, 2), ("ns", "b"): (b, 0)}) == []
    code, headers, body = get(a)
    assert code == 200
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"service": {"namespace": "ns", "name": "a"},
                                "localEndpoints": 2, "serviceProxyHealthy": True}
    code, headers, body = get(b)
    assert code == 503 and headers["X-Load-Balancing-Endpoint-Weight"] == "0"
    assert json.loads(body)["localEndpoints"] == 0
    # Endpoint counts change without reopening the port.
    hc.sync({("ns", "a"): (a, 0), ("ns", "b"): (b, 1)})
    assert get(a)[0] == 503 and get(b)[0] == 200


def test_unhealthy_proxy_makes_every_service_503(
    server: tuple[ServiceHealthServer, HealthState], clock: Clock
) -> None:
    hc, health = server
    port = free_port()
    hc.sync({("ns", "a"): (port, 3)})
    health.updated()
    health.queued_update()
    clock.now += 61
    code, _headers, body = get(port)
    assert code == 503
    assert json.loads(body)["serviceProxyHealthy"] is False
    health.updated()
    assert get(port)[0] == 200


def test_ports_close_and_move(server: tuple[ServiceHealthServer, HealthState]) -> None:
    hc, _health = server
    first, second = free_port(), free_port()
    hc.sync({("ns", "a"): (first, 1)})
    assert get(first)[0] == 200
    hc.sync({("ns", "a"): (second, 1)})
    assert refused(first)
    assert get(second)[0] == 200
    hc.sync({})
    assert refused(second)
    assert hc.ports() == {}


def test_port_in_use_is_reported_and_retried(
    server: tuple[ServiceHealthServer, HealthState],
) -> None:
    hc, _health = server
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    errors = hc.sync({("ns", "a"): (port, 1)})
    assert len(errors) == 1 and errors[0].startswith(
        f"failed to start health check for ns/a on port {port}:")
    busy.close()
    assert hc.sync({("ns", "a"): (port, 1)}) == []
    assert get(port)[0] == 200


def test_node_port_addresses_select_listen_ips() -> None:
    assert node_addresses(()) == [""]
    assert node_addresses(("0.0.0.0/0",)) == [""]
    assert "127.0.0.1" in node_addresses(("127.0.0.0/8",))


def test_listens_on_configured_cidr() -> None:
    options = OptionRegistry()
    for option in CORE_OPTIONS:
        options.add(option)
    config = load_config({"nodeport-addresses": "127.0.0.0/8"}, options)
    hc = ServiceHealthServer(config, lambda: True)
    try:
        port = free_port()
        hc.sync({("default", "lb"): (port, 1)})
        assert get(port)[0] == 200
    finally:
        hc.close()


def test_many_services_share_one_accept_thread(clock: Clock) -> None:
    import threading

    before = threading.active_count()
    hc = ServiceHealthServer(None, None, addresses=["127.0.0.1"])
    try:
        # Hold all 40 probe sockets open while choosing, so no port is handed out twice.
        probes = []
        for _ in range(40):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        chosen = [probe.getsockname()[1] for probe in probes]
        for probe in probes:
            probe.close()
        ports = {("ns", f"s{i}"): (port, i % 2) for i, port in enumerate(chosen)}
        assert hc.sync(ports) == []
        assert threading.active_count() - before <= 1
        for (_ns, name), (port, count) in list(ports.items())[:6]:
            assert get(port)[0] == (200 if count else 503), name
    finally:
        hc.close()
