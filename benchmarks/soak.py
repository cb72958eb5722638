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
* sync errors and restore failures counted by kproxy's own metrics;
* the fixed service's latency tail (answered requests slower than 0.2/0.5/1 s) and the load
  average, so a timeout can be told apart: a dropped SYN costs exactly the 1 s retransmit
  (connect ~1.0x s), a starved process costs an arbitrary delay.

The fixed service's endpoints run a logging server (``--serve-log``, port 8081) that writes
when it accepted and answered each connection and from which client port; after a failure the
report looks the client's source port up in those logs (seen late = the request got through
and the answer was slow; never seen = the SYN or its reply was lost), and saves the
conntrack entry of that connection, the load and CPU pressure at that moment, and counters
that say where a lost packet went: forwarded packets conntrack judged INVALID (counted by
rules the soak adds to the node's mangle FORWARD; kproxy's KUBE-FORWARD drops them),
conntrack's statistics, and the client's SYN retransmissions. ``--calibrate`` causes both
kinds of failure on purpose and prints their reports.

    python benchmarks/soak.py                     # 30 minutes, iptables mode
    python benchmarks/soak.py --minutes 2 --mode userspace
    python benchmarks/soak.py --minutes 30 --workdir /tmp/soak/run3   # keep logs + snapshots
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from e2e_harness import Cluster, answered, eventually
from e2e_netns import NetnsThread

from kproxy_core.demo import Ep, endpoint_slice_obj, service_obj, svc_port
from kproxy_core.testing.netns import wait_for_port
from kproxy_core.testing.signals import exit_on_signals

FIXED_IP = "10.96.200.1"
#: the fixed service's target port: the logging server (the pods' echo server keeps 8080)
LOG_PORT = 8081
FIXED_PODS = ("pod-1-2", "pod-2-2")
CLIENT_POD = "pod-1-3"
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


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_pressure() -> str:
    """The ``some`` line of /proc/pressure/cpu (share of time tasks waited for a CPU)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "n/a"


class _LoggingHandler(socketserver.BaseRequestHandler):
    server: _LoggingServer

    def handle(self) -> None:
        accepted = time.time()
        peer_ip, peer_port = self.client_address[0], self.client_address[1]
        self.request.sendall(f"{self.server.pod_name} {peer_ip}\n".encode())
        answered_at = time.time()
        # Written before waiting for the client's close: a line per connection even when the
        # client gave up and the close never comes.
        self.server.log(f"{accepted:.3f} {answered_at:.3f} {peer_ip} {peer_port}")
        try:
            while self.request.recv(4096):
                pass
        except OSError:
            pass


class _LoggingServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, port: int, pod_name: str, log_path: Path) -> None:
        super().__init__(("0.0.0.0", port), _LoggingHandler)
        self.pod_name = pod_name
        self._log = log_path.open("a", buffering=1)
        self._lock = threading.Lock()

    def log(self, line: str) -> None:
        with self._lock:
            self._log.write(line + "\n")


def serve_log(pod_name: str, port: int, log_path: Path) -> None:
    """The fixed service's endpoint: answers like the echo server and logs every connection
    as ``<accepted unix time> <answered unix time> <peer ip> <peer port>``."""
    with _LoggingServer(port, pod_name, log_path) as server:
        server.serve_forever()


@dataclass
class Probe:
    """One request to the fixed service, timed by phase (wall-clock, to match server logs)."""

    started: float
    reply: str
    local_port: int
    connect_s: float
    total_s: float
    phase: str  # where it ended: "ok", "connect" or "reply"


def probe(host: str, port: int, timeout: float) -> Probe:
    started = time.time()
    connected = started
    local_port = 0
    phase = "connect"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            try:
                sock.connect((host, port))
            finally:
                # connect() chose the source port even when it timed out: the key to find
                # this request in conntrack and in the server's log.
                local_port = sock.getsockname()[1]
            connected = time.time()
            phase = "reply"
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            reply = data.decode().strip() or "error: closed without a reply"
            phase = "ok"
        except ConnectionRefusedError:
            reply = "refused"
        except TimeoutError:
            reply = "timeout"
        except OSError as exc:
            reply = f"error {exc}"
    end = time.time()
    return Probe(started, reply, local_port, (connected if phase != "connect" else end) - started,
                 end - started, phase)


def server_log_lines(c: Cluster) -> dict[int, list[str]]:
    """Client source port -> the lines of the fixed endpoints' logs that name it."""
    seen: dict[int, list[str]] = {}
    for name in FIXED_PODS:
        path = c.workdir / f"serve-{name}.log"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) == 4 and fields[3].isdigit():
                seen.setdefault(int(fields[3]), []).append(f"{name} {line}")
    return seen


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


#: Counting rules (no target) the soak puts in the node's mangle FORWARD, a chain kproxy
#: never writes, so a sync never resets them: forwarded packets conntrack found INVALID
#: (kproxy's KUBE-FORWARD drops those), and the TCP SYNs among them.
_COUNTERS = {
    "invalid_syn": ["-p", "tcp", "--syn", "-m", "conntrack", "--ctstate", "INVALID"],
    "invalid": ["-m", "conntrack", "--ctstate", "INVALID"],
}


def install_counters(c: Cluster) -> None:
    for name, match in _COUNTERS.items():
        c.sb.node.run(["iptables", "-t", "mangle", "-A", "FORWARD", *match,
                       "-m", "comment", "--comment", f"soak-{name}"])


def counters(c: Cluster) -> dict[str, int]:
    """The INVALID counters, conntrack's own statistics in the node namespace, and the
    client's SYN retransmissions and TCP timeouts (its /proc/net/netstat)."""
    result: dict[str, int] = {}
    listing = c.sb.node.run(["iptables", "-t", "mangle", "-L", "FORWARD", "-v", "-x", "-n"],
                            check=False).stdout
    for line in listing.splitlines():
        for name in _COUNTERS:
            if f"soak-{name} " in line + " ":
                result[name] = int(line.split()[0])
    stats = c.sb.node.run(["conntrack", "-S"], check=False).stdout
    for key in ("invalid", "error", "drop", "insert_failed", "early_drop"):
        result[f"ct_{key}"] = sum(int(v) for v in re.findall(rf"\b{key}=(\d+)", stats))
    netstat = c.pod(CLIENT_POD).ns.run(["cat", "/proc/net/netstat"], check=False).stdout
    lines = netstat.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        for key, value in zip(names.split()[1:], values.split()[1:], strict=False):
            if key in ("TCPSynRetrans", "TCPTimeouts"):
                result[f"client_{key}"] = int(value)
    return result


def start_fixed_service(c: Cluster) -> list[subprocess.Popen[bytes]]:
    """Logging servers in the fixed pods, kproxy, and the fixed Service answering."""
    servers = []
    for name in FIXED_PODS:
        pod = c.pod(name)
        # The endpoints are measuring instruments, not what is measured: at raised priority
        # a saturated machine cannot make them accept late (a starved endpoint, seen in
        # runs 3-4, says nothing about kproxy's dataplane).
        servers.append(pod.ns.spawn(
            ["nice", "-n", "-10", sys.executable, str(Path(__file__).resolve()), "--serve-log",
             name, str(LOG_PORT), str(c.workdir / f"serve-{name}.log")], stdout=subprocess.DEVNULL))
        wait_for_port(pod.ns, pod.ip, LOG_PORT, timeout=30)
    c.start_kproxy()
    install_counters(c)
    c.apply(service_obj("fixed", FIXED_IP, [svc_port(80, LOG_PORT)]),
            endpoint_slice_obj("fixed", c.eps(*FIXED_PODS), ports=(("", LOG_PORT, "TCP"),)))
    c.wait_answered_by(c.pod(CLIENT_POD), FIXED_IP, 80, set(FIXED_PODS), count=16)
    # The readiness probes above that ran before kproxy had programmed the service left
    # conntrack entries without NAT (SYN_SENT, UNREPLIED, 120 s): a measured request that
    # happens to reuse one of their source ports matches that entry, is not DNATed and is
    # lost (seen in a run: twice, both on the same port, connect phase). Not what the soak
    # measures: start from a clean table for the service.
    c.sb.node.run(["conntrack", "-D", "-p", "tcp", "--orig-dst", FIXED_IP], check=False)
    return servers


def as_record(p: Probe, t: float, request: int) -> dict[str, Any]:
    return {"t": round(t, 3), "utc": time.strftime("%H:%M:%S", time.gmtime(p.started)),
            "started": round(p.started, 3), "port": p.local_port,
            "connect_s": round(p.connect_s, 3), "total_s": round(p.total_s, 3),
            "phase": p.phase, "reply": p.reply, "request": request}


def snapshot(c: Cluster, record: dict[str, Any]) -> None:
    """What the machine and the node's conntrack held right after a failed request."""
    record["load"] = loadavg()
    record["cpu_pressure"] = cpu_pressure()
    record["counters"] = counters(c)
    record["conntrack"] = c.sb.node.run(
        ["conntrack", "-L", "-p", "tcp", "--orig-src", c.pod(CLIENT_POD).ip,
         "--sport", str(record["port"])], check=False).stdout.strip()


def match_servers(c: Cluster, failures: list[dict[str, Any]]) -> None:
    """Did the failed requests reach a server? Matched by client source port and start time
    (a port is reused after the range wraps, so only lines within 10 s count)."""
    seen = server_log_lines(c)
    for record in failures:
        record["server"] = [line for line in seen.get(record["port"], [])
                            if abs(float(line.split()[1]) - record["started"]) < 10]
        if not record["server"] and c.mode == "userspace":
            # The userspace mode relays from its own socket (another port): list what the
            # servers accepted while the request was pending instead (the client is
            # sequential: nothing else of ours was in flight then).
            begin, end = record["started"] - 0.1, record["started"] + record["total_s"]
            record["server"] = [f"(by time) {line}" for lines in seen.values()
                                for line in lines if begin <= float(line.split()[1]) <= end]


def classify(record: dict[str, Any]) -> str:
    """``starved endpoint``: the kernel completed the handshake at once and a server accepted
    the connection after the client had given up (the endpoint process did not run in time);
    ``lost before an endpoint``: the handshake never completed and no server saw it;
    ``other`` otherwise."""
    accepted_late = any(
        len(fields := line.split()) == 5 and fields[0] in FIXED_PODS
        and float(fields[1]) - record["started"] >= record["total_s"]
        for line in record.get("server", ()))
    if record["phase"] == "reply" and accepted_late:
        return "starved endpoint"
    if record["phase"] == "connect" and not record.get("server"):
        return "lost before an endpoint"
    return "other"


def print_failure(f: dict[str, Any]) -> None:
    print(f"  failed ({f.get('cause', '?')}) at t={f['t']}s ({f['utc']} UTC), request "
          f"{f['request']}, client port "
          f"{f['port']}: {f['reply']} in phase {f['phase']} (connect {f['connect_s']}s, "
          f"total {f['total_s']}s), load {f.get('load', '?')}")
    if "conntrack" in f:
        print(f"    conntrack: {f['conntrack'] or '(no entry)'}")
        print(f"    cpu pressure: {f['cpu_pressure']}")
        print(f"    counters: {f.get('counters')}")
    for line in f.get("server") or ["(no server saw this connection)"]:
        fields = line.split()
        late = ""
        if len(fields) == 5 and fields[0] in FIXED_PODS:
            # <pod> <accepted> <answered> <peer ip> <peer port>
            late = (f" (accepted {float(fields[1]) - f['started']:+.3f}s, answered "
                    f"{float(fields[2]) - f['started']:+.3f}s after the client started)")
        print(f"    server: {line}{late}")


def _soak(c: Cluster, minutes: float, sample: float, churn_interval: float,
          max_services: int, seed: int) -> dict[str, Any]:
    start_fixed_service(c)
    assert c.kproxy is not None
    kp = c.kproxy
    pid = kp.proc.pid
    in_client = NetnsThread(c.pod(CLIENT_POD).ns.name)
    baseline_chains = live_service_chains(c)
    fds_before, threads_before = open_fds(pid), threads(pid)

    requests = 0
    failures: list[dict[str, Any]] = []
    #: answered but slow: the tail that a timeout would belong to if it is starvation
    slow: list[dict[str, Any]] = []
    over = {"0.2s": 0, "0.5s": 0, "1s": 0}
    #: connects that took 1.0-1.5 s: the first SYN was lost and the 1 s retransmit got through
    syn_retransmits = 0
    longest_gap = 0.0
    start = time.monotonic()

    def traffic(stop: threading.Event) -> None:
        nonlocal requests, longest_gap, syn_retransmits
        last_ok = time.monotonic()
        while not stop.is_set():
            p = in_client.call(lambda: probe(FIXED_IP, 80, 2.0))
            now = time.monotonic()
            requests += 1
            record = as_record(p, now - start, requests)
            if 1.0 <= p.connect_s < 1.5:
                syn_retransmits += 1
            if answered(p.reply):
                longest_gap = max(longest_gap, now - last_ok)
                last_ok = now
                for label, limit in (("0.2s", 0.2), ("0.5s", 0.5), ("1s", 1.0)):
                    over[label] += p.total_s > limit
                if p.total_s > 0.5:
                    record["load"] = loadavg()
                    slow.append(record)
            else:
                failures.append(record)
                if len(failures) <= 5:
                    snapshot(c, record)
                    saved = c.sb.node.run(["iptables-save", "-t", "nat"], check=False).stdout
                    (c.workdir / f"failure-{len(failures)}-nat.txt").write_text(saved)
            time.sleep(0.02)

    churn = Churn(c, max_services, seed)

    def churning(stop: threading.Event) -> None:
        while not stop.wait(churn_interval):
            churn.step()

    rss: list[tuple[float, int]] = []
    loads: list[float] = []
    deadline = start + minutes * 60
    with running(traffic), running(churning):
        next_sample = start
        while time.monotonic() < deadline:
            if not kp.alive():
                raise RuntimeError(f"kproxy exited {kp.proc.returncode}:\n{kp.log_tail()}")
            now = time.monotonic()
            if now >= next_sample:
                rss.append((now - start, rss_kib(pid)))
                loads.append(float(loadavg().split()[0]))
                print(f"  t={now - start:7.0f}s rss={rss[-1][1]} KiB services={len(churn.live)} "
                      f"requests={requests} failed={len(failures)} slow>0.5s={len(slow)} "
                      f"conntrack={conntrack_entries(c)} load={loadavg()} {counters(c)}",
                      flush=True)
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
    # The userspace mode holds a socket per service port: give its last sync time to close
    # them before counting (a leak stays above the baseline after 30 s).
    try:
        eventually("fds back to the baseline",
                   lambda: True if open_fds(pid) <= fds_before else None, timeout=30)
    except AssertionError:
        pass
    in_client.close()
    match_servers(c, failures)
    causes: dict[str, int] = {}
    for record in failures:
        record["cause"] = classify(record)
        causes[record["cause"]] = causes.get(record["cause"], 0) + 1
    metrics = c.metrics()
    second_half = [s for s in rss if s[0] >= minutes * 30]
    return {
        "mode": c.mode,
        "minutes": minutes,
        "requests": requests,
        "failed": len(failures),
        "failures": failures[:20],
        "failure_causes": causes,
        "longest_gap_s": round(longest_gap, 3),
        "answered_slower_than": over,
        "syn_retransmit_connects": syn_retransmits,
        "slowest_answered": sorted(slow, key=lambda r: -r["total_s"])[:10],
        "load_avg_1m_mean": round(sum(loads) / len(loads), 2) if loads else 0.0,
        "load_avg_1m_max": max(loads, default=0.0),
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
        "counters_after": counters(c),
        "sync_errors": metric(metrics, "kproxy_sync_errors_total"),
        "restore_failures": metric(
            metrics, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"),
        "syncs": metric(metrics, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
        "still_alive": kp.alive(),
    }


def calibrate(workdir: Path) -> None:
    """Show what the failure report says for the two causes it must tell apart, caused on
    purpose: both endpoint servers stopped for 3 s (a starved process: the kernel completes
    the handshake, nobody answers) and the client's SYNs dropped for 3 s (a packet lost on
    the way: nothing reaches a server)."""
    c = Cluster("iptables", workdir)
    try:
        servers = start_fixed_service(c)
        client = c.pod(CLIENT_POD)
        in_client = NetnsThread(client.ns.name)
        drop = ["OUTPUT", "-p", "tcp", "--dport", "80", "--syn", "-j", "DROP"]

        def stop_servers() -> None:
            for proc in servers:
                os.kill(proc.pid, signal.SIGSTOP)

        def cont_servers() -> None:
            for proc in servers:
                os.kill(proc.pid, signal.SIGCONT)

        cases = [
            ("endpoint servers stopped 3 s (starvation)", stop_servers, cont_servers),
            ("client SYNs dropped 3 s (packet loss)",
             lambda: client.ns.run(["iptables", "-I", *drop]),
             lambda: client.ns.run(["iptables", "-D", *drop])),
        ]
        failures = []
        for number, (what, begin, end) in enumerate(cases, 1):
            begin()
            timer = threading.Timer(3.0, end)
            timer.start()
            try:
                p = in_client.call(lambda: probe(FIXED_IP, 80, 2.0))
                record = as_record(p, 0.0, number)
                record["case"] = what
                snapshot(c, record)
            finally:
                timer.join()
            failures.append(record)
            time.sleep(1.5)  # the stopped servers catch up; the next case starts clean
        match_servers(c, failures)
        for record in failures:
            record["cause"] = classify(record)
            print(f"{record['case']}:")
            print_failure(record)
        in_client.close()
    finally:
        c.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-log"]:
        # Internal: the fixed service's endpoint, started by the soak inside a pod.
        serve_log(argv[1], int(argv[2]), Path(argv[3]))
        return 0
    exit_on_signals()  # SIGTERM/SIGINT unwind through the sandbox's cleanup
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
    parser.add_argument("--calibrate", action="store_true",
                        help="only show the failure report for a stopped endpoint and for "
                        "dropped SYNs, caused on purpose (about 20 s)")
    args = parser.parse_args(argv)
    if args.calibrate:
        with TemporaryDirectory(prefix="kproxy-soak-") as tmp:
            workdir = args.workdir or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            calibrate(workdir)
        return 0
    if args.minutes <= 0 or args.sample <= 0 or args.churn_interval <= 0:
        parser.error("--minutes, --sample and --churn-interval must be positive")
    print(f"soak: {args.minutes:g} min, mode {args.mode}, churn every {args.churn_interval}s, "
          f"up to {args.max_services} services", flush=True)
    result = soak(args.mode, args.minutes, args.sample, args.churn_interval,
                  args.max_services, args.seed, args.workdir)
    r = result
    causes = f" {r['failure_causes']}" if r["failure_causes"] else ""
    print(f"fixed service: {r['requests']} requests, {r['failed']} failed{causes}, "
          f"longest gap {r['longest_gap_s']}s")
    for f in r["failures"]:
        print_failure(f)
    print(f"answered slower than {r['answered_slower_than']}; connects that needed a SYN "
          f"retransmit: {r['syn_retransmit_connects']}; load avg (1 min) mean "
          f"{r['load_avg_1m_mean']} max {r['load_avg_1m_max']}")
    for f in r["slowest_answered"][:5]:
        print(f"  slow: t={f['t']}s total {f['total_s']}s (connect {f['connect_s']}s), load "
              f"{f['load']}")
    print(f"churn: {r['churn_ops']}")
    print(f"RSS KiB: first {r['rss_kib_first']} last {r['rss_kib_last']} max "
          f"{r['rss_kib_max']}; slope {r['rss_slope_kib_per_min_second_half']} KiB/min "
          f"(second half), {r['rss_slope_kib_per_min_all']} KiB/min (all)")
    print(f"fds: {r['fds_before']} -> {r['fds_after']}; threads: {r['threads_before']} -> "
          f"{r['threads_after']}")
    print(f"leftover chains: {r['leftover_chains'] or 'none'}; ipset entries: "
          f"{r['ipset_entries_after']}")
    print(f"INVALID packets / conntrack stats / client SYN retransmits: {r['counters_after']}")
    print(f"syncs {r['syncs']:.0f}, sync errors {r['sync_errors']:.0f}, restore failures "
          f"{r['restore_failures']:.0f}")
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
