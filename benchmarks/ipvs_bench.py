"""IPVS mode at scale, in a fresh network namespace (prints numbers; asserts nothing).

Needs a kernel with IPVS: on hosts without it run it in the VM::

    python -m kproxy_core.testing.vm --modules ip_vs,ip_vs_rr,ip_set -- \
        python benchmarks/ipvs_bench.py [--sizes 1000,10000] [--repeat 3]

Measures, per size N (N ClusterIP services x 5 endpoints, from empty): the full sync (time,
kernel writes); at the largest N a one-endpoint change (partial sync: time, objects touched);
and the floor: the same virtual/real servers loaded by ``ipvsadm --restore`` in an empty
namespace (IPVS objects only, no addresses, sets or iptables); for reference, the same
objects through the mode's own IPVS writer alone.
"""

from __future__ import annotations

import argparse
import logging
import os
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


def ports(n: int, bump: int | None = None) -> list[ResolvedServicePort]:
    out = []
    for i in range(n):
        cip = f"10.96.{i // 250}.{i % 250 + 1}"
        eps = [ep(f"10.244.{(i * ENDPOINTS + j) // 250 % 250}.{(i * ENDPOINTS + j) % 250 + 1}",
                  local=False) for j in range(ENDPOINTS)]
        if bump == i:
            eps[-1] = ep("10.245.0.1", local=False)
        out.append(svc(f"s{i}", cip, 80, eps))
    return out


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
        top = sorted(self.seconds.items(), key=lambda item: -item[1])[:6]
        return ", ".join(f"{name} {secs:.2f}s/{self.calls[name]}" for name, secs in top)


def bench_proxier(n: int, change: bool) -> dict[str, Any]:
    from kproxy_ipvs.netlink import NetlinkKernel
    from kproxy_ipvs.proxier import IpvsProxier

    logging.disable(logging.CRITICAL)
    kernel = TimedKernel(NetlinkKernel())
    proxier = IpvsProxier(context({"clusterCIDR": "10.244.0.0/16"}), kernel=kernel)
    first: NodeView = view(*ports(n), node_ips=())
    full_request = request(first)
    start = time.perf_counter()
    result = proxier.sync(full_request)
    out: dict[str, Any] = {"full_s": time.perf_counter() - start,
                           "full_ops": result.objects_written,
                           "full_ext_s": result.external_seconds,
                           "full_kernel": kernel.report(),
                           "full_kernel_s": sum(kernel.seconds.values())}
    if change:
        second = view(*ports(n, bump=n // 2), node_ips=())
        partial_request = request(second, first)  # the core's change tracking, not timed
        kernel.seconds.clear()
        kernel.calls.clear()
        start = time.perf_counter()
        result = proxier.sync(partial_request)
        out.update(partial_s=time.perf_counter() - start, partial_ops=result.objects_written,
                   partial_counters=dict(result.counters), partial_kernel=kernel.report())
        # The periodic resync: everything compared with the kernel, nothing to write.
        kernel.seconds.clear()
        kernel.calls.clear()
        start = time.perf_counter()
        result = proxier.sync(request(second, second, full=True))
        out.update(resync_s=time.perf_counter() - start, resync_ops=result.objects_written,
                   resync_kernel=kernel.report())
    proxier.close()
    return out


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
                             "change and the resync run on the last one of the largest size)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if not os.path.exists("/proc/net/ip_vs"):
        print("no IPVS in this kernel (modprobe ip_vs, or run in the VM: see the docstring)",
              file=sys.stderr)
        return 2
    print(f"IPVS mode, N ClusterIP services x {ENDPOINTS} endpoints, one fresh netns each")
    for n in sizes:
        ratios = [run_size(n, n == max(sizes) and rep == args.repeat - 1)
                  for rep in range(args.repeat)]
        if len(ratios) > 1:
            ratios.sort()
            print(f"N={n:>6}: ratio to the floor over {len(ratios)} pairs: median "
                  f"{ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}",
                  flush=True)
    return 0


def run_size(n: int, change: bool) -> float:
    """One full sync and its floor right after it; prints them; returns the ratio."""
    with Sandbox() as sandbox:
        ns = sandbox.netns("bench")
        res = in_netns(ns.name, partial(bench_proxier, n, change), timeout=1800)
    with Sandbox() as sandbox:
        ns = sandbox.netns("floor")
        floor = in_netns(ns.name, partial(bench_floor, n), timeout=1800)
    with Sandbox() as sandbox:
        ns = sandbox.netns("writer")
        writer = in_netns(ns.name, partial(bench_bulk_ipvs, n), timeout=1800)
    objects = n * (1 + ENDPOINTS)
    print(f"N={n:>6}: full sync {res['full_s']:.2f}s ({res['full_ops']} kernel writes, "
          f"{res['full_ext_s']:.2f}s in iptables-restore); ipvsadm --restore floor for the "
          f"{objects} IPVS objects: {floor:.2f}s (ratio {res['full_s'] / floor:.2f})",
          flush=True)
    print(f"N={n:>6}:   kernel calls {res['full_kernel_s']:.2f}s (bulk ones overlap): "
          f"{res['full_kernel']}", flush=True)
    print(f"N={n:>6}:   the same {objects} IPVS objects through kproxy_ipvs.bulk alone: "
          f"{writer:.2f}s", flush=True)
    if "partial_s" in res:
        print(f"N={n:>6}: one endpoint changed: partial sync {res['partial_s'] * 1000:.1f}ms, "
              f"{res['partial_ops']} kernel writes {res['partial_counters']}; "
              f"kernel calls: {res['partial_kernel']}", flush=True)
        print(f"N={n:>6}: full resync, nothing changed: {res['resync_s']:.2f}s, "
              f"{res['resync_ops']} kernel writes; kernel calls: {res['resync_kernel']}",
              flush=True)
    return float(res["full_s"] / floor)


if __name__ == "__main__":
    sys.exit(main())
