"""Prints how long the Python side of an iptables sync takes at 10k services x 5 endpoints.

No kernel is touched: it times `IptablesProxier.plan` (rendering and assembling the restore
text), the part kproxy controls; iptables-restore time is the kernel's.

    python plugins/kproxy-iptables/benchmarks/render_10k.py [SERVICES] [ENDPOINTS]
"""

from __future__ import annotations

import logging
import sys
import time

from kproxy_iptables.proxier import IptablesProxier

from kproxy_core.backend import BackendContext, SyncRequest
from kproxy_core.model import (
    Endpoint,
    NodeView,
    ResolvedServicePort,
    ServicePortKey,
    ServicePortName,
)
from kproxy_core.plugins import KproxyPluginManager


class _Config:
    values = {"clusterCIDR": "10.0.0.0/8", "iptables.localhostNodePorts": False}

    def get(self, path: str) -> object:
        return self.values[path]


def build(services: int, endpoints: int) -> dict[ServicePortKey, ResolvedServicePort]:
    out = {}
    for i in range(services):
        key = ServicePortKey(4, ServicePortName(f"ns{i % 50}", f"svc{i}", "http", "TCP"))
        eps = tuple(Endpoint(f"10.{(i >> 8) & 255}.{i & 255}.{j + 1}", 8080, j == 0, True, True,
                             False) for j in range(endpoints))
        out[key] = ResolvedServicePort(
            key, f"172.{16 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", 80,
            node_port=30000 + i % 2000 if i % 4 == 0 else 0, cluster_endpoints=eps,
            all_reachable_endpoints=eps, has_any_endpoints=True)
    return out


def main() -> None:
    services = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    endpoints = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    ports = build(services, endpoints)
    view = NodeView("node", ("192.168.0.2",), "", ports)
    proxier = IptablesProxier(BackendContext(_Config(), "node", logging.getLogger("bench"),
                                             KproxyPluginManager(load_entrypoints=False),
                                             families=(4,)))
    start = time.perf_counter()
    data, book = proxier.plan(SyncRequest(view, frozenset(ports), True), 4, full=True)
    text = data.render()
    full = time.perf_counter() - start
    proxier._commit(4, book)
    changed = next(iter(ports))
    start = time.perf_counter()
    data, _ = proxier.plan(SyncRequest(view, frozenset({changed}), False), 4, full=False)
    partial_text = data.render()
    partial = time.perf_counter() - start
    print(f"services={services} endpoints/service={endpoints}")
    print(f"full sync (render+assemble): {full:.3f}s, {text.count(chr(10))} lines")
    print(f"partial sync, 1 changed:     {partial:.3f}s, {partial_text.count(chr(10))} lines")


if __name__ == "__main__":
    main()
