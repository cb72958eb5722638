"""`kproxy explain` against a live kproxy (iptables mode) and the live kernel, in a sandbox:
kproxy runs as its own process in the node namespace with the example manifests, and the
explain command runs in the same namespace (the metrics server listens on its loopback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy_core.testing.netns import ClusterSandbox

pytestmark = pytest.mark.root

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "manifests"
KPROXY = [sys.executable, "-m", "kproxy_core.cli"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSandbox]:
    manifests = tmp_path_factory.mktemp("manifests")
    shutil.copytree(EXAMPLES, manifests, dirs_exist_ok=True)
    cluster = ClusterSandbox(local_pods=2, remote_pods=1)
    try:
        for pod in cluster.pods:
            cluster.start_echo(pod)
        cluster.node.spawn([*KPROXY, "--proxy-mode=iptables", f"--manifests={manifests}",
                            "--hostname-override=node", "--cluster-cidr=10.244.0.0/16",
                            "--healthz-bind-address=127.0.0.1:10256",
                            "--metrics-bind-address=127.0.0.1:10249"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        # /healthz answers 200 before the first sync (as upstream's): wait for a sync in
        # the metrics instead, else the first SYN can beat the rules and stick in conntrack.
        while time.monotonic() < deadline:
            probe = cluster.node.run([sys.executable, "-c", (
                "import urllib.request,sys;"
                "text=urllib.request.urlopen('http://127.0.0.1:10249/metrics').read().decode();"
                "sys.exit(0 if any(line.startswith("
                "'kubeproxy_sync_proxy_rules_last_timestamp_seconds ') and "
                "float(line.split()[1]) > 0 for line in text.splitlines()) else 1)")],
                check=False)
            if probe.returncode == 0:
                break
            time.sleep(0.3)
        else:
            pytest.fail("kproxy did not become healthy in the sandbox within 60 s")
        yield cluster
    finally:
        cluster.close()


def _explain(cluster: ClusterSandbox, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.node.run([*KPROXY, "explain", *args], check=False)


def test_explain_shows_model_rules_and_verdict(live: ClusterSandbox) -> None:
    # Traffic first, so the counters in the report are not all zero.
    live.pods[1].ns.run([sys.executable, "-m", "kproxy_core.testing.echo", "tcp",
                         "10.96.0.10", "80", "--count", "3"])
    proc = _explain(live, "default/web", "--from", "10.244.1.3", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (port,) = report["ports"]
    assert report["mode"] == "iptables"
    assert {ep["address"] for ep in port["internalEndpoints"]} == {
        "10.244.1.2:8080", "10.244.1.3:8080"}
    nat = port["programmed"]["tables"]["nat"]
    svc_chains = [chain for chain in nat if chain.startswith("KUBE-SVC-")]
    assert len(svc_chains) == 1
    assert sum(rule["packets"] for chain in nat.values() for rule in chain) >= 3
    (verdict,) = port["verdicts"]
    assert verdict["verdict"] == "ACCEPT"
    assert sorted(verdict["endpoints"]) == ["10.244.1.2:8080", "10.244.1.3:8080"]


def test_explain_text_and_all(live: ClusterSandbox) -> None:
    text = _explain(live, "default/api")
    assert text.returncode == 0, text.stderr
    assert "externalTrafficPolicy" not in text.stdout  # the text form is for people
    assert "external endpoints (1):" in text.stdout
    assert "10.244.2.2:8080  (node node2)" in text.stdout
    summary = _explain(live, "--all", "--json")
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["drift"] == []


def test_explain_unknown_service_is_one_line(live: ClusterSandbox) -> None:
    proc = _explain(live, "default/nope")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "not proxied on this node" in proc.stderr
