"""Cascade error reconciliation as two sans-IO roles (numpy and numba kernels, no I/O).

Bob's ``CascadeReconciler`` asks parity questions, Alice's ``CascadeResponder`` answers; all the
questions of one round travel in one ``ParityQuery``, answered by one ``ParityAnswer``::

    responder = CascadeResponder(alice_bits, seed=seed, variant=variant)
    reconciler = CascadeReconciler(bob_bits, seed=seed, variant=variant, qber_estimate=q)
    while (query := reconciler.next_query()) is not None:
        reconciler.receive_answer(responder.answer(query))

``reconciler.parity_bits_received == responder.parity_bits_sent`` is the reconciliation leak.

The roles' hot loops are numba kernels (``cascade.kernels``), compiled on first use and cached on
disk; ``cascade.warmup.compile_kernels`` compiles them ahead of the first frame.
"""

from qkdnode.postprocess.cascade.messages import ParityAnswer, ParityQuery
from qkdnode.postprocess.cascade.permutation import cascade_permutation
from qkdnode.postprocess.cascade.reconciler import CascadeReconciler
from qkdnode.postprocess.cascade.responder import CascadeResponder
from qkdnode.postprocess.cascade.variants import CascadeVariant

__all__ = [
    "CascadeReconciler",
    "CascadeResponder",
    "CascadeVariant",
    "ParityAnswer",
    "ParityQuery",
    "cascade_permutation",
]
