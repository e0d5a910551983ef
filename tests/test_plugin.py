"""The twistd plugin: discovery, its contract, and what the built wheel ships."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from zope.interface.verify import verifyObject

from m2mgw import tap

REPO = Path(__file__).resolve().parent.parent


def m2mgw_maker() -> IServiceMaker:
    makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "m2mgw"]
    assert len(makers) == 1, [p.tapname for p in getPlugins(IServiceMaker)]
    return makers[0]


def test_twistd_finds_the_plugin() -> None:
    maker = m2mgw_maker()
    verifyObject(IServiceMaker, maker)
    verifyObject(IPlugin, maker)
    assert maker.options is tap.Options
    assert maker.makeService is tap.makeService
    assert "MGP/1" in maker.description


def test_plugin_module_does_not_import_the_reactor() -> None:
    # twistd -r REACTOR must be able to install its reactor after loading plugins.
    code = (
        "import sys, twisted.plugins.m2mgw_plugin;"
        "print('twisted.internet.reactor' in sys.modules, 'm2mgw.tap' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "False"]


def _bdist_wheel_in_env() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the wheel package."""
    version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    if version >= (70, 1):
        return True
    try:
        importlib.metadata.version("wheel")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
def test_wheel_ships_the_plugin_without_package_markers(tmp_path: Path) -> None:
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache", "*.egg-info")
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("m2mgw", "twisted", "etc", "docs"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, source / name, ignore=ignore)
    # A plugin cache left by an earlier twistd run must not be shipped.
    (source / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
    (source / "m2mgw" / "plugins" / "dropin.cache").write_bytes(b"stale")

    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet"]
    if _bdist_wheel_in_env():
        command.append("--no-build-isolation")
    command += ["--wheel-dir", str(tmp_path / "dist"), str(source)]
    subprocess.run(command, check=True, timeout=300, capture_output=True)

    (wheel,) = (tmp_path / "dist").glob("m2mgw-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/m2mgw_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert {"m2mgw/tap.py", "m2mgw/config.py", "m2mgw/service.py"} <= names
    assert {"m2mgw/modules/udp.py", "m2mgw/apps/listener.py"} <= names
    assert "m2mgw/plugins/__init__.py" in names
