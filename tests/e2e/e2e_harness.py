"""The end-to-end harness: a sandbox cluster, the fake API server and kproxy as a real process.

Topology (`kproxy_core.testing.netns.ClusterSandbox`): ``node`` (10.99.0.1) with pods
pod-1-2 (10.244.1.2) and pod-1-3 (10.244.1.3), ``node2`` with pod-2-2 (10.244.2.2), and an
external ``client`` (10.99.0.100). Every pod runs the echo server on TCP and UDP 8080.

kproxy runs inside the node namespace, started with upstream flag names and ``--kubeconfig``
pointing at the fake API server. The API server runs in this test process, but its listening
socket is created inside the node namespace (see `e2e_netns`), so kproxy reaches it at
127.0.0.1 there while the tests drive it through its Python API.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from e2e_netns import NetnsThread

from kproxy_core.demo import Ep, kproxy_command, node_obj
from kproxy_core.testing import echo
from kproxy_core.testing.netns import CLUSTER_CIDR, ClusterSandbox, NetNS, Pod
from kproxy_core.testing.timescale import in_vm, scaled, time_scale

T = TypeVar("T")

MODES = ("iptables", "userspace", "ipvs", "nftables")
HEALTHZ = "127.0.0.1:10256"
METRICS = "127.0.0.1:10249"


#: One factor for every timeout of the e2e and reliability suites (see
#: `kproxy_core.testing.timescale`).
TIME_SCALE = time_scale()

#: How long a change may take to show in traffic: manifest/watch delivery, the min sync
#: period (100 ms in these tests) and the sync itself, with a wide margin for a loaded machine.
CONVERGE_TIMEOUT = 20.0
#: How long one echo request may take before it counts as "timeout".
REQUEST_TIMEOUT = scaled(1.0)

#: Kernel modes preserve the client address with externalTrafficPolicy Local; userspace
#: terminates connections, so the endpoint always sees a node address (as upstream's did).
PRESERVES_CLIENT_IP = {"iptables": True, "ipvs": True, "nftables": True, "userspace": False}

_ips = itertools.count(20)


def fresh_ip(prefix: str = "10.96.0") -> str:
    """A service IP no other test in this process uses (tests share one cluster per mode)."""
    return f"{prefix}.{next(_ips)}"


_node_ports = itertools.count(30100)


def fresh_node_port() -> int:
    return next(_node_ports)


def mode_flags(mode: str) -> list[str]:
    # A short min sync period keeps convergence checks quick; the flags are upstream's.
    if mode == "ipvs":
        return ["--ipvs-min-sync-period=100ms"]
    return ["--iptables-min-sync-period=100ms"]


def answered(reply: str) -> bool:
    return bool(reply) and reply.split()[0] not in ("refused", "timeout", "error", "error:")


def pods_of(replies: Sequence[str]) -> set[str]:
    return {r.split()[0] for r in replies if answered(r)}


def eventually(what: str, check: Callable[[], T | None], timeout: float = CONVERGE_TIMEOUT,
               interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what`` and the
    last value otherwise. ``timeout`` is host time: `scaled` here, so every caller's wait
    stretches alike in the VM."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


class Kproxy:
    """One kproxy process inside the node namespace."""

    def __init__(self, ns: NetNS, argv: list[str], log_path: Path) -> None:
        self.ns = ns
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = ns.spawn(argv, stdout=log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.alive():
            os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=scaled(timeout))


class Cluster:
    """A sandbox + fake API server + one kproxy, for one mode."""

    def __init__(self, mode: str, workdir: Path) -> None:
        from kproxy_core.testing.apiserver import ApiServer

        self.mode = mode
        self.workdir = workdir
        self.sb = ClusterSandbox(local_pods=2, remote_pods=1)
        self.kproxy: Kproxy | None = None
        self._restarts = 0
        self._threads: dict[str, NetnsThread] = {}
        self._threads_lock = threading.Lock()
        try:
            for pod in self.sb.pods:
                self.sb.start_echo(pod, tcp_port=8080, udp_port=8080, timeout=scaled(10))
            self.in_node = NetnsThread(self.sb.node.name)
            self.api = ApiServer()
            # start() binds the listening socket: do it from the thread inside the node netns.
            self.api_url = self.in_node.call(self.api.start)
            self.kubeconfig = workdir / "kubeconfig"
            self.api.write_kubeconfig(str(self.kubeconfig))
            self.api.create("Node", node_obj("node", self.sb.node_ip))
        except BaseException:
            self.close()
            raise

    # -- pods ------------------------------------------------------------------------------------

    @property
    def local_pods(self) -> list[Pod]:
        return [p for p in self.sb.pods if p.node == "node"]

    @property
    def remote_pods(self) -> list[Pod]:
        return [p for p in self.sb.pods if p.node == "node2"]

    def pod(self, name: str) -> Pod:
        return next(p for p in self.sb.pods if p.name == name)

    def eps(self, *names: str, **conditions: Any) -> list[Ep]:
        return [Ep.of(self.pod(n), **conditions) for n in names]

    # -- API objects -----------------------------------------------------------------------------

    def apply(self, *objs: dict[str, Any]) -> None:
        for obj in objs:
            self.api.apply(obj["kind"], obj)

    def delete(self, *objs: dict[str, Any]) -> None:
        for obj in objs:
            self.api.delete(obj["kind"], obj)

    # -- kproxy ----------------------------------------------------------------------------------

    def kproxy_argv(self, *extra: str) -> list[str]:
        return [*kproxy_command(), f"--proxy-mode={self.mode}",
                f"--kubeconfig={self.kubeconfig}", "--hostname-override=node",
                f"--cluster-cidr={CLUSTER_CIDR}", f"--healthz-bind-address={HEALTHZ}",
                f"--metrics-bind-address={METRICS}", "--v=2", *mode_flags(self.mode), *extra]

    def spawn_kproxy(self, *extra: str) -> Kproxy:
        """Start a kproxy process (the cluster's current one) without waiting for it."""
        self._restarts += 1
        kp = self.kproxy = Kproxy(self.sb.node, self.kproxy_argv(*extra),
                                  self.workdir / f"kproxy-{self._restarts}.log")
        return kp

    def start_kproxy(self, *extra: str) -> Kproxy:
        """Start a kproxy process and wait until its /healthz says 200."""
        kp = self.spawn_kproxy(*extra)

        def healthy() -> bool:
            if not kp.alive():
                raise AssertionError(f"kproxy exited {kp.proc.returncode}:\n{kp.log_tail()}")
            return self.http(f"http://{HEALTHZ}/healthz")[0] == 200

        eventually("kproxy /healthz 200", healthy, timeout=30)
        return kp

    def http(self, url: str) -> tuple[int, str]:
        """GET ``url`` inside the node namespace: (status, body); status 0 if nothing answers."""
        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=scaled(2)) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError as exc:
                return 0, str(exc)

        return self.in_node.call(get, timeout=scaled(60))

    def metrics(self) -> str:
        status, body = self.http(f"http://{METRICS}/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:200]}"
        return body

    # -- traffic ---------------------------------------------------------------------------------

    def send(self, src: NetNS | Pod, host: str, port: int, count: int = 1, *,
             proto: str = "tcp", timeout: float = REQUEST_TIMEOUT) -> list[str]:
        """``count`` echo requests from ``src``, each a reply line ``"<pod> <client ip>"`` or
        ``refused`` / ``timeout`` / ``error ...`` (like ``python -m kproxy_core.testing.echo``).
        Sent from a thread inside ``src``'s namespace: no process per request."""
        ns = src.ns if isinstance(src, Pod) else src
        with self._threads_lock:
            thread = self._threads.get(ns.name)
            if thread is None:
                thread = self._threads[ns.name] = NetnsThread(ns.name)
        request = echo.tcp_request if proto == "tcp" else echo.udp_request

        def one() -> str:
            try:
                return request(host, port, timeout)
            except ConnectionRefusedError:
                return "refused"
            except TimeoutError:
                return "timeout"
            except OSError as exc:
                return f"error {exc}"

        return [thread.call(one, timeout=scaled(60)) for _ in range(count)]

    def wait_answered_by(self, src: NetNS | Pod, host: str, port: int, expected: set[str], *,
                         count: int = 8, proto: str = "tcp") -> list[str]:
        """Wait until ``count`` requests are all answered, only by pods in ``expected``, and by
        every pod of ``expected`` when ``count`` makes that near certain."""
        def check() -> list[str] | None:
            replies = self.send(src, host, port, count, proto=proto)
            got = pods_of(replies)
            if not all(answered(r) for r in replies) or not got <= expected:
                return None
            if count >= 4 * len(expected) and got != expected:
                return None
            return replies

        return eventually(f"{proto} {host}:{port} answered only by {sorted(expected)}", check)

    def wait_not_answered(self, src: NetNS | Pod, host: str, port: int,
                          want: set[str] | None = None, *, proto: str = "tcp") -> str:
        """Wait until a request is not answered; with ``want``, until the outcome is one of
        ``want`` ("refused": REJECT, "timeout": DROP)."""
        def check() -> str | None:
            reply = self.send(src, host, port, 1, proto=proto)[0]
            if answered(reply) or (want is not None and reply not in want):
                return None
            return reply

        return eventually(f"{proto} {host}:{port} -> {sorted(want or {'no answer'})}", check)

    def close(self) -> None:
        # Every step runs even if one before it fails: a namespace must never outlive a test.
        try:
            if self.kproxy is not None and self.kproxy.alive():
                self.kproxy.stop(signal.SIGKILL, timeout=10)
        finally:
            try:
                api = getattr(self, "api", None)
                if api is not None:
                    api.stop()
                for thread in [getattr(self, "in_node", None), *self._threads.values()]:
                    if thread is not None:
                        thread.close()
            finally:
                self.sb.close()


def mode_problem(mode: str) -> tuple[str, bool] | None:
    """Why ``mode`` cannot run here, and whether that must fail in CI (True) or may be skipped
    anywhere (False: covered elsewhere). None when it can run."""
    from kproxy_core.plugins import KproxyPluginManager

    if mode not in KproxyPluginManager().modes().names():
        return (f"proxy mode {mode!r} is not installed (pip install plugins/kproxy-{mode})", True)
    if mode == "ipvs" and not Path("/sys/module/ip_vs").exists() and not _module_available("ip_vs"):
        # The VM exists to run IPVS: there a missing module is a broken setup, never a skip.
        return ("IPVS: not in this kernel, covered by the ipvs-vm env", in_vm())
    if os.geteuid() != 0:
        return ("the e2e suite needs root (network namespaces)", True)
    return None


def must_not_skip() -> bool:
    """CI and the VM: a mode that cannot run is a failure, not a skip."""
    return in_vm() or os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_mode(mode: str) -> None:
    """Return if ``mode`` can run here; otherwise skip with the reason, or fail where every
    mode must run (CI, the VM) and this one should."""
    problem = mode_problem(mode)
    if problem is None:
        return
    reason, fatal_in_ci = problem
    if fatal_in_ci and must_not_skip():
        pytest.fail(f"{reason} (CI or the VM: every mode must run)", pytrace=False)
    pytest.skip(reason)


def _module_available(name: str) -> bool:
    # modinfo only reads the module tree; loading is left to the mode itself.
    return subprocess.run(["modinfo", name], capture_output=True, check=False).returncode == 0
