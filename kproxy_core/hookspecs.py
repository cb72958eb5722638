"""Every hook kproxy calls, grouped by lifecycle.

Plugins implement hooks with `kproxy_core.hookimpl` and are found through the entry-point group
``kproxy``. Every hook name starts with ``kproxy_``. The order here is the order of a run:

1. initialisation: options are collected, the configuration is read, plugins see it;
2. registration: modes, load-balancing algorithms and sources are registered into registries;
3. observation: plugins watch syncs (metrics, audit, tracing) without being on the hot path;
4. cleanup: ``--cleanup`` and mode switches reach every installed mode.

The hot path (the chosen mode receiving changes and syncing) is the typed
`kproxy_core.backend.Backend` interface, not a hook. ``docs/hooks.md`` documents each hook;
a test fails when a hook here is missing there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kproxy_core.backend import AlgorithmSpec, ConfigView, ModeSpec, SourceSpec
    from kproxy_core.options import OptionRegistry
    from kproxy_core.plugins import Registry
    from kproxy_core.sync import SyncReport

hookspec = pluggy.HookspecMarker("kproxy")

# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


@hookspec
def kproxy_add_options(options: OptionRegistry) -> None:
    """Declare command-line flags and config-file fields.

    Each `kproxy_core.options.Option` becomes a flag (e.g. ``--ipvs-scheduler``) and a field of
    ``KubeProxyConfiguration`` (e.g. ``ipvs.scheduler``). A mode owns its ``--<mode>-*`` flags
    and its config section, so they exist whenever the mode is installed.

    :param options: the registry to ``add()`` options to; a duplicate path or flag is an error.
    """


@hookspec
def kproxy_configure(config: ConfigView) -> None:
    """Called once the configuration is final (flags merged over the file, validated), before
    any source or backend starts.

    :param config: the effective configuration; read values with ``config.get(path)``.
    """


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


@hookspec
def kproxy_register_modes(register: Registry[ModeSpec]) -> None:
    """Register proxy modes (backends) that ``--proxy-mode`` can select.

    :param register: call ``register.add(ModeSpec(name, load, help))``. ``load`` must import
        the backend class lazily: this hook runs for ``kproxy --help`` and ``kproxy plugins``
        on hosts without the mode's native dependencies.
    """


@hookspec
def kproxy_register_algorithms(register: Registry[AlgorithmSpec]) -> None:
    """Register load-balancing algorithms (userspace uses them; IPVS maps them to schedulers).

    :param register: call ``register.add(AlgorithmSpec(name, create, help, ipvs_scheduler))``.
    """


@hookspec
def kproxy_register_sources(register: Registry[SourceSpec]) -> None:
    """Register sources of API state (the core registers ``kube`` and ``manifests``).

    :param register: call ``register.add(SourceSpec(name, load, help))``.
    """


# --------------------------------------------------------------------------------------------
# Observation
# --------------------------------------------------------------------------------------------


@hookspec
def kproxy_sync_finished(report: SyncReport) -> None:
    """Called after every sync attempt, successful or not, from the sync thread.

    Keep it cheap: it runs on the sync loop. Exceptions are logged and ignored.

    :param report: mode, whether it was full, duration, changed service ports, result or error.
    """


# --------------------------------------------------------------------------------------------
# Cleanup
# --------------------------------------------------------------------------------------------


@hookspec
def kproxy_cleanup(config: ConfigView, keep_mode: str | None, logger: logging.Logger) -> list[str]:
    """Remove everything a mode created in the kernel (rules, chains, virtual servers, ipsets,
    interfaces), and nothing else.

    Broadcast to every installed plugin: by ``kproxy --cleanup`` (``keep_mode`` None) and at
    start-up in some mode (``keep_mode`` is that mode: the other modes clean their leftovers,
    as upstream does). An implementation must import its native libraries inside the function
    and must tolerate a host where its mode never ran or cannot run.

    :param config: the effective configuration.
    :param keep_mode: the mode that is about to run and must not be cleaned, or None.
    :param logger: where to report what was removed.
    :returns: one short line per thing removed (for the ``--cleanup`` summary).
    """
    return []
