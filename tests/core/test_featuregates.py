"""The gate table against upstream's newer releases: gates v1.36/v1.37 added are accepted and
logged as ignored, gates they locked refuse the other value, gates they dropped or renamed are
unknown (the real command exiting 2 on them: test_cli_errors.py)."""

from __future__ import annotations

import pytest

from kproxy_core import featuregates
from kproxy_core.config import CORE_OPTIONS, ConfigError, build_parser, load_config
from kproxy_core.options import OptionError, OptionRegistry


def _load(argv: list[str]) -> dict[str, bool]:
    options = OptionRegistry()
    for option in CORE_OPTIONS:
        options.add(option)
    args = build_parser(options, ["iptables"]).parse_args(argv)
    return load_config(args, options).feature_gates


# (gate, default, stage, locked) as upstream has it on the newest line read.
NEWER = [
    ("EnvFiles", True, "Beta", False),                       # v1.35 beta
    ("NativeHistograms", False, "Alpha", False),             # component-base metrics, v1.36
    ("TopologyAwareWorkloadScheduling", False, "Alpha", False),  # v1.36
    ("CompositePodGroup", False, "Alpha", False),            # v1.37
    ("DRADerivedAttributes", False, "Alpha", False),         # v1.37
    ("DRAAdminAccess", True, "GA", True),                    # GA + locked in v1.36
    ("NodeDeclaredFeatures", True, "GA", True),              # GA + locked in v1.37
    ("DRADeviceTaints", True, "GA", False),                  # GA, not yet locked, v1.37
    ("ComponentStatusz", True, "Beta", False),               # beta in v1.36
    ("CustomCPUCFSQuotaPeriod", False, "Alpha", False),      # upstream's registered name
    ("AllowOverwriteTerminationGracePeriodSeconds", False, "Deprecated", True),  # v1.35
]


@pytest.mark.parametrize(("name", "default", "stage", "locked"), NEWER,
                         ids=[n for n, *_ in NEWER])
def test_newer_gates_are_known(name: str, default: bool, stage: str, locked: bool) -> None:
    assert featuregates.KNOWN[name] == featuregates.Gate(name, default, stage, locked)
    assert featuregates.parse(f"{name}={str(default).lower()}") == {name: default}


def test_newer_gate_accepted_from_flag_and_logged_as_ignored() -> None:
    gates = _load(["--feature-gates=CompositePodGroup=true,DRAAdminAccess=true"])
    assert gates == {"CompositePodGroup": True, "DRAAdminAccess": True}
    assert featuregates.notes(gates) == [
        "feature gate CompositePodGroup=true is recognised but kproxy does not implement it: "
        "ignored",
        "setting GA feature gate DRAAdminAccess=true: it will be removed in a future release",
        "feature gate DRAAdminAccess=true is recognised but kproxy does not implement it: "
        "ignored",
    ]


@pytest.mark.parametrize(("value", "message"), [
    ("DRAAdminAccess=false", "cannot set feature gate DRAAdminAccess to false, feature is "
                             "locked to true"),
    ("VolumeAttributesClass=false", "cannot set feature gate VolumeAttributesClass to false"),
    ("AllowOverwriteTerminationGracePeriodSeconds=true",
     "cannot set feature gate AllowOverwriteTerminationGracePeriodSeconds to true, feature is "
     "locked to false"),
    # Dropped upstream once their compatibility window ended, or renamed.
    ("LoadBalancerIPMode=true", "unrecognized feature gate: LoadBalancerIPMode"),
    ("ComponentSLIs=true", "unrecognized feature gate: ComponentSLIs"),
    ("CPUCFSQuotaPeriod=true", "unrecognized feature gate: CPUCFSQuotaPeriod"),
])
def test_newer_locks_and_removals_are_rejected(value: str, message: str) -> None:
    with pytest.raises(OptionError) as exc:
        featuregates.parse(value)
    assert message in str(exc.value)
    with pytest.raises(ConfigError, match="--feature-gates"):
        _load([f"--feature-gates={value}"])
