"""Builders shared by the unit and the real-kernel tests."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kproxy_core.backend import BackendContext, SyncRequest
from kproxy_core.model import (
    Endpoint,
    NodeView,
    Protocol,
    ResolvedServicePort,
    ServicePortKey,
    ServicePortName,
)
from kproxy_core.plugins import KproxyPluginManager


class FakeConfig:
    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.values = dict(values or {})

    def get(self, path: str) -> Any:
        if path not in self.values:
            raise KeyError(path)
        return self.values[path]


def context(config: Mapping[str, Any] | None = None, families: tuple[int, ...] = (4,)
            ) -> BackendContext:
    return BackendContext(config=FakeConfig(config), node_name="node",
                          logger=logging.getLogger("test-ipvs"),
                          plugins=KproxyPluginManager(load_entrypoints=False), families=families)


def key(name: str, protocol: Protocol = "TCP", family: int = 4, port: str = "p") -> ServicePortKey:
    return ServicePortKey(family, ServicePortName("default", name, port, protocol))  # type: ignore[arg-type]


def ep(ip: str, port: int = 8080, local: bool = True) -> Endpoint:
    return Endpoint(ip=ip, port=port, is_local=local, ready=True, serving=True, terminating=False,
                    node_name="node" if local else "node2")


def svc(name: str, cluster_ip: str, port: int, endpoints: Iterable[Endpoint] = (), *,
        protocol: Protocol = "TCP", local_only_external: bool = False, **kw: Any
        ) -> ResolvedServicePort:
    eps = tuple(endpoints)
    local = tuple(e for e in eps if e.is_local)
    return ResolvedServicePort(
        key=key(name, protocol, 6 if ":" in cluster_ip else 4), cluster_ip=cluster_ip, port=port,
        cluster_endpoints=eps, local_endpoints=local if local_only_external else (),
        all_reachable_endpoints=eps, has_any_endpoints=bool(eps),
        external_policy_local=local_only_external, **kw)


def view(*ports: ResolvedServicePort, node_ips: tuple[str, ...] = ("10.99.0.1",),
         pod_cidrs: tuple[str, ...] = ()) -> NodeView:
    return NodeView("node", node_ips, "", {p.key: p for p in ports}, pod_cidrs=pod_cidrs)


def request(new: NodeView, old: NodeView | None = None, full: bool = False) -> SyncRequest:
    if old is None:
        return SyncRequest(new, frozenset(new.services), True)
    changed = {k for k in set(new.services) | set(old.services)
               if new.services.get(k) != old.services.get(k)}
    return SyncRequest(new, frozenset(changed), full,
                       {k: old.services.get(k) for k in changed})
