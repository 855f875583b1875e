"""Bob's side of Cascade: asks parity questions in lock step, corrects his bits (sans-IO).

Cascade: Brassard & Salvail, "Secret-key reconciliation by public discussion", EUROCRYPT 1993;
parameters and optimisations as in Martinez-Mateo et al., arXiv:1407.3257.

State per pass (in that pass's permuted order): the *known-parity partition*. It starts as the
top-level blocks; each answered binary-search question (the parity of the left half of a part)
splits a part into two parts with known parity (right = part xor left, derived, never asked).
Bob's parity of a part minus Alice's is its *syndrome*; a part with odd syndrome holds an odd
number of errors. Every round:

1. every odd part of length 1 is a certain error: flip it (deduplicated over passes), update
   the syndromes of the parts holding it in every active pass, repeat until none is left —
   cached answers are re-used for free, nothing is asked;
2. pick the odd parts to search: with sub-block reuse every odd part of every active pass,
   otherwise the first odd part of every odd top-level block (classic Cascade);
3. if there are none, activate the next pass (its top-level parities are already known) or stop;
   else ask the left half of every picked part, all in one query.

Round 0 asks every top-level parity of every pass at once (Alice's parities never change, so
asking early leaks nothing more and saves one round trip per pass). The parity of the whole frame
is known from pass 0, so the last top-level block of every later pass is derived, not asked.
Every question is a distinct parity Bob could not derive: ``parity_bits_received`` equals the
bits Alice sent. Passes activate one after the other as in Cascade: pass p+1 only when no part
of passes 0..p is left to search.

Bob's range parities use a prefix-XOR array per pass over his bits at the last rebuild plus a
sorted array of positions corrected since then (a range's correction is a difference of two
``searchsorted`` counts); the array is rebuilt once the pending list grows long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.cascade.messages import ParityAnswer, ParityQuery, encode_triples
from qkdnode.postprocess.cascade.permutation import (
    cascade_permutation,
    check_seed,
    inverse_permutation,
)
from qkdnode.postprocess.cascade.responder import check_frame_bits, prefix_parity
from qkdnode.postprocess.cascade.variants import CascadeVariant

_EMPTY_INT: Final = np.zeros(0, dtype=np.int64)


@dataclass(slots=True)
class _PassState:
    """One active pass: permutation and known-parity partition (see the module docstring)."""

    block_size: int
    perm: NDArray[np.int32]
    inverse: NDArray[np.int32]
    prefix: NDArray[np.uint8]  # Bob's prefix parity at the last rebuild
    starts: NDArray[np.int64]  # sorted starts of the parts; part i ends at starts[i+1] (or n)
    alice: NDArray[np.uint8]  # Alice's parity of each part
    odd: NDArray[np.bool_]  # syndrome of each part (Bob's parity != Alice's)
    pending: NDArray[np.int64] = field(default_factory=lambda: _EMPTY_INT)  # sorted positions


class CascadeReconciler:
    """Bob's Cascade role over his noisy frame.

    Drive it with ``next_query()`` / ``receive_answer()`` until ``next_query()`` returns None.
    ``qber_estimate`` must be in (0, 0.5) (ValueError otherwise); ``seed`` is Alice's 32 bytes.
    A malformed or unexpected answer raises ProtocolError(field=...) and changes no state.
    """

    def __init__(
        self,
        bits: NDArray[np.uint8],
        *,
        seed: bytes,
        variant: CascadeVariant,
        qber_estimate: float,
    ) -> None:
        self._bits = check_frame_bits(bits).copy()
        self._seed = check_seed(seed)
        if not isinstance(variant, CascadeVariant):
            raise ProtocolError("must be a CascadeVariant", field="variant")
        self._variant = variant
        self._n = int(self._bits.shape[0])
        self._block_sizes = variant.block_sizes(qber_estimate, self._n)
        # Rebuilding a prefix costs ~n; merging the pending list ~len(pending): balance the two.
        self._rebuild_after = max(256, math.isqrt(self._n) * 8)
        self._top_alice: list[NDArray[np.uint8]] = []
        self._passes: list[_PassState] = []
        self._round = 0
        self._query: ParityQuery | None = None
        self._expected_bits = 0
        self._planned: list[tuple[int, NDArray[np.int64], NDArray[np.int64]]] = []
        self._finished = False
        self.errors_corrected = 0
        self.parity_bits_received = 0
        self.round_trips = 0
        self._query = self._top_level_query()

    # ---------------------------------------------------------------- public
    @property
    def corrected_bits(self) -> NDArray[np.uint8]:
        """Bob's bits with every correction so far applied (a copy)."""
        return self._bits.copy()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return self._block_sizes

    def __repr__(self) -> str:  # never the bits or the seed
        return (
            f"CascadeReconciler(n_bits={self._n}, variant={self._variant.value}, "
            f"round_trips={self.round_trips}, parity_bits_received={self.parity_bits_received}, "
            f"finished={self._finished})"
        )

    def next_query(self) -> ParityQuery | None:
        """The query of the current round (the same object until answered), or None when done."""
        if self._finished:
            return None
        return self._query

    def receive_answer(self, answer: ParityAnswer) -> None:
        """Apply Alice's answer to the outstanding query, then plan the next round."""
        if not isinstance(answer, ParityAnswer):
            raise ProtocolError("expected a ParityAnswer", field="answer")
        if self._finished or self._query is None:
            raise ProtocolError("no query is outstanding", field="round_index")
        if answer.round_index != self._round:
            raise ProtocolError(
                f"expected round {self._round}, got {answer.round_index}", field="round_index"
            )
        if answer.count != self._expected_bits:
            raise ProtocolError(
                f"expected {self._expected_bits} parity bits, got {answer.count}", field="count"
            )
        parities = answer.bits()
        if self._round == 0:
            self._receive_top_level(parities)
        else:
            self._receive_splits(parities)
        self.parity_bits_received += answer.count
        self.round_trips += 1
        self._round += 1
        self._query = None
        self._plan()

    # ---------------------------------------------------------------- round 0
    def _top_level_query(self) -> ParityQuery:
        triples = []
        total = 0
        for pass_index, size in enumerate(self._block_sizes):
            blocks = -(-self._n // size)
            count = blocks if pass_index == 0 else blocks - 1
            if count:
                triples.append((pass_index, size, count))
                total += count
        self._expected_bits = total
        return ParityQuery(
            round_index=0, top_blocks=encode_triples(np.array(triples, dtype=np.int64))
        )

    def _receive_top_level(self, parities: NDArray[np.uint8]) -> None:
        blocks0 = -(-self._n // self._block_sizes[0])
        first = parities[:blocks0].copy()
        total_parity = np.bitwise_xor.reduce(first)
        self._top_alice = [first]
        offset = blocks0
        for size in self._block_sizes[1:]:
            count = -(-self._n // size) - 1
            tops = np.empty(count + 1, dtype=np.uint8)
            tops[:count] = parities[offset : offset + count]
            # The frame's parity is known: the last block's parity is derived, never asked.
            tops[count] = total_parity ^ np.bitwise_xor.reduce(tops[:count])
            self._top_alice.append(tops)
            offset += count

    # ---------------------------------------------------------------- later rounds
    def _bob_parity(
        self, state: _PassState, starts: NDArray[np.int64], ends: NDArray[np.int64]
    ) -> NDArray[np.uint8]:
        parity = state.prefix[ends] ^ state.prefix[starts]
        if state.pending.shape[0]:
            flips = np.searchsorted(state.pending, ends) - np.searchsorted(state.pending, starts)
            parity ^= (flips & 1).astype(np.uint8)
        return parity

    def _receive_splits(self, parities: NDArray[np.uint8]) -> None:
        offset = 0
        for pass_index, part, middle in self._planned:
            state = self._passes[pass_index]
            left_alice = parities[offset : offset + part.shape[0]]
            offset += part.shape[0]
            left_odd = (left_alice ^ self._bob_parity(state, state.starts[part], middle)).astype(
                np.bool_
            )
            right_alice = state.alice[part] ^ left_alice
            right_odd = state.odd[part] ^ left_odd
            state.alice[part] = left_alice
            state.odd[part] = left_odd
            state.starts = np.insert(state.starts, part + 1, middle)
            state.alice = np.insert(state.alice, part + 1, right_alice)
            state.odd = np.insert(state.odd, part + 1, right_odd)
        self._planned = []

    def _activate(self, pass_index: int) -> None:
        size = self._block_sizes[pass_index]
        perm = cascade_permutation(self._seed, self._n, pass_index)
        prefix = prefix_parity(self._bits, perm)
        starts = np.arange(0, self._n, size, dtype=np.int64)
        ends = np.minimum(starts + size, self._n)
        alice = self._top_alice[pass_index]
        odd = (alice ^ prefix[ends] ^ prefix[starts]).astype(np.bool_)
        self._passes.append(
            _PassState(
                block_size=size,
                perm=perm,
                inverse=inverse_permutation(perm),
                prefix=prefix,
                starts=starts,
                alice=alice,
                odd=odd,
            )
        )

    def _part_ends(self, state: _PassState, part: NDArray[np.int64]) -> NDArray[np.int64]:
        nxt = part + 1
        ends = np.full(part.shape[0], self._n, dtype=np.int64)
        inside = nxt < state.starts.shape[0]
        ends[inside] = state.starts[nxt[inside]]
        return ends

    def _correct(self, positions: NDArray[np.int64]) -> None:
        """Flip Bob's bits at original ``positions`` (distinct) and update every active pass."""
        self._bits[positions] ^= 1
        self.errors_corrected += int(positions.shape[0])
        for state in self._passes:
            permuted = np.sort(state.inverse[positions].astype(np.int64))
            part = np.searchsorted(state.starts, permuted, side="right") - 1
            touched, hits = np.unique(part, return_counts=True)
            state.odd[touched[(hits & 1) == 1]] ^= True
            if state.pending.shape[0] + permuted.shape[0] > self._rebuild_after:
                state.prefix = prefix_parity(self._bits, state.perm)
                state.pending = _EMPTY_INT
            else:
                state.pending = np.sort(np.concatenate((state.pending, permuted)))

    def _fix_known_errors(self) -> None:
        """Flip every bit that is an odd part of length 1 in some pass, until none is left."""
        while True:
            found = []
            for state in self._passes:
                part = np.flatnonzero(state.odd)
                if part.shape[0]:
                    single = (self._part_ends(state, part) - state.starts[part]) == 1
                    if bool(single.any()):
                        found.append(state.perm[state.starts[part[single]]].astype(np.int64))
            if not found:
                return
            self._correct(np.unique(np.concatenate(found)))

    def _select(self, state: _PassState) -> NDArray[np.int64]:
        """Indices of the parts of this pass to binary-search this round."""
        part = np.flatnonzero(state.odd).astype(np.int64)
        if part.shape[0] == 0 or self._variant.sub_block_reuse:
            return part
        # Classic Cascade: search an odd top-level block through its first odd part.
        block = state.starts[part] // state.block_size
        _, first, count = np.unique(block, return_index=True, return_counts=True)
        chosen: NDArray[np.int64] = part[first[(count & 1) == 1]]
        return chosen

    def _plan(self) -> None:
        while True:
            self._fix_known_errors()
            planned = []
            triples = []
            for pass_index, state in enumerate(self._passes):
                part = self._select(state)
                if part.shape[0] == 0:
                    continue
                starts = state.starts[part]
                middle = (starts + self._part_ends(state, part)) // 2
                planned.append((pass_index, part, middle))
                triples.append(
                    np.column_stack((np.full(part.shape[0], pass_index), starts, middle))
                )
            if planned:
                self._planned = planned
                self._expected_bits = sum(p[1].shape[0] for p in planned)
                self._query = ParityQuery(
                    round_index=self._round, ranges=encode_triples(np.concatenate(triples))
                )
                return
            if len(self._passes) < len(self._block_sizes):
                self._activate(len(self._passes))
                continue
            self._finished = True
            self._query = None
            return
