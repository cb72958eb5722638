"""``--cleanup`` and mode switches: delete the ``kube-proxy`` tables, nothing else."""

from __future__ import annotations

import logging

from kproxy_nftables import nft
from kproxy_nftables.rules import TABLE, nft_family


def cleanup(logger: logging.Logger) -> list[str]:
    if nft.nft_binary() is None:
        return []  # nftables never ran here
    removed = []
    for family in (4, 6):
        if nft.table_exists(family) and nft.delete_table(family):
            line = f"nftables: deleted table {nft_family(family)} {TABLE}"
            logger.info(line)
            removed.append(line)
    return removed
