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


class ProxierHost(BackendHost):
    def __init__(self, netns: str, config: Mapping[str, Any] | None = None,
                 families: tuple[int, ...] = (4,)) -> None:
        config = dict(config or {})

        def make() -> Backend:
            from kproxy_iptables.proxier import IptablesProxier

            return IptablesProxier(context(config, families))

        super().__init__(netns, make, ops={"writer": _writer, "cleanup": _cleanup,
                                         "canary_check": _canary_check})

    def save(self, table: str) -> str:
        return str(self.call("writer", ("save", (table,))))
