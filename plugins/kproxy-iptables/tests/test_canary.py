"""The canary monitor off the sync path (no kernel: the check is a stand-in, or the proxier's
own check over a fake writer; tests/test_kernel.py and test_periodic_kernel.py run it on a
real kernel)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from iptables_helpers import FakeConfig
from kproxy_iptables import rules as R
from kproxy_iptables.proxier import CanaryMonitor, IptablesProxier

from kproxy_core.backend import BackendContext
from kproxy_core.plugins import KproxyPluginManager

log = logging.getLogger("test.canary")


def test_monitor_reports_a_loss_from_its_thread() -> None:
    present = threading.Event()
    present.set()
    lost = threading.Event()

    def check() -> list[str]:
        return [] if present.is_set() else ["canary chain KUBE-PROXY-CANARY is gone"]

    monitor = CanaryMonitor(check, lambda _missing: lost.set(), 0.01, log)
    monitor.start()
    try:
        deadline = time.monotonic() + 5
        while monitor.checks < 3:
            assert time.monotonic() < deadline, "the monitor does not check"
            time.sleep(0.005)
        assert not lost.is_set()
        present.clear()
        assert lost.wait(5), "a missing canary was not reported"
    finally:
        monitor.stop()
    checks = monitor.checks
    time.sleep(0.05)
    assert monitor.checks == checks, "stop() left the thread running"


def test_a_failing_check_is_not_a_loss(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[str]:
        raise OSError("iptables: resource temporarily unavailable")

    lost: list[bool] = []
    monitor = CanaryMonitor(broken, lambda _missing: lost.append(True), 30.0, log)
    with caplog.at_level(logging.WARNING):
        assert monitor.check_once() is True
    assert lost == []
    assert "cannot check the canary chains" in caplog.text


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        CanaryMonitor(lambda: [], lambda _missing: None, 0, log)


def _proxier(context: BackendContext) -> IptablesProxier:
    proxier = IptablesProxier(context)
    proxier.missing_in_kernel = lambda: ["a canary"]  # type: ignore[method-assign]
    return proxier


def test_loss_sets_the_full_sync_flag_once_and_asks_the_core() -> None:
    requests: list[bool] = []
    config = FakeConfig({"iptables.localhostNodePorts": False, "iptables.syncPeriod": 7.0})
    proxier = _proxier(BackendContext(
        config, "node", log, KproxyPluginManager(load_entrypoints=False), families=(4,),
        request_sync=lambda: requests.append(True)))
    assert proxier.canary_monitor.interval == 7.0, "upstream: the sync period"
    assert proxier.needs_full_sync() is False
    assert proxier.canary_monitor.check_once() is False
    assert proxier.canary_monitor.check_once() is False
    assert proxier.needs_full_sync() is True
    assert requests == [True], "one request per loss, not one per check"


def test_without_a_request_hook_the_next_sync_is_full() -> None:
    config = FakeConfig({"iptables.localhostNodePorts": False})
    proxier = _proxier(BackendContext(
        config, "node", log, KproxyPluginManager(load_entrypoints=False), families=(4,)))
    assert proxier.canary_monitor.interval == 30.0
    proxier.canary_monitor.check_once()
    assert proxier.needs_full_sync() is True


# -- the proxier's own check, over a fake writer ---------------------------------------------


def _listed(jump: R.JumpRule) -> str:
    """``jump`` as ``iptables -S`` prints it (arguments with spaces in double quotes)."""
    args = [f'"{a}"' if " " in a else a for a in jump.args()]
    return " ".join(["-A", jump.source, *args])


class FakeWriter:
    """What the monitor reads of an nf_tables writer: the canaries, and ``-S CHAIN`` of the
    built-in chains (the method the core's RuleWriter would offer)."""

    backend = "nft"

    def __init__(self, family: int, jumps: list[R.JumpRule]) -> None:
        self.family = family
        self.canaries = {"mangle", "nat", "filter"}
        self.rules: dict[tuple[str, str], list[str]] = {}
        for jump in jumps:
            self.rules.setdefault((jump.table, jump.source), []).append(_listed(jump))
        self.listed: list[tuple[str, str]] = []

    def chain_exists(self, table: str, chain: str) -> bool:
        assert chain == R.KUBE_PROXY_CANARY, f"the monitor looked for {chain}"
        return table in self.canaries

    def list_rules(self, table: str, chain: str) -> list[str]:
        self.listed.append((table, chain))
        return [f"-P {chain} ACCEPT", *self.rules.get((table, chain), [])]

    def delete(self, table: str, chain: str, target: str) -> None:
        before = self.rules[(table, chain)]
        self.rules[(table, chain)] = [r for r in before if not r.endswith(f"-j {target}")]
        assert self.rules[(table, chain)] != before, "nothing deleted"


def _with_fakes(families: tuple[int, ...] = (4,), localhost_nodeports: bool = False
                ) -> tuple[IptablesProxier, dict[int, FakeWriter], list[bool]]:
    requests: list[bool] = []
    config = FakeConfig({"iptables.localhostNodePorts": localhost_nodeports})
    proxier = IptablesProxier(BackendContext(
        config, "node", log, KproxyPluginManager(load_entrypoints=False), families=families,
        request_sync=lambda: requests.append(True)))
    writers = {}
    for family in families:
        jumps = list(R.JUMP_RULES)
        if localhost_nodeports and family == 4:
            jumps += R.KUBELET_JUMP_RULES
        writers[family] = FakeWriter(family, jumps)
        proxier._writers[family] = writers[family]
    return proxier, writers, requests


def test_everything_in_place_is_no_loss() -> None:
    proxier, writers, requests = _with_fakes(families=(4, 6))
    assert proxier.canary_monitor.check_once() is True
    assert proxier.needs_full_sync() is False
    assert requests == []
    # One -S per built-in chain that holds a jump of ours, never one per jump.
    chains = {(j.table, j.source) for j in R.JUMP_RULES}
    for writer in writers.values():
        assert sorted(writer.listed) == sorted(chains)
        assert len(writer.listed) < len(R.JUMP_RULES)


def test_a_deleted_jump_asks_for_a_full_sync_at_once_and_says_which(
        caplog: pytest.LogCaptureFixture) -> None:
    proxier, writers, requests = _with_fakes()
    writers[4].delete("nat", "PREROUTING", R.KUBE_SERVICES)
    missing = proxier.missing_in_kernel()
    assert missing == ["jump rule is gone: IPv4 nat PREROUTING -m comment --comment "
                       "'kubernetes service portals' -j KUBE-SERVICES"]
    with caplog.at_level(logging.INFO):
        assert proxier.canary_monitor.check_once() is False
        assert proxier.canary_monitor.check_once() is False
    assert proxier.needs_full_sync() is True
    assert requests == [True], "one request per loss, not one per check"
    assert "nat PREROUTING" in caplog.text and "-j KUBE-SERVICES" in caplog.text
    assert "the next sync is a full one" in caplog.text


def test_every_family_and_table_is_checked() -> None:
    proxier, writers, _ = _with_fakes(families=(4, 6))
    writers[6].delete("filter", "FORWARD", R.KUBE_FORWARD)
    writers[6].canaries.discard("mangle")
    missing = proxier.missing_in_kernel()
    assert len(missing) == 2, missing
    assert "KUBE-PROXY-CANARY is gone from the IPv6 mangle table" in missing[0]
    assert missing[1].startswith("jump rule is gone: IPv6 filter FORWARD")
    assert missing[1].endswith("-j KUBE-FORWARD")


def test_kubelet_jumps_are_checked_when_localhost_nodeports_render_them() -> None:
    proxier, writers, _ = _with_fakes(localhost_nodeports=True)
    assert proxier.missing_in_kernel() == []
    writers[4].delete("filter", "OUTPUT", R.KUBE_FIREWALL)
    assert proxier.missing_in_kernel() == ["jump rule is gone: IPv4 filter OUTPUT -j "
                                           "KUBE-FIREWALL"]


def test_other_rules_around_a_jump_do_not_hide_or_fake_it() -> None:
    proxier, writers, _ = _with_fakes()
    rules = writers[4].rules[("nat", "OUTPUT")]
    rules.insert(0, "-A OUTPUT -j OTHER-AGENT")
    assert proxier.missing_in_kernel() == []
    # A jump to our chain without our comment is someone else's rule, not ours.
    rules[:] = ["-A OUTPUT -j OTHER-AGENT", "-A OUTPUT -j KUBE-SERVICES"]
    assert len(proxier.missing_in_kernel()) == 1
