"""Drives `driver.py` inside the sandbox's node namespace and runs clients in other ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from kproxy_core.testing.netns import NetNS

HERE = Path(__file__).resolve().parent


class ProxyDriver:
    def __init__(self, ns: NetNS, **options: Any) -> None:
        self.proc = ns.spawn([sys.executable, str(HERE / "driver.py"), json.dumps(options)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        hello = self._read()
        if not hello.get("ok"):
            raise RuntimeError(f"driver failed to start: {hello.get('error')}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"driver exited with {self.proc.wait(5)}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def command(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._read()
        if not reply.get("ok"):
            raise RuntimeError(f"driver: {reply.get('error')}")
        return reply

    def sync(self, *services: dict[str, Any], full: bool = False) -> dict[str, Any]:
        return self.command(op="sync", services=list(services), full=full)

    def describe(self, index: int = 0) -> dict[str, Any]:
        return self.command(op="describe", index=index)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def echo(ns: NetNS, proto: str, host: str, port: int, *, count: int = 1,
         timeout: float = 2.0) -> list[str]:
    """Replies of ``count`` requests (``refused``/``timeout``/``error ...`` for failures)."""
    proc = ns.run([sys.executable, "-m", "kproxy_core.testing.echo", proto, host, str(port),
                   "--count", str(count), "--timeout", str(timeout)], check=False,
                  timeout=count * timeout + 30)
    return proc.stdout.split("\n")[:-1]


def udp_connected(ns: NetNS, host: str, port: int) -> str:
    """A UDP request from a *connected* socket: the kernel drops replies from any other
    source, so an answer proves it came back from the service address."""
    code = ("import socket,sys; h=sys.argv[1]; "
            "s=socket.socket(socket.AF_INET6 if ':' in h else socket.AF_INET, "
            "socket.SOCK_DGRAM); s.settimeout(2); s.connect((h, int(sys.argv[2]))); "
            "s.send(b'hi'); print(s.recv(100).decode().strip())")
    proc = ns.run([sys.executable, "-c", code, host, str(port)], check=False)
    return proc.stdout.strip() or proc.stderr.strip().splitlines()[-1]


def pods_of(replies: list[str]) -> list[str]:
    return [line.split()[0] for line in replies]


class Holder:
    """Long-lived connections held open by `clients.py hold` in a namespace."""

    def __init__(self, ns: NetNS, host: str, port: int, count: int) -> None:
        self.proc = ns.spawn([sys.executable, str(HERE / "clients.py"), "hold", host, str(port),
                              str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pods: list[str] = self._read()

    def _read(self) -> list[str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("hold client failed")
        result: list[str] = json.loads(line)
        return result

    def echo(self) -> list[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"echo\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        self.proc.wait(10)
