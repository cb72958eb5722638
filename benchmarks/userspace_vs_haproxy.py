"""kproxy-userspace against HAProxy (mode tcp) and against no proxy at all. Prints numbers.

Everything runs in a `ClusterSandbox` (root): the client namespace talks over veth/bridge to
the node namespace, which proxies to one pod. Measured per target:

* bulk TCP throughput: ``iperf3 -t SECONDS`` through the proxy;
* short connections: an asyncio client opens a connection, reads a one-line answer, closes,
  with CONCURRENCY in flight; connections/s and connect+answer latency p50/p99;
* proxy CPU per short connection: user+system time of the proxy process (HAProxy or the
  kproxy driver) over the short-connection run, divided by the connections it served. This
  is the figure least disturbed by other load on the machine.

Every target gets the same pod servers, the same client and the same measurement. Targets
are measured in ROUNDS interleaved rounds (each round runs every target once, in an order
rotated by one each round) and the median and the range over the rounds are printed per
target, so a burst of load from elsewhere does not land on one target.

Run: ``python benchmarks/userspace_vs_haproxy.py [--seconds 3] [--concurrency 32]
[--rounds 3] [--relays auto,splice,copy] [--event-loop auto|asyncio|uvloop]
[--skip bulk|short]``.
All processes share the machine's cores, so the short-connection figures include the Python
load generator and Python answer server on the same CPUs: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kproxy_core.testing.netns import ClusterSandbox, NetNS, wait_for_port
from kproxy_core.testing.signals import exit_on_signals

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "plugins" / "kproxy-userspace" / "tests" / "driver.py"

SERVER = r"""
import asyncio, sys
async def handle(reader, writer):
    writer.write(b"ok\n")
    await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

LOADGEN = r"""
import asyncio, json, sys, time
host, port = sys.argv[1], int(sys.argv[2])
seconds, concurrency = float(sys.argv[3]), int(sys.argv[4])
latencies = []
errors = 0
async def worker(deadline):
    global errors
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            await asyncio.wait_for(reader.read(100), 5)
            writer.close()
            latencies.append(time.perf_counter() - started)
        except (OSError, asyncio.TimeoutError):
            errors += 1
async def main():
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    latencies.sort()
    n = len(latencies)
    print(json.dumps({"n": n, "cps": n / elapsed, "p50_ms": latencies[n // 2] * 1e3 if n else None,
                      "p99_ms": latencies[int(n * 0.99)] * 1e3 if n else None,
                      "errors": errors}))
asyncio.run(main())
"""

HAPROXY_CFG = """
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend bulk
    bind {node}:15201
    default_backend bulk_b
backend bulk_b
    server pod {pod}:5201
frontend short
    bind {node}:18081
    default_backend short_b
backend short_b
    server pod {pod}:8081
"""


def iperf(pod: NetNS, pod_ip: str, client: NetNS, host: str, port: int,
          seconds: float) -> float:
    # A one-off server (-1) per measurement exits by itself once its client is done. A
    # long-running one had to be killed at teardown, and iperf3 says so on stderr ("iperf3:
    # interrupt - the server has terminated") at the end of every run.
    server = pod.spawn(["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(pod, pod_ip, 5201)
        out = client.run(["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"],
                         timeout=seconds + 30).stdout
    finally:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.terminate()  # the client failed before the test ended
            server.wait(10)
    report: dict[str, Any] = json.loads(out)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def short(client: NetNS, host: str, port: int, seconds: float, concurrency: int,
          proxy_pid: int | None) -> dict[str, Any]:
    before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    out = client.run([sys.executable, "-c", LOADGEN, host, str(port), str(seconds),
                      str(concurrency)], timeout=seconds + 60).stdout
    result: dict[str, Any] = json.loads(out)
    if proxy_pid:
        result["cpu_us"] = (cpu_seconds(proxy_pid) - before) / max(result["n"], 1) * 1e6
    else:
        result["cpu_us"] = None
    return result


def start_userspace(sb: ClusterSandbox, pod_ip: str, relay: str,
                    event_loop: str) -> subprocess.Popen[bytes]:
    options = {"userspace.relay": relay, "userspace.eventLoop": event_loop}
    proc = sb.node.spawn([sys.executable, str(DRIVER), json.dumps(options)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    assert json.loads(proc.stdout.readline())["ok"]
    services = [
        dict(name="bulk", protocol="TCP", cluster_ip="10.96.0.50", port=5201,
             endpoints=[[pod_ip, 5201]]),
        dict(name="short", protocol="TCP", cluster_ip="10.96.0.51", port=8081,
             endpoints=[[pod_ip, 8081]]),
    ]
    proc.stdin.write(json.dumps({"op": "sync", "services": services, "full": True}).encode()
                     + b"\n")
    proc.stdin.flush()
    reply = json.loads(proc.stdout.readline())
    if not reply["ok"]:
        raise RuntimeError(reply)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    exit_on_signals()  # SIGTERM/SIGINT unwind through the sandbox's cleanup
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--relays", default="auto,splice,copy")
    parser.add_argument("--event-loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    parser.add_argument("--skip", default="", help="comma list: bulk, short")
    args = parser.parse_args()
    relays = [r for r in args.relays.split(",") if r]
    skip = {s for s in args.skip.split(",") if s}
    with ClusterSandbox(local_pods=1, remote_pods=0) as sb:
        pod = sb.pods[0]
        pod.ns.spawn([sys.executable, "-c", SERVER, "8081"])
        wait_for_port(pod.ns, pod.ip, 8081)
        # "No proxy": the client reaches the pod directly, routed through the node.
        sb.client.run(["ip", "route", "add", "10.244.0.0/16", "via", sb.node_ip])

        rounds: dict[str, list[dict[str, Any]]] = {}

        def measure(label: str, bulk: tuple[str, int], fast: tuple[str, int],
                    proxy_pid: int | None) -> None:
            time.sleep(0.3)
            result: dict[str, Any] = {}
            if "bulk" not in skip:
                result["gbps"] = iperf(pod.ns, pod.ip, sb.client, *bulk, args.seconds)
            if "short" not in skip:
                result.update(short(sb.client, *fast, args.seconds, args.concurrency,
                                    proxy_pid))
            rounds.setdefault(label, []).append(result)

        def no_proxy() -> None:
            measure("no proxy", (pod.ip, 5201), (pod.ip, 8081), None)

        def with_haproxy() -> None:
            haproxy = sb.node.spawn(["haproxy", "-f", cfg.name, "-db"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_port(sb.node, sb.node_ip, 18081)
            measure("haproxy", (sb.node_ip, 15201), (sb.node_ip, 18081), haproxy.pid)
            stop(haproxy)

        def with_userspace(relay: str) -> None:
            proxy = start_userspace(sb, pod.ip, relay, args.event_loop)
            measure(f"kproxy-userspace {relay}", ("10.96.0.50", 5201), ("10.96.0.51", 8081),
                    proxy.pid)
            stop(proxy)

        targets: list[Callable[[], None]] = [
            no_proxy, with_haproxy, *(functools.partial(with_userspace, r) for r in relays)]
        with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as cfg:
            cfg.write(HAPROXY_CFG.format(node=sb.node_ip, pod=pod.ip))
        loads = []
        try:
            for number in range(args.rounds):
                # The order rotates every round: a target always measured right after the
                # same neighbour (its TIME_WAIT sockets, its conntrack entries, a CPU burst
                # from elsewhere that lasts one target) would carry a bias of its own.
                shift = number % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    target()
                loads.append(os.getloadavg()[0])
                print(f"round {number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            Path(cfg.name).unlink()

        def values(label: str, key: str) -> list[float]:
            return [float(r[key]) for r in rounds[label] if r.get(key) is not None]

        def median(label: str, key: str) -> float:
            return float(statistics.median(values(label, key)))

        print(f"load average {min(loads):.1f}-{max(loads):.1f} over the rounds; median "
              f"[min-max] of {args.rounds} rounds, rotating order; kproxy event loop option: "
              f"{args.event_loop}")
        for label in rounds:
            line = f"{label:24s}"
            if "bulk" not in skip:
                gbps = values(label, "gbps")
                line += f" {median(label, 'gbps'):6.2f} Gbit/s [{spread(gbps)}]"
            if "short" not in skip:
                line += (f" {median(label, 'cps'):6.0f} conn/s [{spread(values(label, 'cps'))}]"
                         f" p50 {median(label, 'p50_ms'):.2f} ms"
                         f" p99 {median(label, 'p99_ms'):.2f} ms"
                         f" errors {sum(values(label, 'errors')):.0f}")
                cpu = values(label, "cpu_us")
                if cpu:
                    line += f" {statistics.median(cpu):4.0f} us/conn [{spread(cpu)}]"
            print(line, flush=True)
        print()
        for relay in relays:
            label = f"kproxy-userspace {relay}"
            parts = []
            if "bulk" not in skip:
                parts.append(
                    f"throughput {median(label, 'gbps') / median('haproxy', 'gbps'):.2f}x "
                    f"haproxy, {median(label, 'gbps') / median('no proxy', 'gbps'):.2f}x no "
                    "proxy")
            if "short" not in skip:
                parts.append(f"conn/s {median(label, 'cps') / median('haproxy', 'cps'):.2f}x "
                             "haproxy; CPU per connection "
                             f"{median(label, 'cpu_us') / median('haproxy', 'cpu_us'):.2f}x "
                             "haproxy")
            print(f"{relay}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
