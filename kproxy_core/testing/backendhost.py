"""Run one backend in a long-lived child process inside a test's network namespace.

The test process stays in the host namespace; every call (sync, describe, trace, audit, a
command in the namespace, or a mode-specific operation) goes to the child over a pipe and
comes back pickled, exceptions included. One child keeps the backend's in-memory state across
syncs, which partial-sync tests need (a fork per call would forget it)::

    host = BackendHost(ns.name, lambda: MyBackend(context), ops={"cleanup": my_cleanup})
    host.sync(port_a, port_b, full=True)        # changed/previous computed like the core
    host.call("describe", port_a.key)
    host.close()
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import traceback
from collections.abc import Callable, Iterator, Mapping
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from kproxy_core.backend import Backend, SyncResult
from kproxy_core.model import NodeView, ResolvedServicePort, ServicePortKey
from kproxy_core.testing.conformance import diff_views
from kproxy_core.testing.netns import NetNS, Sandbox

#: A mode-specific operation, run in the child: ``op(backend, args) -> picklable result``.
Operation = Callable[[Backend, Any], Any]


def _builtin(backend: Backend, op: str, args: Any) -> Any:
    if op == "sync":
        return backend.sync(args)
    if op == "needs_full_sync":
        return backend.needs_full_sync()
    if op == "describe":
        return dict(backend.describe(args))
    if op == "trace":
        return dict(backend.trace(**args) or {})
    if op == "audit":
        return backend.audit(args)
    if op == "run":
        argv, stdin = args
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60,
                              check=False)
        return (proc.returncode, proc.stdout, proc.stderr)
    raise ValueError(f"unknown operation {op!r}")


def _serve(conn: Connection, netns: str, make_backend: Callable[[], Backend],
           ops: Mapping[str, Operation]) -> None:
    from kproxy_core.testing.innetns import enter_netns

    enter_netns(netns)
    backend = make_backend()
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        op, args = request
        try:
            result = ops[op](backend, args) if op in ops else _builtin(backend, op, args)
            conn.send(("ok", result))
        except BaseException as exc:  # sent back to fail in the test
            try:
                conn.send(("error", exc, traceback.format_exc()))
            except Exception:
                conn.send(("error", RuntimeError(repr(exc)), traceback.format_exc()))


class BackendHost:
    def __init__(self, netns: str, make_backend: Callable[[], Backend],
                 ops: Mapping[str, Operation] | None = None,
                 node_ips: tuple[str, ...] = ("10.99.0.1",), node_name: str = "node") -> None:
        context = multiprocessing.get_context("fork")  # closures need no pickling with fork
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_serve,
                                     args=(child, netns, make_backend, dict(ops or {})),
                                     daemon=True)
        self._proc.start()
        child.close()
        self.node_ips = node_ips
        self.node_name = node_name
        self.previous_view: NodeView | None = None

    @property
    def previous(self) -> dict[ServicePortKey, ResolvedServicePort]:
        return dict(self.previous_view.services) if self.previous_view else {}

    def call(self, op: str, args: Any = None, timeout: float = 120) -> Any:
        self._conn.send((op, args))
        if not self._conn.poll(timeout):
            raise TimeoutError(f"backend host did not answer {op}")
        reply = self._conn.recv()
        if reply[0] == "ok":
            return reply[1]
        exc: BaseException = reply[1]
        exc.add_note(f"in the backend host:\n{reply[2]}")
        raise exc

    def view(self, *ports: ResolvedServicePort) -> NodeView:
        return NodeView(self.node_name, self.node_ips, "", {p.key: p for p in ports})

    def sync(self, *ports: ResolvedServicePort, full: bool = False) -> SyncResult:
        """Sync to exactly ``ports``; ``changed``/``previous`` computed like the core does."""
        from kproxy_core.backend import SyncRequest

        view = self.view(*ports)
        changed, previous = diff_views(self.previous_view, view)
        result: SyncResult = self.call(
            "sync", SyncRequest(view=view, changed=changed, full=full, previous=previous))
        self.previous_view = view
        return result

    def run(self, *argv: str, stdin: str | None = None) -> str:
        """Run a command in the namespace; its stdout (RuntimeError when it fails)."""
        code, out, err = self.call("run", (list(argv), stdin))
        if code != 0:
            raise RuntimeError(f"{argv} exited {code}: {err}")
        return str(out)

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


HostT = TypeVar("HostT", bound="BackendHost")


@contextlib.contextmanager
def host_in_new_netns(make_host: Callable[[NetNS], HostT]) -> Iterator[HostT]:
    """A fresh ``node`` namespace and the host ``make_host`` builds in it (after any setup
    of its own in the namespace); both are gone afterwards, whatever the test did. Fails
    (never skips) without root: a kernel test that cannot run must not pass silently."""
    if os.geteuid() != 0:
        raise RuntimeError("kernel tests need root (they create network namespaces)")
    with Sandbox() as sandbox:
        host = make_host(sandbox.netns("node"))
        try:
            yield host
        finally:
            host.close()
