"""Configuration errors through the ``kproxy`` command: one line on stderr, exit 2, nothing
started or applied. Covers a mode's own validation (a backend raising `OptionError`) and
``--feature-gates`` / ``featureGates:`` against the gates upstream recognises.

The in-process tests replace `kproxy_core.agent.Proxy` by a stub that fails the test if the
CLI ever starts it, so a wrongly accepted value can never program this host. The subprocess
tests run the real command inside a network namespace the test creates.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kproxy_core import agent, cli, featuregates, hookimpl
from kproxy_core import logs as kproxy_logs
from kproxy_core.agent import Proxy as RealProxy
from kproxy_core.backend import (
    Backend,
    BackendContext,
    BackendUnavailable,
    ModeSpec,
    SyncRequest,
    SyncResult,
)
from kproxy_core.demo import kproxy_command
from kproxy_core.options import STRING, ModeConfigError, Option, OptionError, OptionRegistry
from kproxy_core.plugins import KproxyPluginManager, Registry
from kproxy_core.testing.netns import NetNS, Sandbox

_CONFIG_HEAD = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


class StrictBackend(Backend):
    """A mode that validates ``strict.level`` itself, as ipvs does ``--ipvs-scheduler``: the
    check needs more than the value, so it can only run when the backend is built."""

    name: ClassVar[str] = "strict"
    required_capabilities: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_supported(cls, context: BackendContext) -> None:
        if context.config.get("strict.level") == "unsupported-here":
            raise BackendUnavailable("strict mode needs the frobnicator kernel module")
        if context.config.get("strict.level") == "early":
            raise OptionError("--strict-level: 'early' is rejected before the backend is built")

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        level = context.config.get("strict.level")
        if level == "plain":
            raise OptionError("--strict-level: 'plain' is not a level")
        if level not in ("ok", ""):
            raise ModeConfigError(f"--strict-level: unknown level {level!r}; choose one of ok")

    def sync(self, request: SyncRequest) -> SyncResult:
        raise AssertionError("a rejected configuration must never sync")


class StrictPlugin:
    @hookimpl
    def kproxy_add_options(self, options: OptionRegistry) -> None:
        options.add(Option("strict.level", "--strict-level", STRING, "", "x", owner="strict"))

    @hookimpl
    def kproxy_register_modes(self, register: Registry[ModeSpec]) -> None:
        register.add(ModeSpec("strict", lambda: StrictBackend))


class NeverStarted(RealProxy):
    """The real `Proxy` (its construction builds the backend, where modes validate) that
    never starts anything unless the test allows it (``--init-only`` runs)."""

    allow_start: ClassVar[bool] = False
    built: ClassVar[list[NeverStarted]] = []

    def __init__(self, config: Any, *, plugins: KproxyPluginManager) -> None:
        super().__init__(config, plugins=plugins)
        NeverStarted.built.append(self)

    def start(self) -> None:
        assert NeverStarted.allow_start, "a rejected configuration reached Proxy.start()"

    def stop(self) -> None:
        pass


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    def plugin_manager() -> KproxyPluginManager:
        pm = KproxyPluginManager(load_entrypoints=False)
        pm.register(StrictPlugin(), name="strict-test")
        return pm

    monkeypatch.setattr(cli, "_plugin_manager", plugin_manager)
    monkeypatch.setattr(agent, "Proxy", NeverStarted)
    # Leave pytest's log capture alone (setup_logging would replace the root handlers).
    monkeypatch.setattr(kproxy_logs, "setup_logging", lambda *_args, **_kw: None)
    NeverStarted.built.clear()
    NeverStarted.allow_start = False

    def invoke(*argv: str) -> tuple[int, list[str], str]:
        try:
            status = cli.main(["--hostname-override=node", "--kubeconfig=/nonexistent", *argv])
        except SystemExit as exc:
            status = int(exc.code or 0)
        out = capsys.readouterr()
        return status, out.err.strip().splitlines(), out.out

    yield invoke


def _one_line(status: int, lines: list[str], needle: str) -> None:
    assert status == 2, (status, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("kproxy: "), lines[0]
    assert needle in lines[0], lines[0]


# -- a mode's own validation --------------------------------------------------------------------


def test_backend_option_error_is_a_config_error(run: Any) -> None:
    status, lines, _ = run("--proxy-mode=strict", "--strict-level=bogus")
    _one_line(status, lines, "invalid configuration for proxy mode strict: --strict-level: "
                             "unknown level 'bogus'")


def test_mode_config_error_is_also_backend_unavailable() -> None:
    # A mode that raised BackendUnavailable for a bad setting switches without breaking
    # callers (or tests) that catch BackendUnavailable.
    assert issubclass(ModeConfigError, BackendUnavailable)
    assert issubclass(ModeConfigError, OptionError)


def test_plain_option_error_from_a_backend_is_a_config_error(run: Any) -> None:
    status, lines, _ = run("--proxy-mode=strict", "--strict-level=plain")
    _one_line(status, lines, "invalid configuration for proxy mode strict: --strict-level: "
                             "'plain' is not a level")


def test_option_error_from_check_supported_is_a_config_error(run: Any) -> None:
    status, lines, _ = run("--proxy-mode=strict", "--strict-level=early")
    _one_line(status, lines, "--strict-level: 'early' is rejected")


def test_backend_unavailable_stays_exit_1(run: Any) -> None:
    status, lines, _ = run("--proxy-mode=strict", "--strict-level=unsupported-here")
    assert status == 1, (status, lines)
    assert lines == ["kproxy: cannot run proxy mode strict: strict mode needs the frobnicator "
                     "kernel module"]


def test_config_warnings_are_not_printed_for_a_rejected_mode(run: Any,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    with caplog.at_level(logging.WARNING, logger="kproxy"):
        status, lines, _ = run("--proxy-mode=strict", "--strict-level=bogus",
                               "--feature-gates=ContextualLogging=true")
    _one_line(status, lines, "unknown level 'bogus'")
    assert not [r for r in caplog.records if "feature gate" in r.getMessage()]


def test_valid_mode_option_starts(run: Any) -> None:
    NeverStarted.allow_start = True
    status, lines, _ = run("--proxy-mode=strict", "--strict-level=ok", "--init-only")
    assert (status, lines) == (0, [])
    assert len(NeverStarted.built) == 1


# -- feature gates -------------------------------------------------------------------------------


BAD_GATE_FLAGS = [
    ("--feature-gates=NoSuchGate=true", "--feature-gates: unrecognized feature gate: NoSuchGate"),
    ("--feature-gates=ContextualLogging=true,nftablesproxymode=true",
     "unrecognized feature gate: nftablesproxymode"),
    ("--feature-gates=ContextualLogging=maybe", "invalid value of ContextualLogging=maybe"),
    ("--feature-gates=ContextualLogging", "expected key=value pairs"),
    ("--feature-gates=NFTablesProxyMode=false",
     "cannot set feature gate NFTablesProxyMode to false, feature is locked to true"),
]


@pytest.mark.parametrize(("flag", "needle"), BAD_GATE_FLAGS, ids=[f for f, _ in BAD_GATE_FLAGS])
def test_bad_feature_gate_flag(run: Any, flag: str, needle: str) -> None:
    status, lines, _ = run("--proxy-mode=strict", flag)
    _one_line(status, lines, needle)
    assert not NeverStarted.built


BAD_GATE_FILES = [
    ("featureGates: {NoSuchGate: true}\n",
     "invalid configuration: featureGates: unrecognized feature gate: NoSuchGate"),
    ("featureGates: {ContextualLogging: 3}\n", "invalid value of ContextualLogging=3"),
    ("featureGates: [ContextualLogging]\n", "featureGates: expected a mapping"),
    ("featureGates: {ServiceTrafficDistribution: false}\n",
     "cannot set feature gate ServiceTrafficDistribution to false"),
]


@pytest.mark.parametrize(("body", "needle"), BAD_GATE_FILES, ids=[b for b, _ in BAD_GATE_FILES])
def test_bad_feature_gate_in_file(run: Any, tmp_path: Path, body: str, needle: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(_CONFIG_HEAD + "mode: strict\n" + body)
    status, lines, _ = run(f"--config={config}")
    _one_line(status, lines, needle)
    assert not NeverStarted.built


def test_known_gates_are_accepted_and_logged_as_ignored(
        run: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    NeverStarted.allow_start = True
    config = tmp_path / "config.yaml"
    config.write_text(_CONFIG_HEAD + "mode: strict\nfeatureGates:\n  ContextualLogging: false\n"
                      "  NFTablesProxyMode: true\n  AllAlpha: false\n")
    with caplog.at_level(logging.WARNING, logger="kproxy"):
        status, lines, _ = run(f"--config={config}", "--init-only")
    assert (status, lines) == (0, [])
    messages = [r.getMessage() for r in caplog.records]
    for gate in ("ContextualLogging=false", "NFTablesProxyMode=true", "AllAlpha=false"):
        assert (f"configuration: feature gate {gate} is recognised but kproxy does not "
                "implement it: ignored") in messages, messages
    assert ("configuration: setting GA feature gate NFTablesProxyMode=true: it will be "
            "removed in a future release") in messages


def test_gate_table_is_well_formed() -> None:
    # Upstream gates kube-proxy users set most, from every registering package: kube,
    # apiserver, client-go, component-base logging.
    for name in ("NFTablesProxyMode", "ServiceTrafficDistribution", "PreferSameTrafficDistribution",
                 "MultiCIDRServiceAllocator", "TopologyAwareHints", "APIServerTracing",
                 "WatchListClient", "ContextualLogging", "LoggingBetaOptions"):
        assert name in featuregates.KNOWN, name
    assert len(featuregates.KNOWN) > 150
    stages = {g.stage for g in featuregates.KNOWN.values()}
    assert stages == {"Alpha", "Beta", "GA", "Deprecated"}
    # A locked gate is always one upstream is about to drop: GA or deprecated.
    assert all(g.stage in ("GA", "Deprecated") for g in featuregates.KNOWN.values() if g.locked)
    assert featuregates.parse({"AllBeta": "true", "WatchList": False}) == {
        "AllBeta": True, "WatchList": False}


# -- the real command, in a namespace ------------------------------------------------------------


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNS]:
    with Sandbox() as sb:
        yield sb.netns("clierr")


def _kproxy(ns: NetNS, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run([*kproxy_command(), "--kubeconfig=/nonexistent/kubeconfig",
                   "--hostname-override=node", *args], check=False)


def _kube_rules(ns: NetNS) -> list[str]:
    text = "\n".join(ns.run([tool], check=False).stdout
                     for tool in ("iptables-legacy-save", "iptables-nft-save"))
    return [line for line in text.splitlines() if "KUBE-" in line]


@pytest.mark.root
@pytest.mark.parametrize(("args", "needle"), [
    (("--feature-gates=NoSuchGate=true",), "NoSuchGate"),
    (("--proxy-mode=nftables", "--feature-gates=NFTablesProxyMode=false"), "NFTablesProxyMode"),
    (("--proxy-mode=userspace", "--feature-gates=ContextualLogging=yes-please"),
     "ContextualLogging"),
    # Gates of the newer upstream lines (featuregates.py's sources): removed, locked since.
    (("--proxy-mode=memory", "--feature-gates=CompositePodGroup=true,LoadBalancerIPMode=true"),
     "unrecognized feature gate: LoadBalancerIPMode"),
    (("--proxy-mode=memory",
      "--feature-gates=NativeHistograms=true,NodeDeclaredFeatures=false"),
     "cannot set feature gate NodeDeclaredFeatures to false"),
], ids=["unknown", "locked", "not-bool", "removed", "locked-in-1.37"])
def test_command_rejects_bad_gates(ns: NetNS, args: tuple[str, ...], needle: str) -> None:
    proc = _kproxy(ns, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("kproxy: invalid configuration: "), lines
    assert needle in lines[0], lines
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _kube_rules(ns) == []


@pytest.mark.root
def test_command_start_failure_is_one_line(ns: NetNS) -> None:
    # Valid configuration, but no API server can be reached or configured: exit 1 with one
    # line, no traceback (the traceback is at --v=4 and up). The sample plugin's mode: the
    # core env has no other.
    proc = _kproxy(ns, "--proxy-mode=memory")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kproxy: ")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert errors and "start-up failed" in errors[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
