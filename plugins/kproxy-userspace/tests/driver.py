"""Runs a `UserspaceProxier` inside a network namespace for the real-traffic tests.

Started as ``ip netns exec NODE python driver.py OPTIONS_JSON`` (config paths, plus
``node_ips`` and ``families``: the node's addresses and IP families, default IPv4 only);
reads one JSON command per line on stdin and answers one JSON line on stdout:

* ``{"op": "sync", "services": [...], "full": true}`` → ``{"ok": true, "result": {...}}``
* ``{"op": "describe", "index": N}`` (N-th service of the last sync) → ``{"ok": true, ...}``
* ``{"op": "quit"}``

A service is a dict (its IP family is its cluster_ip's): ns, name, port_name, protocol,
cluster_ip, port, node_port,
endpoints ([ip, port] pairs), external_endpoints (optional: external traffic then uses these,
as with externalTrafficPolicy Local), affinity (seconds or null), external_ips, lb_ips,
source_ranges.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Any

from kproxy_core.backend import BackendContext, SyncRequest
from kproxy_core.model import (
    Endpoint,
    NodeView,
    ResolvedServicePort,
    ServicePortKey,
    ServicePortName,
    ip_family,
)
from kproxy_core.plugins import KproxyPluginManager


class DictConfig:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, path: str) -> Any:
        return self.values.get(path)


def endpoint(pair: list[Any]) -> Endpoint:
    return Endpoint(pair[0], int(pair[1]), is_local=True, ready=True, serving=True,
                    terminating=False)


def build(spec: dict[str, Any]) -> ResolvedServicePort:
    family = ip_family(spec["cluster_ip"]) if spec.get("cluster_ip") else 4
    key = ServicePortKey(family, ServicePortName(spec.get("ns", "default"), spec["name"],
                                                 spec.get("port_name", ""),
                                                 spec.get("protocol", "TCP")))
    cluster = tuple(endpoint(p) for p in spec.get("endpoints", []))
    external = spec.get("external_endpoints")
    local = tuple(endpoint(p) for p in external) if external is not None else ()
    return ResolvedServicePort(
        key=key,
        cluster_ip=spec.get("cluster_ip", ""),
        port=int(spec["port"]),
        node_port=int(spec.get("node_port", 0)),
        external_ips=tuple(spec.get("external_ips", ())),
        load_balancer_ips=tuple(spec.get("lb_ips", ())),
        load_balancer_source_ranges=tuple(spec.get("source_ranges", ())),
        external_policy_local=external is not None,
        session_affinity_timeout=spec.get("affinity"),
        cluster_endpoints=cluster,
        local_endpoints=local,
        all_reachable_endpoints=cluster + local,
        has_any_endpoints=bool(cluster or local),
    )


def main() -> int:
    options = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    node_ips = tuple(options.pop("node_ips", ["10.99.0.1"]))
    families = tuple(options.pop("families", [4]))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from kproxy_userspace.proxier import UserspaceProxier

    context = BackendContext(config=DictConfig(options), node_name="node",
                             logger=logging.getLogger("userspace"),
                             plugins=KproxyPluginManager(load_entrypoints=False),
                             families=families)
    try:
        UserspaceProxier.check_supported(context)
        proxier = UserspaceProxier(context)
    except Exception as exc:
        print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
        return 1
    print(json.dumps({"ok": True}), flush=True)
    previous: dict[ServicePortKey, ResolvedServicePort] = {}
    keys: list[ServicePortKey] = []
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["op"] == "quit":
                break
            if command["op"] == "sync":
                ports = [build(s) for s in command["services"]]
                services = {p.key: p for p in ports}
                keys = [p.key for p in ports]
                changed = frozenset(
                    k for k in set(services) | set(previous)
                    if services.get(k) != previous.get(k)
                )
                view = NodeView("node", node_ips, "", services)
                result = proxier.sync(SyncRequest(view, changed, bool(command.get("full")),
                                                  {k: previous.get(k) for k in changed}))
                previous = services
                reply: dict[str, Any] = {"ok": True, "objects": result.objects_written,
                                         "counters": dict(result.counters)}
            elif command["op"] == "describe":
                reply = {"ok": True, **proxier.describe(keys[command["index"]])}
            else:
                reply = {"ok": False, "error": f"unknown op {command['op']}"}
        except Exception as exc:
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    proxier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
