"""Small builders for hand-made resolved models, shared by the golden and kernel tests."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

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


class FakeConfig:
    """A ConfigView over a plain dict; unknown paths raise KeyError like a real one would."""

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
    """A resolved port; local endpoints are derived from ``is_local`` when a Local policy
    applies, the way the core's resolver hands them over."""
    eps = tuple(endpoints)
    local_policy = kwargs.get("external_policy_local") or kwargs.get("internal_policy_local")
    local = tuple(e for e in eps if e.is_local) if local_policy else ()
    cluster = eps
    if kwargs.get("internal_policy_local") and not (
            kwargs.get("node_port") or kwargs.get("external_ips")
            or kwargs.get("load_balancer_ips")):
        cluster = ()  # nothing uses the cluster-wide set
    return ResolvedServicePort(
        key=k, cluster_ip=cluster_ip, port=port, cluster_endpoints=cluster,
        local_endpoints=local, all_reachable_endpoints=tuple(dict.fromkeys(cluster + local)),
        has_any_endpoints=bool(eps), **kwargs)


def view(*ports: ResolvedServicePort, node_ips: tuple[str, ...] = ("10.99.0.1",)) -> NodeView:
    return NodeView("node", node_ips, "", {p.key: p for p in ports})


def context(config: Mapping[str, Any] | None = None,
            families: tuple[int, ...] = (4,)) -> BackendContext:
    return BackendContext(
        config=FakeConfig(config),
        node_name="node",
        logger=logging.getLogger("kproxy.test.iptables"),
        plugins=KproxyPluginManager(load_entrypoints=False),
        families=families,
    )


def check_consistency(text: str) -> None:
    """Upstream's checks on one restore transaction: every jump target of ours is declared in
    that table (or is a built-in target), and every declared service chain is jumped to."""
    table = ""
    declared: dict[str, set[str]] = {}
    jumped: dict[str, set[str]] = {}
    deleted: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            declared[table], jumped[table], deleted[table] = set(), set(), set()
        elif line.startswith(":"):
            declared[table].add(line[1:].split()[0])
        elif line.startswith("-X "):
            deleted[table].add(line.split()[1])
        elif line.startswith("-A "):
            tokens = shlex.split(line)
            for flag in ("-j", "-g"):
                if flag in tokens and tokens[tokens.index(flag) + 1].startswith("KUBE-"):
                    jumped[table].add(tokens[tokens.index(flag) + 1])
    for name in declared:
        missing = jumped[name] - declared[name]
        assert not missing, f"{name}: jumps to undeclared chains {sorted(missing)}"
        dangling = jumped[name] & deleted[name]
        assert not dangling, f"{name}: jumps to deleted chains {sorted(dangling)}"
        unused = {c for c in declared[name] - deleted[name] - jumped[name]
                  if c.startswith(("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-",
                                   "KUBE-SEP-"))}
        assert not unused, f"{name}: declared but unused chains {sorted(unused)}"


def table_lines(text: str, table: str) -> list[str]:
    """The ``-A`` lines of one table, in order."""
    out: list[str] = []
    current = ""
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith("-A "):
            out.append(line)
    return out
