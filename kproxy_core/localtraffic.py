"""``detectLocalMode``: what counts as traffic from this node's pods.

Kernel modes masquerade service traffic that does *not* come from a local pod (and
short-circuit external traffic that does). Which packets are "local" is node semantics, not a
dataplane detail, so it is decided here once; each mode only renders the answer (an iptables
``-s``/``-i`` match, an nftables ``ip saddr``/``iifname`` expression...).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from kproxy_core.backend import ConfigView, as_list, config_value
from kproxy_core.model import of_family
from kproxy_core.options import ModeConfigError

DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")


@attrs.frozen
class LocalTraffic:
    """Local-pod traffic in one IP family: from ``cidr``, or arriving on ``interface``
    (a name prefix when ``prefix``). Neither set: nothing can be told (upstream's no-op
    detector: no locality-based masquerade)."""

    cidr: str = ""
    interface: str = ""
    prefix: bool = False

    @property
    def known(self) -> bool:
        return bool(self.cidr or self.interface)


class LocalTrafficDetector:
    """Reads ``detectLocalMode``, ``clusterCIDR`` and ``detectLocal.*`` once; answers per family
    (NodeCIDR uses this node's pod CIDRs from the Node object, ``NodeView.pod_cidrs``)."""

    def __init__(self, config: ConfigView) -> None:
        self.mode = str(config_value(config, "detectLocalMode", "") or "ClusterCIDR")
        if self.mode not in DETECT_LOCAL_MODES:
            raise ModeConfigError(
                f"detectLocalMode must be one of {', '.join(DETECT_LOCAL_MODES)}, "
                f"not {self.mode!r}")
        self.cluster_cidrs = as_list(config_value(config, "clusterCIDR", ""))
        self.bridge_interface = str(config_value(config, "detectLocal.bridgeInterface", ""))
        self.interface_prefix = str(config_value(config, "detectLocal.interfaceNamePrefix", ""))

    def for_family(self, family: int, pod_cidrs: Sequence[str] = ()) -> LocalTraffic:
        if self.mode in ("ClusterCIDR", "NodeCIDR"):
            source = self.cluster_cidrs if self.mode == "ClusterCIDR" else pod_cidrs
            cidrs = of_family(source, family)
            # Upstream takes one CIDR per family.
            return LocalTraffic(cidr=cidrs[0]) if cidrs else LocalTraffic()
        if self.mode == "BridgeInterface":
            return LocalTraffic(interface=self.bridge_interface)
        return LocalTraffic(interface=self.interface_prefix, prefix=bool(self.interface_prefix))
