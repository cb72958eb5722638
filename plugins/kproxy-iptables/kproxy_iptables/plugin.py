"""Entry point of the ``iptables`` mode: hooks only.

This module is imported for ``kproxy --help`` and ``kproxy plugins`` on any host, so it must
not import python-iptables or anything else native, not even indirectly: the backend and the
cleanup code are imported inside the functions that need them.
"""

from __future__ import annotations

import logging

from kproxy_core import hookimpl
from kproxy_core.backend import Backend, ConfigView, ModeSpec
from kproxy_core.kernel.iptables import SHARED_CHAIN_MODES
from kproxy_core.options import STRING, Option, OptionRegistry
from kproxy_core.plugins import Registry

MODE = "iptables"

WRITER_OPTION = Option(
    path="iptables.writer",
    flag="--iptables-writer",
    kind=STRING,
    default="restore",
    help="How rules reach the kernel: 'restore' (one iptables-restore transaction per family, "
    "as upstream) or 'libiptc' (python-iptables, no external process).",
    choices=("restore", "libiptc"),
    owner=MODE,
)


def _load_backend() -> type[Backend]:
    from kproxy_iptables.proxier import IptablesProxier

    return IptablesProxier


@hookimpl
def kproxy_add_options(options: OptionRegistry) -> None:
    options.add(WRITER_OPTION)


@hookimpl
def kproxy_register_modes(register: Registry[ModeSpec]) -> None:
    register.add(ModeSpec(
        MODE,
        _load_backend,
        help="iptables NAT rules, upstream kube-proxy's default mode and chain layout "
        "(KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*...)",
    ))


@hookimpl
def kproxy_cleanup(config: ConfigView, keep_mode: str | None,
                   logger: logging.Logger) -> list[str]:
    if keep_mode == MODE or keep_mode in SHARED_CHAIN_MODES:
        return []
    from kproxy_iptables.cleanup import cleanup

    removed: list[str] = cleanup(logger)
    return removed
