"""Alice's side of Cascade: answers parity queries, nothing else (sans-IO; numba kernels)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.cascade import kernels
from qkdnode.postprocess.cascade.messages import ParityAnswer, ParityQuery
from qkdnode.postprocess.cascade.permutation import MAX_BITS, cascade_permutation, check_seed
from qkdnode.postprocess.cascade.variants import CascadeVariant


def check_frame_bits(bits: NDArray[np.uint8], field: str = "bits") -> NDArray[np.uint8]:
    """Raise ProtocolError unless ``bits`` is a non-empty 1-D uint8 array of 0/1."""
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint8 or bits.ndim != 1:
        raise ProtocolError("expected a 1-D numpy uint8 array", field=field)
    if not 1 <= bits.shape[0] <= MAX_BITS:
        raise ProtocolError(f"length must be in [1, {MAX_BITS}]", field=field)
    if int(bits.max()) > 1:
        raise ProtocolError("values must be 0 or 1", field=field)
    return bits


class CascadeResponder:
    """Answers Bob's parity queries over Alice's frame.

    Needs only the bits, the 32-byte seed and the variant (for the number of passes). Queries
    must arrive with round_index 0, 1, 2, ...; a malformed or out-of-range query raises
    ProtocolError(field=...) and changes no state. ``parity_bits_sent`` counts every parity bit
    of every answer: the disclosure to record in the leakage ledger.
    """

    def __init__(self, bits: NDArray[np.uint8], *, seed: bytes, variant: CascadeVariant) -> None:
        self._bits = check_frame_bits(bits).copy()
        self._seed = check_seed(seed)
        if not isinstance(variant, CascadeVariant):
            raise ProtocolError("must be a CascadeVariant", field="variant")
        self._variant = variant
        # Prefix parity of every pass, pass p at [p * (n + 1), (p + 1) * (n + 1)), computed on
        # first use: a whole round of ranges is then answered by one gather, whatever the pass.
        n = self.n_bits
        self._prefix_all = np.zeros(variant.passes * (n + 1), dtype=np.uint8)
        self._prefix_ready = np.zeros(variant.passes, dtype=np.bool_)
        self._next_round = 0
        self.parity_bits_sent = 0

    @property
    def n_bits(self) -> int:
        return int(self._bits.shape[0])

    @property
    def rounds_answered(self) -> int:
        return self._next_round

    def __repr__(self) -> str:  # never the bits or the seed
        return (
            f"CascadeResponder(n_bits={self.n_bits}, variant={self._variant.value}, "
            f"rounds_answered={self._next_round}, parity_bits_sent={self.parity_bits_sent})"
        )

    def _pass_prefix(self, pass_index: int) -> NDArray[np.uint8]:
        n = self.n_bits
        prefix = self._prefix_all[pass_index * (n + 1) : (pass_index + 1) * (n + 1)]
        if not self._prefix_ready[pass_index]:
            kernels.responder_prefix(
                self._bits, cascade_permutation(self._seed, n, pass_index), prefix
            )
            self._prefix_ready[pass_index] = True
        return prefix

    def answer(self, query: ParityQuery) -> ParityAnswer:
        """Alice's parities for ``query``; ProtocolError on a wrong round or a bad request."""
        if not isinstance(query, ParityQuery):
            raise ProtocolError("expected a ParityQuery", field="query")
        if query.round_index != self._next_round:
            raise ProtocolError(
                f"expected round {self._next_round}, got {query.round_index}", field="round_index"
            )
        n = self.n_bits
        tops, ranges, total = query.validate(n, self._variant.passes)
        out = np.empty(total, dtype=np.uint8)
        asked = np.zeros(self._variant.passes, dtype=np.bool_)
        asked[tops[:, 0]] = True
        asked[ranges[:, 0]] = True
        for pass_index in np.flatnonzero(asked & ~self._prefix_ready).tolist():
            self._pass_prefix(pass_index)
        kernels.responder_answer(self._prefix_all, n, tops, ranges, out)
        self._next_round += 1
        self.parity_bits_sent += total
        return ParityAnswer.from_bits(round_index=query.round_index, bits=out)
