"""The process lifecycle, for every proxy mode: a killed and restarted kproxy, ``--cleanup``,
and the quick-start demo itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from e2e_harness import Cluster, answered, eventually, scaled

from kproxy_core.demo import endpoint_slice_obj, kproxy_command, service_obj

pytestmark = pytest.mark.root


def test_kill_and_restart_keeps_traffic_flowing(own_cluster: Cluster) -> None:
    c = own_cluster
    ip = "10.96.5.1"
    c.start_kproxy()
    c.apply(service_obj("live", ip), endpoint_slice_obj("live", c.eps("pod-1-2", "pod-2-2")))
    pod = c.pod("pod-1-3")
    c.wait_answered_by(pod, ip, 80, {"pod-1-2", "pod-2-2"}, count=16)

    # (phase, reply): phases "down" (killed), "starting" (new process not yet healthy), "up".
    outcomes: list[tuple[str, str]] = []
    phase = "down"
    stop = threading.Event()

    def background() -> None:
        while not stop.is_set():
            outcomes.extend((phase, reply) for reply in c.send(pod, ip, 80, 1))

    assert c.kproxy is not None
    c.kproxy.stop(signal.SIGKILL)
    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    try:
        # Changes made while the proxy is down are picked up when it is back.
        c.apply(endpoint_slice_obj("live", c.eps("pod-2-2")))
        time.sleep(1.0)
        phase = "starting"
        c.start_kproxy()
        phase = "up"
        c.wait_answered_by(pod, ip, 80, {"pod-2-2"}, count=8)
    finally:
        stop.set()
        thread.join(timeout=30)
    if c.mode == "userspace":
        # The userspace proxy relays every connection itself: nothing flows while it is down.
        return
    assert any(p == "down" for p, _ in outcomes), "no request was sent while kproxy was down"
    failed = [(p, o) for p, o in outcomes if not answered(o)]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed}"


def _saved_rules(c: Cluster) -> str:
    out = []
    for tool in ("iptables-legacy-save", "iptables-nft-save",
                 "ip6tables-legacy-save", "ip6tables-nft-save"):
        proc = c.sb.node.run([tool], check=False)
        out.append(proc.stdout)
    return "\n".join(out)


def test_cleanup_removes_everything_and_only_that(own_cluster: Cluster) -> None:
    c = own_cluster
    ip = "10.96.5.2"
    # Another agent's chain and rule in the node namespace: --cleanup must leave them alone.
    c.sb.node.run(["iptables", "-t", "nat", "-N", "OTHER-AGENT"])
    c.sb.node.run(["iptables", "-t", "nat", "-A", "OTHER-AGENT", "-d", "192.0.2.1/32",
                   "-j", "RETURN"])
    kp = c.start_kproxy()
    c.apply(service_obj("gone", ip), endpoint_slice_obj("gone", c.eps("pod-1-2")))
    c.wait_answered_by(c.pod("pod-1-3"), ip, 80, {"pod-1-2"})

    assert kp.stop(signal.SIGTERM) == 0, kp.log_tail()
    if c.mode != "userspace":
        # Rules stay when the process exits.
        assert answered(c.send(c.pod("pod-1-3"), ip, 80)[0])

    proc = c.sb.node.run([*kproxy_command(), "--cleanup", "--v=2"], check=False,
                         timeout=scaled(60))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    eventually("service gone after --cleanup",
               lambda: not answered(c.send(c.pod("pod-1-3"), ip, 80)[0]), timeout=5)
    saved = _saved_rules(c)
    # KUBE-FIREWALL is the kubelet's chain too: upstream creates it but never removes it.
    ours = [line for line in saved.splitlines()
            if "KUBE-" in line and "KUBE-FIREWALL" not in line]
    assert not ours, ours
    assert "OTHER-AGENT -d 192.0.2.1/32 -j RETURN" in saved, saved
    sets = c.sb.node.run(["ipset", "list", "-n"], check=False).stdout.split()
    assert not [s for s in sets if s.startswith("KUBE-")], sets
    links = c.sb.node.run(["ip", "-o", "link", "show"]).stdout
    assert "kube-ipvs0" not in links
    # A second run finds nothing to do and still succeeds.
    again = c.sb.node.run([*kproxy_command(), "--cleanup"], check=False, timeout=scaled(60))
    assert again.returncode == 0, again.stdout + again.stderr


def test_demo(mode: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "kproxy_core.demo", f"--proxy-mode={mode}",
                           "--json"], capture_output=True, text=True, timeout=scaled(300),
                          check=False)
    summary = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    assert proc.returncode == 0 and summary.get("ok"), proc.stdout[-4000:] + proc.stderr[-2000:]


def test_unknown_mode_names_installed_modes() -> None:
    proc = subprocess.run([*kproxy_command(), "--proxy-mode=nonexistent"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "nonexistent" in lines[0]
    assert "iptables" in lines[0], lines[0]
