"""`kproxy_core.testing.signals`: a script killed with SIGTERM or SIGINT still runs its cleanup
(a sandbox's namespaces and processes go), and a second signal does not cut that cleanup
short."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, time
    from kproxy_core.testing.signals import exit_on_signals
    exit_on_signals()
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        print("cleaning", flush=True)
        time.sleep(float(sys.argv[1]))
        print("cleaned", flush=True)
""")

SANDBOX_SCRIPT = textwrap.dedent("""
    import time
    from kproxy_core.testing.netns import Sandbox
    from kproxy_core.testing.signals import exit_on_signals
    exit_on_signals()
    with Sandbox() as sandbox:
        ns = sandbox.netns("sig")
        sleeper = ns.spawn(["sleep", "60"])
        print(ns.name, sleeper.pid, flush=True)
        time.sleep(60)
""")


def _start(script: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_runs_cleanup_and_exits_128_plus_n(sig: signal.Signals) -> None:
    proc = _start(SCRIPT, "0")
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert out == "cleaning\ncleaned\n", (out, err)
    assert proc.returncode == 128 + sig
    assert "Traceback" not in err, err


def test_second_signal_does_not_interrupt_cleanup() -> None:
    proc = _start(SCRIPT, "1")
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "cleaning\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out == "cleaned\n", (out, err)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGINT ignored: cleaning up" in err, err


@pytest.mark.root
def test_sigterm_removes_the_sandbox() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (creates a network namespace)")
    proc = _start(SANDBOX_SCRIPT)
    assert proc.stdout is not None
    name, pid = proc.stdout.readline().split()
    try:
        assert name in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True, check=True).stdout
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                          text=True, check=True).stdout
        assert not os.path.exists(f"/proc/{pid}"), "the namespace's process outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
