from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from kproxy_core.config import CORE_OPTIONS, Config, load_config
from kproxy_core.metrics import NETWORK_PROGRAMMING_BUCKETS, SYNC_BUCKETS, Metrics
from kproxy_core.options import OptionRegistry
from kproxy_core.servers import HealthState, ServerError, Servers, go_time, start_servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(**flags: str) -> Config:
    options = OptionRegistry()
    for option in CORE_OPTIONS:
        options.add(option)
    return load_config(flags, options)


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


# -- HealthState (upstream ProxyHealthServer semantics) ------------------------------------------


def test_healthy_while_starting_and_after_sync() -> None:
    clock = Clock()
    health = HealthState(30, clock=clock)
    assert health.health_timeout == 60
    assert health.is_healthy()
    health.queued_update()
    clock.now += 1000  # no first sync yet: still "starting up", healthy as upstream
    assert health.is_healthy()
    health.updated()
    assert health.is_healthy()


def test_unhealthy_when_queued_change_waits_past_timeout() -> None:
    clock = Clock()
    health = HealthState(30, clock=clock)
    health.updated()
    health.queued_update()
    clock.now += 59
    health.queued_update()  # a later change does not reset the oldest queued time
    assert health.is_healthy()
    clock.now += 1
    assert not health.is_healthy()
    health.updated()
    assert health.is_healthy()


def test_node_deletion_affects_healthz_not_livez() -> None:
    clock = Clock()
    health = HealthState(30, clock=clock)
    health.updated()
    health.sync_node(deleting=True)
    code, body = health.body(include_node=True)
    assert code == 503
    assert json.loads(body)["nodeEligible"] is False
    code, body = health.body(include_node=False)
    assert code == 200 and "nodeEligible" not in json.loads(body)
    health.sync_node(deleting=False, taints=["ToBeDeletedByClusterAutoscaler"])
    assert health.body(include_node=True)[0] == 503
    health.sync_node(deleting=False)
    assert health.body(include_node=True)[0] == 200


def test_body_like_upstream_json() -> None:
    clock = Clock()
    health = HealthState(1, clock=clock, families=(4, 6))
    health.updated(now=clock.now - 10)
    health.queued_update(now=clock.now - 5)
    code, body = health.body(include_node=True)
    assert code == 503
    assert body.decode() == (
        '{"lastUpdated":"2023-11-14T22:13:10Z","currentTime":"2023-11-14T22:13:20Z",'
        '"nodeEligible":true,"healthy":false,"status":{'
        '"IPv4":{"lastUpdated":"2023-11-14T22:13:10Z","healthy":false},'
        '"IPv6":{"lastUpdated":"2023-11-14T22:13:10Z","healthy":false}}}'
    )
    health.updated()
    code, body = health.body(include_node=False)
    assert code == 200
    # Healthy: lastUpdated is "now", as upstream reports for compatibility.
    assert json.loads(body)["lastUpdated"] == json.loads(body)["currentTime"]


def test_go_time() -> None:
    assert go_time(None) == "0001-01-01T00:00:00Z"
    assert go_time(1_700_000_000.5) == "2023-11-14T22:13:20.5Z"
    assert go_time(1_700_000_000.25) == "2023-11-14T22:13:20.25Z"
    assert go_time(1_700_000_000) == "2023-11-14T22:13:20Z"


# -- metrics -----------------------------------------------------------------------------------


def test_metric_buckets_match_upstream() -> None:
    assert len(SYNC_BUCKETS) == 15 and SYNC_BUCKETS[0] == 0.001
    assert abs(SYNC_BUCKETS[-1] - 16.384) < 1e-9
    assert NETWORK_PROGRAMMING_BUCKETS[:4] == (0.0, 0.25, 0.5, 1.0)
    assert NETWORK_PROGRAMMING_BUCKETS[-1] == 300.0
    assert len(NETWORK_PROGRAMMING_BUCKETS) == 1 + 2 + 59 + 12 + 7


def test_metrics_names_types_and_values() -> None:
    metrics = Metrics("iptables")
    metrics.observe_sync(0.003, full=False)
    metrics.synced(123.0)
    metrics.queued(120.0)
    metrics.set_changes(1, 2, 10, 20)
    metrics.set_changes(0, 0, 12, 20)
    metrics.restore_failure(partial=True)
    metrics.set_table_rules("nat", 100, 7)
    metrics.set_no_local_endpoints(1, 2)
    metrics.count_healthz(503)
    text = metrics.render().decode()
    for line in (
        "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
        'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.004"} 1.0',
        "# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter",
        "kubeproxy_sync_proxy_rules_service_changes_total 12.0",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 20.0",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds 123.0",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds 120.0",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 1.0",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1.0",
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total 1.0",
        'kubeproxy_sync_proxy_rules_iptables_total{table="nat"} 100.0',
        'kubeproxy_sync_proxy_rules_iptables_last{table="nat"} 7.0',
        'kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"} 2.0',
        'kubeproxy_proxy_healthz_total{code="503"} 1.0',
        "# HELP kubeproxy_network_programming_duration_seconds [ALPHA] In Cluster Network "
        "Programming Latency in seconds",
    ):
        assert line in text, line
    assert "_created" not in text


def test_mode_specific_metrics_registered_like_upstream() -> None:
    ipvs = Metrics("ipvs").render().decode()
    assert "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 0.0" in ipvs
    assert "sync_full_proxy_rules" not in ipvs
    other = Metrics("userspace")
    assert "iptables_restore" not in other.render().decode()
    other.restore_failure()  # first use registers it
    assert "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1.0" in (
        other.render().decode())
    # Separate registries: two proxies in one process do not collide.
    Metrics("iptables"), Metrics("iptables")


# -- the HTTP servers --------------------------------------------------------------------------


@pytest.fixture
def servers() -> Iterator[tuple[Servers, HealthState, Metrics]]:
    config = make_config(**{"healthz-bind-address": f"127.0.0.1:{free_port()}",
                            "metrics-bind-address": f"127.0.0.1:{free_port()}"})
    health = HealthState(30)
    metrics = Metrics("iptables")
    running = start_servers(
        config, health, metrics, proxy_mode_name="iptables",
        configz=config.as_file_dict,
        debug_handlers={"/debug/services/": lambda path: (200, "text/plain", path.encode()),
                        "/debug/": lambda path: (404, "text/plain", b"nothing")},
    )
    yield running, health, metrics
    running.stop()


def test_healthz_and_livez(servers: tuple[Servers, HealthState, Metrics]) -> None:
    running, health, metrics = servers
    base = f"http://{running.healthz_address}"
    code, headers, body = get(base + "/healthz")
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["nodeEligible"] is True
    health.sync_node(deleting=True)
    assert get(base + "/healthz")[0] == 503
    assert get(base + "/livez")[0] == 200
    assert get(base + "/nope")[0] == 404
    assert metrics.sample("kubeproxy_proxy_healthz_total", {"code": "200"}) == 1
    assert metrics.sample("kubeproxy_proxy_healthz_total", {"code": "503"}) == 1
    assert metrics.sample("kubeproxy_proxy_livez_total", {"code": "200"}) == 1


def test_metrics_server_routes(servers: tuple[Servers, HealthState, Metrics]) -> None:
    running, _health, metrics = servers
    base = f"http://{running.metrics_address}"
    metrics.observe_sync(0.01, full=True)
    code, headers, body = get(base + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"kubeproxy_sync_full_proxy_rules_duration_seconds_count 1.0" in body
    assert get(base + "/proxyMode")[2] == b"iptables"
    configz = json.loads(get(base + "/configz")[2])
    assert configz["kubeproxy.config.k8s.io"]["iptables"]["syncPeriod"] == "30s"
    assert get(base + "/healthz")[2] == b"ok"
    code, _headers, body = get(base + "/debug/services/ns/name")
    assert (code, body) == (200, b"/debug/services/ns/name")
    assert get(base + "/debug/other")[0] == 404


def test_empty_address_disables_server() -> None:
    config = make_config(**{"healthz-bind-address": "", "metrics-bind-address": ""})
    running = start_servers(config, HealthState(30), Metrics(), proxy_mode_name="x",
                            configz=dict)
    assert running.healthz_address is None and running.metrics_address is None
    running.stop()


def test_bind_failure_hard_fail_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = make_config(**{"healthz-bind-address": f"127.0.0.1:{port}",
                                "metrics-bind-address": "", "bind-address-hard-fail": "true"})
        with pytest.raises(ServerError) as info:
            start_servers(config, HealthState(30), Metrics(), proxy_mode_name="x", configz=dict)
        assert str(info.value).startswith(f"failed to start healthz server on 127.0.0.1:{port}:")
        assert "\n" not in str(info.value)


def test_bind_failure_retries_without_hard_fail() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    config = make_config(**{"healthz-bind-address": f"127.0.0.1:{port}",
                            "metrics-bind-address": ""})
    running = start_servers(config, HealthState(30), Metrics(), proxy_mode_name="x",
                            configz=dict, retry_interval=0.05)
    try:
        assert running.healthz_address is None
        busy.close()
        deadline = time.monotonic() + 5
        while running.healthz_address is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.healthz_address == f"127.0.0.1:{port}"
        assert get(f"http://127.0.0.1:{port}/livez")[0] == 200
    finally:
        running.stop()
