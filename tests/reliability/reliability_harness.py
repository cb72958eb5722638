"""The reliability suite's harness: the e2e harness (tests/e2e, used read-only) plus faults.

`FaultCluster` is the e2e `Cluster` whose kproxy runs with a directory of wrapper binaries
first in PATH: ``iptables[-legacy|-nft]-restore`` wrappers that pass through to the real
binary unless the test drops a control file beside them:

* ``fail``: exit 1 with an iptables-restore-like error (the restore never runs);
* ``slow``: touch ``entered`` then sleep as many seconds as the file says, before restoring
  (so a test can kill kproxy while a sync is provably in flight).

Measurements (gaps seen by clients...) are printed in the terminal summary: a gap is a
number to report, only a failed request is a bug.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from e2e_harness import Cluster, eventually, require_mode

MEASUREMENTS: list[str] = []

#: Every mode under test runs one of these in its syncs: iptables and userspace in every sync
#: that changes rules, ipvs (which writes IPVS, addresses and sets over netlink, in-process)
#: in its full syncs and when the set of non-empty ipsets its rules match changes.
RESTORE_TOOLS = tuple(f"{prefix}{variant}-restore" for prefix in ("iptables", "ip6tables")
                      for variant in ("", "-legacy", "-nft"))

_WRAPPER = """#!/bin/sh
# kproxy reliability test wrapper around {real}
dir={dir}
case "$1" in --version|-V|--help|-h) exec {real} "$@" ;; esac
if [ -e "$dir/fail" ]; then
    echo "{name}: line 2 failed (injected by the test)" >&2
    exit 1
fi
if [ -e "$dir/slow" ]; then
    touch "$dir/entered"
    sleep "$(cat "$dir/slow")"
fi
exec {real} "$@"
"""


def record(line: str) -> None:
    """Add a measurement to the terminal summary (and print it for ``-s`` runs)."""
    MEASUREMENTS.append(line)
    print(line)


class FaultCluster(Cluster):  # type: ignore[misc,unused-ignore]
    """A `Cluster` whose kproxy finds the restore wrappers first in PATH; ``env`` adds
    variables to kproxy's environment."""

    def __init__(self, mode: str, workdir: Path) -> None:
        self.wrapdir = workdir / "bin"
        self.wrapdir.mkdir()
        for tool in RESTORE_TOOLS:
            real = shutil.which(tool)
            if real is None:
                continue
            path = self.wrapdir / tool
            path.write_text(_WRAPPER.format(real=real, dir=self.wrapdir, name=tool))
            path.chmod(0o755)
        self.env: dict[str, str] = {}
        super().__init__(mode, workdir)

    def kproxy_argv(self, *extra: str) -> list[str]:
        path = f"{self.wrapdir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        env = [f"{k}={v}" for k, v in sorted(self.env.items())]
        if self.mode == "ipvs":
            # The tests set the sync period with iptables mode's flag; ipvs has its own.
            extra = tuple(arg.replace("--iptables-sync-period=", "--ipvs-sync-period=", 1)
                          for arg in extra)
        return ["env", f"PATH={path}", *env, *super().kproxy_argv(*extra)]

    def wait_synced(self) -> None:
        """Until a sync has succeeded. Traffic alone does not say so: the ipvs mode's first
        sync carries a ClusterIP service before its iptables restore ends (seconds in the
        VM), and a fault injected meanwhile would hit that first sync instead."""
        eventually("a successful sync", lambda: self.metric(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0)

    def inject(self, fault: str, value: str = "") -> None:
        (self.wrapdir / fault).write_text(value)

    def clear(self, fault: str) -> None:
        (self.wrapdir / fault).unlink(missing_ok=True)

    def log(self) -> str:
        """Every kproxy log of this cluster so far, oldest first."""
        logs = sorted(self.workdir.glob("kproxy-*.log"),
                      key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            series, _, label_text = head.partition("{")
            if series != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def saved(self) -> str:
        """iptables-save of both backends in the node namespace (IPv4)."""
        return "\n".join(
            self.sb.node.run([tool], check=False).stdout
            for tool in ("iptables-legacy-save", "iptables-nft-save"))


FAULT_MODES = ("iptables", "userspace", "ipvs")


def require_fault_mode(mode: str) -> None:
    """As the e2e suite's: ipvs runs where the kernel has IPVS (the ipvs-vm env's VM) and is
    skipped with the reason on a host without it."""
    require_mode(mode)
