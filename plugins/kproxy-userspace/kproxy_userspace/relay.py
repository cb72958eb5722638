"""The data path: listeners and relays on one asyncio event loop in a thread of its own.

Everything here runs on the loop thread except `DataPlane.call`, which the sync thread uses to
run a function there and wait for its result. The hot path is written as plain callbacks on
``loop.add_reader``/``add_writer`` rather than coroutines: a task per connection costs more
than the relaying itself for short connections.

TCP bytes move with ``os.splice`` through a pipe per direction, so payload is never copied
into Python; a socket that refuses splice (``EINVAL``) falls back to ``recv_into``/``send``.
Under the default ``relay=auto`` a direction copies its first `SPLICE_AFTER` bytes and takes
a pipe only after that: request/response traffic then holds 2 fds per connection instead of
6, while bulk transfers run the very same splice path as ``relay=splice`` (issue #5 measured
no difference per MB: docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge

from kproxy_core.algorithms import AffinityPicker, AffinityTable
from kproxy_core.backend import AlgorithmSpec, Picker
from kproxy_core.model import Endpoint

T = TypeVar("T")
RelayMode = Literal["auto", "splice", "copy"]
LoopKind = Literal["auto", "asyncio", "uvloop"]

#: Upstream's userspace proxy dialled endpoints with these timeouts, one per attempt.
CONNECT_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
#: Bytes moved per splice/recv call; also the pipe size asked for.
CHUNK = 1 << 20
#: Under ``relay=auto``, bytes a direction copies before it switches to splice.
SPLICE_AFTER = 64 * 1024
COPY_BUFFER = 256 * 1024
#: Connections accepted (or datagrams read) per readiness event: bounded so one busy listener
#: cannot starve the others on the loop.
BATCH = 64
_PIPE_POOL_MAX = 256
_F_SETPIPE_SZ = 1031
_IP_PKTINFO = 8
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# Defined once per process in a registry of their own (tests read it directly); the proxier
# also registers them in the core's registry (BackendContext.metrics), which /metrics serves.
REGISTRY = CollectorRegistry(auto_describe=True)
ACTIVE = Gauge("kproxy_userspace_active_connections",
               "Open proxied connections (TCP) or sessions (UDP) per service port",
               ["service", "protocol"], registry=REGISTRY)
CONNECTIONS = Counter("kproxy_userspace_connections_total",
                      "Connections (TCP) or sessions (UDP) established per service port",
                      ["service", "protocol"], registry=REGISTRY)
BYTES = Counter("kproxy_userspace_bytes_total",
                "Payload bytes relayed per service port and direction",
                ["service", "protocol", "direction"], registry=REGISTRY)
CONNECT_FAILURES = Counter("kproxy_userspace_connect_failures_total",
                           "Failed attempts to connect to an endpoint",
                           ["service", "protocol"], registry=REGISTRY)
REJECTED = Counter("kproxy_userspace_rejected_total",
                   "Clients turned away: no endpoint left, connection limit, or out of files",
                   ["service", "protocol", "reason"], registry=REGISTRY)
METRICS = (ACTIVE, CONNECTIONS, BYTES, CONNECT_FAILURES, REJECTED)


@attrs.frozen
class Limits:
    max_connections: int = 0
    connect_retries: int = len(CONNECT_TIMEOUTS)
    udp_idle_timeout: float = 0.25
    relay: RelayMode = "auto"
    event_loop: LoopKind = "auto"


class LoopUnavailable(RuntimeError):
    """``event_loop="uvloop"`` was asked for and uvloop cannot be imported."""


def new_event_loop(kind: LoopKind) -> tuple[asyncio.AbstractEventLoop, str]:
    """The relay's event loop and its name: uvloop when installed (``auto``) or asked for.

    uvloop's reader/writer registration and callback dispatch are C, which is most of the
    Python cost of a short connection; plain asyncio is the fallback, not an error.
    """
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if kind == "uvloop":
                raise LoopUnavailable(
                    "--userspace-event-loop=uvloop but uvloop is not installed "
                    "(pip install 'kproxy-userspace[uvloop]')") from exc
        else:
            return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


class RateLimitedLog:
    """One log line per key per interval, with the number suppressed in between, so a flood of
    EMFILE or limit hits produces a readable log instead of a stream."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        suffix = f" ({suppressed} more since the last report)" if suppressed else ""
        self.logger.warning("%s%s", message, suffix)


class _Labels:
    """Metric children of one listener, resolved once (``labels()`` is not free)."""

    __slots__ = ("active", "bytes_in", "bytes_out", "connections", "failures", "protocol",
                 "service")

    def __init__(self, service: str, protocol: str) -> None:
        self.service = service
        self.protocol = protocol
        self.active = ACTIVE.labels(service, protocol)
        self.connections = CONNECTIONS.labels(service, protocol)
        self.failures = CONNECT_FAILURES.labels(service, protocol)
        self.bytes_in = BYTES.labels(service, protocol, "to_endpoint")
        self.bytes_out = BYTES.labels(service, protocol, "to_client")

    def rejected(self, reason: str) -> None:
        REJECTED.labels(self.service, self.protocol, reason).inc()

    def remove(self) -> None:
        for metric, labels in (
            (ACTIVE, (self.service, self.protocol)),
            (CONNECTIONS, (self.service, self.protocol)),
            (CONNECT_FAILURES, (self.service, self.protocol)),
            (BYTES, (self.service, self.protocol, "to_endpoint")),
            (BYTES, (self.service, self.protocol, "to_client")),
        ):
            try:
                metric.remove(*labels)
            except KeyError:
                pass


# --------------------------------------------------------------------------------------------
# Load balancing state of one listener
# --------------------------------------------------------------------------------------------


class Balancer:
    """A listener's picker, rebuilt when its endpoints change.

    Open connections are re-announced to a rebuilt picker (for least-connections), and the
    affinity table survives rebuilds, so a client stays on an endpoint that is still there.
    """

    def __init__(self, algorithm: AlgorithmSpec, endpoints: Sequence[Endpoint],
                 affinity_timeout: int | None) -> None:
        self.algorithm = algorithm
        self.endpoints: tuple[Endpoint, ...] = ()
        self.affinity_timeout: int | None = None
        self._table: AffinityTable | None = None
        self._members: frozenset[Endpoint] = frozenset()
        self.picker: Picker = algorithm.create(())
        #: Open connection → its endpoint.
        self.open: dict[object, Endpoint] = {}
        self.update(endpoints, affinity_timeout)

    def update(self, endpoints: Sequence[Endpoint], affinity_timeout: int | None) -> None:
        endpoints = tuple(endpoints)
        if endpoints == self.endpoints and affinity_timeout == self.affinity_timeout \
                and self._members:
            return
        if affinity_timeout != self.affinity_timeout:
            self._table = AffinityTable(affinity_timeout) if affinity_timeout else None
        self.endpoints = endpoints
        self.affinity_timeout = affinity_timeout
        self._members = frozenset(endpoints)
        inner = self.algorithm.create(endpoints)
        if self._table is not None and affinity_timeout:
            self.picker = AffinityPicker(inner, affinity_timeout, endpoints=endpoints,
                                         table=self._table)
        else:
            self.picker = inner
        for endpoint in self.open.values():
            if endpoint in self._members:
                self.picker.connection_opened(endpoint)

    def pick(self, client_ip: str, exclude: Sequence[Endpoint]) -> Endpoint | None:
        return self.picker.pick(client_ip, exclude)

    def opened(self, conn: object, endpoint: Endpoint) -> None:
        self.open[conn] = endpoint
        if endpoint in self._members:
            self.picker.connection_opened(endpoint)

    def closed(self, conn: object) -> None:
        endpoint = self.open.pop(conn, None)
        if endpoint is not None and endpoint in self._members:
            self.picker.connection_closed(endpoint)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class DataPlane:
    """The event loop thread and every listener on it."""

    def __init__(self, limits: Limits, logger: logging.Logger) -> None:
        self.limits = limits
        self.logger = logger
        self.ratelimited = RateLimitedLog(logger)
        self.loop, self.loop_name = new_event_loop(limits.event_loop)
        logger.info("userspace: relay event loop: %s", self.loop_name)
        self.loop.set_exception_handler(self._on_loop_error)
        self.listeners: dict[Any, TcpListener | UdpListener] = {}
        #: Open TCP connections (connecting or relaying) and UDP sessions, for the limit.
        self.active = 0
        self.splice_enabled = limits.relay != "copy"
        #: `_Direction.copy_left` of a new relay: copy for good, splice at once, or copy first.
        self.copy_first = {"copy": -1, "splice": 0}.get(limits.relay, SPLICE_AFTER)
        #: The copy path's one buffer (the loop is one thread; see `_Direction`).
        self.buffer = memoryview(bytearray(COPY_BUFFER))
        self._pipes: list[tuple[int, int]] = []
        #: Pipes held by relays right now (each is two fds and up to CHUNK of pipe memory).
        self.pipes_in_use = 0
        self._thread = threading.Thread(target=self._run, name="kproxy-userspace-relay",
                                        daemon=True)
        self._closables: set[_Closable] = set()

    # -- thread control (any thread) ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, func: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        """Run ``func(*args)`` on the loop thread and return its result (or raise its error)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def runner() -> None:
            try:
                future.set_result(func(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(runner)
        return future.result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            self.loop.close()
            return
        try:
            self.call(self._close_everything, timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    # -- loop thread -------------------------------------------------------------------------

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.ratelimited.warning(
            f"loop:{type(exc).__name__}",
            f"userspace relay: unexpected error: {context.get('message')}: {exc!r}",
        )

    def _close_everything(self) -> None:
        for listener in list(self.listeners.values()):
            listener.close()
        self.listeners.clear()
        for item in list(self._closables):
            item.abort()
        for read_fd, write_fd in self._pipes:
            os.close(read_fd)
            os.close(write_fd)
        self._pipes.clear()

    def track(self, item: _Closable) -> None:
        self._closables.add(item)

    def untrack(self, item: _Closable) -> None:
        self._closables.discard(item)

    def admit(self, labels: _Labels) -> bool:
        """Whether one more connection/session fits under ``max_connections``."""
        limit = self.limits.max_connections
        if limit and self.active >= limit:
            labels.rejected("limit")
            self.ratelimited.warning(
                "limit",
                f"userspace: --userspace-max-connections={limit} reached; refusing new "
                f"clients of {labels.service}/{labels.protocol.lower()}",
            )
            return False
        return True

    def exhausted(self, labels: _Labels, exc: OSError) -> None:
        labels.rejected("resources")
        self.ratelimited.warning(
            f"exhausted:{exc.errno}",
            f"userspace: out of resources ({os.strerror(exc.errno or 0)}) while serving "
            f"{labels.service}/{labels.protocol.lower()}; raise the open-files limit "
            "(ulimit -n) or lower --userspace-max-connections",
        )

    def get_pipe(self) -> tuple[int, int]:
        self.pipes_in_use += 1
        if self._pipes:
            return self._pipes.pop()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size or pipe-user-pages: the default still works
        return read_fd, write_fd

    def put_pipe(self, pipe: tuple[int, int], empty: bool) -> None:
        self.pipes_in_use -= 1
        if empty and len(self._pipes) < _PIPE_POOL_MAX:
            self._pipes.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def set_listener(self, lid: Any, protocol: str, family: int, endpoints: Sequence[Endpoint],
                     algorithm: AlgorithmSpec, affinity_timeout: int | None,
                     service: str) -> int:
        """Create or update the listener ``lid``; its port."""
        listener = self.listeners.get(lid)
        if listener is not None and (listener.protocol != protocol
                                     or listener.family != family
                                     or listener.balancer.algorithm != algorithm):
            listener.close()
            del self.listeners[lid]
            listener = None
        if listener is None:
            balancer = Balancer(algorithm, endpoints, affinity_timeout)
            cls = TcpListener if protocol == "TCP" else UdpListener
            listener = cls(self, family, balancer, _Labels(service, protocol))
            self.listeners[lid] = listener
        else:
            listener.balancer.update(endpoints, affinity_timeout)
        return listener.port

    def remove_listener(self, lid: Any) -> bool:
        listener = self.listeners.pop(lid, None)
        if listener is None:
            return False
        listener.close()
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "listeners": len(self.listeners),
            "splice": self.splice_enabled,
            "event_loop": self.loop_name,
            "pooled_pipes": len(self._pipes),
            "pipes_in_use": self.pipes_in_use,
        }


class _Closable:
    def abort(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# TCP
# --------------------------------------------------------------------------------------------


def _listen_socket(family: int, kind: socket.SocketKind) -> socket.socket:
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    sock = socket.socket(af, kind)
    try:
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == 6 else "0.0.0.0", 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _abortive_close(sock: socket.socket) -> None:
    """Close with RST, so the client sees "connection reset" at once instead of an EOF that
    looks like an empty answer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class TcpListener:
    protocol = "TCP"

    def __init__(self, plane: DataPlane, family: int, balancer: Balancer,
                 labels: _Labels) -> None:
        self.plane = plane
        self.family = family
        self.balancer = balancer
        self.labels = labels
        self.sock = _listen_socket(family, socket.SOCK_STREAM)
        self.sock.listen(4096)
        self.port: int = self.sock.getsockname()[1]
        self._paused = False
        plane.loop.add_reader(self.sock.fileno(), self._on_accept)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.plane.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.labels.remove()

    def _resume(self) -> None:
        if self._paused and self.sock.fileno() >= 0:
            self._paused = False
            self.plane.loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        plane = self.plane
        for _ in range(BATCH):
            try:
                client, address = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    plane.exhausted(self.labels, exc)
                    # The pending connection stays in the backlog and keeps the socket
                    # readable: stop listening briefly instead of spinning.
                    self._paused = True
                    plane.loop.remove_reader(self.sock.fileno())
                    plane.loop.call_later(0.1, self._resume)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            if not plane.admit(self.labels):
                _abortive_close(client)
                continue
            client.setblocking(False)
            _Connector(self, client, address[0]).next_attempt()


class _Connector(_Closable):
    """Connects one accepted client to an endpoint, trying others when an attempt fails."""

    __slots__ = ("attempt", "client", "client_ip", "handles", "listener", "server", "tried")

    def __init__(self, listener: TcpListener, client: socket.socket, client_ip: str) -> None:
        self.listener = listener
        self.client = client
        self.client_ip = client_ip
        self.tried: list[Endpoint] = []
        self.server: socket.socket | None = None
        self.handles: asyncio.TimerHandle | None = None
        listener.plane.active += 1
        listener.plane.track(self)

    def _finish(self) -> None:
        self.listener.plane.untrack(self)

    def fail(self, reason: str) -> None:
        self.listener.labels.rejected(reason)
        self.listener.plane.active -= 1
        self._finish()
        _abortive_close(self.client)

    def abort(self) -> None:
        self._cancel_attempt()
        self.fail("shutdown")

    def _cancel_attempt(self) -> None:
        if self.handles is not None:
            self.handles.cancel()
            self.handles = None
        if self.server is not None:
            self.listener.plane.loop.remove_writer(self.server.fileno())
            self.server.close()
            self.server = None

    def next_attempt(self) -> None:
        listener = self.listener
        plane = listener.plane
        if len(self.tried) >= max(1, plane.limits.connect_retries):
            self.fail("endpoints_failed")
            return
        endpoint = listener.balancer.pick(self.client_ip, self.tried)
        if endpoint is None:
            self.fail("no_endpoints" if not self.tried else "endpoints_failed")
            return
        self.tried.append(endpoint)
        af = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        try:
            # Non-blocking from birth: one system call fewer than setblocking afterwards.
            server = socket.socket(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                plane.exhausted(listener.labels, exc)
                self.fail("resources")
                return
            raise
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server = server
        err = server.connect_ex((endpoint.ip, endpoint.port))
        if err == 0:
            self._connected(endpoint)
        elif err == errno.EINPROGRESS:
            timeout = CONNECT_TIMEOUTS[min(len(self.tried), len(CONNECT_TIMEOUTS)) - 1]
            plane.loop.add_writer(server.fileno(), self._on_writable, endpoint)
            self.handles = plane.loop.call_later(timeout, self._on_timeout, endpoint)
        else:
            self._attempt_failed(endpoint, os.strerror(err))

    def _on_writable(self, endpoint: Endpoint) -> None:
        server = self.server
        assert server is not None
        fd = server.fileno()
        err = server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if self.handles is not None:
            self.handles.cancel()
            self.handles = None
        loop = self.listener.plane.loop
        if err:
            loop.remove_writer(fd)
            self._attempt_failed(endpoint, os.strerror(err))
        else:
            # Reading is registered before writing is dropped, so the fd's registration is
            # modified rather than deleted and added again (uvloop keeps its poll handle).
            self._connected(endpoint)
            loop.remove_writer(fd)

    def _on_timeout(self, endpoint: Endpoint) -> None:
        self.handles = None
        self._attempt_failed(endpoint, "timed out")

    def _attempt_failed(self, endpoint: Endpoint, why: str) -> None:
        self._cancel_attempt()
        labels = self.listener.labels
        labels.failures.inc()
        self.listener.plane.logger.debug("userspace: %s/%s: connect to %s failed: %s",
                                         labels.service, labels.protocol, endpoint.address, why)
        self.next_attempt()

    def _connected(self, endpoint: Endpoint) -> None:
        server = self.server
        assert server is not None
        self.server = None
        self._finish()
        self.listener.labels.connections.inc()
        self.listener.labels.active.inc()
        _TcpRelay(self.listener, self.client, server, endpoint)


class _Direction:
    """One half of a relay: bytes from ``src`` to ``dst``.

    Copy mode reads into the plane's one shared buffer and sends at once (the loop is one
    thread, so the buffer is free again when the callback returns); only bytes ``dst`` would
    not take are kept, as a copy of their own. Under ``relay=auto`` a direction copies its
    first `SPLICE_AFTER` bytes and splices after that: a request or an answer of a few bytes
    costs the same two system calls either way, without taking a pipe.
    """

    __slots__ = ("copy_left", "counter", "dst", "dst_fd", "eof", "pending", "pending_view",
                 "pipe", "relay", "src", "src_fd", "waiting")

    def __init__(self, relay: _TcpRelay, src: socket.socket, dst: socket.socket,
                 counter: Counter, copy_left: int) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.counter = counter
        self.pipe: tuple[int, int] | None = None
        #: Bytes still to move by copying before splicing (negative: copy for good).
        self.copy_left = copy_left
        self.pending = 0
        self.pending_view: memoryview | None = None
        self.eof = False
        #: True while waiting for ``dst`` to become writable (reading is paused meanwhile).
        self.waiting = False

    # splice: socket → pipe → socket, payload never enters Python.

    def on_readable(self) -> None:
        if self.copy_left:
            self._read_copy()
            return
        # One chunk per readiness event: splicing up to 4 MiB per event cut loop wakeups per
        # MB about threefold but moved neither throughput nor CPU per MB (docs/benchmarks.md),
        # and would let one bulk connection hold the loop four times longer.
        if self.pipe is None:
            self.pipe = self.relay.plane.get_pipe()
        try:
            moved = os.splice(self.src_fd, self.pipe[1], CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EINVAL and self.pending == 0:
                self._switch_to_copy()
                self._read_copy()
                return
            self.relay.abort()
            return
        if moved == 0:
            self._eof()
            return
        self.pending += moved
        self._flush_pipe()

    def _flush_pipe(self) -> None:
        assert self.pipe is not None
        pending = self.pending
        try:
            while pending:
                moved = os.splice(self.pipe[0], self.dst_fd, pending, flags=_SPLICE_FLAGS)
                pending -= moved
                self.counter.inc(moved)
        except BlockingIOError:
            self.pending = pending
            self._wait_writable()
            return
        except OSError:
            self.pending = pending
            self.relay.abort()
            return
        self.pending = 0
        self._drained()

    # copy: recv_into the shared buffer, then send.

    def _switch_to_copy(self) -> None:
        if self.pipe is not None:
            self.relay.plane.put_pipe(self.pipe, empty=True)
            self.pipe = None
        self.copy_left = -1

    def _read_copy(self) -> None:
        buffer = self.relay.plane.buffer
        try:
            count = self.src.recv_into(buffer)
        except BlockingIOError:
            return
        except OSError:
            self.relay.abort()
            return
        if count == 0:
            self._eof()
            return
        if self.copy_left > 0:
            # Reaching 0 switches to splice; negative (copy for good) stays negative.
            self.copy_left = max(0, self.copy_left - count)
        view = buffer[:count]
        try:
            sent = self.dst.send(view)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.relay.abort()
            return
        self.counter.inc(sent)
        if sent < count:
            # The shared buffer is reused by the next callback: keep the rest aside.
            self.pending_view = memoryview(bytes(view[sent:]))
            self._flush_copy()

    def _flush_copy(self) -> None:
        view = self.pending_view
        assert view is not None
        try:
            while view:
                sent = self.dst.send(view)
                view = view[sent:]
                self.counter.inc(sent)
        except BlockingIOError:
            self.pending_view = view
            self._wait_writable()
            return
        except OSError:
            self.relay.abort()
            return
        self.pending_view = None
        self._drained()

    # flow control

    def on_writable(self) -> None:
        if self.pending_view is not None:
            self._flush_copy()
        else:
            self._flush_pipe()

    def _wait_writable(self) -> None:
        if not self.waiting:
            self.waiting = True
            loop = self.relay.plane.loop
            if not self.eof:
                loop.remove_reader(self.src_fd)
            loop.add_writer(self.dst_fd, self.on_writable)

    def _drained(self) -> None:
        if self.waiting:
            self.waiting = False
            loop = self.relay.plane.loop
            loop.remove_writer(self.dst_fd)
            if not self.eof:
                loop.add_reader(self.src_fd, self.on_readable)
        if self.eof:
            self._half_close()

    def _eof(self) -> None:
        self.eof = True
        self.relay.plane.loop.remove_reader(self.src_fd)
        if not self.pending and self.pending_view is None:
            self._half_close()

    def _half_close(self) -> None:
        if not self.relay.done:
            # The other direction still runs: tell ``dst`` no more bytes come. When it is done
            # already, both sockets close now and close sends the FIN itself.
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.relay.half_closed(self)

    def release(self) -> None:
        loop = self.relay.plane.loop
        if not self.eof:
            loop.remove_reader(self.src_fd)
        if self.waiting:
            loop.remove_writer(self.dst_fd)
        if self.pipe is not None:
            self.relay.plane.put_pipe(self.pipe, empty=self.pending == 0)
            self.pipe = None


class _TcpRelay(_Closable):
    __slots__ = ("client", "closed", "directions", "done", "endpoint", "listener", "plane",
                 "server")

    def __init__(self, listener: TcpListener, client: socket.socket, server: socket.socket,
                 endpoint: Endpoint) -> None:
        self.listener = listener
        self.plane = listener.plane
        self.client = client
        self.server = server
        self.endpoint = endpoint
        self.done = 0
        self.closed = False
        labels = listener.labels
        copy_left = self.plane.copy_first
        upstream = _Direction(self, client, server, labels.bytes_in, copy_left)
        downstream = _Direction(self, server, client, labels.bytes_out, copy_left)
        self.directions = (upstream, downstream)
        listener.balancer.opened(self, endpoint)
        self.plane.track(self)
        loop = self.plane.loop
        loop.add_reader(downstream.src_fd, downstream.on_readable)
        loop.add_reader(upstream.src_fd, upstream.on_readable)

    def half_closed(self, direction: _Direction) -> None:
        self.done += 1
        if self.done == 2:
            self._close(abort=False)

    def abort(self) -> None:
        self._close(abort=True)

    def _close(self, *, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for direction in self.directions:
            direction.release()
        if abort:
            _abortive_close(self.client)
            _abortive_close(self.server)
        else:
            self.client.close()
            self.server.close()
        self.listener.balancer.closed(self)
        self.listener.labels.active.dec()
        self.plane.active -= 1
        self.plane.untrack(self)


# --------------------------------------------------------------------------------------------
# UDP
# --------------------------------------------------------------------------------------------


class UdpListener:
    """Receives datagrams for a service port; one session (a connected socket to the chosen
    endpoint) per client address, closed after ``udp_idle_timeout`` without traffic.

    Replies leave from the address the client's datagram was delivered to (``IP_PKTINFO``),
    so conntrack maps them back to the service IP the client sent to.
    """

    protocol = "UDP"

    def __init__(self, plane: DataPlane, family: int, balancer: Balancer,
                 labels: _Labels) -> None:
        self.plane = plane
        self.family = family
        self.balancer = balancer
        self.labels = labels
        self.sock = _listen_socket(family, socket.SOCK_DGRAM)
        if family == 6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            self.sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        self.port: int = self.sock.getsockname()[1]
        self.sessions: dict[Any, _UdpSession] = {}
        plane.loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        for session in list(self.sessions.values()):
            session.abort()
        if self.sock.fileno() >= 0:
            self.plane.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.labels.remove()

    def _on_readable(self) -> None:
        ancillary_size = socket.CMSG_SPACE(20)
        for _ in range(BATCH):
            try:
                data, ancdata, _flags, address = self.sock.recvmsg(65535, ancillary_size)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self.plane.exhausted(self.labels, exc)
                    return
                continue  # an ICMP error queued on the socket: nothing to do for the listener
            session = self.sessions.get(address)
            if session is None:
                session = self._open(address, ancdata)
                if session is None:
                    continue
            session.send(data)

    def _open(self, address: Any, ancdata: list[tuple[int, int, bytes]]) -> _UdpSession | None:
        if not self.plane.admit(self.labels):
            return None
        tried: list[Endpoint] = []
        while len(tried) < max(1, self.plane.limits.connect_retries):
            endpoint = self.balancer.pick(address[0], tried)
            if endpoint is None:
                break
            tried.append(endpoint)
            af = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
            try:
                sock = socket.socket(af, socket.SOCK_DGRAM)
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self.plane.exhausted(self.labels, exc)
                    return None
                raise
            sock.setblocking(False)
            try:
                sock.connect((endpoint.ip, endpoint.port))
            except OSError:
                sock.close()
                self.labels.failures.inc()
                continue
            session = _UdpSession(self, address, _reply_ancdata(self.family, ancdata), sock,
                                  endpoint)
            self.sessions[address] = session
            return session
        self.labels.rejected("no_endpoints" if not tried else "endpoints_failed")
        return None

    def reply(self, data: bytes, address: Any, ancdata: list[tuple[int, int, bytes]]) -> None:
        try:
            self.sock.sendmsg([data], ancdata, 0, address)
        except OSError:
            pass  # UDP: a reply that cannot be sent now is lost, as on the wire


def _reply_ancdata(family: int,
                   received: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Ancillary data that sends a reply from the address a datagram arrived at."""
    for level, kind, data in received:
        if family == 4 and level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
            # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}: reply from
            # ``addr`` (the destination the datagram had), on any interface.
            return [(level, kind, struct.pack("i4s4s", 0, data[8:12], b"\0" * 4))]
        if family == 6 and level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            # struct in6_pktinfo {in6_addr addr; unsigned int ifindex}
            return [(level, kind, data[:16] + struct.pack("I", 0))]
    return []


class _UdpSession(_Closable):
    __slots__ = ("address", "ancdata", "closed", "endpoint", "last", "listener", "sock", "timer")

    def __init__(self, listener: UdpListener, address: Any,
                 ancdata: list[tuple[int, int, bytes]], sock: socket.socket,
                 endpoint: Endpoint) -> None:
        self.listener = listener
        self.address = address
        self.ancdata = ancdata
        self.sock = sock
        self.endpoint = endpoint
        self.closed = False
        plane = listener.plane
        self.last = plane.loop.time()
        plane.active += 1
        plane.track(self)
        listener.balancer.opened(self, endpoint)
        listener.labels.connections.inc()
        listener.labels.active.inc()
        plane.loop.add_reader(sock.fileno(), self._on_reply)
        timeout = plane.limits.udp_idle_timeout
        self.timer = plane.loop.call_later(timeout, self._check_idle)

    def send(self, data: bytes) -> None:
        self.last = self.listener.plane.loop.time()
        try:
            self.sock.send(data)
            self.listener.labels.bytes_in.inc(len(data))
        except BlockingIOError:
            pass  # socket buffer full: drop, as a router would
        except OSError:
            self.abort()

    def _on_reply(self) -> None:
        listener = self.listener
        for _ in range(BATCH):
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:
                # ICMP port unreachable from the endpoint: end the session so the next
                # datagram chooses again.
                self.abort()
                return
            self.last = listener.plane.loop.time()
            listener.reply(data, self.address, self.ancdata)
            listener.labels.bytes_out.inc(len(data))

    def _check_idle(self) -> None:
        loop = self.listener.plane.loop
        idle_for = loop.time() - self.last
        timeout = self.listener.plane.limits.udp_idle_timeout
        if idle_for >= timeout:
            self.abort()
        else:
            self.timer = loop.call_later(timeout - idle_for, self._check_idle)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        listener = self.listener
        plane = listener.plane
        self.timer.cancel()
        plane.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if listener.sessions.get(self.address) is self:
            del listener.sessions[self.address]
        listener.balancer.closed(self)
        listener.labels.active.dec()
        plane.active -= 1
        plane.untrack(self)
