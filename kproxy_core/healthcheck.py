"""Per-service health-check node ports (upstream ``pkg/proxy/healthcheck/service_health.go``).

A LoadBalancer Service with ``externalTrafficPolicy: Local`` has a ``healthCheckNodePort``;
the cloud load balancer probes it on every node and sends traffic only to nodes answering 200.
A node answers 200 when it has at least one local ready endpoint for the service and the proxy
itself is healthy, else 503, with upstream's JSON body and ``X-Load-Balancing-Endpoint-Weight``.

All listeners share one accept thread (selectors) and a small worker pool, so a node with
hundreds of such services does not run hundreds of server threads.
"""

from __future__ import annotations

import ipaddress
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

from kproxy_core.servers import send_reply

log = logging.getLogger(__name__)

ServiceName = tuple[str, str]


def health_body(namespace: str, name: str, endpoints: int, proxy_healthy: bool) -> bytes:
    """Upstream's response body, byte for byte (tab-indented JSON)."""
    return (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {_go_quote(namespace)},\n'
        f'\t\t"name": {_go_quote(name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {endpoints},\n'
        f'\t"serviceProxyHealthy": {"true" if proxy_healthy else "false"}\n'
        "}"
    ).encode()


def _go_quote(text: str) -> str:
    # Kubernetes names are DNS labels, where Go's %q and JSON quoting agree.
    import json

    return json.dumps(text)


class _Handler(BaseHTTPRequestHandler):
    server: Any  # a _Port
    timeout = 5  # a slow client must not hold a worker for long
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        port: _Port = self.server
        code, headers, body = port.owner._respond(port.service)
        send_reply(self, code, headers, body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health check %s %s", self.address_string(), format % args)


class _Port:
    """The listening sockets of one service's health-check port."""

    def __init__(
        self,
        owner: ServiceHealthServer,
        service: ServiceName,
        port: int,
        sockets: list[socket.socket],
    ) -> None:
        self.owner = owner
        self.service = service
        self.port = port
        self.sockets = sockets


def _listen(address: str, port: int) -> socket.socket:
    if address in ("", "0.0.0.0", "::"):
        # Like Go's listener on the unspecified address: both families on one socket.
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            address = "::"
        except OSError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = "0.0.0.0"
    else:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def node_addresses(node_port_addresses: Sequence[str]) -> list[str]:
    """Where health-check ports listen for a ``nodePortAddresses`` setting, as upstream:
    everywhere when it is empty or matches all; else this host's IPs inside the CIDRs."""
    entries = list(node_port_addresses)
    if not entries or "all" in entries or any(e in ("0.0.0.0/0", "::/0") for e in entries):
        return [""]
    networks = []
    for entry in entries:
        if entry == "localhost":
            networks += [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
        elif entry == "primary":
            # The Node's primary IPs are not known here; listening everywhere is the safe side.
            log.info("nodePortAddresses 'primary': health check ports listen on all addresses")
            return [""]
        else:
            networks.append(ipaddress.ip_network(entry, strict=False))
    found = [ip for ip in _local_ips() if any(ipaddress.ip_address(ip) in n for n in networks)]
    if not found:
        log.error(
            "no local address matches nodePortAddresses %s; health check ports listen "
            "on all addresses",
            ",".join(entries),
        )
        return [""]
    return found


def _local_ips() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")]


class ServiceHealthServer:
    """Opens and closes health-check listeners as services come and go.

    ``config`` supplies ``nodePortAddresses`` (unless ``addresses`` lists the IPs to listen
    on; ``""`` means all). ``proxy_health`` is a `kproxy_core.servers.HealthState` (anything
    with ``is_healthy()``) or a callable returning the proxy's health; None means healthy.
    """

    def __init__(
        self,
        config: Any = None,
        proxy_health: Any = None,
        *,
        addresses: Sequence[str] | None = None,
        workers: int = 4,
    ) -> None:
        if addresses is None:
            configured = config.get("nodePortAddresses") if config is not None else ()
            addresses = node_addresses(tuple(configured or ()))
        self.addresses = list(addresses)
        self._health: Callable[[], bool] = _health_function(proxy_health)
        self._lock = threading.Lock()
        self._ports: dict[ServiceName, _Port] = {}
        self._endpoints: dict[ServiceName, int] = {}
        self._selector = selectors.DefaultSelector()
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="kproxy-healthcheck"
        )
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._accept_loop, name="kproxy-healthcheck", daemon=True
        )
        self._thread.start()

    # -- public ----------------------------------------------------------------------------------

    def sync(self, services: Mapping[ServiceName, tuple[int, int]]) -> list[str]:
        """Make ``services`` ({(namespace, name): (health check port, local endpoints)}) the
        served set. Returns one error line per port that could not be opened (logged too;
        retried on the next sync, as upstream)."""
        errors: list[str] = []
        with self._lock:
            for service, port in list(self._ports.items()):
                wanted = services.get(service)
                if wanted is None or wanted[0] != port.port:
                    log.info("closing health check for %s/%s on port %d", *service, port.port)
                    self._close_port(port)
                    del self._ports[service]
            for service, (port_number, _count) in services.items():
                if service in self._ports:
                    continue
                try:
                    port = self._open(service, port_number)
                except OSError as exc:
                    message = (
                        f"failed to start health check for {service[0]}/{service[1]} on "
                        f"port {port_number}: {exc.strerror or exc}"
                    )
                    log.error("%s", message)
                    errors.append(message)
                    continue
                log.info("opened health check for %s/%s on port %d", *service, port_number)
                self._ports[service] = port
            self._endpoints = {service: count for service, (_p, count) in services.items()}
        return errors

    def ports(self) -> dict[ServiceName, int]:
        with self._lock:
            return {service: port.port for service, port in self._ports.items()}

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for port in self._ports.values():
                self._close_port(port)
            self._ports.clear()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._selector.close()

    # -- internals -------------------------------------------------------------------------------

    def _open(self, service: ServiceName, port_number: int) -> _Port:
        sockets: list[socket.socket] = []
        try:
            for address in self.addresses:
                sockets.append(_listen(address, port_number))
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        port = _Port(self, service, port_number, sockets)
        for sock in sockets:
            self._selector.register(sock, selectors.EVENT_READ, port)
        return port

    def _close_port(self, port: _Port) -> None:
        for sock in port.sockets:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                events = self._selector.select(timeout=0.2)
            except (OSError, ValueError):
                if self._closed.is_set():
                    return
                continue
            for key, _mask in events:
                port: _Port = key.data
                try:
                    conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
                except (BlockingIOError, OSError):
                    continue
                conn.setblocking(True)
                self._pool.submit(self._serve, conn, peer, port)

    def _serve(self, conn: socket.socket, peer: Any, port: _Port) -> None:
        try:
            _Handler(conn, peer, port)  # type: ignore[arg-type]
        except Exception as exc:  # a broken client must not disturb the others
            log.debug("health check connection from %s failed: %s", peer, exc)
        finally:
            conn.close()

    def _respond(self, service: ServiceName) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            count = self._endpoints.get(service, 0)
        healthy = self._health()
        headers = {
            "Content-Type": "application/json",
            "X-Content-Type-Options": "nosniff",
            "X-Load-Balancing-Endpoint-Weight": str(count),
        }
        code = 200 if count > 0 and healthy else 503
        return code, headers, health_body(service[0], service[1], count, healthy)


def _health_function(proxy_health: Any) -> Callable[[], bool]:
    if proxy_health is None:
        return lambda: True
    is_healthy = getattr(proxy_health, "is_healthy", None)
    if callable(is_healthy):
        return lambda: bool(is_healthy())
    if callable(proxy_health):
        return lambda: bool(proxy_health())
    raise TypeError("proxy_health must have is_healthy() or be a callable")
