"""The template mode passes the core's conformance suite, through its installed entry point."""

from __future__ import annotations

from kproxy_core.backend import Backend
from kproxy_core.testing.conformance import BackendConformance, Dataplane, Flow


class TestMemoryConformance(BackendConformance):
    mode = "memory"

    def dataplane(self, backend: Backend) -> Dataplane:
        table = backend.table  # type: ignore[attr-defined]
        return {
            Flow(kind, proto, address, port): frozenset(endpoints)
            for rows in table.values()
            for kind, proto, address, port, endpoints in rows
        }
