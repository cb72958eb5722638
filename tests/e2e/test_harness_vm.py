"""The harness's behaviour in the ipvs VM: one timeout factor, and no silent skip of a mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from e2e_harness import mode_problem, must_not_skip

from kproxy_core.testing.timescale import VM_TIME_SCALE
from kproxy_core.testing.timescale import time_scale as _time_scale


def test_time_scale_is_one_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KPROXY_IN_VM", raising=False)
    monkeypatch.delenv("KPROXY_E2E_TIME_SCALE", raising=False)
    assert _time_scale() == 1.0


def test_time_scale_in_the_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPROXY_IN_VM", "1")
    monkeypatch.delenv("KPROXY_E2E_TIME_SCALE", raising=False)
    assert _time_scale() == VM_TIME_SCALE > 1


def test_time_scale_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPROXY_IN_VM", "1")
    monkeypatch.setenv("KPROXY_E2E_TIME_SCALE", "2.5")
    assert _time_scale() == 2.5


@pytest.mark.parametrize("raw", ["fast", "0.5"])
def test_time_scale_rejects_bad_values(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("KPROXY_E2E_TIME_SCALE", raw)
    with pytest.raises(ValueError, match="KPROXY_E2E_TIME_SCALE"):
        _time_scale()


def test_missing_ipvs_fails_in_the_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    import e2e_harness

    monkeypatch.setattr(e2e_harness, "_module_available", lambda name: False)
    monkeypatch.setattr(Path, "exists", lambda self: False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("KPROXY_IN_VM", "1")
    problem = mode_problem("ipvs")
    assert problem is not None and problem[1] is True and must_not_skip()
    monkeypatch.delenv("KPROXY_IN_VM")
    problem = mode_problem("ipvs")
    assert problem is not None and problem[1] is False and not must_not_skip()


# -- the interpreter's trees in the guest's RAM (kproxy_core.testing.vm) -----------------------


def test_python_trees_are_the_stdlib_then_site_packages() -> None:
    import sysconfig

    from kproxy_core.testing import vm

    trees = vm.python_trees()
    paths = [path for path, _ in trees]
    assert paths and paths[0] == os.path.realpath(sysconfig.get_paths()["stdlib"]), trees
    assert all(os.path.isdir(path) for path in paths)
    stdlib_skip = trees[0][1]
    # Never imported in a test run: left out of the copy (still readable over 9p).
    assert "site-packages" in stdlib_skip or not os.path.isdir(
        os.path.join(paths[0], "site-packages"))
    assert all(os.path.isdir(os.path.join(paths[0], name)) for name in stdlib_skip)


def _tree(base: Path) -> Path:
    tree = base / "lib"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "mod.py").write_text("X = 1\n")
    (tree / "big").mkdir()
    (tree / "big" / "unused.py").write_text("Y = 2\n")
    return tree


def test_packed_trees_leave_out_the_skipped_and_are_removed(tmp_path: Path) -> None:
    import tarfile

    from kproxy_core.testing import vm

    tree = _tree(tmp_path)
    with vm.host_workdir(root=str(tmp_path / "cache")) as workdir:
        assert workdir is not None
        (tar, path, skip), = vm.pack_trees([(str(tree), ("big",))], workdir)
        assert (path, skip) == (str(tree), ("big",))
        with tarfile.open(tar) as archive:
            names = set(archive.getnames())
        assert "./pkg/mod.py" in names and not any("big" in n for n in names), names
    assert not os.path.exists(tar)


@pytest.mark.root
def test_guest_script_mounts_the_copy_over_the_tree(tmp_path: Path) -> None:
    """The guest's commands, run in a private mount namespace on the host: the tree is served
    from the copy (a file changed in the original after packing is not seen), and what was
    left out is still there, bound from the original."""
    import subprocess

    from kproxy_core.testing import vm

    tree = _tree(tmp_path)
    with vm.host_workdir(root=str(tmp_path / "cache")) as workdir:
        assert workdir is not None
        packed = vm.pack_trees([(str(tree), ("big",))], workdir)
        (tree / "pkg" / "mod.py").write_text("X = 'changed on the host'\n")
        line = vm.guest_script(
            ["sh", "-c", f"cat {tree}/pkg/mod.py {tree}/big/unused.py; mount | grep -c {tree}"],
            [], str(tmp_path), {}, packed, cache_dir=str(tmp_path / "ram"))
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               line], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["X = 1", "Y = 2"], proc.stdout
    assert int(lines[2]) == 2, proc.stdout


def test_guest_script_goes_in_a_file_not_on_the_kernel_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kproxy_core.testing import vm

    for tool in ("vng", "qemu-system-x86_64"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    long_args = ["python", "-m", "pytest", *[f"tests/t{i}.py" for i in range(400)]]
    argv = vm.build_vng_argv(long_args, kernel="/boot/k", modules=["ip_vs"], cwd="/work",
                             memory="2G", cpus=2, kvm=False, env={}, script_dir=str(tmp_path))
    script = tmp_path / "guest.sh"
    assert argv[-2:] == ["--exec", f"sh {script}"]
    assert "tests/t399.py" in script.read_text()
