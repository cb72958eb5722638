"""A tiny TCP/UDP server that answers with its name and the peer address it saw, and a client.

Used inside test namespaces ("pods") by every mode's tests, the e2e suite and the demo::

    python -m kproxy_core.testing.echo serve --name pod-a --tcp 8080 --udp 8080
    python -m kproxy_core.testing.echo tcp 10.96.0.10 80      # prints "pod-a 10.244.1.2"
    python -m kproxy_core.testing.echo udp 10.96.0.10 53

The client exits 0 and prints the reply, or exits 1 and prints ``refused``, ``timeout`` or
the error, so tests can tell REJECT (refused at once) from DROP (timeout).
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import sys
import threading


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        peer = self.client_address[0]
        self.request.sendall(f"{self.server.pod_name} {peer}\n".encode())
        # Keep the connection open until the client closes it (long-lived connection tests),
        # echoing anything it sends (large-transfer checksum tests).
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    pod_name = ""


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        _data, sock = self.request
        sock.sendto(f"{self.server.pod_name} {self.client_address[0]}\n".encode(),
                    self.client_address)


class _UDPServer(socketserver.ThreadingUDPServer):
    allow_reuse_address = True
    daemon_threads = True
    pod_name = ""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(name: str, tcp_port: int | None, udp_port: int | None, host: str = "") -> None:
    servers: list[socketserver.BaseServer] = []
    families = [socket.AF_INET, socket.AF_INET6] if not host else [_family(host)]
    for family in families:
        bind = host or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        if tcp_port is not None:
            tcp = _TCPServer.__new__(_TCPServer)
            tcp.address_family = family
            _TCPServer.__init__(tcp, (bind, tcp_port), _TCPHandler, bind_and_activate=False)
            if family == socket.AF_INET6:
                tcp.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tcp.server_bind()
            tcp.server_activate()
            tcp.pod_name = name
            servers.append(tcp)
        if udp_port is not None:
            udp = _UDPServer.__new__(_UDPServer)
            udp.address_family = family
            _UDPServer.__init__(udp, (bind, udp_port), _UDPHandler, bind_and_activate=False)
            if family == socket.AF_INET6:
                udp.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            udp.server_bind()
            udp.server_activate()
            udp.pod_name = name
            servers.append(udp)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    print(f"{name} listening", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


def tcp_request(host: str, port: int, timeout: float = 2.0, source: str | None = None) -> str:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()


def udp_request(host: str, port: int, timeout: float = 2.0) -> str:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"ping\n", (host, port))
        data, _ = sock.recvfrom(4096)
        return data.decode().strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy_core.testing.echo")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve")
    serve_p.add_argument("--name", required=True)
    serve_p.add_argument("--tcp", type=int)
    serve_p.add_argument("--udp", type=int)
    serve_p.add_argument("--host", default="")
    for proto in ("tcp", "udp"):
        client = sub.add_parser(proto)
        client.add_argument("host")
        client.add_argument("port", type=int)
        client.add_argument("--timeout", type=float, default=2.0)
        client.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.name, args.tcp, args.udp, args.host)
        return 0
    status = 0
    for _ in range(args.count):
        try:
            if args.command == "tcp":
                print(tcp_request(args.host, args.port, args.timeout), flush=True)
            else:
                print(udp_request(args.host, args.port, args.timeout), flush=True)
        except ConnectionRefusedError:
            print("refused", flush=True)
            status = 1
        except TimeoutError:
            print("timeout", flush=True)
            status = 1
        except OSError as exc:
            print(f"error {exc}", flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
