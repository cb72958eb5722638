"""Network namespaces for real-kernel tests, shared by every mode's tests, the e2e suite and the
demo.

All traffic stays inside namespaces created here. Every namespace name carries this process's
id and a counter, and `Sandbox.close` deletes exactly the namespaces and processes it created.

The cluster sandbox (`ClusterSandbox`) is routed, not bridged, like many CNI plugins: each pod
is a namespace with a point-to-point veth to its node and a /32 route, so every packet between
pods crosses the node's IP stack and its netfilter hooks::

    client (10.99.0.100) ──┐
    node   (10.99.0.1)   ──┼── lan (bridge, its own namespace)
    node2  (10.99.0.2)   ──┘
    node:  pods 10.244.1.2, 10.244.1.3, ...   node2: pods 10.244.2.2, ...

Service VIPs (10.96.0.0/16, external IPs and LB IPs in 10.98.0.0/16) are routed from the client
to ``node``; nothing here routes outside the sandbox.

``ClusterSandbox(ipv6=True)`` adds the same layout in IPv6 beside it (dual-stack): LAN
``fd00:99::N/64``, pods ``fd00:244:<node>::<host>/128`` (``Pod.ip6``), VIPs in ``fd00:96::/112``
and ``fd00:98::/112``. Addresses are added with ``nodad`` so they work at once.
"""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Self

import attrs

from kproxy_core.testing.timescale import scaled

_counter = itertools.count()

CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
EXTERNAL_CIDR = "10.98.0.0/16"
LAN_PREFIX = "10.99.0"
CLUSTER_CIDR6 = "fd00:244::/48"
SERVICE_CIDR6 = "fd00:96::/112"
EXTERNAL_CIDR6 = "fd00:98::/112"
LAN_PREFIX6 = "fd00:99:"


def unique_name(role: str) -> str:
    return f"kpt{os.getpid()}-{next(_counter)}-{role}"


class CommandFailed(RuntimeError):
    pass


def run(argv: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise CommandFailed(f"{shlex.join(argv)} exited {proc.returncode}: {output}")
    return proc


@attrs.define
class NetNS:
    """One named network namespace."""

    name: str
    processes: list[subprocess.Popen[bytes]] = attrs.field(factory=list)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(self.exec_argv(argv), check=check, input=input, timeout=timeout)

    def sh(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", command], check=check)

    def spawn(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process in this namespace; it is killed (by its own pid) on close."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.exec_argv(argv), start_new_session=True, **kwargs
        )
        self.processes.append(proc)
        return proc

    def python(self, module: str, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return self.spawn([sys.executable, "-m", module, *args], **kwargs)

    def sysctl(self, key: str, value: str) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def stop_processes(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        self.processes.clear()


class Sandbox:
    """Owns namespaces; deletes them (and their processes) on close."""

    def __init__(self) -> None:
        self.namespaces: list[NetNS] = []

    def netns(self, role: str) -> NetNS:
        ns = NetNS(unique_name(role))
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    def veth(self, a: NetNS, a_if: str, b: NetNS, b_if: str) -> None:
        run(["ip", "-n", a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if,
             "netns", b.name])
        a.run(["ip", "link", "set", a_if, "up"])
        b.run(["ip", "link", "set", b_if, "up"])

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            ns.stop_processes()
        for ns in reversed(self.namespaces):
            # Killing leftovers by namespace too: a process that forked away from our pid
            # would otherwise keep the namespace alive.
            pids = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.frozen
class Pod:
    name: str
    ip: str
    node: str
    ns: NetNS
    #: The pod's IPv6 address when the sandbox is dual-stack.
    ip6: str | None = None


class ClusterSandbox(Sandbox):
    """Two nodes with routed pods and an external client (see the module docstring)."""

    def __init__(self, local_pods: int = 2, remote_pods: int = 1, *, ipv6: bool = False) -> None:
        super().__init__()
        self.pods: list[Pod] = []
        self.ipv6 = ipv6
        try:
            self.lan = self.netns("lan")
            self.lan.run(["ip", "link", "add", "br0", "type", "bridge"])
            self.lan.run(["ip", "link", "set", "br0", "up"])
            self.node = self._host("node", 1)
            self.node2 = self._host("node2", 2)
            self.client = self._host("client", 100)
            for subnet_host, other_ip, subnet in ((self.node, "2", "10.244.2.0/24"),
                                                  (self.node2, "1", "10.244.1.0/24")):
                subnet_host.run(["ip", "route", "add", subnet, "via", f"{LAN_PREFIX}.{other_ip}"])
                subnet_host.sysctl("net.ipv4.ip_forward", "1")
                # Nodes need some route for VIPs, or local connects fail before netfilter's
                # OUTPUT hook can DNAT them. This gateway exists nowhere: what is not NATed
                # dies inside the sandbox.
                subnet_host.run(["ip", "route", "add", "default", "via", f"{LAN_PREFIX}.254"])
            # The client reaches VIPs through the node, as a router in front of it would send it.
            for cidr in (SERVICE_CIDR, EXTERNAL_CIDR):
                self.client.run(["ip", "route", "add", cidr, "via", f"{LAN_PREFIX}.1"])
            self.node2.run(["ip", "route", "add", SERVICE_CIDR, "via", f"{LAN_PREFIX}.1"])
            if ipv6:
                self._wire_ipv6()
            for index in range(local_pods):
                self.add_pod(self.node, 1, index + 2)
            for index in range(remote_pods):
                self.add_pod(self.node2, 2, index + 2)
        except BaseException:
            self.close()
            raise

    def netns(self, role: str) -> NetNS:
        ns = super().netns(role)
        if self.ipv6:
            # Link-local addresses of new links are tentative for a second or two (DAD), and
            # neighbour discovery waits for them: the first packets would be lost.
            for scope in ("all", "default"):
                ns.sysctl(f"net.ipv6.conf.{scope}.accept_dad", "0")
        return ns

    def _host(self, role: str, host_id: int) -> NetNS:
        ns = self.netns(role)
        peer = f"l{host_id}"
        self.veth(ns, "eth0", self.lan, peer)
        self.lan.run(["ip", "link", "set", peer, "master", "br0"])
        ns.run(["ip", "addr", "add", f"{LAN_PREFIX}.{host_id}/24", "dev", "eth0"])
        if self.ipv6:
            ns.run(["ip", "-6", "addr", "add", f"{LAN_PREFIX6}:{host_id}/64", "dev", "eth0",
                    "nodad"])
        return ns

    def _wire_ipv6(self) -> None:
        """The IPv4 routes of ``__init__``, in IPv6."""
        for subnet_host, other_id, subnet in ((self.node, 2, "fd00:244:2::/64"),
                                              (self.node2, 1, "fd00:244:1::/64")):
            subnet_host.run(["ip", "-6", "route", "add", subnet, "via",
                             f"{LAN_PREFIX6}:{other_id}"])
            subnet_host.sysctl("net.ipv6.conf.all.forwarding", "1")
            # As for IPv4: some route for VIPs so local connects reach OUTPUT; the gateway
            # exists nowhere.
            subnet_host.run(["ip", "-6", "route", "add", "default", "via", f"{LAN_PREFIX6}:fe"])
        for cidr in (SERVICE_CIDR6, EXTERNAL_CIDR6):
            self.client.run(["ip", "-6", "route", "add", cidr, "via", self.node_ip6])
        self.node2.run(["ip", "-6", "route", "add", SERVICE_CIDR6, "via", self.node_ip6])

    @property
    def node_ip(self) -> str:
        return f"{LAN_PREFIX}.1"

    @property
    def node_ip6(self) -> str:
        return f"{LAN_PREFIX6}:1"

    def add_pod(self, host: NetNS, node_index: int, host_id: int) -> Pod:
        node_name = "node" if node_index == 1 else "node2"
        name = f"pod-{node_index}-{host_id}"
        ip = f"10.244.{node_index}.{host_id}"
        gateway = f"10.244.{node_index}.1"
        ns = self.netns(name)
        host_if = f"veth{host_id}"
        self.veth(ns, "eth0", host, host_if)
        ns.run(["ip", "addr", "add", f"{ip}/32", "dev", "eth0"])
        ns.run(["ip", "route", "add", gateway, "dev", "eth0"])
        ns.run(["ip", "route", "add", "default", "via", gateway])
        host.run(["ip", "addr", "add", f"{gateway}/32", "dev", host_if])
        host.run(["ip", "route", "add", f"{ip}/32", "dev", host_if])
        # The gateway address sits on every pod veth of the node; answer ARP for it per link.
        host.sysctl(f"net.ipv4.conf.{host_if}.proxy_arp", "1")
        ip6 = None
        if self.ipv6:
            ip6 = f"fd00:244:{node_index}::{host_id:x}"
            gateway6 = f"fd00:244:{node_index}::1"
            ns.run(["ip", "-6", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad"])
            ns.run(["ip", "-6", "route", "add", gateway6, "dev", "eth0"])
            ns.run(["ip", "-6", "route", "add", "default", "via", gateway6])
            host.run(["ip", "-6", "addr", "add", f"{gateway6}/128", "dev", host_if, "nodad"])
            host.run(["ip", "-6", "route", "add", f"{ip6}/128", "dev", host_if])
        pod = Pod(name, ip, node_name, ns, ip6)
        self.pods.append(pod)
        return pod

    def start_echo(self, pod: Pod, *, tcp_port: int = 8080, udp_port: int | None = 8080,
                   timeout: float | None = None) -> None:
        """Start the echo server (`kproxy_core.testing.echo`) in a pod and wait until it listens."""
        args = ["serve", "--name", pod.name, "--tcp", str(tcp_port)]
        if udp_port is not None:
            args += ["--udp", str(udp_port)]
        pod.ns.python("kproxy_core.testing.echo", *args, stdout=subprocess.DEVNULL)
        wait_for_port(pod.ns, pod.ip, tcp_port, scaled(10) if timeout is None else timeout)


def wait_for_port(ns: NetNS, ip: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {ip}:{port} in {ns.name} after {timeout}s")
