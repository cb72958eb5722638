"""``--cleanup`` (and start-up in another mode): remove what IPVS mode created, nothing else.

Tolerates hosts where the mode never ran or cannot run: a missing IPVS module, ipset
module or iptables binary just means there is nothing of that kind to remove.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from kproxy_ipvs import rules
from kproxy_ipvs.netlink import Kernel


def _excluded(config: Any) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    from kproxy_core.backend import config_value

    return [ipaddress.ip_network(c, strict=False)
            for c in config_value(config, "ipvs.excludeCIDRs", ())]


def cleanup(config: Any, logger: logging.Logger, kernel: Kernel | None = None) -> list[str]:
    removed: list[str] = []
    if kernel is None:
        from kproxy_core.backend import BackendUnavailable
        from kproxy_ipvs.netlink import NetlinkKernel

        try:
            kernel = NetlinkKernel()
        except BackendUnavailable as exc:
            logger.debug("ipvs cleanup: IPVS unavailable (%s); nothing to remove there", exc)
            kernel = None
        if kernel is None:
            return _cleanup_without_ipvs(logger)
    excluded = _excluded(config)
    services = kernel.list_services()
    count = 0
    for key in services:
        ip = ipaddress.ip_address(key.address)
        if any(ip in net for net in excluded if net.version == ip.version):
            continue
        kernel.del_service(key)
        count += 1
    if count:
        removed.append(f"ipvs: {count} virtual servers")
    if kernel.delete_link(rules.DUMMY_DEVICE):
        removed.append(f"ipvs: interface {rules.DUMMY_DEVICE}")
    removed += _iptables_and_sets(kernel, logger)
    for line in removed:
        logger.info("removed %s", line)
    return removed


def _iptables_and_sets(kernel: Kernel, logger: logging.Logger) -> list[str]:
    removed: list[str] = []
    for family in (4, 6):
        try:
            for table, chain, target, comment in rules.JUMPS:
                kernel.delete_jump(family, table, chain, rules.jump_args(target, comment))
            chains = 0
            # Flush all first: our chains jump to each other.
            for table, chain in rules.CHAINS:
                if kernel.delete_chain(family, table, chain):
                    chains += 1
            if chains:
                removed.append(f"ipvs: {chains} IPv{family} iptables chains")
        except Exception as exc:  # no ip6tables, no iptables at all...
            logger.debug("ipvs cleanup: IPv%d iptables skipped: %s", family, exc)
    # Sets last: the kernel refuses to destroy a set an iptables rule still references.
    try:
        existing = set(kernel.list_set_names())
    except Exception as exc:
        logger.debug("ipvs cleanup: ipset unavailable: %s", exc)
        return removed
    sets = 0
    for family in (4, 6):
        for spec in rules.SETS:
            name = rules.set_name(spec.name, family)
            if name in existing and kernel.destroy_set(name):
                sets += 1
    if sets:
        removed.append(f"ipvs: {sets} ipsets")
    return removed


def _cleanup_without_ipvs(logger: logging.Logger) -> list[str]:
    """No IPVS here, but iptables rules and sets from an earlier run may still exist."""

    class _NoIpvs:
        def __getattr__(self, name: str) -> Any:
            from kproxy_ipvs.netlink import NetlinkKernel

            return getattr(NetlinkKernel, name).__get__(self)

    shim: Any = _NoIpvs.__new__(_NoIpvs)
    shim.__dict__.update({"_writer_kind": "restore", "_writers": {}, "_ipset": None,
                          "_prepare": None})
    return _iptables_and_sets(shim, logger)
