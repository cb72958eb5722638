"""Linux capability check at start-up: a proxy without CAP_NET_ADMIN fails in its first sync
with an obscure "Permission denied" from iptables or netlink; say it once, clearly, instead."""

from __future__ import annotations

from collections.abc import Iterable

#: Bit numbers from linux/capability.h.
CAPABILITY_BITS = {
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_ADMIN": 21,
}


def effective_capabilities(status_path: str = "/proc/self/status") -> int | None:
    """The effective capability mask of this process, or None if it cannot be read."""
    try:
        with open(status_path) as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def missing_capabilities(required: Iterable[str], mask: int | None) -> list[str]:
    """Names in ``required`` that ``mask`` lacks (none when the mask is unknown: let the
    kernel be the judge rather than refusing on a host without /proc)."""
    if mask is None:
        return []
    return [name for name in required if not mask >> CAPABILITY_BITS[name] & 1]


def check(mode: str, required: Iterable[str], status_path: str = "/proc/self/status") -> str | None:
    """One line explaining what is missing, or None when the process may run ``mode``."""
    missing = missing_capabilities(required, effective_capabilities(status_path))
    if not missing:
        return None
    return (f"proxy mode {mode} needs {', '.join(missing)}: run kproxy as root or in a "
            f"privileged container (securityContext.privileged: true, or capabilities.add: "
            f"[{', '.join(name.removeprefix('CAP_') for name in missing)}])")
