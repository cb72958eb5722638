"""The harness's behaviour in the ipvs VM: one timeout factor, and no silent skip of a mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_harness import mode_problem, must_not_skip

from kproxy_core.testing.timescale import VM_TIME_SCALE
from kproxy_core.testing.timescale import time_scale as _time_scale


def test_time_scale_is_one_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KPROXY_IN_VM", raising=False)
    monkeypatch.delenv("KPROXY_E2E_TIME_SCALE", raising=False)
    assert _time_scale() == 1.0


def test_time_scale_in_the_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPROXY_IN_VM", "1")
    monkeypatch.delenv("KPROXY_E2E_TIME_SCALE", raising=False)
    assert _time_scale() == VM_TIME_SCALE > 1


def test_time_scale_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPROXY_IN_VM", "1")
    monkeypatch.setenv("KPROXY_E2E_TIME_SCALE", "2.5")
    assert _time_scale() == 2.5


@pytest.mark.parametrize("raw", ["fast", "0.5"])
def test_time_scale_rejects_bad_values(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("KPROXY_E2E_TIME_SCALE", raw)
    with pytest.raises(ValueError, match="KPROXY_E2E_TIME_SCALE"):
        _time_scale()


def test_missing_ipvs_fails_in_the_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    import e2e_harness

    monkeypatch.setattr(e2e_harness, "_module_available", lambda name: False)
    monkeypatch.setattr(Path, "exists", lambda self: False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("KPROXY_IN_VM", "1")
    problem = mode_problem("ipvs")
    assert problem is not None and problem[1] is True and must_not_skip()
    monkeypatch.delenv("KPROXY_IN_VM")
    problem = mode_problem("ipvs")
    assert problem is not None and problem[1] is False and not must_not_skip()
