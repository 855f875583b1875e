"""Compile (or load from numba's cache) the kernels of the Cascade roles ahead of the first frame.

Compiling every kernel of both roles costs a process a few seconds of CPU the first time on a
machine (docs/benchmarks.md, the ``jit`` rows); loading them from a filled cache well under a
second. A node can call ``compile_kernels`` in a worker thread at start-up, so that the first
block does not wait for the compiler: numba compiles under its own lock, so a frame run meanwhile
in another thread waits for a kernel still compiling, or uses it compiled.
"""

from __future__ import annotations

import numpy as np

from qkdnode.postprocess.cascade.reconciler import CascadeReconciler
from qkdnode.postprocess.cascade.responder import CascadeResponder
from qkdnode.postprocess.cascade.variants import CascadeVariant

# A frame long enough for every code path of every variant (weighted and 4-way cuts, deduced
# errors), short enough to run in milliseconds once compiled.
_FRAME_BITS = 40_000
_QBER = 0.05


def compile_kernels(variants: tuple[CascadeVariant, ...] = tuple(CascadeVariant)) -> None:
    """Run one fixed small frame of each variant through both roles (deterministic, no I/O)."""
    rng = np.random.default_rng(20_251_204)
    alice = rng.integers(0, 2, _FRAME_BITS, dtype=np.uint8)
    bob = alice ^ (rng.random(_FRAME_BITS) < _QBER).astype(np.uint8)
    seed = bytes(range(32))
    for variant in variants:
        responder = CascadeResponder(alice, seed=seed, variant=variant)
        reconciler = CascadeReconciler(bob, seed=seed, variant=variant, qber_estimate=_QBER)
        while (query := reconciler.next_query()) is not None:
            reconciler.receive_answer(responder.answer(query))
