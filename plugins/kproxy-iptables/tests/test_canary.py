"""The canary monitor off the sync path (no kernel: the check is a stand-in)."""

from __future__ import annotations

import logging
import threading
import time

import attrs
import pytest
from iptables_helpers import FakeConfig
from kproxy_iptables.proxier import CanaryMonitor, IptablesProxier

from kproxy_core.backend import BackendContext
from kproxy_core.plugins import KproxyPluginManager

log = logging.getLogger("test.canary")


def test_monitor_reports_a_loss_from_its_thread() -> None:
    present = threading.Event()
    present.set()
    lost = threading.Event()
    monitor = CanaryMonitor(present.is_set, lost.set, 0.01, log)
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
    def broken() -> bool:
        raise OSError("iptables: resource temporarily unavailable")

    lost: list[bool] = []
    monitor = CanaryMonitor(broken, lambda: lost.append(True), 30.0, log)
    with caplog.at_level(logging.WARNING):
        assert monitor.check_once() is True
    assert lost == []
    assert "cannot check the canary chains" in caplog.text


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        CanaryMonitor(lambda: True, lambda: None, 0, log)


@attrs.frozen
class _ContextWithRequest(BackendContext):
    """What the core would hand over once BackendContext offers ``request_sync``."""

    request_sync: object = None


def _proxier(context: BackendContext) -> IptablesProxier:
    proxier = IptablesProxier(context)
    proxier.canaries_present = lambda: False  # type: ignore[method-assign]
    return proxier


def test_loss_sets_the_full_sync_flag_once_and_asks_the_core() -> None:
    requests: list[bool] = []
    config = FakeConfig({"iptables.localhostNodePorts": False, "iptables.syncPeriod": 7.0})
    proxier = _proxier(_ContextWithRequest(
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
