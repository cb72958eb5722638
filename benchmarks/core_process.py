"""The whole kproxy process at scale, with the kernel out of the picture: `kproxy` (the real
CLI, the kube source over HTTP, parsing, resolution, change tracking, the sync loop, servers)
in the template plugin's `memory` mode, against the fake API server holding N Services and N
EndpointSlices (5 endpoints each). Prints, per N:

* start → first successful sync (initial lists over HTTP included);
* one-endpoint change: API write → the sync that carries it finished (from the process's own
  metrics), i.e. watch delivery + core time + the (trivial) memory backend;
* the kproxy process's peak RSS (VmHWM).

Targets (issue 2): initial list to resolved model ≤ 5 s and process ≤ 200 MB RSS at 10k x 5;
a one-endpoint change resolved in ≤ 10 ms of core time (see core_scale.py for the core-only
number; this one adds HTTP watch delivery and a min-sync-period of 0).

    python benchmarks/core_process.py [N ...]        (needs: pip install tests/sample_plugin)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from core_scale import endpoint_slice, service

from kproxy_core.testing.apiserver import ApiServer
from kproxy_core.testing.signals import exit_on_signals


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _metric(url: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # 503 before the first sync: serving all the same
    except OSError:
        return False


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(count: int) -> dict[str, Any]:
    api = ApiServer(bookmark_interval=5.0)
    api.start()
    for i in range(count):
        api.create("Service", service(i))
        api.create("EndpointSlice", endpoint_slice(i))
    api.create("Node", {"metadata": {"name": "node-0"},
                        "status": {"addresses": [{"type": "InternalIP",
                                                  "address": "10.99.0.1"}]}})
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = api.write_kubeconfig(Path(tmp) / "kubeconfig")
        metrics_port = _free_port()
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        healthz_port = _free_port()
        healthz = f"http://127.0.0.1:{healthz_port}/healthz"
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kproxy_core.cli", "--proxy-mode=memory",
             f"--kubeconfig={kubeconfig}", "--hostname-override=node-0",
             "--iptables-min-sync-period=0s", "--iptables-sync-period=1h",
             f"--healthz-bind-address=127.0.0.1:{healthz_port}",
             f"--metrics-bind-address=127.0.0.1:{metrics_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "KPROXY_DISABLE_PLUGIN_AUTOLOAD": ""},
        )
        try:
            count_name = "kubeproxy_sync_proxy_rules_duration_seconds_count"
            serving = None  # servers start after imports and start-up cleanup
            while (_metric(metrics, count_name) or 0) < 1:
                if serving is None and _answers(healthz):
                    serving = time.monotonic() - started
                if proc.poll() is not None or time.monotonic() - started > 300:
                    raise RuntimeError("kproxy did not sync within 300 s")
                time.sleep(0.05)
            first_sync = time.monotonic() - started
            changes = []
            for generation in range(1, 6):
                before = _metric(metrics, count_name) or 0
                changed = endpoint_slice(count // 2)
                # Flip one endpoint's readiness: a real change of the resolved model.
                changed["endpoints"][0]["conditions"]["ready"] = generation % 2 == 0
                t0 = time.monotonic()
                api.update("EndpointSlice", changed)
                while (_metric(metrics, count_name) or 0) <= before:
                    if time.monotonic() - t0 > 60:
                        raise RuntimeError("the change was not synced within 60 s")
                    time.sleep(0.002)
                changes.append(time.monotonic() - t0)
                time.sleep(0.2)
            return {"services": count, "first_sync_s": first_sync,
                    "list_to_synced_s": first_sync - (serving or 0.0),
                    "change_ms_median": sorted(changes)[len(changes) // 2] * 1000,
                    "change_ms_max": max(changes) * 1000,
                    "peak_rss_mb": _peak_rss_mb(proc.pid)}
        finally:
            proc.terminate()
            proc.wait(30)
            api.stop()


def main(argv: list[str]) -> int:
    exit_on_signals()  # SIGTERM/SIGINT unwind through the sandbox's cleanup
    if os.environ.get("KPROXY_BENCH_NETNS") is None:
        # kproxy cleans other modes' leftovers at start-up: keep that (and everything else)
        # inside a namespace of our own, never the host's.
        from kproxy_core.testing.netns import Sandbox

        with Sandbox() as sandbox:
            ns = sandbox.netns("bench")
            return subprocess.run(
                ["ip", "netns", "exec", ns.name, sys.executable, __file__, *argv],
                env={**os.environ, "KPROXY_BENCH_NETNS": ns.name}, check=False).returncode
    sizes = [int(a) for a in argv] or [1000, 5000, 10000]
    print(f"{'services':>9} {'start→synced':>13} {'list→synced':>12} "
          f"{'1-ep change (median/max)':>26} {'peak RSS':>9}")
    for size in sizes:
        r = run(size)
        print(f"{r['services']:>9} {r['first_sync_s']:>12.2f}s {r['list_to_synced_s']:>11.2f}s "
              f"{r['change_ms_median']:>15.1f} / {r['change_ms_max']:.1f} ms "
              f"{r['peak_rss_mb']:>7.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
