"""kproxy-core: the part of kproxy every proxy mode plugs into.

Plugins mark hook implementations with `hookimpl`; see `kproxy_core.hookspecs`.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("kproxy")

__all__ = ["__version__", "hookimpl"]
