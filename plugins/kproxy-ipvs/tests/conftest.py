"""The real-kernel suite (``tests/kernel``) needs IPVS, which most CI kernels lack: it runs
inside a VM (``vm/run-tests.sh``, tox env ``ipvs-vm``), where `kproxy_core.testing.vm` sets
``KPROXY_IN_VM=1``. Elsewhere it is not collected (set ``KPROXY_IPVS_KERNEL_TESTS=1`` to run it
on a host whose kernel has IPVS)."""

from __future__ import annotations

import os

collect_ignore_glob: list[str] = []
if not (os.environ.get("KPROXY_IN_VM") == "1" or os.environ.get("KPROXY_IPVS_KERNEL_TESTS") == "1"):
    collect_ignore_glob.append("kernel/*")
