"""``--cleanup`` and mode switches: remove every chain and jump rule the iptables mode creates,
in both IP families and both iptables backends (legacy and nft), and nothing else.

Like upstream ``CleanupLeftovers``: kubelet's ``KUBE-FIREWALL`` chain (which this mode only
duplicates) is left alone, and so is every chain not named by this mode.
"""

from __future__ import annotations

import logging
from typing import Any

from kproxy_core.kernel.iptables import RestoreData
from kproxy_iptables import rules as R

NAT_OWN = (R.KUBE_SERVICES, R.KUBE_NODEPORTS, R.KUBE_POSTROUTING, R.KUBE_MARK_MASQ,
           R.KUBE_PROXY_CANARY)
FILTER_OWN = (R.KUBE_SERVICES, R.KUBE_EXTERNAL_SERVICES, R.KUBE_FORWARD, R.KUBE_NODEPORTS,
              R.KUBE_PROXY_FIREWALL, R.KUBE_PROXY_CANARY)


def _chains(save_text: str) -> set[str]:
    return {line[1:].split(" ", 1)[0] for line in save_text.splitlines() if line.startswith(":")}


def cleanup_writer(writer: Any, logger: logging.Logger) -> list[str]:
    """Remove this mode's rules through one writer (one family, one backend)."""
    label = f"ipv{writer.family}/{writer.backend}"
    removed: list[str] = []
    for jump in R.JUMP_RULES:
        if writer.delete_rule(jump.table, jump.source, jump.args()):
            removed.append(f"{label}: {jump.table} {jump.source} -> {jump.target} jump")
    data = RestoreData(writer.family)
    for table, own in (("nat", NAT_OWN), ("filter", FILTER_OWN)):
        existing = _chains(writer.save(table))
        doomed = [c for c in own if c in existing]
        if table == "nat":
            doomed += sorted(c for c in existing if R.is_service_chain(c))
        section = data.table(table)
        for chain in doomed:
            section.chain(chain)  # flush, so that -X finds it empty
        for chain in doomed:
            section.delete_chain(chain)
        removed.extend(f"{label}: {table} chain {chain}" for chain in doomed)
    if not data.is_empty():
        writer.restore(data)
    if writer.delete_chain("mangle", R.KUBE_PROXY_CANARY):
        removed.append(f"{label}: mangle chain {R.KUBE_PROXY_CANARY}")
    for line in removed:
        logger.info("removed %s", line)
    return removed


def cleanup(logger: logging.Logger) -> list[str]:
    """Clean every family and backend that exists on this host."""
    from kproxy_core.backend import BackendUnavailable
    from kproxy_core.kernel.iptables_writers import find_binary, make_writer

    removed: list[str] = []
    for family in (4, 6):
        for backend in ("legacy", "nft"):
            if find_binary(family, backend, "restore") is None:
                continue
            try:
                writer = make_writer("restore", family, backend)
            except BackendUnavailable as exc:
                logger.debug("iptables cleanup: skipping ipv%s/%s: %s", family, backend, exc)
                continue
            removed.extend(cleanup_writer(writer, logger))
    return removed
