"""Import contracts: the pure modules import no I/O, and no qkdnode module imports itself back.

Pure modules (the protocol core, the configuration, and the pure modules that sit in shell
folders) may import the standard library minus its I/O modules, numpy, msgpack, cryptography, and
other pure qkdnode modules; nothing else. Checked twice: statically on every import statement
(also those inside functions), and in a fresh interpreter that imports them all and must not load
an I/O library.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import qkdnode

ROOT = Path(qkdnode.__file__).resolve().parent
PURE_PACKAGES = (
    "qkdnode.audit",
    "qkdnode.channel",
    "qkdnode.coordination",
    "qkdnode.postprocess",
    "qkdnode.config",
    "qkdnode.relay",
)
PURE_MODULES = (
    "qkdnode",
    "qkdnode.errors",
    "qkdnode.link",
    "qkdnode.link.interface",
    "qkdnode.link.physics",
    "qkdnode.link.fibre",
    "qkdnode.link.serialproto",
    "qkdnode.link.serialrecords",
    "qkdnode.delivery",
    "qkdnode.delivery.api",
    "qkdnode.delivery.fairuse",
)
IO_MODULES = frozenset(
    {
        "trio",
        "socket",
        "ssl",
        "sqlite3",
        "asyncio",
        "selectors",
        "select",
        "termios",
        "tty",
        "pty",
        "fcntl",
        "subprocess",
        "threading",
        "signal",
        "http",
        "urllib.request",
        "h11",
        "structlog",
        "logging",
        "time",
        "random",
        "shutil",
        "tempfile",
        "prometheus_client",
        "rich",
    }
)
# what a fresh interpreter must not have loaded (time, threading and the like are loaded by
# numpy and cryptography themselves; the static check above keeps pure code from using them)
LOADED_NEVER = ("trio", "socket", "ssl", "sqlite3", "asyncio", "selectors", "termios", "h11")
THIRD_PARTY = frozenset({"numpy", "msgpack", "cryptography", "numba", "pysequoia", "gmpy2"})


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


MODULES = _all_modules()


def _pure() -> list[str]:
    names = [n for n in MODULES if n.startswith(tuple(p + "." for p in PURE_PACKAGES))]
    return sorted({*PURE_PACKAGES, *PURE_MODULES, *names})


def _imports(name: str) -> Iterator[str]:
    """Every module ``name`` imports (``from a import b`` gives ``a.b`` when that is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "__future__":
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}"
                yield child if child in MODULES else base


def _allowed(imported: str, pure: set[str]) -> bool:
    top = imported.partition(".")[0]
    if top == "qkdnode":
        return imported in pure
    if imported in IO_MODULES or top in IO_MODULES:
        return False
    return top in THIRD_PARTY or top in sys.stdlib_module_names


def test_every_listed_pure_module_exists() -> None:
    assert set(_pure()) <= set(MODULES)


def test_pure_modules_import_only_pure_modules_and_no_io() -> None:
    pure = set(_pure())
    bad = [
        f"{name} imports {imported}"
        for name in sorted(pure)
        for imported in _imports(name)
        if not _allowed(imported, pure)
    ]
    assert bad == []


def test_the_config_package_imports_nothing_of_the_node_but_errors() -> None:
    config = [name for name in MODULES if name.startswith("qkdnode.config")]
    bad = [
        f"{name} imports {imported}"
        for name in config
        for imported in _imports(name)
        if imported.startswith("qkdnode")
        and imported != "qkdnode.errors"
        and not imported.startswith("qkdnode.config")
    ]
    assert config and bad == []


def test_pure_modules_load_no_io_library_in_a_fresh_interpreter() -> None:
    modules = _pure()
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(m for m in {LOADED_NEVER!r} if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "", f"pure modules loaded: {result.stdout.strip()}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_qkdnode_modules() -> None:
    graph = {name: {i for i in _imports(name) if i in MODULES and i != name} for name in MODULES}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
