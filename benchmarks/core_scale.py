"""Scale benchmark of the core's state: parse + resolve + change tracking.

For N Services with one EndpointSlice of 5 endpoints each, prints:
  * initial: replace(Service) + replace(EndpointSlice) + first take_snapshot (target <= 5 s at 10k)
  * one-endpoint change: upsert one slice + take_snapshot, median of repeats (target <= 10 ms)
  * relist: replace() of the unchanged lists (must flag nothing)
  * memory held by the state (tracemalloc, separate run) and the RSS growth

Run: python benchmarks/core_scale.py [N ...]   (default: 1000 5000 10000)
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import tracemalloc
from typing import Any

from kproxy_core.state import ProxyState

NODE = "node-0"
ENDPOINTS_PER_SLICE = 5


def service(i: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % 50}", "resourceVersion": "1"},
        "spec": {
            "type": "ClusterIP" if i % 4 else "NodePort",
            "clusterIP": f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
            "clusterIPs": [f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"],
            "ports": [
                {
                    "name": "http",
                    "port": 80,
                    "protocol": "TCP",
                    "targetPort": 8080,
                    **({} if i % 4 else {"nodePort": 30000 + i % 2000}),
                }
            ],
            "externalTrafficPolicy": "Local" if i % 8 == 0 else "Cluster",
            "sessionAffinity": "ClientIP" if i % 10 == 0 else "None",
        },
    }


def endpoint_slice(i: int, generation: int = 0) -> dict[str, Any]:
    base = i * ENDPOINTS_PER_SLICE
    return {
        "metadata": {
            "name": f"svc-{i}-abcde",
            "namespace": f"ns-{i % 50}",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": "2024-01-02T03:04:05Z"
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [
                    f"10.{128 + (base + k) // 65536}.{(base + k) // 256 % 256}.{(base + k) % 256}"
                ],
                "conditions": {
                    "ready": (k + generation) % 7 != 6,
                    "serving": True,
                    "terminating": False,
                },
                "nodeName": f"node-{(base + k) % 100}",
                "zone": f"zone-{k % 3}",
            }
            for k in range(ENDPOINTS_PER_SLICE)
        ],
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(n: int) -> None:
    services = [service(i) for i in range(n)]
    slices = [endpoint_slice(i) for i in range(n)]

    gc.collect()
    rss_before = rss_bytes()
    state = ProxyState(NODE)
    t0 = time.perf_counter()
    state.replace("Service", services)
    state.replace("EndpointSlice", slices)
    snap = state.take_snapshot()
    initial = time.perf_counter() - t0
    assert len(snap.changed) == n, (len(snap.changed), n)
    rss_after = rss_bytes()

    times: list[float] = []
    for r in range(1, 41):
        changed = endpoint_slice((r * 7919) % n, generation=r)
        t = time.perf_counter()
        state.upsert("EndpointSlice", changed)
        one = state.take_snapshot()
        times.append(time.perf_counter() - t)
        assert len(one.changed) <= 1

    t = time.perf_counter()
    state.replace("Service", services)
    relist_snap = state.take_snapshot()
    relist = time.perf_counter() - t
    assert not relist_snap.changed

    # memory in a separate state: tracemalloc slows allocation-heavy code several-fold
    del state, snap, one, relist_snap
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    state = ProxyState(NODE)
    state.replace("Service", services)
    state.replace("EndpointSlice", slices)
    state.take_snapshot()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()

    print(
        f"N={n:>6}  initial replace+snapshot {initial * 1000:8.1f} ms   "
        f"one-endpoint change median {statistics.median(times) * 1000:6.2f} ms "
        f"(max {max(times) * 1000:6.2f})   relist {relist * 1000:7.1f} ms   "
        f"state {held / 2**20:6.1f} MiB (tracemalloc)   "
        f"RSS +{(rss_after - rss_before) / 2**20:6.1f} MiB"
    )


def main(argv: list[str]) -> None:
    sizes = [int(a) for a in argv] or [1000, 5000, 10000]
    print(
        f"{ENDPOINTS_PER_SLICE} endpoints per service, 1 slice per service, "
        f"python {sys.version.split()[0]}"
    )
    for n in sizes:
        run(n)


if __name__ == "__main__":
    main(sys.argv[1:])
