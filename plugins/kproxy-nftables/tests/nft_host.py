"""Runs an `NftablesProxier` in a long-lived child process inside a test's network namespace.

The test process stays in the host namespace; every call (sync, describe, trace, cleanup, a
command in the namespace) goes to the child over a pipe and comes back pickled. One child
keeps the proxier's in-memory record across syncs, which partial syncs need.
"""

from __future__ import annotations

import logging
import multiprocessing
import subprocess
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

from nft_helpers import context, read_dataplane

from kproxy_core.backend import SyncRequest, SyncResult
from kproxy_core.model import NodeView, ResolvedServicePort, ServicePortKey


def _serve(conn: Connection, netns: str, config: Mapping[str, Any],
           families: tuple[int, ...]) -> None:
    from kproxy_core.testing.innetns import enter_netns

    enter_netns(netns)
    from kproxy_nftables import nft
    from kproxy_nftables.cleanup import cleanup
    from kproxy_nftables.proxier import NftablesProxier

    proxier = NftablesProxier(context(config, families))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        op, args = request
        try:
            if op == "sync":
                result: Any = proxier.sync(args)
            elif op == "last_transaction":
                result = list(proxier.last_transaction)
            elif op == "needs_full_sync":
                result = proxier.needs_full_sync()
            elif op == "describe":
                result = dict(proxier.describe(args))
            elif op == "trace":
                result = dict(proxier.trace(**args) or {})
            elif op == "audit":
                result = proxier.audit(args)
            elif op == "dataplane":
                result = read_dataplane(families)
            elif op == "table":
                result = nft.read_table(args)
            elif op == "cleanup":
                result = cleanup(logging.getLogger("kproxy.test.cleanup"))
            elif op == "run":
                proc = subprocess.run(args[0], input=args[1], capture_output=True, text=True,
                                      timeout=60, check=False)
                result = (proc.returncode, proc.stdout, proc.stderr)
            else:
                raise ValueError(f"unknown op {op!r}")
            conn.send(("ok", result))
        except BaseException as exc:  # sent back to fail in the test
            try:
                conn.send(("error", exc, traceback.format_exc()))
            except Exception:
                conn.send(("error", RuntimeError(repr(exc)), traceback.format_exc()))


class ProxierHost:
    def __init__(self, netns: str, config: Mapping[str, Any] | None = None,
                 families: tuple[int, ...] = (4,)) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, netns, dict(config or {}),
                                                      families), daemon=True)
        self._proc.start()
        child.close()
        self.previous: dict[ServicePortKey, ResolvedServicePort] = {}
        self.node_ips: tuple[str, ...] = ("10.99.0.1",)

    def call(self, op: str, args: Any = None) -> Any:
        self._conn.send((op, args))
        if not self._conn.poll(120):
            raise TimeoutError(f"proxier host did not answer {op}")
        reply = self._conn.recv()
        if reply[0] == "ok":
            return reply[1]
        exc: BaseException = reply[1]
        exc.add_note(f"in the proxier host:\n{reply[2]}")
        raise exc

    def view(self, *ports: ResolvedServicePort) -> NodeView:
        return NodeView("node", self.node_ips, "", {p.key: p for p in ports})

    def sync(self, *ports: ResolvedServicePort, full: bool = False) -> SyncResult:
        """Sync to exactly ``ports``; ``changed``/``previous`` computed like the core does."""
        current = {p.key: p for p in ports}
        changed = {k for k in current if self.previous.get(k) != current[k]}
        changed |= set(self.previous) - set(current)
        request = SyncRequest(view=self.view(*ports), changed=frozenset(changed), full=full,
                              previous={k: self.previous.get(k) for k in changed})
        result: SyncResult = self.call("sync", request)
        self.previous = current
        return result

    def run(self, *argv: str, stdin: str | None = None) -> str:
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
