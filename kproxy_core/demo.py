"""``kproxy demo``: a throw-away cluster made of network namespaces, kproxy programming it, and
real traffic through it, narrated.

It builds a `kproxy_core.testing.netns.ClusterSandbox` (pods run the echo server, which answers
with its own name and the client address it saw), writes Service/EndpointSlice/Node manifests
for that sandbox into a temporary directory, and starts ``kproxy --manifests DIR`` as a
separate process inside the sandbox's node namespace, exactly as an operator would run it on
a node. Then it sends requests from a pod, from the node and from an external client, changes
an endpoint by rewriting a manifest, stops kproxy (the rules stay and traffic keeps flowing),
runs ``kproxy --cleanup`` and deletes the sandbox. Nothing outside the sandbox is touched.

The manifest builders (`service_obj`, `endpoint_slice_obj`, `node_obj`) are shared with the
end-to-end suite, which sends the same objects to the fake API server.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from kproxy_core.testing.netns import CLUSTER_CIDR, ClusterSandbox, NetNS, Pod
from kproxy_core.testing.timescale import scaled

HEALTHZ = "127.0.0.1:10256"
METRICS = "127.0.0.1:10249"
ECHO_PORT = 8080

# --------------------------------------------------------------------------------------------
# Manifest builders (JSON-shaped dicts, as the API server serves them)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Ep:
    """One endpoint of an EndpointSlice, with upstream's condition fields."""

    ip: str
    node: str
    ready: bool = True
    serving: bool | None = None
    terminating: bool = False
    zone: str = ""

    @classmethod
    def of(cls, pod: Pod, **kwargs: Any) -> Ep:
        return cls(pod.ip, pod.node, **kwargs)


def svc_port(port: int, target_port: int | str = ECHO_PORT, *, name: str = "",
             protocol: str = "TCP", node_port: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": port, "targetPort": target_port,
                           "protocol": protocol}
    if node_port:
        out["nodePort"] = node_port
    return out


def service_obj(name: str, cluster_ip: str, ports: Sequence[Mapping[str, Any]] | None = None, *,
                namespace: str = "default", type: str = "ClusterIP",
                external_ips: Sequence[str] = (), load_balancer_ips: Sequence[str] = (),
                source_ranges: Sequence[str] = (), external_local: bool = False,
                internal_local: bool = False, affinity_timeout: int | None = None,
                health_check_node_port: int = 0) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": type,
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "ports": [dict(p) for p in (ports if ports is not None else [svc_port(80)])],
        "sessionAffinity": "None",
    }
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    if type in ("NodePort", "LoadBalancer"):
        spec["externalTrafficPolicy"] = "Local" if external_local else "Cluster"
    if internal_local:
        spec["internalTrafficPolicy"] = "Local"
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    if health_check_node_port:
        spec["healthCheckNodePort"] = health_check_node_port
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    if load_balancer_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in load_balancer_ips]}}
    return obj


def endpoint_slice_obj(service: str, endpoints: Sequence[Ep], *, namespace: str = "default",
                       name: str | None = None,
                       ports: Sequence[tuple[str, int, str]] = (("", ECHO_PORT, "TCP"),),
                       ) -> dict[str, Any]:
    """One IPv4 EndpointSlice; ``ports`` are (name, port, protocol), names matching the
    Service's port names."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-abc12",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "port": port, "protocol": proto} for n, port, proto in ports],
        "endpoints": [_endpoint(ep) for ep in endpoints],
    }


def _endpoint(ep: Ep) -> dict[str, Any]:
    conditions: dict[str, bool] = {"ready": ep.ready, "terminating": ep.terminating}
    if ep.serving is not None:
        conditions["serving"] = ep.serving
    out: dict[str, Any] = {"addresses": [ep.ip], "conditions": conditions, "nodeName": ep.node}
    if ep.zone:
        out["zone"] = ep.zone
    return out


def node_obj(name: str, ip: str, zone: str = "") -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                 {"type": "Hostname", "address": name}]},
    }


# --------------------------------------------------------------------------------------------
# Running things inside the sandbox
# --------------------------------------------------------------------------------------------


def kproxy_command() -> list[str]:
    """How to start the ``kproxy`` console script of *this* Python environment."""
    beside = Path(sys.executable).with_name("kproxy")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("kproxy")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from kproxy_core.cli import main; sys.exit(main())"]


def requests(ns: NetNS, host: str, port: int, count: int = 1, *, proto: str = "tcp",
             timeout: float = 1.0) -> list[str]:
    """Send ``count`` requests with the echo client from ``ns``; one reply line each:
    ``"<pod> <client ip seen>"``, or ``refused`` / ``timeout`` / ``error ...``."""
    proc = ns.run([sys.executable, "-m", "kproxy_core.testing.echo", proto, host, str(port),
                   "--count", str(count), "--timeout", str(timeout)],
                  check=False, timeout=30 + count * timeout)
    return proc.stdout.split("\n")[:count] if proc.stdout else ["error: " + proc.stderr.strip()]


_HTTP_GET = """
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=2)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
except OSError as e:
    print(0); print(e)
"""


def http_get(ns: NetNS, url: str) -> tuple[int, str]:
    """GET ``url`` from inside ``ns``: (status, body); status 0 when nothing answered."""
    out = ns.run([sys.executable, "-c", _HTTP_GET, url], check=False).stdout
    status, _, body = out.partition("\n")
    return (int(status) if status.strip().isdigit() else 0), body.strip()


def wait_until(what: str, check: Callable[[], bool], timeout: float,
               interval: float = 0.2) -> float:
    """Poll ``check`` until true; seconds it took. TimeoutError names ``what``."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


class DemoFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, mode: str, out: Callable[[str], None]) -> None:
        self.mode = mode
        self.out = out
        self.failures: list[str] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="kproxy-demo-"))
        self.manifest = self.workdir / "manifests" / "cluster.yaml"
        self.log_path = self.workdir / "kproxy.log"
        self.sandbox: ClusterSandbox | None = None
        self.kernel_dataplane = kernel_dataplane(mode)
        self.kproxy: subprocess.Popen[bytes] | None = None

    # -- set-up --------------------------------------------------------------------------------

    def build(self) -> ClusterSandbox:
        self.out("Building a sandbox cluster out of network namespaces ...")
        sb = self.sandbox = ClusterSandbox(local_pods=2, remote_pods=1)
        for pod in sb.pods:
            sb.start_echo(pod, tcp_port=ECHO_PORT, udp_port=ECHO_PORT)
        self.out(f"  node   {sb.node_ip:<12} ({sb.node.name}), pods "
                 + ", ".join(f"{p.name} {p.ip}" for p in sb.pods if p.node == "node"))
        self.out("  node2  10.99.0.2    pods "
                 + ", ".join(f"{p.name} {p.ip}" for p in sb.pods if p.node == "node2"))
        self.out("  client 10.99.0.100  (outside the cluster, routes service IPs via node)")
        self.out("  every pod runs an echo server on :8080 that answers '<pod> <client ip it saw>'")
        return sb

    def objects(self, web_endpoints: Sequence[Pod]) -> list[dict[str, Any]]:
        assert self.sandbox is not None
        pods = self.sandbox.pods
        everywhere = [Ep.of(p) for p in pods]
        return [
            node_obj("node", self.sandbox.node_ip),
            service_obj("web", "10.96.0.10"),
            endpoint_slice_obj("web", [Ep.of(p) for p in web_endpoints]),
            service_obj("web-nodeport", "10.96.0.11",
                        [svc_port(80, name="tcp", node_port=30080),
                         svc_port(80, name="udp", protocol="UDP")], type="NodePort"),
            endpoint_slice_obj("web-nodeport", everywhere,
                               ports=[("tcp", ECHO_PORT, "TCP"), ("udp", ECHO_PORT, "UDP")]),
            service_obj("sticky", "10.96.0.12", affinity_timeout=600),
            endpoint_slice_obj("sticky", everywhere),
        ]

    def write_manifests(self, web_endpoints: Sequence[Pod]) -> None:
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so kproxy's poller never reads a half-written file.
        tmp = self.manifest.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(self.objects(web_endpoints), sort_keys=False))
        os.replace(tmp, self.manifest)

    def start_kproxy(self) -> None:
        assert self.sandbox is not None
        argv = [*kproxy_command(), f"--proxy-mode={self.mode}",
                f"--manifests={self.manifest.parent}", "--hostname-override=node",
                f"--cluster-cidr={CLUSTER_CIDR}", f"--healthz-bind-address={HEALTHZ}",
                f"--metrics-bind-address={METRICS}", "--v=2"]
        self.out(f"\nStarting kproxy inside the node namespace ({self.sandbox.node.name}):")
        self.out(f"  $ {shlex.join(argv)}")
        self.out(f"  log: {self.log_path}")
        with open(self.log_path, "wb") as log:
            self.kproxy = self.sandbox.node.spawn(argv, stdout=log, stderr=subprocess.STDOUT)

    def kproxy_exited(self) -> bool:
        return self.kproxy is not None and self.kproxy.poll() is not None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    | " + line for line in text[-lines:])

    def wait_ready(self) -> None:
        assert self.sandbox is not None
        node = self.sandbox.node

        def healthy() -> bool:
            if self.kproxy_exited():
                assert self.kproxy is not None
                raise DemoFailed(f"kproxy exited with status {self.kproxy.returncode}")
            return http_get(node, f"http://{HEALTHZ}/healthz")[0] == 200

        took = wait_until("kproxy /healthz", healthy, timeout=scaled(30))
        self.out(f"  /healthz answers 200 after {took:.1f}s")
        pod = self.sandbox.pods[0]
        took = wait_until("first request through the ClusterIP",
                          lambda: _answered(requests(pod.ns, "10.96.0.10", 80)[0]),
                          timeout=scaled(30))
        self.out(f"  service rules are programmed ({took:.1f}s more)")
        status, mode = http_get(node, f"http://{METRICS}/proxyMode")
        if status == 200:
            self.out(f"  /proxyMode says: {mode}")

    # -- traffic ---------------------------------------------------------------------------------

    def show(self, title: str, ns: NetNS, source: str, host: str, port: int, count: int,
             proto: str = "tcp") -> list[str]:
        replies = requests(ns, host, port, count, proto=proto)
        self.out(f"\n{title}\n  {count} {proto.upper()} requests {source} -> {host}:{port}")
        for reply in replies:
            pod, _, seen = reply.partition(" ")
            self.out(f"    answered by {pod:<9} (it saw the client as {seen})"
                     if _answered(reply) else f"    {reply}")
        answered = collections.Counter(r.split()[0] for r in replies if _answered(r))
        self.out("  tally: " + (", ".join(f"{p} x{n}" for p, n in sorted(answered.items()))
                                or "nothing answered"))
        if sum(answered.values()) != count:
            self.failures.append(f"{title}: {count - sum(answered.values())} requests failed")
        return replies

    def traffic(self) -> None:
        assert self.sandbox is not None
        sb = self.sandbox
        pod = sb.pods[0]
        self.show("1. ClusterIP service 'web' (3 endpoints, random spread), from a pod",
                  pod.ns, pod.name, "10.96.0.10", 80, 9)
        self.show("2. The same ClusterIP from the node itself", sb.node, "node",
                  "10.96.0.10", 80, 6)
        self.show("3. NodePort service 'web-nodeport' from the external client "
                  "(SNATed to the node: externalTrafficPolicy Cluster)",
                  sb.client, "client", sb.node_ip, 30080, 6)
        self.show("4. UDP to service 'web-nodeport' (ClusterIP), from a pod", pod.ns, pod.name,
                  "10.96.0.11", 80, 4, proto="udp")
        replies = self.show("5. Service 'sticky' with sessionAffinity ClientIP, from a pod",
                            pod.ns, pod.name, "10.96.0.12", 80, 6)
        chosen = {r.split()[0] for r in replies if _answered(r)}
        if len(chosen) != 1:
            self.failures.append(f"affinity: requests went to {sorted(chosen)}, expected one pod")

    def churn(self) -> None:
        assert self.sandbox is not None
        pods = self.sandbox.pods
        gone = pods[1]
        self.out(f"\n6. Endpoint change: {gone.name} leaves service 'web' "
                 f"(rewriting {self.manifest.name})")
        self.write_manifests([p for p in pods if p is not gone])
        src = pods[0]
        clean_rounds = 0

        def converged() -> bool:
            nonlocal clean_rounds
            replies = requests(src.ns, "10.96.0.10", 80, 8)
            ok = all(_answered(r) for r in replies) and not any(
                r.split()[0] == gone.name for r in replies)
            clean_rounds = clean_rounds + 1 if ok else 0
            # Two clean rounds of 8: a stale rule set would hit the gone pod with p ≈ 0.998.
            return clean_rounds >= 2

        took = wait_until(f"'web' without {gone.name}", converged, timeout=scaled(30),
                          interval=0.1)
        self.out(f"  converged: no request reaches {gone.name} any more "
                 f"({took:.1f}s after the manifest changed; includes the manifest poll)")
        self.show("  after the change", src.ns, src.name, "10.96.0.10", 80, 6)

    # -- tear-down -------------------------------------------------------------------------------

    def stop_and_cleanup(self) -> None:
        assert self.sandbox is not None and self.kproxy is not None
        sb = self.sandbox
        if self.kernel_dataplane:
            self.out("\n7. Stopping kproxy (SIGTERM): the programmed rules stay, traffic keeps "
                     "flowing")
        else:
            self.out(f"\n7. Stopping kproxy (SIGTERM): in {self.mode} mode the process itself "
                     "relays every connection, so traffic stops with it")
        os.killpg(self.kproxy.pid, signal.SIGTERM)
        try:
            code = self.kproxy.wait(timeout=scaled(15))
        except subprocess.TimeoutExpired as exc:
            raise DemoFailed(f"kproxy did not exit within {scaled(15):.0f}s of SIGTERM") from exc
        self.out(f"  kproxy exited with status {code}")
        if code != 0:
            self.failures.append(f"kproxy exited {code} on SIGTERM")
        pod = sb.pods[0]
        if self.kernel_dataplane:
            self.show("  with kproxy stopped", pod.ns, pod.name, "10.96.0.10", 80, 3)
        else:
            reply = requests(pod.ns, "10.96.0.10", 80, 1)[0]
            self.out(f"  a request to the ClusterIP with kproxy stopped: {reply}")

        argv = [*kproxy_command(), "--cleanup"]
        self.out(f"\n8. Removing everything kproxy programmed: $ {shlex.join(argv)}")
        proc = sb.node.run(argv, check=False, timeout=scaled(60))
        # One line per removed object is noise here; the summary line says it all.
        shown = proc.stdout.strip().splitlines()[-1:] or proc.stderr.strip().splitlines()[-5:]
        for line in shown:
            self.out(f"    | {line}")
        if proc.returncode != 0:
            self.failures.append(f"kproxy --cleanup exited {proc.returncode}")
        reply = requests(sb.pods[0].ns, "10.96.0.10", 80, 1, timeout=1.0)[0]
        self.out(f"  a request to the ClusterIP now: {reply}")
        if _answered(reply):
            self.failures.append("the ClusterIP still answers after --cleanup")

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self) -> int:
        try:
            sb = self.build()
            self.write_manifests(sb.pods)
            self.out(f"\nManifests written to {self.manifest}:")
            self.out("  web           ClusterIP 10.96.0.10:80 -> :8080 on all 3 pods")
            self.out("  web-nodeport  NodePort  10.96.0.11:80 TCP (node port 30080) and UDP")
            self.out("  sticky        ClusterIP 10.96.0.12:80, sessionAffinity ClientIP")
            self.start_kproxy()
            self.wait_ready()
            self.traffic()
            self.churn()
            self.stop_and_cleanup()
        except (DemoFailed, TimeoutError) as exc:
            self.out(f"\ndemo failed: {exc}")
            if self.kproxy is not None:
                self.out("kproxy log (last lines):\n" + self.log_tail())
            return 1
        finally:
            self.out("\nDeleting the sandbox namespaces.")
            self.close()
        if self.failures:
            self.out("\nDone, with problems:\n" + "\n".join(f"  - {f}" for f in self.failures))
            return 1
        self.out("\nDone: every check passed.")
        return 0


def _answered(reply: str) -> bool:
    return bool(reply) and reply.split()[0] not in ("refused", "timeout", "error", "error:")


def kernel_dataplane(mode: str) -> bool:
    """Whether ``mode`` programs the kernel to forward (and traffic outlives the process).
    A mode that terminates connections itself opts out of conntrack cleanup for the same
    reason, so that attribute tells."""
    from kproxy_core.plugins import KproxyPluginManager

    spec = KproxyPluginManager().modes().get(mode)
    return spec is None or spec.load().needs_conntrack_cleanup


def installed_modes() -> list[str]:
    from kproxy_core.plugins import KproxyPluginManager

    return KproxyPluginManager().modes().names()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kproxy demo",
        description="Run kproxy against a throw-away cluster of network namespaces and send "
                    "real traffic through it. Needs root; touches nothing outside the sandbox.")
    parser.add_argument("--proxy-mode", default="iptables",
                        help="proxy mode to demonstrate (default: iptables)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON summary line at the end (for scripts)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if os.geteuid() != 0:
        print("kproxy demo: must run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    modes = installed_modes()
    if args.proxy_mode not in modes:
        print(f"kproxy demo: proxy mode {args.proxy_mode!r} is not installed; installed modes: "
              f"{', '.join(modes) or 'none'}", file=sys.stderr)
        return 2
    print(f"kproxy demo, proxy mode {args.proxy_mode}\n", flush=True)
    demo = Demo(args.proxy_mode, lambda line: print(line, flush=True))
    code = demo.run()
    if args.json:
        print(json.dumps({"mode": args.proxy_mode, "ok": code == 0, "failures": demo.failures}))
    return code


if __name__ == "__main__":
    sys.exit(main())
