"""Fixtures of the reliability suite (the harness is `reliability_harness`, a module name of its
own: ``conftest`` is ambiguous when tests/e2e and tests/reliability run together)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_harness import FAULT_MODES, MEASUREMENTS, FaultCluster, require_fault_mode


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASUREMENTS:
        terminalreporter.section("reliability measurements")
        for line in MEASUREMENTS:
            terminalreporter.write_line(line)


@pytest.fixture(params=FAULT_MODES)
def mode(request: pytest.FixtureRequest) -> str:
    mode = str(request.param)
    require_fault_mode(mode)
    return mode


@pytest.fixture
def fc(mode: str, tmp_path: Path) -> Iterator[FaultCluster]:
    """A fault-injecting cluster for one test; kproxy not started yet."""
    c = FaultCluster(mode, tmp_path)
    try:
        yield c
    finally:
        c.close()
