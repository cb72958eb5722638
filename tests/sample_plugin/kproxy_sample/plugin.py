"""Entry-point module: hooks only. It must import nothing native (no python-iptables, no
pyroute2), because ``kproxy --help`` and ``kproxy plugins`` load it on every host."""

from __future__ import annotations

import logging
import os

from kproxy_core import hookimpl
from kproxy_core.backend import Backend, ConfigView, ModeSpec
from kproxy_core.options import STRING, Option, OptionRegistry
from kproxy_core.plugins import Registry

MODE = "memory"


def _load_backend() -> type[Backend]:
    # Imported lazily: a real mode's backend module imports its native libraries.
    from kproxy_sample.backend import MemoryBackend

    return MemoryBackend


@hookimpl
def kproxy_add_options(options: OptionRegistry) -> None:
    options.add(Option(
        path="memory.stateFile",
        flag="--memory-state-file",
        kind=STRING,
        default="",
        help="write the programmed table as JSON to this file after every sync",
        owner=MODE,
    ))


@hookimpl
def kproxy_register_modes(register: Registry[ModeSpec]) -> None:
    register.add(ModeSpec(MODE, _load_backend, help="dry run: keeps the dataplane in memory"))


@hookimpl
def kproxy_cleanup(config: ConfigView, keep_mode: str | None, logger: logging.Logger) -> list[str]:
    if keep_mode == MODE:
        return []
    path = str(config.get("memory.stateFile") or "")
    if path and os.path.exists(path):
        os.unlink(path)
        logger.info("removed %s", path)
        return [f"memory: removed state file {path}"]
    return []
