"""Meta-tests that keep the plugin API honest (the datasette pattern), plus one test per hook."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from kproxy_core import hookimpl, hookspecs
from kproxy_core.backend import (
    AlgorithmSpec,
    Backend,
    ModeSpec,
    SourceSpec,
    SyncRequest,
    SyncResult,
)
from kproxy_core.options import STRING, Option, OptionRegistry
from kproxy_core.plugins import DuplicateRegistration, KproxyPluginManager, Registry
from kproxy_core.sync import SyncReport, Trigger

DOCS = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"


def _hook_names() -> list[str]:
    return sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
                  if name.startswith("kproxy_"))


def _signature(name: str) -> str:
    sig = inspect.signature(getattr(hookspecs, name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({params}) -> {sig.return_annotation}"


@pytest.mark.parametrize("name", _hook_names())
def test_every_hook_is_documented_with_its_signature(name: str) -> None:
    headings = re.findall(r"^### `(.+)`$", DOCS.read_text(), re.MULTILINE)
    assert _signature(name) in headings, f"docs/hooks.md lacks '### `{_signature(name)}`'"


def test_docs_list_no_hook_that_does_not_exist() -> None:
    documented = {h.split("(")[0] for h in re.findall(r"^### `(.+)`$", DOCS.read_text(), re.M)}
    assert documented == set(_hook_names())


@pytest.mark.parametrize("name", _hook_names())
def test_every_hook_has_a_test(name: str) -> None:
    assert f"test_hook_{name}" in globals(), f"add test_hook_{name} to this module"


def test_every_hook_has_a_docstring_with_params() -> None:
    for name in _hook_names():
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        params = inspect.signature(getattr(hookspecs, name)).parameters
        for param in params:
            assert f":param {param}:" in doc, f"{name} docstring does not document {param}"


# -- one test per hook, with a plugin object registered in a fresh manager --------------------


def _manager(*plugins: object) -> KproxyPluginManager:
    pm = KproxyPluginManager(load_entrypoints=False)
    for plugin in plugins:
        pm.register(plugin)
    return pm


class _NullBackend(Backend):
    name = "null"

    def sync(self, request: SyncRequest) -> SyncResult:
        return SyncResult()


def test_hook_kproxy_add_options() -> None:
    class Plugin:
        @hookimpl
        def kproxy_add_options(self, options: OptionRegistry) -> None:
            options.add(Option("null.level", "--null-level", STRING, "low", "help", owner="null"))

    options = _manager(Plugin()).options()
    assert options.by_flag("--null-level") is not None
    assert options.get("null.level") is not None


def test_hook_kproxy_configure() -> None:
    seen: list[Any] = []

    class Plugin:
        @hookimpl
        def kproxy_configure(self, config: Any) -> None:
            seen.append(config)

    sentinel = object()
    _manager(Plugin()).configure(sentinel)  # type: ignore[arg-type]
    assert seen == [sentinel]


def test_hook_kproxy_register_modes() -> None:
    class Plugin:
        @hookimpl
        def kproxy_register_modes(self, register: Registry[ModeSpec]) -> None:
            register.add(ModeSpec("null", lambda: _NullBackend, "does nothing"))

    modes = _manager(Plugin()).modes()
    spec = modes.get("null")
    assert spec is not None and spec.load() is _NullBackend


def test_hook_kproxy_register_modes_rejects_duplicates_naming_both() -> None:
    class One:
        @hookimpl
        def kproxy_register_modes(self, register: Registry[ModeSpec]) -> None:
            register.add(ModeSpec("null", lambda: _NullBackend, distribution="dist-one"))

    class Two:
        @hookimpl
        def kproxy_register_modes(self, register: Registry[ModeSpec]) -> None:
            register.add(ModeSpec("null", lambda: _NullBackend, distribution="dist-two"))

    with pytest.raises(DuplicateRegistration, match=r"dist-one.*dist-two|dist-two.*dist-one"):
        _manager(One(), Two()).modes()


def test_hook_kproxy_register_algorithms() -> None:
    names = _manager().algorithms().names()
    assert {"round-robin", "least-connections", "random"} <= set(names)


def test_hook_kproxy_register_sources() -> None:
    sources = _manager().sources()
    assert sources.names() == ["kube", "manifests"]
    assert all(spec.distribution == "kproxy-core" for spec in sources)
    assert isinstance(sources.get("kube"), SourceSpec)
    assert isinstance(_manager().algorithms().get("random"), AlgorithmSpec)


def test_hook_kproxy_sync_finished() -> None:
    reports: list[SyncReport] = []

    class Plugin:
        @hookimpl
        def kproxy_sync_finished(self, report: SyncReport) -> None:
            reports.append(report)

    class Broken:
        @hookimpl
        def kproxy_sync_finished(self, report: SyncReport) -> None:
            raise RuntimeError("observer bug")

    report = SyncReport(mode="null", trigger=Trigger.CHANGE, full=True, started=0.0,
                        duration=0.1, changed=1, services=1)
    _manager(Plugin(), Broken()).sync_finished(report)  # the broken observer is contained
    assert reports == [report]


def test_hook_kproxy_cleanup() -> None:
    class Good:
        @hookimpl
        def kproxy_cleanup(self, config: Any, keep_mode: str | None,
                           logger: logging.Logger) -> list[str]:
            return [] if keep_mode == "good" else ["good: removed chain X"]

    class Broken:
        @hookimpl
        def kproxy_cleanup(self, config: Any, keep_mode: str | None,
                           logger: logging.Logger) -> list[str]:
            raise OSError("no such table")

    pm = _manager(Good(), Broken())
    lines = pm.cleanup(object(), None, logging.getLogger("test"))  # type: ignore[arg-type]
    assert "good: removed chain X" in lines
    assert any(line.startswith("error:") and "no such table" in line for line in lines)
    assert pm.cleanup(object(), "good", logging.getLogger("test")) == [  # type: ignore[arg-type]
        line for line in lines if line.startswith("error:")
    ]


def test_entry_point_modules_are_not_loaded_when_autoload_is_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KPROXY_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = KproxyPluginManager()
    assert [name for name, _ in pm.list_name_plugin()] == ["kproxy-core"]
