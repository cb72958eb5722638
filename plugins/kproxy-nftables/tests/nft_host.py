"""An `NftablesProxier` in a long-lived child inside a test's network namespace: the core's
`BackendHost` plus this mode's own operations (last transaction, tables, cleanup)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from nft_helpers import context, read_dataplane

from kproxy_core.backend import Backend
from kproxy_core.testing.backendhost import BackendHost


def _cleanup(_backend: Backend, _args: Any) -> list[str]:
    from kproxy_nftables.cleanup import cleanup

    return cleanup(logging.getLogger("kproxy.test.cleanup"))


def _last_transaction(backend: Backend, _args: Any) -> list[str]:
    return list(backend.last_transaction)  # type: ignore[attr-defined]


def _last_writer(backend: Backend, _args: Any) -> str:
    return str(backend.last_writer)  # type: ignore[attr-defined]


def _table(_backend: Backend, args: Any) -> Any:
    from kproxy_nftables import nft

    return nft.read_table(args)


class ProxierHost(BackendHost):
    def __init__(self, netns: str, config: Mapping[str, Any] | None = None,
                 families: tuple[int, ...] = (4,)) -> None:
        config = dict(config or {})

        def make() -> Backend:
            from kproxy_nftables.proxier import NftablesProxier

            return NftablesProxier(context(config, families))

        super().__init__(netns, make, ops={
            "last_transaction": _last_transaction,
            "last_writer": _last_writer,
            "dataplane": lambda _backend, _: read_dataplane(families),
            "table": _table,
            "cleanup": _cleanup,
        })
