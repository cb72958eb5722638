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

The guest reads the host's files over 9p without a cache: every ``stat``/``open`` is a round
trip through the emulated kernel and QEMU. A Python start imports hundreds of modules (kproxy's
API client alone ~450), which took minutes per process in the guest. So, unless
``--no-cache-python``, the interpreter's standard library and site-packages are packed into
one tar on the host, unpacked into the guest's RAM (tmpfs) at boot and bind-mounted over the
same paths: the same files at the same places, read from memory (`python_trees`).
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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


#: Parts of the standard library no test imports (the stdlib's own tests, IDLE, Tk, the static
#: library for building extensions...): not copied into the guest's RAM.
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "config-*")

#: Big parts of site-packages the guest never imports (kubernetes' asyncio client is a third of
#: a test env): left out of the copy, still readable over 9p.
SITE_PACKAGES_SKIP = ("kubernetes/aio", "pip")

#: Where the guest unpacks the cached trees (its /tmp is a fresh tmpfs).
GUEST_CACHE = "/tmp/.kproxy-vm-python"
#: Trees larger than this together stay on 9p (the guest's /tmp holds half its memory; a test
#: env's interpreter is ~300 MB, a host interpreter with everything installed can be GBs).
CACHE_LIMIT = 600 * 2**20


def python_trees() -> list[tuple[str, tuple[str, ...]]]:
    """(directory, subdirectories left out) for each tree the running interpreter imports
    from: its standard library (without `STDLIB_SKIP`) and its site-packages, parents before
    the trees nested in them. What is left out of a copy stays visible in the guest, read
    over 9p (`guest_script` binds it into the copy), so nothing disappears."""
    paths = sysconfig.get_paths()
    dirs: list[str] = []
    # Not platstdlib: in a venv it is the venv's lib directory, holding only site-packages.
    for key in ("stdlib", "purelib", "platlib"):
        path = os.path.realpath(paths[key])
        if os.path.isdir(path) and path not in dirs and not hidden_in_guest(path):
            dirs.append(path)
    dirs.sort(key=len)
    stdlib = os.path.realpath(paths["stdlib"])
    budget = CACHE_LIMIT
    trees: list[tuple[str, tuple[str, ...]]] = []
    for path in dirs:
        # A venv's base site-packages is not imported from; a nested tree is cached apart.
        if path == stdlib:
            patterns = [*STDLIB_SKIP, "site-packages"]
            names = os.listdir(path)
        else:
            patterns = list(SITE_PACKAGES_SKIP)
            names = list(SITE_PACKAGES_SKIP)
        nested = {os.path.relpath(other, path).split("/", 1)[0] for other in dirs
                  if other.startswith(path + "/")}
        skip = tuple(sorted(name for name in {*names, *nested}
                            if os.path.isdir(os.path.join(path, name)) and (
                                name in nested or any(fnmatch.fnmatch(name, pattern)
                                                      for pattern in patterns))))
        size = _tree_size(path, skip, budget)
        if size > budget:
            print(f"vm: not caching {path} in the guest's RAM (over "
                  f"{CACHE_LIMIT // 2**20} MiB with the rest)", file=sys.stderr)
            continue
        budget -= size
        trees.append((path, skip))
    return trees


def _tree_size(path: str, skip: Sequence[str], limit: int) -> int:
    """Bytes of the files under ``path`` outside its subdirectories ``skip`` (counting stops
    past ``limit``)."""
    total = 0
    left_out = {os.path.join(path, name) for name in skip}
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in left_out]
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
        if total > limit:
            break
    return total


@contextmanager
def host_workdir(root: str | None = None) -> Iterator[str | None]:
    """A fresh host directory the guest can read (under ``root``, default
    ``~/.cache/kproxy-vm``; the guest mounts a fresh /tmp), removed afterwards; None when
    there is none (HOME under /tmp, a read-only filesystem: as inside the VM itself)."""
    if root is None:
        root = os.path.join(os.path.expanduser("~"), ".cache", "kproxy-vm")
        if hidden_in_guest(root):
            print(f"vm: {root} is not visible in the guest: Python read over 9p",
                  file=sys.stderr)
            yield None
            return
    try:
        os.makedirs(root, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="run-", dir=root)
    except OSError as exc:
        print(f"vm: cannot write {root} ({exc}): Python read over 9p", file=sys.stderr)
        yield None
        return
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def pack_trees(trees: Sequence[tuple[str, tuple[str, ...]]], workdir: str
               ) -> list[tuple[str, str, tuple[str, ...]]]:
    """One tar per tree in ``workdir``: (tar, directory, subdirectories left out)."""
    packed = []
    for index, (path, skip) in enumerate(trees):
        tar = os.path.join(workdir, f"{index}.tar")
        excludes = [f"--exclude=./{name}" for name in skip]
        subprocess.run(["tar", "-cf", tar, "-C", path, *excludes, "."], check=True)
        packed.append((tar, path, skip))
    return packed


def guest_script(argv: Sequence[str], modules: Sequence[str], cwd: str, env: dict[str, str],
                 cached: Sequence[tuple[str, str, tuple[str, ...]]] = (),
                 cache_dir: str = GUEST_CACHE) -> str:
    """The shell line run in the guest: unpack each ``cached`` (tar, directory, subdirectories
    left out) into ``cache_dir`` (RAM) and mount it over its directory, the left-out
    subdirectories bound in from the original; load modules; exec the command with ``env``."""
    parts = []
    for index, (tar, path, skip) in enumerate(cached):
        copy = shlex.quote(f"{cache_dir}/{index}")
        parts += [f"mkdir -p {copy}", f"tar -xf {shlex.quote(tar)} -C {copy}"]
        for name in skip:
            inside = shlex.quote(f"{cache_dir}/{index}/{name}")
            parts += [f"mkdir -p {inside}",
                      f"mount --bind {shlex.quote(os.path.join(path, name))} {inside}"]
        # --rbind: with the left-out subdirectories bound into the copy.
        parts.append(f"mount --rbind {copy} {shlex.quote(path)}")
    parts.append(f"cd {shlex.quote(cwd)}")
    for module in modules:
        parts.append(f"modprobe {shlex.quote(module)}")
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    parts.append(f"exec env {assignments} {shlex.join(argv)}")
    return " && ".join(parts)


def build_vng_argv(argv: Sequence[str], *, kernel: str, modules: Sequence[str], cwd: str,
                   memory: str, cpus: int, kvm: bool, env: dict[str, str],
                   shared_dirs: Sequence[str] = (), rw_dirs: Sequence[str] = (),
                   cached: Sequence[tuple[str, str, tuple[str, ...]]] = (),
                   script_dir: str | None = None) -> list[str]:
    """vng's command line. With ``script_dir`` (a host directory the guest reads) the guest
    script goes into a file there: inline it travels on the kernel command line, which the
    kernel cuts at 2048 bytes (the guest then hangs)."""
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
    script = guest_script(argv, modules, cwd, env, cached)
    if script_dir is not None:
        path = os.path.join(script_dir, "guest.sh")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(script + "\n")
        script = f"sh {shlex.quote(path)}"
    out += ["--exec", script]
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
              rw_dirs: Sequence[str] = (), cache_python: bool = False) -> int:
    """Boot the VM, run ``argv`` (first word resolved like the host would), return its exit
    code. Output goes to this process's stdout/stderr. ``cache_python``: the interpreter's
    trees in the guest's RAM (`python_trees`)."""
    argv = list(argv)
    if not argv:
        raise ValueError("no command given")
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    shared = sorted({os.path.realpath(path) for path in (cwd or os.getcwd(), sys.prefix)
                     if hidden_in_guest(path)})
    kernel = kernel or find_kernel(modules)
    with host_workdir() as workdir:
        cached = pack_trees(python_trees(), workdir) if cache_python and workdir else []
        vng_argv = build_vng_argv(argv, kernel=kernel, modules=modules,
                                  cwd=cwd or os.getcwd(), memory=memory, cpus=cpus, kvm=kvm,
                                  env=guest_env(env), shared_dirs=shared,
                                  rw_dirs=[os.path.realpath(path) for path in rw_dirs],
                                  cached=cached, script_dir=workdir)
        return _run(vng_argv, timeout)


def _run(vng_argv: list[str], timeout: float) -> int:
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
    parser.add_argument("--no-cache-python", dest="cache_python", action="store_false",
                        help="read Python's standard library and site-packages over 9p "
                             "instead of from a copy in the guest's RAM")
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
                         timeout=ns.timeout, env=extra, rw_dirs=ns.rwdir,
                         cache_python=ns.cache_python)
    except (VMUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
