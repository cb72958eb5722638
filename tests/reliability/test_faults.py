"""Faults, for real, in network namespaces: kproxy killed mid-sync, the API server gone,
iptables-restore failing, the xtables lock held, rules and the canary removed by someone else,
another agent's rules in the same tables."""

from __future__ import annotations

import itertools
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import pytest
from e2e_harness import HEALTHZ, answered, eventually
from e2e_netns import NetnsThread
from reliability_harness import FaultCluster, record

from kproxy_core.demo import Ep, endpoint_slice_obj, kproxy_command, service_obj
from kproxy_core.testing import echo
from kproxy_core.testing.netns import NetNS, Pod
from kproxy_core.testing.timescale import scaled

pytestmark = pytest.mark.root


class Traffic:
    """A client sending requests to ``ip:port`` continuously from a background thread, each
    outcome recorded with the test's current ``phase``."""

    def __init__(self, c: FaultCluster, src: Pod | NetNS, ip: str, port: int = 80) -> None:
        self.c, self.src, self.ip, self.port = c, src, ip, port
        self.phase = "before"
        self.outcomes: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        # Its own thread in the source namespace: the test's other requests from the same
        # pod (which may wait for timeouts) must not delay these and fake a gap.
        ns = src.ns if isinstance(src, Pod) else src
        self._in_src = NetnsThread(ns.name)

    def _one(self) -> str:
        try:
            return echo.tcp_request(self.ip, self.port, 2.0)
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return f"error {exc}"

    def _run(self) -> None:
        while not self._stop.is_set():
            phase = self.phase
            reply = self._in_src.call(self._one)
            self.outcomes.append((time.monotonic(), phase, reply))
            time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None,
                                   TracebackType | None]) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._in_src.close()

    def failed(self, phases: set[str] | None = None) -> list[tuple[str, str, str]]:
        """(phase, reply, wall-clock time) of every request that was not answered."""
        offset = time.time() - time.monotonic()
        return [(p, r, _clock(t + offset)) for t, p, r in self.outcomes
                if not answered(r) and (phases is None or p in phases)]

    def longest_gap(self) -> float:
        """Longest time between two answered requests."""
        times = [t for t, _, r in self.outcomes if answered(r)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def _cluster(request: pytest.FixtureRequest) -> FaultCluster:
    """The test's `fc`, built only once the test knows it applies to the mode (a topology
    costs a minute or more in the ipvs VM)."""
    c: FaultCluster = request.getfixturevalue("fc")
    return c


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(wall)) + f"{wall % 1:.3f}"[1:]


def healthz(c: FaultCluster) -> int:
    return int(c.http(f"http://{HEALTHZ}/healthz")[0])


def alive(c: FaultCluster) -> None:
    assert c.kproxy is not None
    assert c.kproxy.alive(), f"kproxy exited {c.kproxy.proc.returncode}:\n{c.kproxy.log_tail()}"


# ------------------------------------------------------------------------------------------------
# SIGKILL mid-sync
# ------------------------------------------------------------------------------------------------


#: How many services the big change adds: enough that its restore is not instant.
BULK = 150


def _bulk(c: FaultCluster) -> list[dict[str, object]]:
    objs: list[dict[str, object]] = []
    for i in range(BULK):
        objs += [service_obj(f"bulk-{i}", f"10.96.7.{i + 2}"),
                 endpoint_slice_obj(f"bulk-{i}", c.eps("pod-1-2"))]
    return objs


@pytest.mark.parametrize("when", ["partial", "first-full"])
def test_sigkill_mid_sync_then_restart(mode: str, when: str,
                                       request: pytest.FixtureRequest) -> None:
    """kproxy is SIGKILLed while a sync is provably in flight (held in the restore wrapper);
    traffic to what was programmed keeps flowing while no kproxy runs, and a new process
    converges to everything, including what changed meanwhile.

    ``partial``: the big change arrives while kproxy runs, so a partial sync carries it.
    ``first-full``: kproxy restarts with the big change pending, so the new process's first
    (full) sync carries it. The ipvs mode writes IPVS, addresses and set entries over netlink
    in that sync before (or beside) its restore, so the kill leaves a half-programmed kernel
    for the next process."""
    if when == "partial" and mode == "ipvs":
        pytest.skip("ipvs: a partial sync programs new ClusterIP services over netlink inside "
                    "the process (no external restore to hold in flight); its iptables rules "
                    "are restored on full syncs, the first-full case")
    c = _cluster(request)
    ip = "10.96.6.1"
    c.start_kproxy()
    c.apply(service_obj("live", ip), endpoint_slice_obj("live", c.eps("pod-1-2", "pod-2-2")))
    client = c.pod("pod-1-3")
    c.wait_answered_by(client, ip, 80, {"pod-1-2", "pod-2-2"}, count=16)
    c.wait_synced()
    assert c.kproxy is not None

    with Traffic(c, client, ip) as traffic:
        time.sleep(0.5)
        # The wrapper holds the restore; SIGKILL to kproxy's process group ends it too, so the
        # held restore never runs. Long enough that polling for "entered" cannot miss it.
        c.inject("slow", f"{scaled(10):.0f}")
        if when == "partial":
            c.apply(*_bulk(c))
        else:
            # A crash first; the change arrives while nobody programs it.
            traffic.phase = "down"
            c.kproxy.stop(signal.SIGKILL)
            c.apply(*_bulk(c))
            c.spawn_kproxy()
        killed = c.kproxy
        eventually("a restore in flight", lambda: (c.wrapdir / "entered").exists())
        # In flight in a sync, not in start-up cleanup (which runs before this line).
        eventually("kproxy started", lambda: "kproxy started" in killed.log_tail(200))
        traffic.phase = "down"
        killed.stop(signal.SIGKILL)
        c.clear("slow")
        sync_lines = [line for line in killed.log_tail(200).splitlines() if "synced " in line]
        if when == "first-full":
            assert not sync_lines, f"the first sync was not in flight: {sync_lines}"
        # Changes made while nobody programs them are applied by the next process.
        c.apply(endpoint_slice_obj("live", c.eps("pod-2-2")))
        time.sleep(1.0)
        traffic.phase = "starting"
        started = time.monotonic()
        c.start_kproxy()
        traffic.phase = "up"
        c.wait_answered_by(client, ip, 80, {"pod-2-2"}, count=8)
        c.wait_answered_by(client, f"10.96.7.{BULK + 1}", 80, {"pod-1-2"}, count=2)
        converged = time.monotonic() - started
        traffic.phase = "converged"
        time.sleep(1.0)
    gap = traffic.longest_gap()
    record(f"[{c.mode}] SIGKILL mid-{when} sync: {len(traffic.outcomes)} requests, longest gap "
           f"{gap:.3f}s, restart converged in {converged:.2f}s, failed "
           f"{len(traffic.failed())}")
    assert any(p == "down" for _, p, _ in traffic.outcomes), "nothing sent while kproxy was down"
    if c.mode == "userspace":
        # The userspace proxy relays every connection itself: from the kill until the new
        # process has programmed its listeners nothing can answer. After that nothing may fail.
        assert any(p == "converged" for _, p, _ in traffic.outcomes)
        assert not traffic.failed({"converged"}), traffic.failed({"converged"})
        return
    failed = traffic.failed()
    assert not failed, f"{len(failed)} of {len(traffic.outcomes)} requests failed: {failed[:10]}"


# ------------------------------------------------------------------------------------------------
# API server faults
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["refuse", "http_500", "delay", "compact"])
def test_api_server_fault_keeps_state_then_catches_up(fc: FaultCluster, fault: str) -> None:
    c = fc
    a, b, gone = "10.96.8.1", "10.96.8.2", "10.96.8.3"
    # A short sync period: the outage outlasts the health timeout (2 x sync period), which
    # must not matter while no update is queued (upstream's proxy_health.go).
    c.start_kproxy("--iptables-sync-period=2s")
    c.apply(service_obj("a", a), endpoint_slice_obj("a", c.eps("pod-1-2")),
            service_obj("gone", gone), endpoint_slice_obj("gone", c.eps("pod-1-2")))
    client = c.pod("pod-1-3")
    c.wait_answered_by(client, a, 80, {"pod-1-2"})
    c.wait_answered_by(client, gone, 80, {"pod-1-2"})

    if fault == "refuse":
        c.api.set_fault(refuse=True)
    elif fault == "http_500":
        c.api.set_fault(http_500=True)
        c.api.drop_watches()
    elif fault == "delay":
        c.api.set_fault(delay=3.0)
        c.api.drop_watches()
    else:
        # Refuse while the changes happen and the history is compacted: the watch resumes
        # from a version the server no longer has, gets 410 Expired and must relist.
        c.api.set_fault(refuse=True)

    # Changes made during the outage.
    c.apply(endpoint_slice_obj("a", c.eps("pod-2-2")), service_obj("b", b),
            endpoint_slice_obj("b", c.eps("pod-1-2")))
    c.delete(endpoint_slice_obj("gone", []), service_obj("gone", gone))
    if fault == "compact":
        c.api.compact()

    outage_codes: list[int] = []
    with Traffic(c, client, a) as traffic:
        traffic.phase = "outage"
        end = time.monotonic() + 6.0
        while time.monotonic() < end:
            outage_codes.append(healthz(c))
            alive(c)
            time.sleep(0.5)
        traffic.phase = "recovered"
        c.api.set_fault(refuse=False, http_500=False, delay=0.0)
        c.wait_answered_by(client, a, 80, {"pod-2-2"})
        c.wait_answered_by(client, b, 80, {"pod-1-2"})
        c.wait_not_answered(client, gone, 80)

    if fault != "delay":
        # The last good state stayed programmed for the whole outage.
        outage = [r for _, p, r in traffic.outcomes if p == "outage"]
        assert outage and all(answered(r) and r.startswith("pod-1-2") for r in outage), outage
    assert traffic.failed() == [], traffic.failed()
    assert set(outage_codes) == {200}, outage_codes
    assert healthz(c) == 200
    eventually("watches resumed", lambda: c.api.watch_count("Service") >= 1
               and c.api.watch_count("EndpointSlice") >= 1)
    alive(c)
    record(f"[{c.mode}] API {fault}: healthz during outage {sorted(set(outage_codes))}, "
           f"longest client gap {traffic.longest_gap():.3f}s")


# ------------------------------------------------------------------------------------------------
# iptables-restore failing, the xtables lock
# ------------------------------------------------------------------------------------------------


_RETRY_RE = re.compile(r"sync failed .*retrying in ([0-9.]+)s")


def test_restore_failure_is_retried_with_backoff(fc: FaultCluster) -> None:
    c = fc
    a, b = "10.96.9.1", "10.96.9.2"
    # Health timeout 2 x 4s: long enough that a slow first sync on a loaded machine does not
    # make /healthz 503 before the test starts, short enough to see it go 503 below.
    c.start_kproxy("--iptables-sync-period=4s")
    c.apply(service_obj("a", a), endpoint_slice_obj("a", c.eps("pod-1-2")))
    client = c.pod("pod-1-3")
    c.wait_answered_by(client, a, 80, {"pod-1-2"})
    c.wait_synced()
    errors_before = c.metric("kproxy_sync_errors_total")

    c.inject("fail")
    with Traffic(c, client, a) as traffic:
        if c.mode == "ipvs":
            # ipvs restores its rules in full syncs (a new ClusterIP service alone goes over
            # netlink and would succeed): the periodic one fails first, and every retry is
            # full. The change comes after that, so it is queued behind failing syncs.
            eventually("a periodic full sync failed", lambda: c.metric(
                "kproxy_sync_errors_total") >= errors_before + 1)
        c.apply(service_obj("b", b), endpoint_slice_obj("b", c.eps("pod-2-2")))
        eventually("3 failed syncs", lambda: c.metric("kproxy_sync_errors_total")
                   >= errors_before + 3)
        # A queued change not programmed for longer than 2 x sync period: unhealthy, as
        # upstream.
        eventually("/healthz 503 while changes cannot be programmed",
                   lambda: healthz(c) == 503, timeout=20)
        alive(c)
        if c.mode != "ipvs":
            # One restore carries the whole change. ipvs writes IPVS, addresses and set
            # entries beside the failing restore, as upstream's proxier (IPVS first, then
            # iptables-restore), so b may already answer there.
            assert not answered(c.send(client, b, 80)[0])
        c.clear("fail")
        c.wait_answered_by(client, b, 80, {"pod-2-2"})
        eventually("/healthz 200 again", lambda: healthz(c) == 200)
    assert traffic.failed() == [], traffic.failed()
    delays = [float(d) for d in _RETRY_RE.findall(c.log())]
    assert len(delays) >= 3 and delays[1] > delays[0], delays
    if c.mode in ("iptables", "ipvs"):
        assert c.metric(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total") >= 3
        # The first sync after a failure is a full one (it cannot know what got applied).
        after = c.log().rsplit("sync failed", 1)[1]
        assert "synced full" in after, after[-2000:]
    record(f"[{c.mode}] restore failing: retry delays {delays[:5]}, errors "
           f"{c.metric('kproxy_sync_errors_total') - errors_before:.0f}")


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_xtables_lock_held_by_another_process(fc: FaultCluster) -> None:
    c = fc
    # The legacy backend is the one with a userspace lock: another agent's legacy rule makes
    # kproxy pick it. A private lock file ($XTABLES_LOCKFILE): holding the machine's
    # /run/xtables.lock would stall everyone's iptables.
    c.sb.node.run(["iptables-legacy", "-t", "filter", "-A", "INPUT", "-s", "192.0.2.9/32",
                   "-j", "ACCEPT"])
    lock = c.workdir / "xtables.lock"
    c.env["XTABLES_LOCKFILE"] = str(lock)
    a, b = "10.96.10.1", "10.96.10.2"
    # ipvs takes the lock only in its full syncs (iptables-restore); new services go over
    # netlink: a short period makes the periodic full sync meet the held lock.
    c.start_kproxy(*(["--iptables-sync-period=3s"] if c.mode == "ipvs" else []))
    c.apply(service_obj("a", a), endpoint_slice_obj("a", c.eps("pod-1-2")))
    client = c.pod("pod-1-3")
    c.wait_answered_by(client, a, 80, {"pod-1-2"})
    c.wait_synced()
    assert ":KUBE-" in c.sb.node.run(["iptables-legacy-save", "-t", "nat"]).stdout, \
        "kproxy did not pick the legacy backend"

    holder = _hold_lock(lock)
    try:
        held = time.monotonic()
        c.apply(service_obj("b", b), endpoint_slice_obj("b", c.eps("pod-2-2")))
        # iptables waits 5 s (-w 5) for the lock; held longer, the sync fails. Up to two
        # lock waits precede the failure (chain check, -N), hence the timeout.
        eventually("a sync failed on the lock",
                   lambda: c.metric("kproxy_sync_errors_total") >= 1, timeout=40)
        first_error = time.monotonic() - held
        alive(c)
        assert answered(c.send(client, a, 80)[0])
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=10)
    released = time.monotonic()
    c.wait_answered_by(client, b, 80, {"pod-2-2"})
    record(f"[{c.mode}] xtables lock held {released - held:.1f}s: first sync error after "
           f"{first_error:.1f}s, change programmed {time.monotonic() - released:.1f}s after "
           "release")
    assert "-A INPUT -s 192.0.2.9/32 -j ACCEPT" in c.sb.node.run(["iptables-legacy-save"]).stdout


# ------------------------------------------------------------------------------------------------
# Someone else deletes rules
# ------------------------------------------------------------------------------------------------


def _delete_matching(c: FaultCluster, table: str, pattern: str) -> list[str]:
    """Delete (with the nft iptables, the backend kproxy picks in a fresh sandbox) every rule
    of ``table`` whose save line matches ``pattern``."""
    deleted = []
    for line in c.sb.node.run(["iptables-nft-save", "-t", table]).stdout.splitlines():
        if line.startswith("-A ") and re.search(pattern, line):
            c.sb.node.run(["iptables-nft", "-t", table, "-D", *shlex.split(line[3:])])
            deleted.append(line)
    return deleted


def test_jump_rules_deleted_by_someone_else_come_back(fc: FaultCluster) -> None:
    c = fc
    ip = "10.96.11.1"
    c.start_kproxy("--iptables-sync-period=2s")
    c.apply(service_obj("a", ip), endpoint_slice_obj("a", c.eps("pod-1-2")))
    client = c.pod("pod-1-3")
    c.wait_answered_by(client, ip, 80, {"pod-1-2"})
    c.wait_synced()
    deleted = _delete_matching(c, "nat", r"^-A (PREROUTING|OUTPUT) .*-j KUBE-")
    assert deleted, c.saved()
    removed = time.monotonic()
    c.wait_answered_by(client, ip, 80, {"pod-1-2"})
    record(f"[{c.mode}] jump rules deleted: back after {time.monotonic() - removed:.1f}s "
           "(periodic sync 2s)")
    alive(c)


def test_canary_removed_forces_a_full_sync(mode: str, request: pytest.FixtureRequest) -> None:
    if mode != "iptables":
        why = {"userspace": "it rewrites its chains in every sync",
               "ipvs": "its periodic full sync restores its chains and jumps, as upstream's "
                       "IPVS proxier, which has no canary monitor either"}
        pytest.skip(f"{mode} mode keeps no canary chain ({why.get(mode, '')})")
    c = _cluster(request)
    a, other = "10.96.12.1", "10.96.12.2"
    # Default sync period (30s): the canary monitor looks every sync period, as upstream's.
    c.start_kproxy()
    c.apply(service_obj("a", a), endpoint_slice_obj("a", c.eps("pod-1-2")))
    client = c.pod("pod-1-3")
    c.wait_answered_by(client, a, 80, {"pod-1-2"})
    # Someone flushes the nat table's service dispatch and removes the canary, as a firewall
    # reload does.
    c.sb.node.run(["iptables-nft", "-t", "nat", "-F", "KUBE-SERVICES"])
    for table in ("mangle", "nat", "filter"):
        c.sb.node.run(["iptables-nft", "-t", table, "-X", "KUBE-PROXY-CANARY"])
    removed = time.monotonic()
    c.wait_not_answered(client, a, 80)
    # The monitor notices off the sync path within one sync period and asks the core for a
    # sync at once, which is a full one that repairs the flushed dispatch. A periodic full
    # sync that comes before the monitor's next look repairs it first, and the monitor then
    # finds the canaries back: either way the service must answer again within about one
    # sync period.
    eventually("the canary monitor noticed or a full sync repaired it", lambda: (
        "KUBE-PROXY-CANARY is gone" in c.log() or "KUBE-PROXY-CANARY" in c.saved()),
        timeout=45)
    noticed = time.monotonic() - removed
    how = "monitor" if "KUBE-PROXY-CANARY is gone" in c.log() else "periodic full sync"
    c.apply(service_obj("other", other), endpoint_slice_obj("other", c.eps("pod-2-2")))
    c.wait_answered_by(client, other, 80, {"pod-2-2"})
    c.wait_answered_by(client, a, 80, {"pod-1-2"})
    record(f"[{c.mode}] canary removed: {how} first after {noticed:.1f}s, repaired after "
           f"{time.monotonic() - removed:.1f}s (sync period 30s)")
    saved = c.saved()
    assert saved.count(":KUBE-PROXY-CANARY") == 3, saved


# ------------------------------------------------------------------------------------------------
# Another agent's rules
# ------------------------------------------------------------------------------------------------

OTHER_AGENT = [
    ("nat", ["-N", "cali-nat-outgoing"]),
    ("nat", ["-A", "cali-nat-outgoing", "-s", "192.0.2.0/24", "-j", "MASQUERADE"]),
    ("nat", ["-A", "POSTROUTING", "-j", "cali-nat-outgoing"]),
    ("nat", ["-A", "PREROUTING", "-d", "192.0.2.7/32", "-j", "RETURN"]),
    ("filter", ["-N", "KUBE-ROUTER-INPUT"]),
    ("filter", ["-A", "KUBE-ROUTER-INPUT", "-s", "192.0.2.8/32", "-j", "ACCEPT"]),
    ("filter", ["-A", "INPUT", "-j", "KUBE-ROUTER-INPUT"]),
    ("filter", ["-A", "FORWARD", "-s", "198.51.100.0/24", "-j", "DROP"]),
    ("mangle", ["-N", "OTHER-MANGLE"]),
    ("mangle", ["-A", "OTHER-MANGLE", "-j", "MARK", "--set-xmark", "0x100/0x100"]),
    ("mangle", ["-A", "OUTPUT", "-d", "198.51.100.1/32", "-j", "OTHER-MANGLE"]),
]

OTHER_LINES = [
    "-A cali-nat-outgoing -s 192.0.2.0/24 -j MASQUERADE",
    "-A POSTROUTING -j cali-nat-outgoing",
    "-A PREROUTING -d 192.0.2.7/32 -j RETURN",
    "-A KUBE-ROUTER-INPUT -s 192.0.2.8/32 -j ACCEPT",
    "-A INPUT -j KUBE-ROUTER-INPUT",
    "-A FORWARD -s 198.51.100.0/24 -j DROP",
    "-A OTHER-MANGLE -j MARK --set-xmark 0x100/0x100",
    "-A OUTPUT -d 198.51.100.1/32 -j OTHER-MANGLE",
]


def _assert_other_agent_intact(c: FaultCluster, stage: str) -> None:
    saved = c.sb.node.run(["iptables-nft-save"]).stdout
    missing = [line for line in OTHER_LINES if line not in saved]
    assert not missing, f"after {stage}: another agent's rules are gone: {missing}\n{saved}"
    # Jumps are ensured on every full sync: never twice (a duplicate jump also makes
    # --cleanup fail with "CHAIN_DEL failed (Device or resource busy)").
    for tool in ("iptables-nft-save", "ip6tables-nft-save"):
        table = ""
        seen: set[tuple[str, str]] = set()
        for line in c.sb.node.run([tool]).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-A ") and "KUBE-" in line:
                assert (table, line) not in seen, f"after {stage}: {tool} {table}: twice: {line}"
                seen.add((table, line))


def test_other_agents_rules_survive_every_sync_and_cleanup(fc: FaultCluster) -> None:
    c = fc
    for table, args in OTHER_AGENT:
        c.sb.node.run(["iptables-nft", "-t", table, *args])
    a, b = "10.96.13.1", "10.96.13.2"
    c.start_kproxy("--iptables-sync-period=1s")
    client = c.pod("pod-1-3")
    c.apply(service_obj("a", a, type="NodePort"), endpoint_slice_obj("a", c.eps("pod-1-2")))
    c.wait_answered_by(client, a, 80, {"pod-1-2"})
    c.wait_synced()
    _assert_other_agent_intact(c, "the first sync")
    c.apply(service_obj("b", b), endpoint_slice_obj("b", c.eps("pod-2-2")))
    c.wait_answered_by(client, b, 80, {"pod-2-2"})
    time.sleep(2.5)  # periodic full syncs
    _assert_other_agent_intact(c, "partial and periodic full syncs")
    c.delete(endpoint_slice_obj("b", []), service_obj("b", b))
    c.wait_not_answered(client, b, 80)
    _assert_other_agent_intact(c, "a service deletion")
    # ipvs: the periodic full sync (1s here) is the one that restores, and fails.
    c.inject("fail")
    c.apply(endpoint_slice_obj("a", c.eps("pod-1-2", "pod-1-3")))
    eventually("a failed sync", lambda: c.metric("kproxy_sync_errors_total") >= 1)
    c.clear("fail")
    c.wait_answered_by(client, a, 80, {"pod-1-2", "pod-1-3"}, count=12)
    _assert_other_agent_intact(c, "a failed sync and its full resync")
    assert c.kproxy is not None
    assert c.kproxy.stop(signal.SIGTERM) == 0
    c.start_kproxy()
    c.wait_answered_by(client, a, 80, {"pod-1-2", "pod-1-3"}, count=12)
    c.wait_synced()  # by the new process: the rules answer from before it
    _assert_other_agent_intact(c, "a restart")
    assert c.kproxy.stop(signal.SIGTERM) == 0
    proc = c.sb.node.run([*kproxy_command(), "--cleanup", "--v=2"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_other_agent_intact(c, "--cleanup")
    saved = c.sb.node.run(["iptables-nft-save"]).stdout
    ours = [line for line in saved.splitlines() if re.match(r"^[-:]\S* ?KUBE-(?!ROUTER)", line)
            and "KUBE-FIREWALL" not in line]
    assert not ours, ours


def test_many_endpoints_and_services_survive_ep_flapping(fc: FaultCluster) -> None:
    """Endpoints flapping ready/not ready while traffic flows to the ready ones."""
    c = fc
    ip = "10.96.14.1"
    c.start_kproxy()
    client = c.pod("pod-1-3")
    c.apply(service_obj("flap", ip), endpoint_slice_obj("flap", c.eps("pod-1-2")))
    c.wait_answered_by(client, ip, 80, {"pod-1-2"})
    with Traffic(c, client, ip) as traffic:
        for i in range(20):
            flapping = Ep.of(c.pod("pod-2-2"), ready=i % 2 == 0)
            c.apply(endpoint_slice_obj("flap", [*c.eps("pod-1-2"), flapping]))
            time.sleep(0.15)
    assert traffic.failed() == [], traffic.failed()
    alive(c)


def test_another_agent_referencing_a_stale_chain_does_not_block_updates(
        mode: str, request: pytest.FixtureRequest) -> None:
    """Another agent jumps to one of our service chains; the service goes away, so every sync
    wants to delete that chain and the kernel refuses (the chain is referenced). That must not
    block the programming of every other change."""
    if mode != "iptables":
        pytest.skip(f"{mode} mode has no per-service chains (nothing another agent could "
                    "reference; its chains are a fixed set)")
    c = _cluster(request)
    a, b = "10.96.19.1", "10.96.19.2"
    c.start_kproxy()
    client = c.pod("pod-1-3")
    c.apply(service_obj("a", a), endpoint_slice_obj("a", c.eps("pod-1-2")))
    c.wait_answered_by(client, a, 80, {"pod-1-2"})
    saved = c.sb.node.run(["iptables-nft-save", "-t", "nat"]).stdout
    chain = re.findall(r"-A KUBE-SERVICES -d 10\.96\.19\.1/32 .*-j (KUBE-SVC-[A-Z0-9]+)", saved)
    assert chain, saved
    c.sb.node.run(["iptables-nft", "-t", "nat", "-N", "OTHER-AGENT"])
    c.sb.node.run(["iptables-nft", "-t", "nat", "-A", "OTHER-AGENT", "-d", "192.0.2.1/32",
                   "-j", chain[0]])
    c.delete(endpoint_slice_obj("a", []), service_obj("a", a))
    c.wait_not_answered(client, a, 80)
    c.apply(service_obj("b", b), endpoint_slice_obj("b", c.eps("pod-2-2")))
    c.wait_answered_by(client, b, 80, {"pod-2-2"})
    # And a full resync (as after any failure) still succeeds later.
    assert c.kproxy is not None
    c.kproxy.stop(signal.SIGTERM)
    c.start_kproxy()
    c.apply(service_obj("b", b), endpoint_slice_obj("b", c.eps("pod-1-2")))
    c.wait_answered_by(client, b, 80, {"pod-1-2"})
    assert f"-A OTHER-AGENT -d 192.0.2.1/32 -j {chain[0]}" in c.saved()
    alive(c)
    record(f"[{c.mode}] foreign reference to a stale chain: sync errors "
           f"{c.metric('kproxy_sync_errors_total'):.0f}")
