"""IPVS mode at scale, in a fresh network namespace (prints numbers; asserts nothing).

Needs a kernel with IPVS: on hosts without it run it in the VM::

    python -m kproxy_core.testing.vm --modules ip_vs,ip_vs_rr,ip_set -- \
        python benchmarks/ipvs_bench.py [--sizes 1000,10000] [--repeat 3] [--changes 15]

Measures, per size N (N ClusterIP services x 5 endpoints, from empty): the full sync (time,
kernel writes, seconds per kernel-layer call); at the largest N ``--changes`` one-endpoint
changes one after the other (partial syncs: time, kernel-call vs other time, objects
touched; median and range) and the periodic resync; and the floor: the same virtual/real
servers loaded by ``ipvsadm --restore`` in an empty namespace (IPVS objects only, no
addresses, sets or iptables); for reference, the same objects through the mode's own IPVS
writer alone.

Before each timed step it waits (``--settle``) until the CPUs are idle: a deleted network
namespace is torn down by the kernel afterwards (thousands of IPVS objects, addresses), and
that work would otherwise be billed to whatever runs next (in the VM, seconds).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "plugins", "kproxy-ipvs",
                                "tests"))

from ipvs_helpers import context, ep, request, svc, view

from kproxy_core.model import NodeView, ResolvedServicePort
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import Sandbox

ENDPOINTS = 5


def port(i: int, bumped: bool = False) -> ResolvedServicePort:
    """Service i; ``bumped``: its last endpoint replaced by another address."""
    cip = f"10.96.{i // 250}.{i % 250 + 1}"
    eps = [ep(f"10.244.{(i * ENDPOINTS + j) // 250 % 250}.{(i * ENDPOINTS + j) % 250 + 1}",
              local=False) for j in range(ENDPOINTS)]
    if bumped:
        eps[-1] = ep(f"10.245.{i // 250 % 250}.{i % 250 + 1}", local=False)
    out: ResolvedServicePort = svc(f"s{i}", cip, 80, eps)
    return out


def ports(n: int) -> list[ResolvedServicePort]:
    return [port(i) for i in range(n)]


def settle(limit: float) -> float:
    """Wait until the CPUs are idle (>= 90 % over half a second, twice in a row) or ``limit``
    seconds passed; returns the seconds waited."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)

    start = time.perf_counter()
    quiet = 0
    while quiet < 2 and time.perf_counter() - start < limit:
        idle0, total0 = sample()
        time.sleep(0.5)
        idle1, total1 = sample()
        quiet = quiet + 1 if (idle1 - idle0) >= 0.9 * max(1, total1 - total0) else 0
    return time.perf_counter() - start


class TimedKernel:
    """Wraps the real kernel layer: seconds and calls per method, to see where a sync goes."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    def report(self) -> str:
        top = sorted(self.seconds.items(), key=lambda item: -item[1])[:12]
        return ", ".join(f"{name} {secs:.2f}s/{self.calls[name]}" for name, secs in top)


def bench_proxier(n: int, changes: int, resync: bool) -> dict[str, Any]:
    from kproxy_ipvs.netlink import NetlinkKernel
    from kproxy_ipvs.proxier import IpvsProxier

    logging.disable(logging.CRITICAL)
    first: NodeView = view(*ports(n), node_ips=())
    full_request = request(first)  # the core's work, not timed
    backend_context = context({"clusterCIDR": "10.244.0.0/16"})  # the core's, too
    collector = GcTimer()
    # The program from empty: the kernel layer and the proxier built (anything they start
    # in the background runs inside the timer too), then the first sync.
    start = time.perf_counter()
    kernel = TimedKernel(NetlinkKernel())
    proxier = IpvsProxier(backend_context, kernel=kernel)
    built = time.perf_counter() - start
    result = proxier.sync(full_request)
    out: dict[str, Any] = {"full_s": time.perf_counter() - start, "built_s": built,
                           "full_gc_s": collector.take(),
                           "full_ops": result.objects_written,
                           "full_ext_s": result.external_seconds,
                           "full_kernel": kernel.report(),
                           "full_kernel_s": sum(kernel.seconds.values())}
    current = first
    partials: list[tuple[float, float, int, float]] = []
    for k in range(changes):
        # One endpoint of one more service replaced: the core's change tracking, not timed.
        bumped = port((n // 2 + k * 7919) % n, bumped=True)
        second = NodeView(current.node_name, current.node_ips, current.zone,
                          {**current.services, bumped.key: bumped})
        partial_request = request(second, current)
        current = second
        kernel.seconds.clear()
        kernel.calls.clear()
        collector.take()
        start = time.perf_counter()
        result = proxier.sync(partial_request)
        elapsed = time.perf_counter() - start
        partials.append((elapsed, sum(kernel.seconds.values()), result.objects_written,
                         collector.take()))
        out.update(partial_counters=dict(result.counters), partial_kernel=kernel.report())
    if partials:
        out["partials"] = partials
    if resync:
        # The periodic resync: everything compared with the kernel, nothing to write.
        kernel.seconds.clear()
        kernel.calls.clear()
        start = time.perf_counter()
        result = proxier.sync(request(current, current, full=True))
        out.update(resync_s=time.perf_counter() - start, resync_ops=result.objects_written,
                   resync_kernel=kernel.report())
    proxier.close()
    collector.close()
    return out


class GcTimer:
    """Seconds the cyclic garbage collector ran (it stops every thread) since the last
    `take`."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self._seconds += time.perf_counter() - self._start

    def take(self) -> float:
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def restore_text(n: int) -> str:
    lines = []
    for port in ports(n):
        lines.append(f"-A -t {port.cluster_ip}:80 -s rr")
        for e in port.cluster_endpoints:
            lines.append(f"-a -t {port.cluster_ip}:80 -r {e.ip}:{e.port} -m -w 1")
    return "\n".join(lines) + "\n"


def bench_bulk_ipvs(n: int) -> float:
    """The floor's objects through the mode's own IPVS writer (kproxy_ipvs.bulk) alone."""
    from kproxy_ipvs.bulk import BulkWriter
    from kproxy_ipvs.rules import RealServer, VirtualServer, VSKey

    items = [(VirtualServer(VSKey("TCP", p.cluster_ip, 80), "rr"),
              [RealServer(e.ip, e.port) for e in p.cluster_endpoints]) for p in ports(n)]
    writer = BulkWriter()
    start = time.perf_counter()
    writer.add_services(items)
    seconds = time.perf_counter() - start
    writer.close()
    return seconds


def bench_floor(n: int) -> float:
    text = restore_text(n)
    start = time.perf_counter()
    subprocess.run(["ipvsadm", "--restore"], input=text, text=True, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--repeat", type=int, default=1,
                        help="full sync + floor pairs per size (interleaved; the one-endpoint "
                             "changes and the resync run on the last one of the largest size)")
    parser.add_argument("--changes", type=int, default=1,
                        help="one-endpoint changes, one after the other, at the largest size")
    parser.add_argument("--no-resync", action="store_true",
                        help="skip the periodic full resync (minutes at 10k in the VM)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip ipvsadm --restore and the writer alone (no ratio)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="at most this many seconds waiting for idle CPUs before each "
                             "timed step (0: do not wait)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if not os.path.exists("/proc/net/ip_vs"):
        print("no IPVS in this kernel (modprobe ip_vs, or run in the VM: see the docstring)",
              file=sys.stderr)
        return 2
    print(f"IPVS mode, N ClusterIP services x {ENDPOINTS} endpoints, one fresh netns each")
    for n in sizes:
        last = [n == max(sizes) and rep == args.repeat - 1 for rep in range(args.repeat)]
        ratios = [run_size(n, args.changes if is_last else 0, is_last and not args.no_resync,
                           not args.no_floor, args.settle)
                  for is_last in last]
        if len(ratios) > 1 and not args.no_floor:
            ratios.sort()
            print(f"N={n:>6}: ratio to the floor over {len(ratios)} pairs: median "
                  f"{ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}",
                  flush=True)
    return 0


def run_size(n: int, changes: int, resync: bool, floor_too: bool, limit: float) -> float:
    """One full sync and its floor right after it; prints them; returns the ratio."""
    waited = settle(limit)
    with Sandbox() as sandbox:
        ns = sandbox.netns("bench")
        res = in_netns(ns.name, partial(bench_proxier, n, changes, resync), timeout=3600)
    floor = writer = 0.0
    if floor_too:
        waited += settle(limit)
        with Sandbox() as sandbox:
            ns = sandbox.netns("floor")
            floor = in_netns(ns.name, partial(bench_floor, n), timeout=1800)
        waited += settle(limit)
        with Sandbox() as sandbox:
            ns = sandbox.netns("writer")
            writer = in_netns(ns.name, partial(bench_bulk_ipvs, n), timeout=1800)
    objects = n * (1 + ENDPOINTS)
    ratio = res["full_s"] / floor if floor else 0.0
    print(f"N={n:>6}: full sync {res['full_s']:.2f}s ({res['full_ops']} kernel writes, "
          f"{res['full_ext_s']:.2f}s in iptables-restore)"
          + (f"; ipvsadm --restore floor for the {objects} IPVS objects: {floor:.2f}s "
             f"(ratio {ratio:.2f})" if floor else "")
          + f" [waited {waited:.1f}s for idle CPUs]", flush=True)
    print(f"N={n:>6}:   of which building the kernel layer and the proxier "
          f"{res['built_s']:.2f}s; garbage collection {res['full_gc_s']:.2f}s", flush=True)
    print(f"N={n:>6}:   kernel calls {res['full_kernel_s']:.2f}s (bulk ones overlap): "
          f"{res['full_kernel']}", flush=True)
    if writer:
        print(f"N={n:>6}:   the same {objects} IPVS objects through kproxy_ipvs.bulk alone: "
              f"{writer:.2f}s", flush=True)
    if "partials" in res:
        partials = res["partials"]
        totals = sorted(p[0] * 1000 for p in partials)
        kernels = sorted(p[1] * 1000 for p in partials)
        rest = sorted((p[0] - p[1]) * 1000 for p in partials)
        print(f"N={n:>6}: one endpoint changed, {len(partials)} times: partial sync median "
              f"{statistics.median(totals):.1f}ms (range {totals[0]:.1f}-{totals[-1]:.1f}); "
              f"kernel calls median {statistics.median(kernels):.1f}ms, the rest (Python) "
              f"median {statistics.median(rest):.1f}ms, garbage collection max "
              f"{max(p[3] for p in partials) * 1000:.1f}ms; kernel writes "
              f"{sorted({p[2] for p in partials})}; all (ms): "
              + " ".join(f"{p[0] * 1000:.1f}" for p in partials), flush=True)
        print(f"N={n:>6}:   last change: {res['partial_counters']}; kernel calls: "
              f"{res['partial_kernel']}", flush=True)
    if "resync_s" in res:
        print(f"N={n:>6}: full resync, nothing changed: {res['resync_s']:.2f}s, "
              f"{res['resync_ops']} kernel writes; kernel calls: {res['resync_kernel']}",
              flush=True)
    return float(ratio)


if __name__ == "__main__":
    sys.exit(main())
