"""kproxy's iptables mode at scale: first full sync, one-endpoint change, rules, memory.

For each size (ClusterIP services x endpoints, services and slices written before start) and
each writer/backend, in a fresh network namespace, runs the real thing, ``kproxy
--proxy-mode=iptables --manifests DIR`` as a process inside the namespace, and measures:

* first full sync: kproxy's own sync duration (from its log line) and the restore call inside
  it ("external"); the Python side is the difference. Also process start -> first sync done.
* one-endpoint change: one slice file rewritten with one endpoint replaced -> the new
  KUBE-SEP chain visible in the kernel (``iptables -t nat -S CHAIN`` polled). The manifests
  source polls its directory every second, so this includes up to 1 s of polling; kproxy's
  own partial sync duration (from its log) is printed beside it.
* one periodic sync (``--iptables-sync-period``, ``--sync-period``, 30 s by default) with
  nothing changed, waited for after the changes: partial since periodic syncs are (as
  upstream's), its duration from kproxy's partial-sync histogram and kproxy's CPU (own +
  children) across it.
* one forced full sync over the populated tables: a jump rule (``POSTROUTING -j
  KUBE-POSTROUTING``) is deleted, the canary monitor notices it within a sync period and asks
  for a sync, which is full (the hourly full sync is the same work). Its duration (from the
  log), deletion -> synced, CPU across it, and whether the jump is back. That is the steady
  state's memory peak (stale chain listing, every chain rewritten), so peak RSS is read after
  it (``--no-periodic`` skips both).
* the canary monitor's check at that size (what its thread runs every sync period:
  `IptablesProxier.missing_in_kernel`, in the namespace, best of 3).
* rules in the kernel (``-A`` lines of iptables-save), kproxy's peak RSS (VmHWM, its own
  process only) and CPU seconds (its own, and its children's: the restore processes).
  ``--kproxy-pythonpath DIR...`` runs another checkout's kproxy (e.g. an older commit from
  ``git archive``) for a side-by-side comparison; its label is ``--label``.
* the floor: the same rule set (rendered by the mode from an equivalent model) applied by a
  bare ``iptables-restore`` in another fresh namespace; wall, CPU and peak RSS of that
  process. On nf_tables, also the whole set as ONE transaction (what upstream writes), up to
  ``--single-max`` services since it is quadratic.

The machine is shared: wall times suffer from other load, so CPU seconds are printed too, and
the load average and CPU pressure at each measurement. Prints a Markdown table; asserts
nothing. ``--plot FILE`` draws sync time against service count (needs matplotlib).

    python benchmarks/iptables_mode.py                 # 1000 5000 10000 x 5 endpoints
    python benchmarks/iptables_mode.py --quick         # 200 1000, fewer variants
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kproxy_iptables import rules as R
from kproxy_iptables.proxier import IptablesProxier

from kproxy_core.backend import BackendContext, SyncRequest
from kproxy_core.kernel.iptables import RestoreData
from kproxy_core.model import (
    Endpoint,
    NodeView,
    ResolvedServicePort,
    ServicePortKey,
    ServicePortName,
)
from kproxy_core.plugins import KproxyPluginManager
from kproxy_core.testing.innetns import in_netns
from kproxy_core.testing.netns import NetNS, Sandbox
from kproxy_core.testing.signals import exit_on_signals

CLUSTER_CIDR = "10.244.0.0/16"
TICK = os.sysconf("SC_CLK_TCK")
SYNC_RE = re.compile(r"synced (full|partial): (\d+) service ports, (\d+) changed, ([\d.]+)s "
                     r"\(external ([\d.]+)s\), (\d+) objects written")
FAILED_RE = re.compile(r'msg="(sync failed[^"\n]*)')
CONFIGS = (("restore", "nft"), ("restore", "legacy"), ("libiptc", "legacy"))


def cluster_ip(i: int) -> str:
    return f"172.{16 + i // 65536 % 16}.{i // 256 % 256}.{i % 256}"


def endpoint_ip(n: int) -> str:
    return f"10.{128 + n // 65536 % 64}.{n // 256 % 256}.{n % 256}"


def service_doc(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc{i}", "namespace": f"ns{i % 50}"},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip(i),
                     "clusterIPs": [cluster_ip(i)],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                "targetPort": 8080}]}}


def slice_doc(i: int, addresses: list[str]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc{i}-abcde", "namespace": f"ns{i % 50}",
                         "labels": {"kubernetes.io/service-name": f"svc{i}"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "nodeName": "node2",
                           "conditions": {"ready": True, "serving": True, "terminating": False}}
                          for a in addresses]}


def addresses(i: int, endpoints: int) -> list[str]:
    return [endpoint_ip(i * endpoints + e) for e in range(endpoints)]


def write_manifests(directory: Path, services: int, endpoints: int) -> None:
    def dump(name: str, items: list[dict[str, Any]]) -> None:
        (directory / name).write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                                  "items": items}))
    dump("services.json", [service_doc(i) for i in range(services)])
    dump("slices.json", [slice_doc(i, addresses(i, endpoints)) for i in range(1, services)])
    dump("slice-0.json", [slice_doc(0, addresses(0, endpoints))])
    dump("node.json", [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node"},
                        "spec": {"podCIDR": "10.244.1.0/24"},
                        "status": {"addresses": [{"type": "InternalIP",
                                                  "address": "10.99.0.1"}]}}])


def pressure() -> str:
    load = os.getloadavg()[0]
    try:
        some = Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1]
    except (OSError, IndexError):
        some = "?"
    return f"load {load:.1f}, cpu pressure avg10 {some}%"


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own CPU s, waited-for children's CPU s) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class SyncFailed(RuntimeError):
    pass


def wait_log(log: Path, kind: str, count: int, deadline: float) -> re.Match[str] | None:
    """The ``count``-th "synced <kind>" log match, polling until ``deadline``; raises
    `SyncFailed` with kproxy's message when a sync fails first."""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = [m for m in SYNC_RE.finditer(text) if m.group(1) == kind]
        if len(found) >= count:
            return found[count - 1]
        failed = FAILED_RE.search(text)
        if failed is not None:
            raise SyncFailed(failed.group(1))
        time.sleep(0.05)
    return None


def sync_histogram(ns: NetNS, kind: str = "") -> tuple[float, int]:
    """(sum, count) of kproxy's sync-duration histogram (``kind`` "partial" or "full": that
    one), from its metrics endpoint."""
    text = ns.run([sys.executable, "-c", "import urllib.request;print(urllib.request.urlopen("
                   "'http://127.0.0.1:10249/metrics').read().decode())"]).stdout
    name = f"kubeproxy_sync_{kind}_proxy_rules" if kind else "kubeproxy_sync_proxy_rules"
    total, count = 0.0, 0
    for line in text.splitlines():
        if line.startswith(f"{name}_duration_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith(f"{name}_duration_seconds_count"):
            count = int(float(line.split()[-1]))
    return total, count


def monitor_check_seconds(ns: NetNS, reps: int = 3) -> tuple[float, int]:
    """(best wall seconds of the canary monitor's check, what it found missing) in ``ns``,
    by a proxier built like kproxy's (same defaults) that only reads the kernel."""
    def check() -> tuple[float, int]:
        from kproxy_core.kernel.iptables_writers import detect_backend

        detect_backend.cache_clear()
        proxier = IptablesProxier(BackendContext(
            _Config(), "node", logging.getLogger("bench"),
            KproxyPluginManager(load_entrypoints=False), families=(4,)))
        best, missing = float("inf"), 0
        for _ in range(reps):
            start = time.perf_counter()
            missing = len(proxier.missing_in_kernel())
            best = min(best, time.perf_counter() - start)
        return best, missing

    return in_netns(ns.name, check, timeout=600)


#: The jump the forced full sync's trigger deletes (nothing in the benchmark needs SNAT).
POSTROUTING_JUMP = ["POSTROUTING", "-m", "comment", "--comment", "kubernetes postrouting rules",
                    "-j", "KUBE-POSTROUTING"]


def run_kproxy(services: int, endpoints: int, writer: str, backend: str, changes: int,
               budget: float, *, periodic: bool = True, pythonpath: list[str] | None = None,
               label: str = "", sync_period: float = 30.0) -> dict[str, Any]:
    out: dict[str, Any] = {"services": services, "writer": writer, "backend": backend,
                           "label": label}
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*pythonpath, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmp, Sandbox() as sandbox:
        directory = Path(tmp) / "manifests"
        directory.mkdir()
        write_manifests(directory, services, endpoints)
        ns = sandbox.netns("kpbench")
        if backend == "legacy":
            # kubelet's hint chain: how kproxy (like iptables-wrappers) picks the backend.
            ns.run(["iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
        log = Path(tmp) / "kproxy.log"
        start = time.monotonic()
        with log.open("w") as sink:
            proc = ns.spawn([sys.executable, "-m", "kproxy_core.cli", "--proxy-mode=iptables",
                             f"--manifests={directory}", f"--iptables-writer={writer}",
                             "--hostname-override=node", f"--cluster-cidr={CLUSTER_CIDR}",
                             "--healthz-bind-address=127.0.0.1:10256",
                             "--metrics-bind-address=127.0.0.1:10249",
                             "--iptables-min-sync-period=0",
                             f"--iptables-sync-period={sync_period:g}s", "--v=2"],
                            stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            first = wait_log(log, "full", 1, start + budget)
        except SyncFailed as exc:
            out["error"] = str(exc)[:300]
            out["pressure"] = pressure()
            return out
        if first is None:
            out["error"] = f"no full sync within {budget:.0f}s"
            out["pressure"] = pressure()
            return out
        out["start_to_synced"] = time.monotonic() - start
        out["sync"] = float(first.group(4))
        out["external"] = float(first.group(5))
        out["objects"] = int(first.group(6))
        out["pressure"] = pressure()
        name = ServicePortName("ns0", "svc0", "http", "TCP")
        latencies: list[float] = []
        partials: list[float] = []
        base = addresses(0, endpoints)
        binary = f"iptables-{backend}"
        for n in range(changes):
            new = endpoint_ip(60000 + n)
            chain = R.endpoint_chain(name, f"{new}:8080")
            (directory / "slice-0.json.tmp").write_text(json.dumps(
                {"apiVersion": "v1", "kind": "List",
                 "items": [slice_doc(0, [new, *base[1:]])]}))
            before = sync_histogram(ns)
            changed = time.monotonic()
            os.replace(directory / "slice-0.json.tmp", directory / "slice-0.json")
            while time.monotonic() - changed < budget:
                if ns.run([binary, "-w", "5", "-t", "nat", "-S", chain, "1"],
                          check=False).returncode == 0:
                    latencies.append(time.monotonic() - changed)
                    break
                time.sleep(0.01)
            # Partial syncs log at debug level only: their duration comes from the
            # sync-duration histogram instead (the change's sync is the only one since).
            until = time.monotonic() + 30
            while time.monotonic() < until:
                total, count = sync_histogram(ns)
                if count > before[1]:
                    partials.append((total - before[0]) / (count - before[1]))
                    break
                time.sleep(0.05)
        out["change"] = sorted(latencies)[len(latencies) // 2] if latencies else None
        out["partial_sync"] = sorted(partials)[len(partials) // 2] if partials else None
        out["rss_before_periodic_mb"] = proc_hwm_mb(proc.pid)
        if periodic:
            # The periodic sync of a quiet node: partial (nothing changed since the changes).
            before = sync_histogram(ns, "partial")
            cpu_before = sum(proc_cpu(proc.pid))
            until = time.monotonic() + sync_period + budget
            while time.monotonic() < until:
                total, count = sync_histogram(ns, "partial")
                if count > before[1]:
                    out["periodic_partial_sync"] = (total - before[0]) / (count - before[1])
                    out["periodic_partial_cpu"] = sum(proc_cpu(proc.pid)) - cpu_before
                    break
                time.sleep(0.2)
            out["monitor_check"], out["monitor_missing"] = monitor_check_seconds(ns)
            # A forced full sync, through the canary monitor: a deleted jump.
            fulls = len([m for m in SYNC_RE.finditer(log.read_text(errors="replace"))
                         if m.group(1) == "full"])
            cpu_before = sum(proc_cpu(proc.pid))
            ns.run([binary, "-w", "5", "-t", "nat", "-D", *POSTROUTING_JUMP])
            deleted = time.monotonic()
            again = wait_log(log, "full", fulls + 1, deleted + sync_period + budget)
            if again is not None:
                out["forced_full_sync"] = float(again.group(4))
                out["forced_full_after"] = time.monotonic() - deleted
                out["forced_full_cpu"] = sum(proc_cpu(proc.pid)) - cpu_before
                out["forced_full_reason"] = log.read_text(errors="replace")[
                    again.end():].split("\n", 1)[0].strip().strip('"')
                out["jump_back"] = ns.run([binary, "-w", "5", "-t", "nat", "-C",
                                           *POSTROUTING_JUMP], check=False).returncode == 0
        own, children = proc_cpu(proc.pid)
        out["cpu_own"] = own
        out["cpu_children"] = children
        out["rss_mb"] = proc_hwm_mb(proc.pid)
        saved = ns.run([f"iptables-{backend}-save"], check=False, timeout=600).stdout
        out["rules"] = sum(1 for line in saved.splitlines() if line.startswith("-A"))
        out["chains"] = sum(1 for line in saved.splitlines() if line.startswith(":KUBE-"))
    return out


# --------------------------------------------------------------------------------------------
# The floor: the same rules through a bare restore
# --------------------------------------------------------------------------------------------


class _Config:
    values = {"clusterCIDR": CLUSTER_CIDR}

    def get(self, path: str) -> object:
        return self.values[path]


def model(services: int, endpoints: int) -> NodeView:
    ports: dict[ServicePortKey, ResolvedServicePort] = {}
    for i in range(services):
        key = ServicePortKey(4, ServicePortName(f"ns{i % 50}", f"svc{i}", "http", "TCP"))
        eps = tuple(Endpoint(a, 8080, False, True, True, False)
                    for a in addresses(i, endpoints))
        ports[key] = ResolvedServicePort(key, cluster_ip(i), 80, cluster_endpoints=eps,
                                         all_reachable_endpoints=eps, has_any_endpoints=True)
    return NodeView("node", ("10.99.0.1",), "", ports)


def floor_text(services: int, endpoints: int, sections: bool) -> str:
    view = model(services, endpoints)
    proxier = IptablesProxier(BackendContext(
        _Config(), "node", logging.getLogger("bench"),
        KproxyPluginManager(load_entrypoints=False), families=(4,)))
    data, _ = proxier.plan(SyncRequest(view, frozenset(view.services), True), 4, full=True,
                           sections=sections)
    parts: list[RestoreData] = data if isinstance(data, list) else [data]
    return "".join(p.render() for p in parts if not p.is_empty())


def run_floor(text: str, writer: str, backend: str) -> dict[str, Any]:
    def bare() -> tuple[float, float, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([f"iptables-{backend}-restore", "-w", "5", "--noflush"], input=text,
                       text=True, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return wall, cpu, after.ru_maxrss / 1024

    def libiptc() -> tuple[float, float, float]:
        from kproxy_core.kernel.iptables_writers import LibiptcWriter

        before = resource.getrusage(resource.RUSAGE_SELF)
        wall = LibiptcWriter(4).restore_text(text)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return wall, cpu, after.ru_maxrss / 1024

    with Sandbox() as sandbox:
        ns: NetNS = sandbox.netns("floor")
        wall, cpu, rss = in_netns(ns.name, libiptc if writer == "libiptc" else bare,
                                  timeout=3600)
    return {"wall": wall, "cpu": cpu, "rss_mb": rss, "pressure": pressure()}


# --------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def machine() -> str:
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    version = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout
    return (f"{time.strftime('%Y-%m-%d')}, nproc {os.cpu_count()}, memory "
            f"{int(mem) // 1024} MiB, kernel {os.uname().release}, {version.strip()}")


#: Upstream's first full sync on this kind of machine (from the task brief, not this script).
UPSTREAM_FULL_SYNC = {1000: 2.4, 5000: 52.0, 10000: 350.0}


def plot(results: list[dict[str, Any]], floors: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for writer, backend in CONFIGS:
        rows = [r for r in results if r["writer"] == writer and r["backend"] == backend
                and "sync" in r]
        if rows:
            ax.plot([r["services"] for r in rows], [r["sync"] for r in rows], marker="o",
                    label=f"kproxy first full sync ({writer}, {backend})")
    for kind in sorted({f["kind"] for f in floors}):
        rows = [f for f in floors if f["kind"] == kind]
        ax.plot([f["services"] for f in rows], [f["wall"] for f in rows], linestyle="--",
                marker="x", label=f"floor: {kind}")
    ax.plot(list(UPSTREAM_FULL_SYNC), list(UPSTREAM_FULL_SYNC.values()), linestyle=":",
            marker="s", color="grey", label="upstream kube-proxy v1.36.2, nft (reference)")
    ax.set_xlabel("ClusterIP services (5 endpoints each)")
    ax.set_ylabel("seconds (wall)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("iptables mode: first full sync vs service count")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    exit_on_signals()  # SIGTERM/SIGINT unwind through the sandboxes' cleanup
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--changes", type=int, default=3, help="one-endpoint changes per run")
    parser.add_argument("--configs", nargs="+", default=[f"{w}-{b}" for w, b in CONFIGS],
                        help="writer-backend pairs, e.g. restore-nft libiptc-legacy")
    parser.add_argument("--single-max", type=int, default=2000,
                        help="largest size for the one-transaction nft floor (quadratic)")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds per kproxy run")
    parser.add_argument("--quick", action="store_true", help="sizes 200 1000, 1 change")
    parser.add_argument("--plot", help="write the PNG plot here")
    parser.add_argument("--json", help="write raw results here")
    parser.add_argument("--replot", help="only redraw --plot from a --json file")
    parser.add_argument("--no-periodic", action="store_true",
                        help="skip the periodic (partial) and the forced full sync")
    parser.add_argument("--sync-period", type=float, default=30.0,
                        help="kproxy's --iptables-sync-period, seconds (also the canary "
                             "monitor's period)")
    parser.add_argument("--kproxy-pythonpath", nargs="+",
                        help="run kproxy from these directories instead (another checkout)")
    parser.add_argument("--label", default="", help="printed with each kproxy result")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor runs")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["results"], saved["floors"], args.plot or "iptables-sync-time.png")
        return
    if os.geteuid() != 0:
        sys.exit("needs root (creates network namespaces)")
    # The legacy xtables lock is one file for every namespace on the machine: a 10k restore
    # holding it would stall everybody else's iptables-legacy. Our namespaces are private,
    # so is our lock (kproxy, iptables and the libiptc writer all honour the variable).
    lock = tempfile.NamedTemporaryFile(prefix="kproxy-bench-xtables-", suffix=".lock")
    os.environ["XTABLES_LOCKFILE"] = lock.name
    if args.quick:
        args.sizes, args.changes = [200, 1000], 1
    configs = [tuple(c.split("-", 1)) for c in args.configs]
    print(f"# {machine()}", flush=True)
    results: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    for size in args.sizes:
        for writer, backend in configs:
            r = run_kproxy(size, args.endpoints, writer, backend, args.changes, args.budget,
                           periodic=not args.no_periodic, pythonpath=args.kproxy_pythonpath,
                           label=args.label, sync_period=args.sync_period)
            results.append(r)
            print(json.dumps(r), flush=True)
        for writer, backend in ([] if args.no_floor else configs):
            sections = writer == "restore" and backend == "nft"
            text = floor_text(size, args.endpoints, sections)
            f = run_floor(text, writer, backend)
            f.update(services=size, kind=f"{writer}-{backend}"
                     + (" (kproxy's sections)" if sections else ""))
            floors.append(f)
            print(json.dumps(f), flush=True)
        if ("restore", "nft") in configs and size <= args.single_max and not args.no_floor:
            f = run_floor(floor_text(size, args.endpoints, False), "restore", "nft")
            f.update(services=size, kind="restore-nft, one transaction (upstream's shape)")
            floors.append(f)
            print(json.dumps(f), flush=True)
    print()
    print("| services | writer | backend | first full sync s | restore in it s | Python "
          "share | start->synced s | 1-endpoint change s (sync s) | rules | chains | peak RSS "
          "MB (before the forced full sync) | periodic partial sync s (CPU s) | forced full "
          "sync s (CPU s; jump deleted -> synced s) | monitor check s | CPU own / children s | "
          "load | label |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "sync" not in r:
            print(f"| {r['services']} | {r['writer']} | {r['backend']} | {r['error']} |"
                  + " |" * 12 + f" {r['pressure']} | {r['label']} |")
            continue
        share = (r["sync"] - r["external"]) / r["sync"] if r["sync"] else 0.0
        print(f"| {r['services']} | {r['writer']} | {r['backend']} | {fmt(r['sync'])} | "
              f"{fmt(r['external'])} | {share:.0%} | {fmt(r['start_to_synced'])} | "
              f"{fmt(r['change'])} ({fmt(r['partial_sync'], 3)}) | {r['rules']} | "
              f"{r['chains']} | {fmt(r['rss_mb'], 0)} ({fmt(r['rss_before_periodic_mb'], 0)}) | "
              f"{fmt(r.get('periodic_partial_sync'), 3)} "
              f"({fmt(r.get('periodic_partial_cpu'))}) | {fmt(r.get('forced_full_sync'))} "
              f"({fmt(r.get('forced_full_cpu'))}; {fmt(r.get('forced_full_after'), 1)}"
              f"{'' if r.get('jump_back', True) else ', JUMP NOT BACK'}) | "
              f"{fmt(r.get('monitor_check'), 3)} | {fmt(r['cpu_own'], 1)} / "
              f"{fmt(r['cpu_children'], 1)} | {r['pressure']} | {r['label']} |")
    print()
    print("| services | floor | wall s | CPU s | peak RSS MB | load |")
    print("|---|---|---|---|---|---|")
    for f in floors:
        print(f"| {f['services']} | {f['kind']} | {fmt(f['wall'])} | {fmt(f['cpu'])} | "
              f"{fmt(f['rss_mb'], 0)} | {f['pressure']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results,
                                               "floors": floors}, indent=1))
    if args.plot:
        plot(results, floors, args.plot)


if __name__ == "__main__":
    main()
