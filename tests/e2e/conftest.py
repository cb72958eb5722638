"""Fixtures of the end-to-end suite: one `Cluster` per proxy mode for the whole session.

A mode that cannot run is never skipped silently: a mode plugin that is not installed fails
the run in CI (``CI=true``) and is skipped with the reason locally; IPVS on a kernel without
ip_vs is skipped with a pointer to the ``ipvs-vm`` env, which runs this suite inside a VM
(``-k ipvs``), where every skip of a mode is a failure.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from e2e_harness import MODES, Cluster, require_mode


@pytest.fixture(scope="session", params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    mode = str(request.param)
    require_mode(mode)
    return mode


@pytest.fixture(scope="session")
def cluster(mode: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running kproxy in ``mode``, shared by every test of the suite that wants one (one
    topology per mode, not per module: in the ipvs VM each setup costs minutes): each test
    uses its own service names and IPs, and leaves kproxy running."""
    c = Cluster(mode, tmp_path_factory.mktemp(f"e2e-{mode}"))
    try:
        c.start_kproxy()
        yield c
    finally:
        c.close()


@pytest.fixture
def own_cluster(mode: str, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster for one test (restarts, cleanup); kproxy not started yet."""
    c = Cluster(mode, tmp_path)
    try:
        yield c
    finally:
        c.close()
