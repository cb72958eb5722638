"""The iptables rules that steer service traffic into the userspace listeners.

Chains and rule shapes follow upstream's removed userspace proxier
(``pkg/proxy/userspace/proxier.go``, Kubernetes ≤ 1.25), so operators find what they knew:

* ``nat KUBE-PORTALS-CONTAINER`` (first in PREROUTING): traffic arriving from pods or from
  outside to a ClusterIP / external IP / LB IP is ``REDIRECT``\\ ed to the listener port;
* ``nat KUBE-PORTALS-HOST`` (first in OUTPUT): the node's own traffic is ``DNAT``\\ ed to
  ``<node ip>:<listener>``, because REDIRECT of locally generated packets answers from the
  wrong address (upstream's comment: "which makes DNS unhappy");
* ``nat KUBE-NODEPORT-CONTAINER`` / ``KUBE-NODEPORT-HOST`` (last in PREROUTING / OUTPUT,
  behind ``-m addrtype --dst-type LOCAL``): the same for NodePorts;
* ``filter KUBE-NODEPORT-NON-LOCAL`` (first in INPUT): accept new connections to listeners
  that serve NodePorts, for hosts with a default-deny INPUT policy.

Every sync rewrites these chains whole in one ``iptables-restore --noflush`` transaction: a
userspace proxy serves few services, and a whole rewrite can never leave a stale portal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, cast

import attrs

from kproxy_core.kernel.iptables import RestoreData, quote
from kproxy_core.model import ResolvedServicePort

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL = "KUBE-NODEPORT-NON-LOCAL"
#: Services without endpoints get no portal; their packets meet a REJECT here (ICMP port
#: unreachable: "connection refused" at once), as the kernel modes answer them.
PORTALS_REJECT = "KUBE-PORTALS-REJECT"

NAT_CHAINS = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
FILTER_CHAINS = (NODEPORT_NON_LOCAL, PORTALS_REJECT)


@attrs.frozen
class Jump:
    """A rule in a built-in chain that sends traffic to one of our chains."""

    table: str
    chain: str
    args: tuple[str, ...]
    prepend: bool


_PORTAL_COMMENT = ("-m", "comment", "--comment",
                   "handle ClusterIPs; NOTE: this must be before the NodePort rules")
_NODEPORT_MATCH = ("-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment",
                   "handle service NodePorts; NOTE: this must be the last rule in the chain")

#: Order matters (upstream's iptablesInit): portal jumps first, NodePort jumps last, so a
#: load-balancer IP that happens to be local is handled as a portal, not a NodePort.
JUMPS: tuple[Jump, ...] = (
    Jump("nat", "PREROUTING", (*_PORTAL_COMMENT, "-j", PORTALS_CONTAINER), prepend=True),
    Jump("nat", "OUTPUT", (*_PORTAL_COMMENT, "-j", PORTALS_HOST), prepend=True),
    Jump("nat", "PREROUTING", (*_NODEPORT_MATCH, "-j", NODEPORT_CONTAINER), prepend=False),
    Jump("nat", "OUTPUT", (*_NODEPORT_MATCH, "-j", NODEPORT_HOST), prepend=False),
    Jump("filter", "INPUT",
         ("-m", "comment", "--comment", "Ensure that non-local NodePort traffic can flow",
          "-j", NODEPORT_NON_LOCAL), prepend=True),
    *(Jump("filter", chain,
           ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
            "kubernetes service portals without endpoints", "-j", PORTALS_REJECT),
           prepend=True)
      for chain in ("INPUT", "FORWARD", "OUTPUT")),
)


@attrs.frozen
class Portal:
    """One service port and the listener ports that serve it on this node."""

    port: ResolvedServicePort
    #: Listener for ClusterIP traffic (internal endpoints).
    internal_listener: int
    #: Listener for NodePort / external IP / LB traffic (external endpoints); equal to
    #: ``internal_listener`` when both traffic kinds use the same endpoints.
    external_listener: int


def _host_cidr(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _join(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _common(port: ResolvedServicePort, dest_port: int) -> list[str]:
    proto = port.protocol.lower()
    return ["-m", "comment", "--comment", quote(str(port.name)),
            "-p", proto, "-m", proto, "--dport", str(dest_port)]


def render(portals: Iterable[Portal], node_ip: str | None, family: int) -> RestoreData:
    """The complete content of our chains for one IP family.

    ``node_ip`` is where the node's own traffic is DNATed; without one (a node with no address
    in this family) host-originated traffic is not proxied.
    """
    data = RestoreData(family)
    nat = data.table("nat")
    flt = data.table("filter")
    for chain in NAT_CHAINS:
        nat.chain(chain)
    for chain in FILTER_CHAINS:
        flt.chain(chain)
    for portal in sorted(portals, key=lambda p: p.port.key):
        port = portal.port
        if port.family != family:
            continue
        redirect_int = ("-j", "REDIRECT", "--to-ports", str(portal.internal_listener))
        redirect_ext = ("-j", "REDIRECT", "--to-ports", str(portal.external_listener))
        common = _common(port, port.port)
        if not port.internal_endpoints:
            # REJECT when nothing serves anywhere; DROP when only this node's Local policy
            # leaves nothing (as the kernel modes do).
            verdict = "DROP" if port.has_any_endpoints else "REJECT"
            flt.rule(PORTALS_REJECT, *common, "-d", _host_cidr(port.cluster_ip), "-j", verdict)
        elif port.cluster_ip:
            dest = ("-d", _host_cidr(port.cluster_ip))
            nat.rule(PORTALS_CONTAINER, *common, *dest, *redirect_int)
            if node_ip:
                nat.rule(PORTALS_HOST, *common, *dest, "-j", "DNAT", "--to-destination",
                         _join(node_ip, portal.internal_listener))
        external: list[tuple[str, Sequence[str]]] = [(ip, ()) for ip in port.external_ips]
        for ip in port.load_balancer_ips:
            if port.load_balancer_source_ranges:
                # Sources outside the ranges fall through to the LB IP itself, which the node
                # does not serve: they never reach a listener.
                external.extend((ip, ("-s", cidr)) for cidr in port.load_balancer_source_ranges)
            else:
                external.append((ip, ()))
        if port.is_external_facing and not port.external_endpoints:
            verdict = "DROP" if port.has_any_endpoints else "REJECT"
            for ip in (*port.external_ips, *port.load_balancer_ips):
                flt.rule(PORTALS_REJECT, *common, "-d", _host_cidr(ip), "-j", verdict)
            if port.node_port:
                flt.rule(PORTALS_REJECT, *_common(port, port.node_port), "-m", "addrtype",
                         "--dst-type", "LOCAL", "-j", verdict)
            continue
        for ip, source in external:
            dest = ("-d", _host_cidr(ip))
            nat.rule(PORTALS_CONTAINER, *common, *source, *dest, *redirect_ext)
            if node_ip:
                nat.rule(PORTALS_HOST, *common, *source, *dest, "-j", "DNAT", "--to-destination",
                         _join(node_ip, portal.external_listener))
        if port.node_port:
            node_common = _common(port, port.node_port)
            nat.rule(NODEPORT_CONTAINER, *node_common, *redirect_ext)
            if node_ip:
                nat.rule(NODEPORT_HOST, *node_common, "-j", "DNAT", "--to-destination",
                         _join(node_ip, portal.external_listener))
            flt.rule(NODEPORT_NON_LOCAL, *_common(port, portal.external_listener),
                     "-m", "state", "--state", "NEW", "-j", "ACCEPT")
    return data


def rule_count(data: RestoreData) -> int:
    return sum(len(table.rules) for table in data.tables.values())


# --------------------------------------------------------------------------------------------
# Writer: the core's shared writer when present, else a minimal one with the same methods.
# --------------------------------------------------------------------------------------------


class Writer(Protocol):
    """The part of the core's ``RuleWriter`` this mode uses."""

    family: int

    def restore(self, data: RestoreData, *, noflush: bool = True) -> float: ...

    def ensure_chain(self, table: str, chain: str) -> bool: ...

    def ensure_rule(self, table: str, chain: str, args: Sequence[str], *,
                    prepend: bool = False) -> bool: ...

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> bool: ...

    def delete_chain(self, table: str, chain: str) -> bool: ...


def make_writer(family: int) -> Writer:
    """The core's restore writer for ``family`` (legacy or nft, as the host uses)."""
    from kproxy_core.kernel.iptables_writers import make_writer as core_make_writer

    return cast(Writer, core_make_writer("restore", family))


def ensure_jumps(writer: Writer) -> int:
    """Create our chains and the jumps into them if missing; the number of objects added."""
    added = 0
    for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
        for chain in chains:
            added += bool(writer.ensure_chain(table, chain))
    for jump in JUMPS:
        added += bool(writer.ensure_rule(
            jump.table, jump.chain, list(jump.args), prepend=jump.prepend))
    return added


def remove_all(writer: Writer) -> list[str]:
    """Delete the jumps and our chains (``--cleanup``); one line per thing removed."""
    removed: list[str] = []
    family = writer.family
    for jump in JUMPS:
        while writer.delete_rule(jump.table, jump.chain, list(jump.args)):
            removed.append(
                f"userspace: IPv{family} {jump.table} {jump.chain} jump to {jump.args[-1]}")
    for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
        for chain in chains:
            if writer.delete_chain(table, chain):
                removed.append(f"userspace: IPv{family} {table} chain {chain}")
    return removed
