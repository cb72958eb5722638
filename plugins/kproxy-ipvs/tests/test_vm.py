"""`kproxy_core.testing.vm` on the host: kernel choice and the guest command line (booting a
VM is what ``vm/run-tests.sh`` does)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from kproxy_core.testing import vm


def fake_boot(tmp_path: Path, kernels: dict[str, list[str]]) -> tuple[str, str]:
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for release, names in kernels.items():
        (boot / f"vmlinuz-{release}").write_bytes(b"")
        (modules / release).mkdir(parents=True)
        (modules / release / "modules.dep").write_text(
            "".join(f"kernel/net/{name}.ko.xz: kernel/x.ko.xz\n" for name in names))
    return str(boot), str(modules)


def test_find_kernel_prefers_the_newest_with_the_modules(tmp_path: Path) -> None:
    boot, modules = fake_boot(tmp_path, {"6.1.0-9-amd64": ["ip_vs", "ip_vs_rr", "ip_set"],
                                         "6.8.0-1-cloud": ["ip_set"]})
    assert vm.find_kernel(["ip_vs", "ip_set"], boot=boot, modules_root=modules).endswith(
        "vmlinuz-6.1.0-9-amd64")
    assert vm.find_kernel([], boot=boot, modules_root=modules).endswith("vmlinuz-6.8.0-1-cloud")


def test_find_kernel_without_the_modules_names_the_fix(tmp_path: Path) -> None:
    boot, modules = fake_boot(tmp_path, {"6.8.0-1-cloud": ["ip_set"]})
    with pytest.raises(vm.VMUnavailable, match=r"no kernel .* has the modules ip_vs.*setup\.sh"):
        vm.find_kernel(["ip_vs"], boot=boot, modules_root=modules)


def test_guest_script_loads_modules_then_execs_with_the_environment() -> None:
    line = vm.guest_script(["python", "-m", "pytest", "-k", "a b"], ["ip_vs"], "/work/x y",
                           {"KPROXY_IN_VM": "1"})
    words = shlex.split(line)
    assert words[:3] == ["cd", "/work/x y", "&&"]
    assert words[3:6] == ["modprobe", "ip_vs", "&&"]
    assert words[6:] == ["exec", "env", "KPROXY_IN_VM=1", "python", "-m", "pytest", "-k", "a b"]
    assert vm.guest_env()[vm.IN_VM_ENV] == "1"


def test_paths_under_guest_tmpfs_are_shared_explicitly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    assert vm.hidden_in_guest("/tmp/checkout") and vm.hidden_in_guest("/var/tmp")
    assert not vm.hidden_in_guest("/work/main") and not vm.hidden_in_guest("/tmpfoo")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    fake_vng(tmp_path, monkeypatch, 'echo "ARGS $*"')
    assert vm.run_in_vm(["true"], kernel="/boot/none", cwd=str(checkout), timeout=20) == 0
    args = next(line for line in capfd.readouterr().out.splitlines() if line.startswith("ARGS"))
    assert f"--rodir={os.path.realpath(checkout)}" in args.split()
    assert "--rodir=/work" not in args


def fake_vng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("vng", body), ("qemu-system-x86_64", "exit 0")):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{text}\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def test_runner_relays_output_and_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    # A helper left holding the output pipe (as virtiofsd may) must not keep the runner.
    fake_vng(tmp_path, monkeypatch, "echo '3 passed in 1s'; sleep 30 & exit 3")
    assert vm.run_in_vm(["true"], kernel="/boot/none", cwd="/", timeout=20) == 3
    out, err = capfd.readouterr()
    assert "3 passed in 1s" in out and "vm: command exited 3" in err


def test_runner_kills_the_vm_on_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    fake_vng(tmp_path, monkeypatch, "echo booting; exec sleep 30")
    assert vm.run_in_vm(["true"], kernel="/boot/none", cwd="/", timeout=1) == 124
    out, err = capfd.readouterr()
    assert "booting" in out and "timed out after 1s" in err
