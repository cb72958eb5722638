"""Entry point of the ``ipvs`` mode: hooks only.

Imported for ``kproxy --help`` and ``kproxy plugins`` on any host, so nothing native here:
pyroute2 is imported by the backend and the cleanup code, inside the functions that need them.
"""

from __future__ import annotations

import logging

from kproxy_core import hookimpl
from kproxy_core.backend import Backend, ConfigView, ModeSpec
from kproxy_core.kernel.iptables import SHARED_CHAIN_MODES
from kproxy_core.options import BOOLEAN, CIDR_LIST, DURATION, STRING, Option, OptionRegistry
from kproxy_core.plugins import Registry

MODE = "ipvs"

OPTIONS = (
    Option("ipvs.scheduler", "--ipvs-scheduler", STRING, "",
           "The IPVS scheduler (rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh) or a "
           "registered load-balancing algorithm that maps to one; empty means rr.", owner=MODE),
    Option("ipvs.syncPeriod", "--ipvs-sync-period", DURATION, 30.0,
           "The maximum interval of how often IPVS rules are refreshed (e.g. '5s', '1m').",
           owner=MODE),
    Option("ipvs.minSyncPeriod", "--ipvs-min-sync-period", DURATION, 0.0,
           "The minimum period between IPVS rule resyncs; 0 resyncs at every change.",
           owner=MODE),
    Option("ipvs.strictARP", "--ipvs-strict-arp", BOOLEAN, False,
           "Enable strict ARP by setting arp_ignore to 1 and arp_announce to 2.", owner=MODE),
    Option("ipvs.excludeCIDRs", "--ipvs-exclude-cidrs", CIDR_LIST, (),
           "Comma-separated CIDRs the IPVS proxier must not touch when cleaning up virtual "
           "servers.", owner=MODE),
    Option("ipvs.tcpTimeout", "--ipvs-tcp-timeout", DURATION, 0.0,
           "Timeout for idle IPVS TCP connections; 0 leaves the kernel's value.", owner=MODE),
    Option("ipvs.tcpFinTimeout", "--ipvs-tcpfin-timeout", DURATION, 0.0,
           "Timeout for IPVS TCP connections after a FIN; 0 leaves the kernel's value.",
           owner=MODE),
    Option("ipvs.udpTimeout", "--ipvs-udp-timeout", DURATION, 0.0,
           "Timeout for IPVS UDP packets; 0 leaves the kernel's value.", owner=MODE),
)


def _load_backend() -> type[Backend]:
    from kproxy_ipvs.proxier import IpvsProxier

    return IpvsProxier


@hookimpl
def kproxy_add_options(options: OptionRegistry) -> None:
    for option in OPTIONS:
        options.add(option)


@hookimpl
def kproxy_register_modes(register: Registry[ModeSpec]) -> None:
    register.add(ModeSpec(
        MODE,
        _load_backend,
        help="IPVS virtual servers, kube-ipvs0 and ipsets (needs the ip_vs kernel modules)",
    ))


@hookimpl
def kproxy_cleanup(config: ConfigView, keep_mode: str | None,
                   logger: logging.Logger) -> list[str]:
    # Starting the iptables mode must not delete the KUBE-* chains both modes use (as
    # upstream, which only cleans IPVS leftovers on --cleanup or a switch to nftables).
    if keep_mode == MODE or keep_mode in SHARED_CHAIN_MODES:
        return []
    from kproxy_ipvs.cleanup import cleanup

    return cleanup(config, logger)
