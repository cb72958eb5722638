"""The backend: renders the resolved model into a table of flows.

A real mode renders the same model into kernel objects; the shape is the same: keep what you
programmed per service port, rewrite only ``request.changed`` on partial syncs, and rebuild
everything (dropping what the view no longer has) when ``request.full`` is set.
"""

from __future__ import annotations

import json
import os
import tempfile

from kproxy_core.backend import Backend, BackendContext, SyncRequest, SyncResult
from kproxy_core.model import ResolvedServicePort, ServicePortKey

Row = tuple[str, str, str, int, tuple[str, ...]]


def render(port: ResolvedServicePort) -> list[Row]:
    """(kind, protocol, address, port, endpoints) rows for one service port."""
    internal = tuple(sorted(ep.address for ep in port.internal_endpoints))
    external = tuple(sorted(ep.address for ep in port.external_endpoints))
    rows: list[Row] = [("cluster", port.protocol, port.cluster_ip, port.port, internal)]
    rows += [("external", port.protocol, ip, port.port, external)
             for ip in (*port.external_ips, *port.load_balancer_ips)]
    if port.node_port:
        rows.append(("nodeport", port.protocol, f"v{port.family}", port.node_port, external))
    return rows


class MemoryBackend(Backend):
    name = "memory"
    needs_conntrack_cleanup = False
    required_capabilities = ()

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.table: dict[ServicePortKey, list[Row]] = {}
        self.syncs = 0

    def sync(self, request: SyncRequest) -> SyncResult:
        services = request.view.services
        keys = set(services) | set(self.table) if request.full else request.changed
        written = 0
        for key in keys:
            port = services.get(key)
            if port is None:
                written += len(self.table.pop(key, []))
            else:
                self.table[key] = render(port)
                written += len(self.table[key])
        self.syncs += 1
        self._write_state_file()
        return SyncResult(objects_written=written, counters={"flows": self.flow_count()})

    def flow_count(self) -> int:
        return sum(len(rows) for rows in self.table.values())

    def _write_state_file(self) -> None:
        path = str(self.context.config.get("memory.stateFile") or "")
        if not path:
            return
        rows = [
            {"service": str(key), "kind": kind, "protocol": proto, "address": addr,
             "port": port, "endpoints": list(eps)}
            for key in sorted(self.table) for kind, proto, addr, port, eps in self.table[key]
        ]
        # Atomic replace, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)) or ".")
        with os.fdopen(fd, "w") as out:
            json.dump({"flows": rows}, out, indent=1)
        os.replace(tmp, path)
