"""Compiled kernels with numba, compiled lazily on first call and cached on disk.

``@kernel`` marks a function called from Python, ``@helper`` a function only called from
kernels of the same module. Nothing is imported or compiled when a module is imported: importing
numba loads ``socket`` (through ``importlib.metadata``), which the pure core never loads at
import, and compiling every kernel up front would cost a node that uses few of them seconds at
start-up. The first call of a kernel imports numba, compiles that kernel (and, inside it, the
helpers it calls) with ``njit(cache=True, nogil=True)`` and keeps the dispatcher.

Compiled code is cached in numba's cache directory (``NUMBA_CACHE_DIR``; by default
``__pycache__`` beside the module, which must then be writable; the systemd unit points it at the
node's state directory). ``NUMBA_DISABLE_JIT=1`` runs every kernel as plain Python.

Kernels are plain computation on numpy arrays and scalars: no I/O, no clock, no global state.
Each is checked bit-exact against a reference implementation in the tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

_HELPER_MARK = "__qkdnode_jit_helper__"


def helper(function: F) -> F:
    """Mark ``function`` as called from kernels: compiled into its module with the first kernel."""
    setattr(function, _HELPER_MARK, True)
    return function


def _compile(function: Callable[..., Any]) -> Callable[..., Any]:
    import numba  # lazily: see the module docstring
    from numba.extending import is_jitted

    jit = numba.njit(cache=True, nogil=True)
    module_globals = function.__globals__
    # Helpers are looked up in the module's globals when a kernel is compiled: replace each by
    # its (lazily compiled) dispatcher first.
    for name, value in list(module_globals.items()):
        if callable(value) and getattr(value, _HELPER_MARK, False) and not is_jitted(value):
            module_globals[name] = jit(value)
    dispatcher: Callable[..., Any] = jit(function)
    return dispatcher


def kernel(function: F) -> F:
    """Compile ``function`` with numba on its first call (see the module docstring).

    The plain Python function stays reachable as ``.py_func`` (tests, debugging).
    """
    compiled: list[Callable[..., Any]] = []

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        if not compiled:
            compiled.append(_compile(function))
        return compiled[0](*args)

    call.py_func = function  # type: ignore[attr-defined]
    return cast(F, call)
