"""Soak: service and endpoint churn for N minutes while a client talks to a fixed service.

Runs the end-to-end harness (tests/e2e: a sandbox cluster, the fake API server, kproxy as a
real process in the node namespace). Meanwhile a churn thread creates Services, scales their
EndpointSlices and deletes them through the fake API server, and a client in a pod sends
requests continuously to one fixed Service that never changes. Prints, asserts nothing:

* requests to the fixed service and how many failed (a failure there is a bug: expect 0), and
  the longest gap between two answered requests;
* kproxy's RSS every ``--sample`` seconds, the least-squares slope in KiB/minute over the
  second half of the run (the first half includes warm-up: caches, imports, arenas);
* kproxy's open file descriptors and threads before and after;
* after the churn stops and every churned object is deleted: leftover KUBE-SVC/SEP/FW/XLB
  chains that belong to no live service, and ipset entries;
* sync errors and restore failures counted by kproxy's own metrics.

    python benchmarks/soak.py                     # 30 minutes, iptables mode
    python benchmarks/soak.py --minutes 2 --mode userspace
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from e2e_harness import Cluster, answered, eventually

from kproxy_core.demo import Ep, endpoint_slice_obj, service_obj

FIXED_IP = "10.96.200.1"
#: chains of one service port: they must not outlive the service
_SERVICE_CHAIN = re.compile(r"^:(KUBE-(?:SVC|SEP|FW|XLB|EXT|SVL)-[A-Z0-9]+)", re.M)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) in KiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    return cov / var * 60


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Churn:
    """Creates, scales and deletes up to ``max_services`` services in random order."""

    def __init__(self, c: Cluster, max_services: int, seed: int) -> None:
        self.c = c
        self.max = max_services
        self.rand = random.Random(seed)
        self.live: dict[str, str] = {}
        self.ops = {"create": 0, "scale": 0, "delete": 0}
        self._next = 0

    def _eps(self) -> list[Ep]:
        # Endpoints need not answer: only the fixed service carries traffic. Mix real pods
        # with addresses nobody has, so chains of every shape come and go.
        count = self.rand.randint(0, 6)
        pods = [Ep.of(p) for p in self.c.sb.pods]
        fake = [Ep(f"10.244.9.{self.rand.randint(2, 250)}", "node2") for _ in range(count)]
        return list({e.ip: e for e in pods[: self.rand.randint(0, len(pods))] + fake}.values())

    def step(self) -> None:
        roll = self.rand.random()
        if not self.live or (roll < 0.35 and len(self.live) < self.max):
            self._next += 1
            name = f"churn-{self._next}"
            ip = f"10.96.{100 + self._next // 250 % 50}.{self._next % 250 + 2}"
            kind = self.rand.choice(["ClusterIP", "ClusterIP", "NodePort"])
            self.c.apply(service_obj(name, ip, type=kind),
                         endpoint_slice_obj(name, self._eps()))
            self.live[name] = ip
            self.ops["create"] += 1
        elif roll < 0.8:
            name = self.rand.choice(sorted(self.live))
            self.c.apply(endpoint_slice_obj(name, self._eps()))
            self.ops["scale"] += 1
        else:
            name = self.rand.choice(sorted(self.live))
            self.delete(name)
            self.ops["delete"] += 1

    def delete(self, name: str) -> None:
        ip = self.live.pop(name)
        self.c.delete(endpoint_slice_obj(name, []), service_obj(name, ip))

    def delete_all(self) -> None:
        for name in sorted(self.live):
            self.delete(name)


@contextmanager
def running(target: Any) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=60)


def live_service_chains(c: Cluster) -> set[str]:
    text = c.sb.node.run(["iptables-save", "-t", "nat"], check=False).stdout
    text += c.sb.node.run(["iptables-save", "-t", "filter"], check=False).stdout
    return set(_SERVICE_CHAIN.findall(text))


def conntrack_entries(c: Cluster) -> int:
    out = c.sb.node.run(["conntrack", "-C"], check=False).stdout.strip()
    return int(out) if out.isdigit() else -1


def ipset_entries(c: Cluster) -> int:
    out = c.sb.node.run(["ipset", "list"], check=False).stdout
    return sum(1 for line in out.splitlines() if line and line[0].isdigit())


def soak(mode: str, minutes: float, sample: float, churn_interval: float, max_services: int,
         seed: int, workdir: Path | None = None) -> dict[str, Any]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return _soak_in(workdir, mode, minutes, sample, churn_interval, max_services, seed)
    with TemporaryDirectory(prefix="kproxy-soak-") as tmp:
        return _soak_in(Path(tmp), mode, minutes, sample, churn_interval, max_services, seed)


def _soak_in(workdir: Path, mode: str, minutes: float, sample: float, churn_interval: float,
             max_services: int, seed: int) -> dict[str, Any]:
    c = Cluster(mode, workdir)
    try:
        return _soak(c, minutes, sample, churn_interval, max_services, seed)
    finally:
        c.close()


def _soak(c: Cluster, minutes: float, sample: float, churn_interval: float,
          max_services: int, seed: int) -> dict[str, Any]:
    kp = c.start_kproxy()
    pid = kp.proc.pid
    client = c.pod("pod-1-3")
    c.apply(service_obj("fixed", FIXED_IP),
            endpoint_slice_obj("fixed", c.eps("pod-1-2", "pod-2-2")))
    c.wait_answered_by(client, FIXED_IP, 80, {"pod-1-2", "pod-2-2"}, count=16)
    baseline_chains = live_service_chains(c)
    fds_before, threads_before = open_fds(pid), threads(pid)

    requests = 0
    #: (seconds since start, wall-clock time, reply, requests sent before it)
    failures: list[tuple[float, str, str, int]] = []
    longest_gap = 0.0
    start = time.monotonic()

    def traffic(stop: threading.Event) -> None:
        nonlocal requests, longest_gap
        last_ok = time.monotonic()
        while not stop.is_set():
            reply = c.send(client, FIXED_IP, 80, 1, timeout=2.0)[0]
            now = time.monotonic()
            requests += 1
            if answered(reply):
                longest_gap = max(longest_gap, now - last_ok)
                last_ok = now
            else:
                wall = time.strftime("%H:%M:%S", time.gmtime())
                failures.append((round(now - start, 3), wall, reply, requests))
                if len(failures) <= 5:
                    # What the kernel held right after a failure, for the post-mortem.
                    saved = c.sb.node.run(["iptables-save", "-t", "nat"], check=False).stdout
                    (c.workdir / f"failure-{len(failures)}-nat.txt").write_text(saved)
            time.sleep(0.02)

    churn = Churn(c, max_services, seed)

    def churning(stop: threading.Event) -> None:
        while not stop.wait(churn_interval):
            churn.step()

    rss: list[tuple[float, int]] = []
    deadline = start + minutes * 60
    with running(traffic), running(churning):
        next_sample = start
        while time.monotonic() < deadline:
            if not kp.alive():
                raise RuntimeError(f"kproxy exited {kp.proc.returncode}:\n{kp.log_tail()}")
            now = time.monotonic()
            if now >= next_sample:
                rss.append((now - start, rss_kib(pid)))
                print(f"  t={now - start:7.0f}s rss={rss[-1][1]} KiB services={len(churn.live)} "
                      f"requests={requests} failed={len(failures)} "
                      f"conntrack={conntrack_entries(c)}", flush=True)
                next_sample += sample
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    churn.delete_all()

    def clean() -> set[str] | None:
        left = live_service_chains(c) - baseline_chains
        return None if left else left or {"-"}

    try:
        eventually("churned chains removed", clean, timeout=30)
        leftover: list[str] = []
    except AssertionError:
        leftover = sorted(live_service_chains(c) - baseline_chains)
    metrics = c.metrics()
    second_half = [s for s in rss if s[0] >= minutes * 30]
    return {
        "mode": c.mode,
        "minutes": minutes,
        "requests": requests,
        "failed": len(failures),
        "failures": failures[:20],
        "longest_gap_s": round(longest_gap, 3),
        "churn_ops": churn.ops,
        "rss_kib_first": rss[0][1] if rss else 0,
        "rss_kib_last": rss[-1][1] if rss else 0,
        "rss_kib_max": max((v for _, v in rss), default=0),
        "rss_slope_kib_per_min_second_half": round(slope_per_minute(second_half), 2),
        "rss_slope_kib_per_min_all": round(slope_per_minute(rss), 2),
        "fds_before": fds_before,
        "fds_after": open_fds(pid),
        "threads_before": threads_before,
        "threads_after": threads(pid),
        "leftover_chains": leftover,
        "ipset_entries_after": ipset_entries(c),
        "sync_errors": metric(metrics, "kproxy_sync_errors_total"),
        "restore_failures": metric(
            metrics, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"),
        "syncs": metric(metrics, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
        "still_alive": kp.alive(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--mode", default="iptables", choices=("iptables", "userspace"))
    parser.add_argument("--sample", type=float, default=30.0, help="RSS sample period (s)")
    parser.add_argument("--churn-interval", type=float, default=0.25,
                        help="seconds between churn operations")
    parser.add_argument("--max-services", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep kproxy's log and failure snapshots here (default: a "
                        "temporary directory, removed)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sample <= 0 or args.churn_interval <= 0:
        parser.error("--minutes, --sample and --churn-interval must be positive")
    print(f"soak: {args.minutes:g} min, mode {args.mode}, churn every {args.churn_interval}s, "
          f"up to {args.max_services} services", flush=True)
    result = soak(args.mode, args.minutes, args.sample, args.churn_interval,
                  args.max_services, args.seed, args.workdir)
    r = result
    print(f"fixed service: {r['requests']} requests, {r['failed']} failed, "
          f"longest gap {r['longest_gap_s']}s")
    for failure in r["failures"]:
        print(f"  failed at t={failure[0]}s ({failure[1]} UTC) after {failure[3]} requests: "
              f"{failure[2]}")
    print(f"churn: {r['churn_ops']}")
    print(f"RSS KiB: first {r['rss_kib_first']} last {r['rss_kib_last']} max "
          f"{r['rss_kib_max']}; slope {r['rss_slope_kib_per_min_second_half']} KiB/min "
          f"(second half), {r['rss_slope_kib_per_min_all']} KiB/min (all)")
    print(f"fds: {r['fds_before']} -> {r['fds_after']}; threads: {r['threads_before']} -> "
          f"{r['threads_after']}")
    print(f"leftover chains: {r['leftover_chains'] or 'none'}; ipset entries: "
          f"{r['ipset_entries_after']}")
    print(f"syncs {r['syncs']:.0f}, sync errors {r['sync_errors']:.0f}, restore failures "
          f"{r['restore_failures']:.0f}")
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
