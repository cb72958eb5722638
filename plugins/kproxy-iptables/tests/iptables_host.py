"""An `IptablesProxier` in a long-lived child inside a test's network namespace: the core's
`BackendHost` plus this mode's own operations (its writer, its cleanup)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from iptables_helpers import context

from kproxy_core.backend import Backend
from kproxy_core.testing.backendhost import BackendHost


def _writer(backend: Backend, args: Any) -> Any:
    """A RuleWriter method on the proxier's IPv4 writer."""
    method, method_args = args
    return getattr(backend.writer(4), method)(*method_args)  # type: ignore[attr-defined]


def _cleanup(_backend: Backend, _args: Any) -> list[str]:
    from kproxy_iptables.cleanup import cleanup

    return cleanup(logging.getLogger("kproxy.test.cleanup"))


def _canary_check(backend: Backend, _args: Any) -> bool:
    """One round of the proxier's canary monitor (its thread waits a whole sync period)."""
    return bool(backend.canary_monitor.check_once())  # type: ignore[attr-defined]


def _missing_in_kernel(backend: Backend, _args: Any) -> list[str]:
    """What the canary monitor's check finds missing (without acting on it)."""
    return list(backend.missing_in_kernel())  # type: ignore[attr-defined]


def _writer_backend(backend: Backend, _args: Any) -> str:
    """"nft" or "legacy": the iptables backend the proxier detected in its namespace."""
    return str(backend.writer(4).backend)  # type: ignore[attr-defined]


class ProxierHost(BackendHost):
    def __init__(self, netns: str, config: Mapping[str, Any] | None = None,
                 families: tuple[int, ...] = (4,)) -> None:
        config = dict(config or {})

        def make() -> Backend:
            from kproxy_iptables.proxier import IptablesProxier

            from kproxy_core.kernel.iptables_writers import detect_backend

            # Detect in this namespace, not from a cache the forking test process filled.
            detect_backend.cache_clear()
            return IptablesProxier(context(config, families))

        super().__init__(netns, make, ops={"writer": _writer, "cleanup": _cleanup,
                                         "canary_check": _canary_check,
                                         "missing_in_kernel": _missing_in_kernel,
                                         "writer_backend": _writer_backend})

    def save(self, table: str) -> str:
        return str(self.call("writer", ("save", (table,))))
