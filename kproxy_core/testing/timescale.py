"""One factor for the waits of everything that runs kproxy in a sandbox: the e2e and
reliability suites, and the demo (which those suites also run).

In the virtme-ng VM (``KPROXY_IN_VM=1``, set by `kproxy_core.testing.vm`) the guest CPU is
emulated by QEMU TCG: Python starts and runs several times slower there than on the host (see
docs/modes/ipvs.md, "Tests"), so kproxy's start, a sync and even an echo round trip take that
much longer. ``KPROXY_E2E_TIME_SCALE`` overrides the factor (a slow host). On the host it is 1,
so a real slowdown still fails there.
"""

from __future__ import annotations

import os

#: The factor in the VM: QEMU TCG runs this suite's Python about this many times slower.
VM_TIME_SCALE = 6.0


def in_vm() -> bool:
    """Whether this runs in the VM of `kproxy_core.testing.vm` (the ipvs-vm env)."""
    return os.environ.get("KPROXY_IN_VM") == "1"


def time_scale() -> float:
    """The factor, read from the environment now (one clear error for a bad override)."""
    raw = os.environ.get("KPROXY_E2E_TIME_SCALE")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"KPROXY_E2E_TIME_SCALE must be a number, got {raw!r}") from None
        if value < 1:
            raise ValueError(f"KPROXY_E2E_TIME_SCALE must be >= 1, got {raw!r}")
        return value
    return VM_TIME_SCALE if in_vm() else 1.0


def scaled(seconds: float) -> float:
    """``seconds`` on the host; longer by `time_scale` where everything runs slower."""
    return seconds * time_scale()
