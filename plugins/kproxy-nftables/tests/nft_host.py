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


#: Commands the backend ran since the last `_commands` call (recorded in the child).
_RUN: list[list[str]] = []


def _commands(_backend: Backend, _args: Any) -> list[list[str]]:
    """The commands run through ``subprocess.run`` since the last call (the first call starts
    recording): ``nft`` and the reader's ``nft list`` go through it, so a sync that starts
    no process records nothing."""
    import subprocess

    real = subprocess.run
    if not getattr(real, "kproxy_recording", False):
        def recording(argv: Any, *args: Any, **kwargs: Any) -> Any:
            _RUN.append([str(a) for a in argv] if not isinstance(argv, str) else [argv])
            return real(argv, *args, **kwargs)

        recording.kproxy_recording = True  # type: ignore[attr-defined]
        subprocess.run = recording  # type: ignore[assignment]
    seen = list(_RUN)
    _RUN.clear()
    return seen


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
            "commands": _commands,
            "table_handles": lambda backend, _: dict(backend.table_handles),  # type: ignore
        })
