"""Every distribution in the tree builds to a wheel and an sdist with the metadata its
pyproject.toml declares, and kproxy-core plus one mode plugin, installed from those wheels into
a clean virtualenv, make a working ``kproxy`` that sees that mode and no other.

Slow (it creates two virtualenvs and builds every distribution in isolation); needs the package
index for build requirements and dependencies, as any pip install does.
"""

from __future__ import annotations

import configparser
import email.parser
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = sorted(p for p in (ROOT / "plugins").glob("kproxy-*")
                     if (p / "pyproject.toml").exists())
DISTS: dict[str, Path] = {"kproxy-core": ROOT, **{p.name: p for p in PLUGIN_DIRS}}
#: The plugin installed alone with the core in the clean venv (the brief's choice: its native
#: dependency, pyroute2, is also the core's, so the install is light).
SOLO_PLUGIN = "kproxy-ipvs"


#: The clean venv must see only what is installed in it, whatever the calling env says.
_CLEAN_ENV = {k: v for k, v in os.environ.items()
              if k not in ("PYTHONPATH", "KPROXY_DISABLE_PLUGIN_AUTOLOAD", "VIRTUAL_ENV")}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # cwd "/": with the source tree as cwd, `python -c` would import kproxy_core from there.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False,
                          env=_CLEAN_ENV, cwd="/")
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _venv(path: Path) -> Path:
    _run([sys.executable, "-m", "venv", str(path)])
    return path / "bin" / "python"


def _project(dist: str) -> dict[str, Any]:
    with open(DISTS[dist] / "pyproject.toml", "rb") as f:
        project: dict[str, Any] = tomllib.load(f)["project"]
    return project


def _normalized(name: str) -> str:
    return name.replace("-", "_")


class Builder:
    """Builds each distribution once per test module, on first use, so that one broken
    distribution fails its own tests only."""

    def __init__(self, tmp: Path) -> None:
        self.tools = _venv(tmp / "tools")
        _run([str(self.tools), "-m", "pip", "install", "-q", "build"])
        self.out = tmp / "dist"
        self._built: dict[str, tuple[Path, Path]] = {}

    def artifacts(self, dist: str) -> tuple[Path, Path]:
        """(wheel, sdist) of ``dist``."""
        if dist not in self._built:
            out = self.out / dist
            _run([str(self.tools), "-m", "build", "--sdist", "--wheel", "--outdir", str(out),
                  str(DISTS[dist])])
            version = _project(dist)["version"]
            wheels = list(out.glob(f"{_normalized(dist)}-{version}-*.whl"))
            sdists = list(out.glob(f"{_normalized(dist)}-{version}.tar.gz"))
            assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
            self._built[dist] = (wheels[0], sdists[0])
        return self._built[dist]


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory) -> Builder:
    return Builder(tmp_path_factory.mktemp("packaging"))


def _wheel_file(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix) and ".dist-info/" in n]
        assert len(names) == 1, (suffix, zf.namelist())
        return zf.read(names[0]).decode()


def dist_params() -> Iterator[Any]:
    for dist in DISTS:
        yield pytest.param(dist, id=dist)


def test_every_mode_plugin_is_in_the_tree() -> None:
    assert {p.name for p in PLUGIN_DIRS} >= {"kproxy-iptables", "kproxy-userspace", "kproxy-ipvs"}


@pytest.mark.parametrize("dist", list(dist_params()))
def test_metadata_matches_pyproject(builder: Builder, dist: str) -> None:
    project = _project(dist)
    wheel, sdist = builder.artifacts(dist)
    meta = email.parser.Parser().parsestr(_wheel_file(wheel, "/METADATA"))
    assert meta["Name"] == dist
    assert meta["Version"] == project["version"]
    assert meta["Summary"] == project["description"] and meta["Summary"].strip()
    license_ = meta["License-Expression"] or meta["License"]
    assert license_ == project["license"], license_
    assert meta["Requires-Python"] == project["requires-python"]
    assert str(meta.get_payload()).strip(), "the long description (README) is empty"
    requires = meta.get_all("Requires-Dist") or []
    if dist != "kproxy-core":
        # A plugin depends on the core and never on another plugin.
        assert any(r.startswith("kproxy-core") for r in requires), requires
        others = [r for r in requires
                  if r.startswith("kproxy-") and not r.startswith("kproxy-core")]
        assert not others, others
    with tarfile.open(sdist) as tf:
        top = f"{_normalized(dist)}-{project['version']}"
        names = set(tf.getnames())
        assert f"{top}/pyproject.toml" in names and f"{top}/PKG-INFO" in names, sorted(names)[:20]


@pytest.mark.parametrize("dist", list(dist_params()))
def test_entry_points(builder: Builder, dist: str) -> None:
    project = _project(dist)
    wheel, _ = builder.artifacts(dist)
    parser = configparser.ConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(_wheel_file(wheel, "/entry_points.txt"))
    except AssertionError:
        parser.read_string("")
    declared = project.get("entry-points", {}).get("kproxy", {})
    in_wheel = dict(parser["kproxy"]) if parser.has_section("kproxy") else {}
    assert in_wheel == declared
    if dist == "kproxy-core":
        assert dict(parser["console_scripts"]) == {"kproxy": "kproxy_core.cli:main"}
    else:
        # One plugin module per distribution, named after the mode it brings.
        mode = dist.removeprefix("kproxy-")
        assert list(in_wheel) == [mode], in_wheel


def test_core_and_one_plugin_from_wheels(builder: Builder, tmp_path: Path) -> None:
    assert SOLO_PLUGIN in DISTS, f"{SOLO_PLUGIN} is not in the tree"
    core_wheel, _ = builder.artifacts("kproxy-core")
    plugin_wheel, _ = builder.artifacts(SOLO_PLUGIN)
    python = _venv(tmp_path / "clean")
    # Wheel files by path, so nothing of the same name can come from an index instead.
    _run([str(python), "-m", "pip", "install", "-q", str(core_wheel), str(plugin_wheel)])
    kproxy = str(python.parent / "kproxy")
    mode = SOLO_PLUGIN.removeprefix("kproxy-")

    helped = _run([kproxy, f"--proxy-mode={mode}", "--help"])
    assert "--proxy-mode" in helped.stdout
    assert f"--{mode}-" in helped.stdout, "the mode's own flags are missing from --help"

    listed = _run([kproxy, "plugins"]).stdout
    modes_section = listed.split("modes:", 1)[1].split("algorithms:", 1)[0]
    listed_modes = {line.split()[0] for line in modes_section.strip().splitlines()}
    assert listed_modes == {mode}, listed
    assert SOLO_PLUGIN in listed

    # Installed from wheels, not from the source tree.
    where = _run([str(python), "-c", "import kproxy_core; print(kproxy_core.__file__)"])
    assert str(tmp_path / "clean") in where.stdout
