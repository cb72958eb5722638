"""Start-up cleanup never removes what the starting mode shares with another mode.

Found by test_faults.py::test_sigkill_mid_sync_then_restart: starting iptables mode ran the
ipvs plugin's cleanup, which deletes the ``nat OUTPUT/PREROUTING -j KUBE-SERVICES`` jumps and
flushes KUBE-SERVICES (the same chain and comment as iptables mode's), so every service was
down from start-up until the first sync.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from kproxy_core import hookimpl
from kproxy_core.backend import Backend, ModeSpec
from kproxy_core.plugins import KproxyPluginManager, Registry


def _never() -> type[Backend]:
    raise AssertionError("not loaded in this test")


class FakeModePlugin:
    def __init__(self, mode: str, calls: list[tuple[str, str | None]]) -> None:
        self.mode = mode
        self.calls = calls

    @hookimpl
    def kproxy_register_modes(self, register: Registry[ModeSpec]) -> None:
        register.add(ModeSpec(self.mode, _never))

    @hookimpl
    def kproxy_cleanup(self, config: Any, keep_mode: str | None,
                       logger: logging.Logger) -> list[str]:
        self.calls.append((self.mode, keep_mode))
        return [] if keep_mode == self.mode else [f"{self.mode}: removed"]


@pytest.fixture
def manager() -> tuple[KproxyPluginManager, list[tuple[str, str | None]]]:
    pm = KproxyPluginManager(load_entrypoints=False)
    calls: list[tuple[str, str | None]] = []
    for mode in ("iptables", "ipvs", "nftables", "userspace"):
        pm.register(FakeModePlugin(mode, calls), name=f"fake-{mode}")
    return pm, calls


@pytest.mark.parametrize(("keep", "skipped"), [
    ("iptables", {"ipvs"}),
    ("ipvs", {"iptables"}),
    ("nftables", set()),
    ("userspace", set()),
    (None, set()),
])
def test_startup_cleanup_skips_modes_sharing_chains(
        manager: tuple[KproxyPluginManager, list[tuple[str, str | None]]], keep: str | None,
        skipped: set[str]) -> None:
    pm, calls = manager
    removed = pm.cleanup({}, keep, logging.getLogger("test"))
    asked = {mode for mode, _ in calls}
    assert asked == {"iptables", "ipvs", "nftables", "userspace"} - skipped
    assert sorted(removed) == sorted(f"{m}: removed" for m in asked if m != keep)
