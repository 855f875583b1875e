"""The pure core imports no I/O library: checked in a fresh interpreter."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import qkdnode.channel
import qkdnode.coordination
import qkdnode.postprocess

PURE_PACKAGES = (qkdnode.postprocess, qkdnode.channel, qkdnode.coordination)
FORBIDDEN = ("trio", "socket", "sqlite3", "asyncio", "serial", "selectors")


def _pure_modules() -> list[str]:
    names = ["qkdnode.errors"]
    for package in PURE_PACKAGES:
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.append(info.name)
    return names


def test_pure_modules_import_no_io_library() -> None:
    modules = _pure_modules()
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(m for m in {FORBIDDEN!r} if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "", f"pure core loaded: {result.stdout.strip()}"
