"""Hook implementations of kproxy-userspace. Imports nothing native: the backend class and the
iptables helpers load only when the mode runs or cleans up."""

from __future__ import annotations

import logging

from kproxy_core import hookimpl
from kproxy_core.backend import Backend, ConfigView, ModeSpec
from kproxy_core.options import DURATION, INTEGER, STRING, Option, OptionError, OptionRegistry
from kproxy_core.plugins import Registry

MODE = "userspace"


def _non_negative(value: int) -> None:
    if value < 0:
        raise OptionError(f"must be 0 or more, got {value}")


def _positive(value: int) -> None:
    if value < 1:
        raise OptionError(f"must be 1 or more, got {value}")


def _positive_duration(value: float) -> None:
    if value <= 0:
        raise OptionError("must be more than 0s")


OPTIONS = [
    Option("userspace.algorithm", "--userspace-algorithm", STRING, "round-robin",
           "Load-balancing algorithm for new connections: any registered algorithm "
           "(built in: round-robin, least-connections, random).", owner=MODE),
    # Upstream's userspace mode called this --udp-timeout (config field udpIdleTimeout, 250ms).
    Option("userspace.udpIdleTimeout", "--userspace-udp-idle-timeout", DURATION, 0.25,
           "How long an idle UDP session (one client to one endpoint) stays open. "
           "Upstream's --udp-timeout.", check=_positive_duration, owner=MODE),
    Option("userspace.maxConnections", "--userspace-max-connections", INTEGER, 0,
           "Most TCP connections plus UDP sessions open at once (0: no limit beyond the "
           "open-files limit). Clients over the limit are reset.",
           check=_non_negative, owner=MODE),
    Option("userspace.connectRetries", "--userspace-connect-retries", INTEGER, 4,
           "Endpoints tried for one connection before the client is reset.",
           check=_positive, owner=MODE),
    Option("userspace.relay", "--userspace-relay", STRING, "auto",
           "How TCP bytes are moved: splice (zero-copy through a pipe), copy (recv/send), or "
           "auto (splice, copy where the kernel refuses it).",
           choices=("auto", "splice", "copy"), owner=MODE),
    Option("userspace.eventLoop", "--userspace-event-loop", STRING, "auto",
           "Event loop of the relay: uvloop (pip install 'kproxy-userspace[uvloop]'), asyncio, "
           "or auto (uvloop when installed, else asyncio).",
           choices=("auto", "asyncio", "uvloop"), owner=MODE),
]


@hookimpl
def kproxy_add_options(options: OptionRegistry) -> None:
    for option in OPTIONS:
        options.add(option)


def _load() -> type[Backend]:
    from kproxy_userspace.proxier import UserspaceProxier

    return UserspaceProxier


@hookimpl
def kproxy_register_modes(register: Registry[ModeSpec]) -> None:
    register.add(ModeSpec(MODE, _load, help="proxy in user space: one listener per service "
                                            "port, iptables portals, pluggable algorithms"))


@hookimpl
def kproxy_cleanup(config: ConfigView, keep_mode: str | None,
                   logger: logging.Logger) -> list[str]:
    if keep_mode == MODE:
        return []
    from kproxy_core.backend import BackendUnavailable
    from kproxy_userspace import rules

    removed: list[str] = []
    for family in (4, 6):
        try:
            writer = rules.make_writer(family)
        except BackendUnavailable:
            continue  # no iptables for this family: this mode never ran here
        lines = rules.remove_all(writer)
        for line in lines:
            logger.info("removed %s", line)
        removed.extend(lines)
    return removed
