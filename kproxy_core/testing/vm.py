"""Run a command inside a throw-away VM booted with another kernel (virtme-ng + QEMU).

Why: IPVS lives in the ``ip_vs`` kernel modules, and CI machines (and many developer hosts)
run kernels without them. Debian's ``linux-image-amd64`` ships them; virtme-ng boots that
kernel over the host's root filesystem (read-only, ``/tmp`` is a tmpfs in the guest), so the
guest sees the same Python, the same checkout and the same installed packages, and nothing it
does to netfilter/IPVS reaches the host kernel.

Install the prerequisites with ``plugins/kproxy-ipvs/vm/setup.sh``; then::

    python -m kproxy_core.testing.vm --modules ip_vs,ip_vs_rr -- python -m pytest -q tests/x

The exit code is the command's. KVM is off by default (``--kvm`` to try it): on the machines
this was written on KVM failed with an MSR error, and TCG boots in 20-30 s.
"""

from __future__ import annotations

import argparse
import glob
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

#: Set in the guest for the command, so test suites can tell they run in the VM.
IN_VM_ENV = "KPROXY_IN_VM"


class VMUnavailable(RuntimeError):
    pass


#: Directories the guest mounts fresh (tmpfs): the host's files there are invisible to it.
GUEST_TMPFS = ("/tmp", "/var/tmp", "/run", "/var/log", "/var/cache")


def hidden_in_guest(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == top or real.startswith(top + "/") for top in GUEST_TMPFS)


def _has_module(release: str, module: str, modules_root: str) -> bool:
    """Whether ``/lib/modules/<release>`` has ``module`` (loadable or built in)."""
    tree = os.path.join(modules_root, release)
    names = {module, module.replace("_", "-")}
    for index in ("modules.dep", "modules.builtin"):
        try:
            with open(os.path.join(tree, index), encoding="utf-8") as handle:
                for line in handle:
                    path = line.split(":", 1)[0].strip()
                    base = os.path.basename(path).split(".ko", 1)[0]
                    if base in names:
                        return True
        except OSError:
            continue
    return False


def find_kernel(modules: Sequence[str] = (), *, boot: str = "/boot",
                modules_root: str = "/lib/modules") -> str:
    """The newest ``<boot>/vmlinuz-*`` whose module tree (the guest loads modules from the
    host's ``/lib/modules``) has every one of ``modules``: a host may carry a kernel without
    IPVS (a cloud kernel) next to Debian's generic one."""
    candidates = []
    for path in glob.glob(os.path.join(boot, "vmlinuz-*")):
        release = os.path.basename(path)[len("vmlinuz-"):]
        if os.path.isdir(os.path.join(modules_root, release)):
            candidates.append((release, path))
    if not candidates:
        raise VMUnavailable(
            f"no {boot}/vmlinuz-* with modules in {modules_root}: run "
            "plugins/kproxy-ipvs/vm/setup.sh (apt-get install linux-image-amd64)")
    usable = [(release, path) for release, path in candidates
              if all(_has_module(release, m, modules_root) for m in modules)]
    if not usable:
        raise VMUnavailable(
            f"no kernel in {boot} has the modules {', '.join(modules)} (looked at "
            f"{', '.join(sorted(r for r, _ in candidates))}): run plugins/kproxy-ipvs/vm/setup.sh "
            "(apt-get install linux-image-amd64)")
    return sorted(usable)[-1][1]


def guest_script(argv: Sequence[str], modules: Sequence[str], cwd: str,
                 env: dict[str, str]) -> str:
    """The shell line run in the guest: load modules, then exec the command with ``env``."""
    parts = [f"cd {shlex.quote(cwd)}"]
    for module in modules:
        parts.append(f"modprobe {shlex.quote(module)}")
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    parts.append(f"exec env {assignments} {shlex.join(argv)}")
    return " && ".join(parts)


def build_vng_argv(argv: Sequence[str], *, kernel: str, modules: Sequence[str], cwd: str,
                   memory: str, cpus: int, kvm: bool, env: dict[str, str],
                   shared_dirs: Sequence[str] = (), rw_dirs: Sequence[str] = ()) -> list[str]:
    vng = shutil.which("vng")
    if vng is None:
        raise VMUnavailable(
            "vng not found: pip install virtme-ng (see plugins/kproxy-ipvs/vm/setup.sh)")
    if shutil.which("qemu-system-x86_64") is None:
        raise VMUnavailable("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    out = [vng, "--run", kernel, "--memory", memory, "--cpus", str(cpus), "--user", "root"]
    # Host directories under the guest's fresh tmpfs mounts (a CI checkout in /tmp...) are
    # shared explicitly, read-only as the rest of the host filesystem.
    out += [f"--rodir={path}" for path in shared_dirs]
    # Writable host directories: what a run leaves there (logs, pytest's --basetemp) is
    # readable on the host while the guest still runs.
    out += [f"--rwdir={path}" for path in rw_dirs]
    if not kvm:
        out.append("--disable-kvm")
    out += ["--exec", guest_script(argv, modules, cwd, env)]
    return out


def guest_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Variables the command needs in the guest (virtme does not pass the host's through)."""
    env = {
        IN_VM_ENV: "1",
        "PATH": os.pathsep.join([os.path.dirname(sys.executable),
                                 os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")]),
        # The host filesystem is read-only in the guest.
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
    }
    for key in ("PYTHONPATH", "KPROXY_DISABLE_PLUGIN_AUTOLOAD", "CI"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra or {})
    return env


def run_in_vm(argv: Sequence[str], *, modules: Sequence[str] = (), kernel: str | None = None,
              cwd: str | None = None, memory: str = "2G", cpus: int = 2, kvm: bool = False,
              timeout: float = 900, env: dict[str, str] | None = None,
              rw_dirs: Sequence[str] = ()) -> int:
    """Boot the VM, run ``argv`` (first word resolved like the host would), return its exit
    code. Output goes to this process's stdout/stderr."""
    argv = list(argv)
    if not argv:
        raise ValueError("no command given")
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    shared = sorted({os.path.realpath(path) for path in (cwd or os.getcwd(), sys.prefix)
                     if hidden_in_guest(path)})
    vng_argv = build_vng_argv(argv, kernel=kernel or find_kernel(modules), modules=modules,
                              cwd=cwd or os.getcwd(), memory=memory, cpus=cpus, kvm=kvm,
                              env=guest_env(env), shared_dirs=shared,
                              rw_dirs=[os.path.realpath(path) for path in rw_dirs])
    # Own process group: on timeout QEMU (vng's child) must die too, not linger as an orphan.
    started = time.monotonic()
    deadline = started + timeout
    # Through a pipe: QEMU reopens its stdout for the guest console, so with a file as stdout
    # the guest's output and ours overwrite each other.
    proc = subprocess.Popen(vng_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    out = sys.stdout.buffer
    fd = proc.stdout.fileno()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.flush()
            print(f"vm: command timed out after {timeout:.0f}s", file=sys.stderr)
            return 124
        exited = proc.poll() is not None
        # Once vng has exited, only drain what is left: a helper it left behind (virtiofsd)
        # may hold the pipe open.
        ready, _, _ = select.select([fd], [], [], 0.5 if exited else min(remaining, 1.0))
        if not ready:
            if exited:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out.write(chunk)
        out.flush()
    proc.stdout.close()
    status = proc.wait()
    try:  # whatever vng left behind in its session (QEMU helpers)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    # vng reports the guest command's status; 255 is its "the guest died" (kernel panic...).
    print(f"vm: command exited {status} after {time.monotonic() - started:.0f}s (boot included)",
          file=sys.stderr)
    return status


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy_core.testing.vm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", help="kernel image (default: newest /boot/vmlinuz-*)")
    parser.add_argument("--modules", default="", help="comma-separated modules to modprobe first")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--kvm", action="store_true", help="use KVM (default: TCG emulation)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rwdir", action="append", default=[], metavar="DIR",
                        help="host directory the guest may write (same path in the guest)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    ns = parser.parse_args(args)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    extra = {}
    for item in ns.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env wants KEY=VALUE, got {item!r}")
        extra[key] = value
    try:
        return run_in_vm(command, modules=[m for m in ns.modules.split(",") if m],
                         kernel=ns.kernel, memory=ns.memory, cpus=ns.cpus, kvm=ns.kvm,
                         timeout=ns.timeout, env=extra, rw_dirs=ns.rwdir)
    except (VMUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
