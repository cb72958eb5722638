"""IPVS mode's bulk kernel steps one by one, in fresh network namespaces (prints numbers).

Where does a full program of N services x 5 endpoints go? Each bulk tool the mode runs is
timed alone, with variants, so a slow step can be told apart from the mode's own costs::

    python -m kproxy_core.testing.vm --modules ip_vs,ip_vs_rr,ip_set -- \
        python benchmarks/ipvs_steps.py [--sizes 1000,10000]

Steps: ``ipvsadm --restore`` of 6N virtual/real servers (the floor); ``ip -batch`` of N
addresses on a dummy device; ``ipset restore`` of N ``hash:ip,port`` entries into a set made
with the kernel's default hash size vs one sized for N (with and without the comment
extension); and the three bulk steps run at once (separate kernel subsystems, separate
processes) against one after the other.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import Sandbox

ENDPOINTS = 5


def cluster_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def endpoint_ip(i: int, j: int) -> str:
    k = i * ENDPOINTS + j
    return f"10.244.{k // 250 % 250}.{k % 250 + 1}"


def ipvsadm_text(n: int) -> str:
    lines = []
    for i in range(n):
        lines.append(f"-A -t {cluster_ip(i)}:80 -s rr")
        lines.extend(f"-a -t {cluster_ip(i)}:80 -r {endpoint_ip(i, j)}:8080 -m -w 1"
                     for j in range(ENDPOINTS))
    return "\n".join(lines) + "\n"


def addresses_text(n: int) -> str:
    return "".join(f"addr add {cluster_ip(i)}/32 dev kube-ipvs0\n" for i in range(n))


def ipset_text(n: int, name: str) -> str:
    return "".join(f"add {name} {cluster_ip(i)},tcp:80\n" for i in range(n))


def create_set(name: str, hashsize: int | None, comment: bool) -> None:
    argv = ["ipset", "create", name, "hash:ip,port"]
    if hashsize is not None:
        argv += ["hashsize", str(hashsize), "maxelem", str(max(65536, hashsize))]
    if comment:
        argv.append("comment")
    subprocess.run(argv, check=True)


def timed(argv: list[str], text: str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, input=text, text=True, check=True)
    return time.perf_counter() - start


def step_ipset(n: int, hashsize: int | None, comment: bool) -> float:
    create_set("S", hashsize, comment)
    return timed(["ipset", "restore", "-exist"], ipset_text(n, "S"))


def step_ipvsadm(n: int) -> float:
    return timed(["ipvsadm", "--restore"], ipvsadm_text(n))


def step_addresses(n: int) -> float:
    subprocess.run(["ip", "link", "add", "kube-ipvs0", "type", "dummy"], check=True)
    return timed(["ip", "-batch", "-"], addresses_text(n))


def step_pyroute2_ipset(n: int) -> float:
    """Per-entry netlink adds from Python (the mode's partial-sync path), for comparison."""
    from kproxy_core.kernel import ipset

    create_set("S", None, True)
    start = time.perf_counter()
    with ipset.ipset_socket() as sock:
        for i in range(n):
            ipset.add_entry("S", "hash:ip,port", f"{cluster_ip(i)},tcp:80", sock)
    return time.perf_counter() - start


def overlapped(n: int, hashsize: int | None) -> float:
    """The three tools' bulk steps at once (separate processes)."""
    subprocess.run(["ip", "link", "add", "kube-ipvs0", "type", "dummy"], check=True)
    for name in ("A", "B"):
        create_set(name, hashsize, True)
    jobs = [(["ipvsadm", "--restore"], ipvsadm_text(n)),
            (["ip", "-batch", "-"], addresses_text(n)),
            (["ipset", "restore", "-exist"], ipset_text(n, "A") + ipset_text(n, "B"))]
    start = time.perf_counter()
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, text=True) for argv, _ in jobs]
    for proc, (_argv, text) in zip(procs, jobs, strict=True):
        assert proc.stdin is not None
        proc.stdin.write(text)
        proc.stdin.close()
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"{proc.args!r} failed")
    return time.perf_counter() - start


def fresh(func: Callable[[], object]) -> object:
    with Sandbox() as sandbox:
        ns = sandbox.netns("steps")
        return in_netns(ns.name, func, timeout=1800)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--only", default="", help="comma-separated step names")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    only = {s for s in args.only.split(",") if s}
    if not os.path.exists("/proc/net/ip_vs"):
        print("no IPVS in this kernel (run in the VM: see the docstring)", file=sys.stderr)
        return 2
    for n in sizes:
        sized = 1 << max(10, (n - 1).bit_length())
        steps: list[tuple[str, Callable[[], object]]] = [
            ("ipvsadm", partial(step_ipvsadm, n)),
            ("addresses", partial(step_addresses, n)),
            ("ipset-default", partial(step_ipset, n, None, True)),
            ("ipset-sized", partial(step_ipset, n, sized, True)),
            ("ipset-sized-nocomment", partial(step_ipset, n, sized, False)),
            ("ipset-pyroute2", partial(step_pyroute2_ipset, min(n, 1000))),
        ]
        sequential = 0.0
        for name, func in steps:
            if only and name not in only:
                continue
            seconds = float(fresh(func))  # type: ignore[arg-type]
            if name in ("ipvsadm", "addresses", "ipset-default"):
                sequential += seconds * (2 if name == "ipset-default" else 1)
            label = f"{name} (first {min(n, 1000)})" if name == "ipset-pyroute2" else name
            print(f"N={n:>6} {label:<24} {seconds:8.2f}s", flush=True)
        if not only or "overlap" in only:
            together = float(fresh(partial(overlapped, n, None)))  # type: ignore[arg-type]
            print(f"N={n:>6} {'overlap (3 at once)':<24} {together:8.2f}s "
                  f"(sum of the same steps above: {sequential:.2f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
