"""A worker thread that lives in another network namespace.

``setns(2)`` with CLONE_NEWNET changes the namespace of the calling *thread* only, and a socket
belongs for life to the namespace it was created in. So a test can create sockets inside the
sandbox's node namespace (an HTTP client for kproxy's /healthz, or the fake API server's
listening socket) from one dedicated thread, while the test itself and every other thread stay
in the host namespace. Nothing in the host namespace changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000


def _enter(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into netns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsThread:
    """Runs callables on one thread that has entered network namespace ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"netns-{name}",
                                        initializer=_enter, initargs=(name,))

    def call(self, func: Callable[[], T], timeout: float = 60) -> T:
        return self._pool.submit(func).result(timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
