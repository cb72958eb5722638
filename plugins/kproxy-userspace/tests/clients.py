"""Test clients run inside namespaces (``python clients.py CMD ...``).

* ``bulk HOST PORT MEGABYTES``: sends random bytes through the echo server and prints
  ``<sha256 sent> <sha256 received> <bytes received>``.
* ``hold HOST PORT N``: opens N connections, prints one JSON line with the pod names, then
  for each ``echo`` line on stdin sends a line on every connection and prints what came back
  (JSON); ``quit`` (or EOF) closes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading


def _first_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def bulk(host: str, port: int, megabytes: int) -> None:
    total = megabytes * 1024 * 1024
    sock = socket.create_connection((host, port), timeout=30)
    _first_line(sock)
    sent = hashlib.sha256()
    received = hashlib.sha256()
    count = 0

    def sender() -> None:
        remaining = total
        while remaining:
            block = os.urandom(min(remaining, 256 * 1024))
            sent.update(block)
            sock.sendall(block)
            remaining -= len(block)
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=sender)
    thread.start()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received.update(chunk)
        count += len(chunk)
    thread.join()
    sock.close()
    print(sent.hexdigest(), received.hexdigest(), count, flush=True)


def hold(host: str, port: int, count: int) -> None:
    socks = [socket.create_connection((host, port), timeout=5) for _ in range(count)]
    print(json.dumps([_first_line(s).split()[0] for s in socks]), flush=True)
    for line in sys.stdin:
        if line.strip() != "echo":
            break
        results = []
        for sock in socks:
            try:
                sock.sendall(b"ping\n")
                results.append(_first_line(sock))
            except OSError as exc:
                results.append(f"error {exc}")
        print(json.dumps(results), flush=True)
    for sock in socks:
        sock.close()


def main() -> None:
    command, host, port, number = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if command == "bulk":
        bulk(host, port, number)
    elif command == "hold":
        hold(host, port, number)
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
