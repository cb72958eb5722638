"""Security defaults, end to end: the CAP_NET_ADMIN check, no secrets in logs, metrics on
localhost, the route_localnet guard, loadBalancerSourceRanges."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_harness import eventually
from reliability_harness import FaultCluster, require_fault_mode

from kproxy_core.demo import endpoint_slice_obj, kproxy_command, service_obj
from kproxy_core.testing.netns import NetNS, Sandbox

pytestmark = pytest.mark.root

TOKEN = "kproxy-test-secret-token-7f3a9c"
PASSWORD = "kproxy-test-secret-password-51b2"


@pytest.fixture
def ns() -> Iterator[NetNS]:
    with Sandbox() as sb:
        yield sb.netns("security")


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_missing_cap_net_admin_is_one_clear_line(ns: NetNS, mode: str) -> None:
    require_fault_mode(mode)
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop CAP_NET_ADMIN", pytrace=False)
    ns.sysctl("net.ipv4.conf.all.route_localnet", "0")  # a new netns inherits the host's
    proc = ns.run(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
                   *kproxy_command(), f"--proxy-mode={mode}",
                   "--kubeconfig=/nonexistent/kubeconfig", "--hostname-override=node"],
                  check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0] and mode in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    saved = ns.run(["iptables-nft-save"]).stdout + ns.run(["iptables-legacy-save"]).stdout
    assert "KUBE-" not in saved
    assert ns.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "0"


# ------------------------------------------------------------------------------------------------
# Secrets
# ------------------------------------------------------------------------------------------------


def _kubeconfig(server: str, **user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request 401 (the path where clients like to dump request details) and
    keeps the Authorization headers it saw."""

    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization", ""))
        body = (b'{"kind":"Status","apiVersion":"v1","status":"Failure",'
                b'"message":"Unauthorized","reason":"Unauthorized","code":401}')
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _assert_no_secret(text: str, where: str) -> None:
    for secret in (TOKEN, PASSWORD, TOKEN[-12:]):
        assert secret not in text, f"{where} contains a credential ({secret[:8]}...)"


def test_kubeconfig_token_never_logged_when_rejected(tmp_path: Path) -> None:
    c = FaultCluster("iptables", tmp_path)
    server: ThreadingHTTPServer | None = None
    try:
        _Recorder.seen = []

        def listen() -> ThreadingHTTPServer:
            return ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)

        server = c.in_node.call(listen)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        c.kubeconfig.write_text(yaml.safe_dump(
            _kubeconfig(f"http://127.0.0.1:{port}", token=TOKEN)))
        # Not start_kproxy: it waits for /healthz, and a proxy that cannot list may not get
        # there. Run it at --v=10 while every request is rejected.
        from e2e_harness import Kproxy

        kp = c.kproxy = Kproxy(c.sb.node, c.kproxy_argv("--v=10"), c.workdir / "kproxy-1.log")
        eventually("requests with the token", lambda: len(_Recorder.seen) >= 3, timeout=30)
        time.sleep(1.0)
        kp.stop(signal.SIGTERM)
        assert f"Bearer {TOKEN}" in _Recorder.seen, _Recorder.seen[:3]
        log = c.log()
        assert "401" in log or "Unauthorized" in log, log[-3000:]
        _assert_no_secret(log, "kproxy's log")
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        c.close()


def test_kubeconfig_credentials_never_logged_in_normal_operation(tmp_path: Path) -> None:
    c = FaultCluster("iptables", tmp_path)
    try:
        c.kubeconfig.write_text(yaml.safe_dump(_kubeconfig(c.api_url, token=TOKEN)))
        c.start_kproxy("--v=10")
        ip = "10.96.16.1"
        c.apply(service_obj("s", ip), endpoint_slice_obj("s", c.eps("pod-1-2")))
        c.wait_answered_by(c.pod("pod-1-3"), ip, 80, {"pod-1-2"})
        # Errors, reconnects and relists at the highest verbosity.
        c.api.set_fault(http_500=True)
        c.api.drop_watches()
        time.sleep(2.0)
        c.api.set_fault(http_500=False)
        c.api.compact()
        c.api.drop_watches()
        c.apply(endpoint_slice_obj("s", c.eps("pod-2-2")))
        c.wait_answered_by(c.pod("pod-1-3"), ip, 80, {"pod-2-2"})
        status, body = c.http("http://127.0.0.1:10249/configz")
        assert status == 200, body
        assert c.kproxy is not None
        c.kproxy.stop(signal.SIGTERM)
        _assert_no_secret(c.log(), "kproxy's log")
        _assert_no_secret(body, "/configz")
    finally:
        c.close()


# ------------------------------------------------------------------------------------------------
# Listeners, route_localnet, source ranges
# ------------------------------------------------------------------------------------------------


def _listeners(ns: NetNS) -> list[str]:
    return ns.run(["ss", "-Hltn"]).stdout.split()


def test_metrics_on_localhost_by_default(tmp_path: Path) -> None:
    c = FaultCluster("iptables", tmp_path)
    try:
        from e2e_harness import Kproxy

        # The harness passes --metrics-bind-address; here only the defaults apply.
        argv = [a for a in c.kproxy_argv() if not a.startswith(("--metrics-bind-address",
                                                                 "--healthz-bind-address"))]
        kp = c.kproxy = Kproxy(c.sb.node, argv, c.workdir / "kproxy-1.log")
        eventually("metrics listening", lambda: any(
            a.endswith(":10249") for a in _listeners(c.sb.node)) or None)
        listening = _listeners(c.sb.node)
        assert "127.0.0.1:10249" in listening, listening
        assert not [a for a in listening if a.endswith(":10249") and a != "127.0.0.1:10249"]
        # /healthz is for the node's load balancers: all addresses, as upstream.
        eventually("healthz listening", lambda: "0.0.0.0:10256" in _listeners(c.sb.node))
        assert kp.alive()
    finally:
        c.close()


def test_route_localnet_guard(tmp_path: Path) -> None:
    c = FaultCluster("iptables", tmp_path)
    try:
        c.sb.node.sysctl("net.ipv4.conf.all.route_localnet", "0")
        c.start_kproxy()
        c.apply(service_obj("np", "10.96.17.1", type="NodePort"),
                endpoint_slice_obj("np", c.eps("pod-1-2")))
        c.wait_answered_by(c.pod("pod-1-3"), "10.96.17.1", 80, {"pod-1-2"})
        node = c.sb.node
        assert node.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "1"
        saved = node.run(["iptables-nft-save", "-t", "filter"]).stdout
        guard = [line for line in saved.splitlines() if line.startswith("-A KUBE-FIREWALL")
                 and "! -s 127.0.0.0/8 -d 127.0.0.0/8" in line and "-j DROP" in line]
        assert guard, saved
        assert "-A INPUT -j KUBE-FIREWALL" in saved, saved
    finally:
        c.close()
    # Localhost NodePorts off: route_localnet is left alone.
    (tmp_path / "off").mkdir()
    c = FaultCluster("iptables", tmp_path / "off")
    try:
        # A new namespace inherits the host's value: start from 0 to see that nobody sets it.
        c.sb.node.sysctl("net.ipv4.conf.all.route_localnet", "0")
        c.start_kproxy("--iptables-localhost-nodeports=false")
        assert c.sb.node.run(
            ["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "0"
    finally:
        c.close()


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_load_balancer_source_ranges_follow_updates(tmp_path: Path, mode: str) -> None:
    require_fault_mode(mode)
    c = FaultCluster(mode, tmp_path)
    try:
        c.start_kproxy()
        vip, lb = "10.96.18.1", "10.98.18.1"
        client = c.sb.client

        def svc(ranges: list[str]) -> dict[str, Any]:
            return service_obj("lb", vip, type="LoadBalancer", load_balancer_ips=[lb],
                               source_ranges=ranges)

        c.apply(svc([f"{c.sb.node_ip}/32", "10.99.0.100/32"]),
                endpoint_slice_obj("lb", c.eps("pod-1-2")))
        c.wait_answered_by(client, lb, 80, {"pod-1-2"})
        c.apply(svc(["192.0.2.0/24"]))
        c.wait_not_answered(client, lb, 80)
        c.apply(svc([]))  # no ranges: open to all again
        c.wait_answered_by(client, lb, 80, {"pod-1-2"})
    finally:
        c.close()

