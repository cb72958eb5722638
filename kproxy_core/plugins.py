"""The plugin manager and its typed facade.

Core code never calls ``pm.hook.*`` directly: it uses the methods of `KproxyPluginManager`,
which know each hook's argument and result types (the tox 4 pattern).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import pluggy

from kproxy_core import hookspecs
from kproxy_core.backend import AlgorithmSpec, ConfigView, ModeSpec, SourceSpec
from kproxy_core.options import OptionRegistry

if TYPE_CHECKING:
    from kproxy_core.sync import SyncReport

ENTRY_POINT_GROUP = "kproxy"
#: Set to 1 to skip installed plugins (the core's own tests do, so they do not depend on what
#: happens to be installed in the environment).
DISABLE_AUTOLOAD_ENV = "KPROXY_DISABLE_PLUGIN_AUTOLOAD"

log = logging.getLogger(__name__)


class _Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def distribution(self) -> str: ...


SpecT = TypeVar("SpecT", bound=_Named)


class DuplicateRegistration(ValueError):
    pass


class Registry(Generic[SpecT]):
    """Registry of named specs (modes, algorithms or sources). A duplicate name is an error
    naming both distributions, so two plugins can never silently shadow each other."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, SpecT] = {}
        self._distribution = ""

    def add(self, spec: SpecT) -> None:
        if not spec.distribution and self._distribution:
            import attrs

            spec = attrs.evolve(spec, distribution=self._distribution)  # type: ignore[misc]
        existing = self._items.get(spec.name)
        if existing is not None:
            raise DuplicateRegistration(
                f"{self.what} {spec.name!r} is registered by both "
                f"{existing.distribution or 'an unnamed plugin'} and "
                f"{spec.distribution or 'an unnamed plugin'}"
            )
        self._items[spec.name] = spec

    def get(self, name: str) -> SpecT | None:
        return self._items.get(name)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[SpecT]:
        return iter(sorted(self._items.values(), key=lambda spec: spec.name))

    def __len__(self) -> int:
        return len(self._items)


class KproxyPluginManager(pluggy.PluginManager):
    """pluggy's manager plus kproxy's built-in plugins and a typed facade."""

    def __init__(self, *, load_entrypoints: bool | None = None) -> None:
        super().__init__("kproxy")
        self.add_hookspecs(hookspecs)
        from kproxy_core import builtin

        self.register(builtin, name="kproxy-core")
        if load_entrypoints is None:
            load_entrypoints = os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("1", "true")
        if load_entrypoints:
            self.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        self._modes: Registry[ModeSpec] | None = None
        self._algorithms: Registry[AlgorithmSpec] | None = None
        self._sources: Registry[SourceSpec] | None = None
        #: id(plugin) -> the proxy modes it registered (filled by `modes`)
        self._modes_by_plugin: dict[int, frozenset[str]] = {}

    # -- discovery ---------------------------------------------------------------------------

    def distribution_of(self, plugin: object) -> str:
        if self.get_name(plugin) == "kproxy-core":
            return "kproxy-core"
        for candidate, dist in self.list_plugin_distinfo():
            if candidate is plugin:
                return f"{dist.project_name}"
        return self.get_name(plugin) or repr(plugin)

    def plugin_summaries(self) -> list[dict[str, Any]]:
        """For ``kproxy plugins``: each plugin with its distribution, version and hooks."""
        versions = {id(p): dist.version for p, dist in self.list_plugin_distinfo()}
        rows = []
        for name, plugin in self.list_name_plugin():
            hooks = sorted(caller.name for caller in (self.get_hookcallers(plugin) or []))
            rows.append(
                {
                    "name": name,
                    "distribution": self.distribution_of(plugin),
                    "version": versions.get(id(plugin), _core_version())
                    if name == "kproxy-core" or id(plugin) in versions
                    else "",
                    "hooks": hooks,
                }
            )
        return sorted(rows, key=lambda row: (row["name"] != "kproxy-core", row["name"]))

    def _collect(self, hook_name: str, registry: Registry[Any]) -> dict[int, frozenset[str]]:
        """Run a registration hook; returns, per plugin (by id), the names it registered."""
        hook = getattr(self.hook, hook_name)
        by_plugin: dict[int, frozenset[str]] = {}
        for impl in hook.get_hookimpls():
            registry._distribution = self.distribution_of(impl.plugin)
            before = set(registry.names())
            try:
                impl.function(register=registry)
            finally:
                registry._distribution = ""
            added = frozenset(registry.names()) - before
            by_plugin[id(impl.plugin)] = by_plugin.get(id(impl.plugin), frozenset()) | added
        return by_plugin

    # -- typed facade --------------------------------------------------------------------------

    def options(self) -> OptionRegistry:
        registry = OptionRegistry()
        self.hook.kproxy_add_options(options=registry)
        return registry

    def configure(self, config: ConfigView) -> None:
        self.hook.kproxy_configure(config=config)

    def modes(self) -> Registry[ModeSpec]:
        if self._modes is None:
            self._modes = Registry("proxy mode")
            self._modes_by_plugin = self._collect("kproxy_register_modes", self._modes)
        return self._modes

    def algorithms(self) -> Registry[AlgorithmSpec]:
        if self._algorithms is None:
            self._algorithms = Registry("load-balancing algorithm")
            self._collect("kproxy_register_algorithms", self._algorithms)
        return self._algorithms

    def sources(self) -> Registry[SourceSpec]:
        if self._sources is None:
            self._sources = Registry("source")
            self._collect("kproxy_register_sources", self._sources)
        return self._sources

    def sync_finished(self, report: SyncReport) -> None:
        # Called one implementation at a time: one broken observer must not silence the others
        # (a plain hook call stops at the first exception).
        for impl in self.hook.kproxy_sync_finished.get_hookimpls():
            try:
                impl.function(report=report)
            except Exception:
                log.exception("kproxy_sync_finished in %s failed; ignored",
                              self.distribution_of(impl.plugin))

    def cleanup(
        self, config: ConfigView, keep_mode: str | None, logger: logging.Logger
    ) -> list[str]:
        """Broadcast cleanup to every plugin. One plugin failing does not stop the others; its
        error is logged and reported as a line starting with ``error:``.

        At start-up (``keep_mode`` set), a plugin registering another of the
        `SHARED_CHAIN_MODES` is not asked: its cleanup would delete the KUBE-SERVICES jumps and
        chains ``keep_mode`` already programmed, and traffic would stop until the first sync
        (upstream's platformCleanup skips it the same way). Enforced here so that no plugin
        has to remember it.
        """
        from kproxy_core.kernel.iptables import SHARED_CHAIN_MODES

        removed: list[str] = []
        sharing = SHARED_CHAIN_MODES - {keep_mode} if keep_mode in SHARED_CHAIN_MODES else set()
        if sharing:
            self.modes()
        for impl in reversed(self.hook.kproxy_cleanup.get_hookimpls()):
            if sharing and self._modes_by_plugin.get(id(impl.plugin), frozenset()) & sharing:
                logger.debug("start-up cleanup: skipping %s (shares iptables chains with %s)",
                             self.distribution_of(impl.plugin), keep_mode)
                continue
            try:
                lines = cast(
                    "list[str] | None",
                    impl.function(config=config, keep_mode=keep_mode, logger=logger),
                )
            except Exception as exc:
                dist = self.distribution_of(impl.plugin)
                logger.error("cleanup by %s failed: %s", dist, exc)
                removed.append(f"error: cleanup by {dist} failed: {exc}")
                continue
            removed.extend(str(line) for line in (lines or ()))
        return removed


def _core_version() -> str:
    from kproxy_core import __version__

    return __version__
