"""The entry-point module: hooks register the mode and option without importing native code."""

from __future__ import annotations

import subprocess
import sys

import pytest
from iptables_helpers import context
from kproxy_iptables import plugin

from kproxy_core.options import OptionError, OptionRegistry
from kproxy_core.plugins import Registry


def test_plugin_imports_nothing_native() -> None:
    code = ("import sys, kproxy_iptables.plugin as p; "
            "bad = [m for m in ('iptc', 'pyroute2', 'kproxy_iptables.proxier') "
            "if m in sys.modules];"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_registers_mode_and_writer_option() -> None:
    modes: Registry = Registry("proxy mode")  # type: ignore[type-arg]
    plugin.kproxy_register_modes(register=modes)
    spec = modes.get("iptables")
    assert spec is not None and spec.load().name == "iptables"
    options = OptionRegistry()
    plugin.kproxy_add_options(options=options)
    option = options.by_flag("--iptables-writer")
    assert option is not None and option.path == "iptables.writer" and option.owner == "iptables"
    assert option.parse("libiptc") == "libiptc"
    with pytest.raises(OptionError):
        option.parse("ebpf")


def test_cleanup_skipped_for_own_mode() -> None:
    ctx = context()
    assert plugin.kproxy_cleanup(config=ctx.config, keep_mode="iptables", logger=ctx.logger) == []


def test_bad_settings_give_one_clear_error() -> None:
    from kproxy_iptables.proxier import IptablesProxier

    from kproxy_core.backend import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="detectLocalMode must be one of"):
        IptablesProxier(context({"detectLocalMode": "Nope",
                                 "iptables.localhostNodePorts": False}))
    with pytest.raises(BackendUnavailable, match=r"masqueradeBit must be within 0\.\.31"):
        IptablesProxier(context({"iptables.masqueradeBit": 40,
                                 "iptables.localhostNodePorts": False}))
