"""Cascade over a key cut into frames reconciled one after another (bounded memory).

Bob's Cascade state costs about 50 bytes per key bit at 4 passes (``reconciler``: 2.5 bytes per
position of every pass, the permutations of every pass with their inverses, the pass 0 <-> 1
map), so a key of 10^7 bits would need about 0.5 GB for it alone. With ``max_frame_bits`` > 0 a
key longer than that is cut into the fewest frames of at most ``max_frame_bits`` bits, of equal
length but the last (``frame_bounds``), and each frame is one Cascade exchange of its own, with
the seed ``frame_seed(seed, i)``, run after the previous frame's. Only one frame's state is held:
a finished frame's permutations leave the permutation cache too (its seed never recurs).

On the wire nothing changes: the queries of frame i + 1 follow those of frame i, each frame
numbering its rounds from 0; Alice moves to the next frame when a query of round 0 arrives
after her current frame answered at least one round. Both nodes must use the same
``max_frame_bits`` (``[postprocess] cascade_frame_bits``): otherwise the queries do not fit
Alice's frames (ProtocolError) or the keys fail verification. ``max_frame_bits`` = 0, or a key
of at most ``max_frame_bits`` bits, is one frame with the block's own seed: exactly plain
Cascade.

Every parity Alice sends is counted as before (the sum over frames), and Bob discloses the sum
of the errors corrected in all frames once.
"""

from __future__ import annotations

import hashlib
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.cascade.messages import ParityAnswer, ParityQuery
from qkdnode.postprocess.cascade.permutation import check_seed, forget_permutations
from qkdnode.postprocess.cascade.reconciler import CascadeReconciler
from qkdnode.postprocess.cascade.responder import CascadeResponder, check_frame_bits
from qkdnode.postprocess.cascade.variants import CascadeVariant

FRAME_SEED_DOMAIN: Final = b"qkdnode/cascade/frame/v1"


def frame_bounds(n: int, max_frame_bits: int) -> list[tuple[int, int]]:
    """[start, end) of each frame of an ``n``-bit key: one frame if ``max_frame_bits`` is 0
    or at least ``n``, else ceil(n / max_frame_bits) frames of ceil(n / frames) bits, the last
    one shorter."""
    if n < 1 or max_frame_bits < 0:
        raise ValueError("n >= 1 and max_frame_bits >= 0")
    if max_frame_bits == 0 or n <= max_frame_bits:
        return [(0, n)]
    frames = -(-n // max_frame_bits)
    size = -(-n // frames)
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def frame_seed(seed: bytes, index: int) -> bytes:
    """The 32-byte Cascade seed of frame ``index``: the block's seed for frame 0, else
    SHA-256(FRAME_SEED_DOMAIN || seed || index as 4 bytes, little-endian)."""
    check_seed(seed)
    if index == 0:
        return seed
    return hashlib.sha256(FRAME_SEED_DOMAIN + seed + index.to_bytes(4, "little")).digest()


class FramedReconciler:
    """Bob's Cascade over the frames of his key, one ``CascadeReconciler`` at a time (the
    ``CascadeReconciler`` interface: ``next_query`` / ``receive_answer`` until done)."""

    def __init__(
        self,
        bits: NDArray[np.uint8],
        *,
        seed: bytes,
        variant: CascadeVariant,
        qber_estimate: float,
        max_frame_bits: int,
    ) -> None:
        self._bits = check_frame_bits(bits)
        self._seed = check_seed(seed)
        self._variant = variant
        self._q = qber_estimate
        self._bounds = frame_bounds(int(bits.shape[0]), max_frame_bits)
        self._corrected: list[NDArray[np.uint8]] = []
        self._done_errors = 0
        self._done_parity_bits = 0
        self._done_round_trips = 0
        self._current: CascadeReconciler | None = self._frame(0)

    def _frame(self, index: int) -> CascadeReconciler:
        start, end = self._bounds[index]
        return CascadeReconciler(
            self._bits[start:end],
            seed=frame_seed(self._seed, index),
            variant=self._variant,
            qber_estimate=self._q,
        )

    @property
    def frames(self) -> int:
        return len(self._bounds)

    @property
    def finished(self) -> bool:
        return self._current is None

    @property
    def errors_corrected(self) -> int:
        current = 0 if self._current is None else self._current.errors_corrected
        return self._done_errors + current

    @property
    def parity_bits_received(self) -> int:
        current = 0 if self._current is None else self._current.parity_bits_received
        return self._done_parity_bits + current

    @property
    def round_trips(self) -> int:
        current = 0 if self._current is None else self._current.round_trips
        return self._done_round_trips + current

    @property
    def corrected_bits(self) -> NDArray[np.uint8]:
        """Bob's bits with every correction so far applied (a copy)."""
        parts = list(self._corrected)
        done = sum(part.shape[0] for part in parts)
        if self._current is not None:
            parts.append(self._current.corrected_bits)
            done += parts[-1].shape[0]
        parts.append(self._bits[done:])
        return np.concatenate(parts).astype(np.uint8, copy=False)

    def next_query(self) -> ParityQuery | None:
        """The current frame's query; the next frame starts when one finishes; None at the end."""
        while self._current is not None:
            query = self._current.next_query()
            if query is not None:
                return query
            finished = self._current
            self._corrected.append(finished.corrected_bits)
            self._done_errors += finished.errors_corrected
            self._done_parity_bits += finished.parity_bits_received
            self._done_round_trips += finished.round_trips
            index = len(self._corrected)
            self._current = None  # its state is freed before the next frame's is made
            start, end = self._bounds[index - 1]
            forget_permutations(frame_seed(self._seed, index - 1), end - start)
            if index < len(self._bounds):
                self._current = self._frame(index)
        return None

    def receive_answer(self, answer: ParityAnswer) -> None:
        if self._current is None:
            raise ProtocolError("no query is outstanding", field="round_index")
        self._current.receive_answer(answer)

    def __repr__(self) -> str:
        return (
            f"FramedReconciler(frames={self.frames}, done={len(self._corrected)}, "
            f"round_trips={self.round_trips}, parity_bits_received={self.parity_bits_received})"
        )


class FramedResponder:
    """Alice's Cascade over the frames of her key, one ``CascadeResponder`` at a time."""

    def __init__(
        self,
        bits: NDArray[np.uint8],
        *,
        seed: bytes,
        variant: CascadeVariant,
        max_frame_bits: int,
    ) -> None:
        self._bits = check_frame_bits(bits)
        self._seed = check_seed(seed)
        self._variant = variant
        self._bounds = frame_bounds(int(bits.shape[0]), max_frame_bits)
        self._index = 0
        self._done_rounds = 0
        self._done_parity_bits = 0
        self._current = self._frame(0)

    def _frame(self, index: int) -> CascadeResponder:
        start, end = self._bounds[index]
        return CascadeResponder(
            self._bits[start:end], seed=frame_seed(self._seed, index), variant=self._variant
        )

    @property
    def frames(self) -> int:
        return len(self._bounds)

    @property
    def frames_started(self) -> int:
        return self._index + 1

    @property
    def rounds_answered(self) -> int:
        return self._done_rounds + self._current.rounds_answered

    @property
    def parity_bits_sent(self) -> int:
        return self._done_parity_bits + self._current.parity_bits_sent

    def answer(self, query: ParityQuery) -> ParityAnswer:
        """Alice's parities; a query of round 0 after answered rounds opens the next frame."""
        if (
            isinstance(query, ParityQuery)
            and query.round_index == 0
            and self._current.rounds_answered > 0
        ):
            if self._index + 1 >= len(self._bounds):
                raise ProtocolError("a query after the last frame", field="round_index")
            self._done_rounds += self._current.rounds_answered
            self._done_parity_bits += self._current.parity_bits_sent
            start, end = self._bounds[self._index]
            forget_permutations(frame_seed(self._seed, self._index), end - start)
            self._index += 1
            self._current = self._frame(self._index)
        return self._current.answer(query)

    def __repr__(self) -> str:
        return (
            f"FramedResponder(frames={self.frames}, frame={self._index}, "
            f"rounds_answered={self.rounds_answered})"
        )
