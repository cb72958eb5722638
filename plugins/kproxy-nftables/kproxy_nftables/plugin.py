"""Entry point of the ``nftables`` mode: hooks only.

Imported for ``kproxy --help`` and ``kproxy plugins`` on any host: nothing here runs ``nft``
or imports the backend until the mode is chosen or cleanup is asked for.
"""

from __future__ import annotations

import logging

from kproxy_core import hookimpl
from kproxy_core.backend import Backend, ConfigView, ModeSpec
from kproxy_core.options import BOOLEAN, DURATION, INTEGER, Option, OptionError, OptionRegistry
from kproxy_core.plugins import Registry

MODE = "nftables"


def _bit(value: int) -> None:
    if not 0 <= value <= 31:
        raise OptionError(f"must be within the range [0, 31], got {value}")


def _positive(value: float) -> None:
    if value <= 0:
        raise OptionError(f"must be greater than 0, got {value}")


def _non_negative(value: float) -> None:
    if value < 0:
        raise OptionError(f"must not be negative, got {value}")


# Upstream's KubeProxyNFTablesConfiguration. Upstream has no --nftables-* flags: the shared
# flags (--masquerade-all, --iptables-masquerade-bit) apply, so these are file-only.
OPTIONS = (
    Option("nftables.masqueradeBit", None, INTEGER, 14,
           "The bit of the fwmark space to mark packets requiring SNAT with (nftables mode). "
           "Must be within the range [0, 31].", check=_bit, owner=MODE),
    Option("nftables.masqueradeAll", None, BOOLEAN, False,
           "SNAT all traffic sent via Service cluster IPs (nftables mode).", owner=MODE),
    Option("nftables.syncPeriod", None, DURATION, 30.0,
           "How often the nftables mode resyncs everything (e.g. '30s'). Must be greater "
           "than 0.", check=_positive, owner=MODE),
    Option("nftables.minSyncPeriod", None, DURATION, 1.0,
           "The minimum period between nftables syncs (e.g. '1s'); 0 syncs on every change.",
           check=_non_negative, owner=MODE),
)


def _load_backend() -> type[Backend]:
    from kproxy_nftables.proxier import NftablesProxier

    return NftablesProxier


@hookimpl
def kproxy_add_options(options: OptionRegistry) -> None:
    for option in OPTIONS:
        options.add(option)


@hookimpl
def kproxy_register_modes(register: Registry[ModeSpec]) -> None:
    register.add(ModeSpec(
        MODE,
        _load_backend,
        help="nftables table 'kube-proxy' (ip/ip6) with verdict maps, upstream's layout; "
        "syncs send only what changed",
    ))


@hookimpl
def kproxy_cleanup(config: ConfigView, keep_mode: str | None,
                   logger: logging.Logger) -> list[str]:
    if keep_mode == MODE:
        return []
    from kproxy_nftables.cleanup import cleanup

    removed: list[str] = cleanup(logger)
    return removed
