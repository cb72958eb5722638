"""Run a Python function inside a named network namespace, from a test.

Kernel code in kproxy (rule writers, conntrack, ipvs) acts on the network namespace of the
calling process, like kube-proxy does. Tests must never touch the host namespace, so they run
that code in a namespace they created::

    with Sandbox() as sb:
        ns = sb.netns("node")
        rules = in_netns(ns.name, lambda: make_writer("restore", 4, "nft").save("nat"))

`in_netns` forks; the child enters the namespace with ``setns(2)`` and calls ``func``; the
return value (or the exception, with its traceback text) comes back pickled through a pipe.
The parent's namespace never changes, so the rest of the test process, and other threads,
stay on the host. ``func`` may be a lambda or closure: it is called in the forked child, never
pickled. Only the result must pickle.

Only the network namespace is entered (not the mount namespace that ``ip netns exec`` also
sets up), so ``/sys/class/net`` still shows the host: use netlink or commands for interface
state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
import select
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


class InNetnsError(RuntimeError):
    """The child failed in a way that is not an ordinary exception of ``func``."""


def _setns(path: str) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if setns is not None:
            setns(fd, CLONE_NEWNET)
            return
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def enter_netns(name: str) -> None:
    """Move the *calling process* into namespace ``name`` (for a child process or a script
    that owns its process; tests want `in_netns`)."""
    path = name if name.startswith("/") else os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"network namespace {name!r} does not exist ({path})")
    _setns(path)


def _read_all(fd: int, pid: int, timeout: float) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            raise TimeoutError(f"function in network namespace did not finish in {timeout}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def in_netns(name: str, func: Callable[[], T], *, timeout: float = 120.0) -> T:
    """Call ``func()`` in a forked child that joined network namespace ``name``.

    Returns what ``func`` returned; re-raises what it raised (same type when it pickles, the
    child's traceback is attached as a note). ``timeout`` kills a hung child.
    """
    path = name if name.startswith("/") else os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"network namespace {name!r} does not exist ({path})")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack (pytest would run twice)
        status = 0
        try:
            os.close(read_fd)
            try:
                _setns(path)
                payload: tuple[str, object, str] = ("ok", func(), "")
            except BaseException as exc:
                payload = ("error", exc, traceback.format_exc())
            try:
                data = pickle.dumps(payload)
            except Exception as exc:
                data = pickle.dumps(("error", InNetnsError(
                    f"result of {func!r} does not pickle: {exc}; original: {payload[1]!r}"),
                    payload[2]))
            view = memoryview(data)
            while view:
                written = os.write(write_fd, view)
                view = view[written:]
            os.close(write_fd)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        data = _read_all(read_fd, pid, timeout)
    finally:
        os.close(read_fd)
    _, wait_status = os.waitpid(pid, 0)
    if not data:
        raise InNetnsError(
            f"child in namespace {name} died without a result (wait status {wait_status})")
    kind, value, tb = pickle.loads(data)
    if kind == "ok":
        return value  # type: ignore[no-any-return]
    assert isinstance(value, BaseException)
    value.add_note(f"raised in network namespace {name}:\n{tb}")
    raise value
