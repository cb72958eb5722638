"""nftables mode at scale, in a fresh network namespace (prints numbers; asserts nothing).

    python benchmarks/nftables_bench.py [--sizes 1000,5000,10000] [--changes 5]

Per size N (N ClusterIP services x 5 endpoints, from an empty namespace): the first full sync
(wall time, time inside ``nft``, CPU time of the process and ``nft``, statements sent),
then one-endpoint changes (partial syncs, each on another service): ``--changes``
replacing one endpoint (same count), as many adding a sixth and as many removing one
(median and max wall time of each kind, the median time spent in the kernel, statements
sent, the writer used: netlink or nft). Each change is timed twice over: the sync alone, and
end to end as the core pays it, ``needs_full_sync()`` (the table check the core makes before
every sync that is not already full) plus the sync; the check's own median is printed, and
so is the check older versions made, ``nft list table ip kube-proxy`` (median of 3 runs,
wall and CPU seconds), for a before/after in one run. Then a second full sync (what a
restart, a failed sync or the hourly full sync pays; periodic syncs are partial), which
lists chain/set/map names once, and the process's peak RSS (``ru_maxrss`` of the forked
child that ran the proxier, which starts as a copy of this process: the baseline is printed
too). ``--replace-only`` runs only the replacements (the only kind older versions of this
script measured).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "plugins", "kproxy-nftables",
                                "tests"))

from nft_helpers import context, ep, key, svc

from kproxy_core.backend import SyncRequest
from kproxy_core.model import NodeView, ResolvedServicePort
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import Sandbox
from kproxy_core.testing.signals import exit_on_signals

ENDPOINTS = 5


def make_port(i: int, bump: int = 0, kind: str = "replace") -> ResolvedServicePort:
    """Service ``i``; with ``bump``, one endpoint changed: the last one replaced by another
    address, a sixth added, or the last one removed (``kind``)."""
    cip = f"10.96.{i // 250}.{i % 250 + 1}"
    eps = [ep(f"10.{244 + (i * ENDPOINTS + j) // 62500}.{(i * ENDPOINTS + j) // 250 % 250}."
              f"{(i * ENDPOINTS + j) % 250 + 1}", 8080) for j in range(ENDPOINTS)]
    if bump and kind == "replace":
        eps[-1] = ep(f"10.250.0.{bump}", 8080)
    elif bump and kind == "add":
        eps.append(ep(f"10.250.1.{bump}", 8080))
    elif bump:
        eps.pop()
    port: ResolvedServicePort = svc(key("bench", f"s{i}", "http"), cip, 80, endpoints=eps)
    return port


def cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (``nft``) so far: unlike
    wall time, hardly inflated by other work on the machine."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(n: int, changes: int, kinds: tuple[str, ...]) -> dict[str, Any]:
    from kproxy_nftables import nft
    from kproxy_nftables.proxier import NftablesProxier

    logging.disable(logging.CRITICAL)
    baseline = rss_mb()
    proxier = NftablesProxier(context({"clusterCIDR": ("10.244.0.0/14",)}))
    ports = {p.key: p for p in (make_port(i) for i in range(n))}
    start, cpu = time.perf_counter(), cpu_s()
    result = proxier.sync(SyncRequest(view=NodeView("node", ("10.99.0.1",), "", dict(ports)),
                                      changed=frozenset(ports), full=True))
    out: dict[str, Any] = {"full_s": time.perf_counter() - start, "full_cpu_s": cpu_s() - cpu,
                           "full_nft_s": result.external_seconds,
                           "full_statements": len(proxier.last_transaction)}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    kernel: list[float] = []
    checks: list[float] = []
    end_to_end: list[float] = []
    asked_full = 0
    statements = []
    writers = set()
    view = NodeView("node", ("10.99.0.1",), "", ports)  # the core hands over its own dict
    for c in range(changes):
        for k, kind in enumerate(kinds):
            i = (n // 2 + (c * len(kinds) + k) * 7) % n
            new = make_port(i, bump=c + 1, kind=kind)
            old = ports[new.key]
            ports[new.key] = new
            request = SyncRequest(view=view, changed=frozenset({new.key}), full=False,
                                  previous={new.key: old})
            start = time.perf_counter()
            asked_full += proxier.needs_full_sync()  # what the core asks first
            checked = time.perf_counter()
            result = proxier.sync(request)
            done = time.perf_counter()
            times[kind].append(done - checked)
            checks.append(checked - start)
            end_to_end.append(done - start)
            kernel.append(result.external_seconds)
            statements.append(len(proxier.last_transaction))
            writers.add(proxier.last_writer)
    every = [t for kind in kinds for t in times[kind]]
    out.update(partial_median_s=statistics.median(every), partial_max_s=max(every),
               partial_kernel_s=statistics.median(kernel),
               by_kind={kind: (statistics.median(t), max(t)) for kind, t in times.items()},
               partial_statements=max(statements), writer="+".join(sorted(writers)),
               check_s=statistics.median(checks), e2e_median_s=statistics.median(end_to_end),
               e2e_max_s=max(end_to_end), asked_full=asked_full)
    old_check, old_cpu = [], []
    for _ in range(3):
        start, cpu = time.perf_counter(), cpu_s()
        nft.table_exists(4)  # the check before (nft prints the whole table)
        old_check.append(time.perf_counter() - start)
        old_cpu.append(cpu_s() - cpu)
    out.update(old_check_s=statistics.median(old_check),
               old_check_cpu_s=statistics.median(old_cpu))
    start = time.perf_counter()
    result = proxier.sync(SyncRequest(view=NodeView("node", ("10.99.0.1",), "", dict(ports)),
                                      changed=frozenset(), full=True))
    out.update(resync_s=time.perf_counter() - start, resync_nft_s=result.external_seconds,
               baseline_rss_mb=baseline, peak_rss_mb=rss_mb())
    return out


def main() -> int:
    exit_on_signals()  # SIGTERM/SIGINT unwind through the sandboxes' cleanup
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--changes", type=int, default=5,
                        help="changes of each kind per size")
    parser.add_argument("--replace-only", action="store_true")
    args = parser.parse_args()
    kinds = ("replace",) if args.replace_only else ("replace", "add", "remove")
    print(f"{'services':>8} {'full s':>8} {'(nft s)':>8} {'cpu s':>6} {'stmts':>7} "
          f"{'1-ep med ms':>11} "
          f"{'max ms':>7} {'(kernel)':>8} {'stmts':>5} {'resync s':>8} {'(nft s)':>8} "
          f"{'rss MB':>7} {'base MB':>7} {'writer':>7} {'check us':>8} {'e2e med ms':>10} "
          f"{'e2e max ms':>10} {'old chk s':>9} {'(cpu)':>5}  median/max ms per kind")
    for n in (int(s) for s in args.sizes.split(",")):
        with Sandbox() as sandbox:
            ns = sandbox.netns("nftbench")
            r = in_netns(ns.name, functools.partial(bench, n, args.changes, kinds),
                         timeout=1800)
        per_kind = " ".join(f"{kind} {med * 1000:.1f}/{top * 1000:.1f}"
                            for kind, (med, top) in r["by_kind"].items())
        print(f"{n:>8} {r['full_s']:>8.2f} {r['full_nft_s']:>8.2f} {r['full_cpu_s']:>6.2f} "
              f"{r['full_statements']:>7} "
              f"{r['partial_median_s'] * 1000:>11.1f} {r['partial_max_s'] * 1000:>7.1f} "
              f"{r['partial_kernel_s'] * 1000:>8.2f} {r['partial_statements']:>5} "
              f"{r['resync_s']:>8.2f} {r['resync_nft_s']:>8.2f} {r['peak_rss_mb']:>7.0f} "
              f"{r['baseline_rss_mb']:>7.0f} {r['writer']:>7} {r['check_s'] * 1e6:>8.0f} "
              f"{r['e2e_median_s'] * 1000:>10.1f} {r['e2e_max_s'] * 1000:>10.1f} "
              f"{r['old_check_s']:>9.2f} {r['old_check_cpu_s']:>5.2f}  {per_kind}"
              + (f"  (check asked for a full sync {r['asked_full']}x)" if r["asked_full"]
                 else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
