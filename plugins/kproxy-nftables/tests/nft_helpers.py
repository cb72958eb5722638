"""Builders and kernel read-back shared by the nftables mode's tests."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kproxy_nftables import nft
from kproxy_nftables import rules as R
from kproxy_nftables.proxier import dispatch, endpoints_of

from kproxy_core.backend import BackendContext
from kproxy_core.model import (
    Endpoint,
    NodeView,
    Protocol,
    ResolvedServicePort,
    ServicePortKey,
    ServicePortName,
)
from kproxy_core.plugins import KproxyPluginManager
from kproxy_core.testing.conformance import Flow


class FakeConfig:
    """A ConfigView over a dict; unknown paths raise KeyError like the real one."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.values = dict(values or {})

    def get(self, path: str) -> Any:
        return self.values[path]


def key(ns: str, name: str, port: str = "p80", proto: Protocol = "TCP",
        family: int = 4) -> ServicePortKey:
    return ServicePortKey(family, ServicePortName(ns, name, port, proto))  # type: ignore[arg-type]


def ep(ip: str, port: int = 80, local: bool = False) -> Endpoint:
    return Endpoint(ip, port, is_local=local, ready=True, serving=True, terminating=False)


def svc(k: ServicePortKey, cluster_ip: str, port: int = 80, *,
        endpoints: Iterable[Endpoint] = (), **kwargs: Any) -> ResolvedServicePort:
    """A resolved port; local endpoints derived from ``is_local`` when a Local policy applies,
    as the core's resolver hands them over."""
    eps = tuple(endpoints)
    local_policy = kwargs.get("external_policy_local") or kwargs.get("internal_policy_local")
    local = tuple(e for e in eps if e.is_local) if local_policy else ()
    return ResolvedServicePort(
        key=k, cluster_ip=cluster_ip, port=port, cluster_endpoints=eps,
        local_endpoints=local, all_reachable_endpoints=tuple(dict.fromkeys(eps + local)),
        has_any_endpoints=bool(eps), **kwargs)


def view(*ports: ResolvedServicePort, node_ips: tuple[str, ...] = ("10.99.0.1",)) -> NodeView:
    return NodeView("node", node_ips, "", {p.key: p for p in ports})


def context(config: Mapping[str, Any] | None = None,
            families: tuple[int, ...] = (4,)) -> BackendContext:
    return BackendContext(
        config=FakeConfig(config),
        node_name="node",
        logger=logging.getLogger("kproxy.test.nftables"),
        plugins=KproxyPluginManager(load_entrypoints=False),
        families=families,
    )


def read_dataplane(families: Iterable[int] = (4,)) -> dict[Flow, frozenset[str]]:
    """The kernel's tables as conformance Flows (run inside the namespace)."""
    flows: dict[Flow, frozenset[str]] = {}
    for family in families:
        table = nft.read_table(family)
        cluster_ips = {str(e) for e in table.sets.get(R.CLUSTER_IPS_SET, ())}
        keys: set[tuple[Any, ...]] = set()
        for name in (R.SERVICE_IPS_MAP, R.NO_ENDPOINT_SERVICES_MAP):
            keys.update(table.maps.get(name, {}))
        for address, proto, port in keys:
            verdict, chain = dispatch(table, proto, address, port)
            reached = frozenset(endpoints_of(table, chain or "")) if verdict == "accept" \
                else frozenset()
            kind = "cluster" if address in cluster_ips else "external"
            flows[Flow(kind, proto.upper(), address, port)] = reached  # type: ignore[arg-type]
        np_keys: set[tuple[Any, ...]] = set()
        for name in (R.SERVICE_NODEPORTS_MAP, R.NO_ENDPOINT_NODEPORTS_MAP):
            np_keys.update(table.maps.get(name, {}))
        for proto, port in np_keys:
            verdict, chain = dispatch(table, proto, None, port)
            reached = frozenset(endpoints_of(table, chain or "")) if verdict == "accept" \
                else frozenset()
            flows[Flow("nodeport", proto.upper(), f"v{family}", port)] = reached
    return flows
