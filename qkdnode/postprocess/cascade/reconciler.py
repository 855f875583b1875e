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

Implementation: all active passes live in one *global* position space, position ``i`` of pass
``p`` being ``p * n + i``, so one round costs a fixed number of numpy calls whatever the number
of passes: one sorted array of part starts (with Alice's parity and the syndrome of each part),
one prefix-XOR array of Bob's permuted bits over all passes (taken when each pass is activated),
and one sorted array of the global positions corrected since then — a range's correction is a
difference of two ``searchsorted`` counts, never a rebuilt prefix.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.cascade.messages import ParityAnswer, ParityQuery, encode_triples
from qkdnode.postprocess.cascade.permutation import cascade_permutation, check_seed
from qkdnode.postprocess.cascade.responder import check_frame_bits
from qkdnode.postprocess.cascade.variants import CascadeVariant

_EMPTY_INT: Final = np.zeros(0, dtype=np.int64)


def _insert_after(
    arrays: tuple[NDArray[Any], ...], after: NDArray[np.int64], values: tuple[NDArray[Any], ...]
) -> list[NDArray[Any]]:
    """Insert ``values[i][j]`` right after row ``after[j]`` of ``arrays[i]`` (``after`` sorted).

    O(len) per array, like np.insert, but with the index work shared by the arrays; few rows
    (the long tail of rounds) are spliced by memcpy, many by one boolean mask.
    """
    count = after.shape[0]
    if count <= 32:
        cuts = (after + 1).tolist()
        merged = []
        for array, value in zip(arrays, values, strict=True):
            pieces = np.split(array, cuts)
            spliced = [pieces[0]]
            for j in range(count):
                spliced += [value[j : j + 1], pieces[j + 1]]
            merged.append(np.concatenate(spliced))
        return merged
    size = arrays[0].shape[0] + count
    new_at = after + 1 + np.arange(count)
    old_at = np.ones(size, dtype=np.bool_)
    old_at[new_at] = False
    merged = []
    for array, value in zip(arrays, values, strict=True):
        out = np.empty(size, dtype=array.dtype)
        out[old_at] = array
        out[new_at] = value
        merged.append(out)
    return merged


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
        n = int(self._bits.shape[0])
        self._n = n
        self._block_sizes = variant.block_sizes(qber_estimate, n)
        passes = len(self._block_sizes)
        self._sizes = np.array(self._block_sizes, dtype=np.int64)
        # First global top-level block index of every pass (classic Cascade needs block ids).
        blocks = -(-n // self._sizes)
        self._block_offset = np.concatenate(([0], np.cumsum(blocks)[:-1])).astype(np.int64)
        self._top_alice: list[NDArray[np.uint8]] = []
        # Global arrays over all passes (filled pass by pass on activation, see module doc).
        self._active = 0
        self._perm_all = np.empty(passes * n, dtype=np.int32)
        self._inverse_all = np.empty((passes, n), dtype=np.int32)
        self._prefix = np.zeros(passes * n + 1, dtype=np.uint8)
        self._pending = _EMPTY_INT
        # Sorted part starts plus a sentinel part at active * n (Alice parity 0, never odd).
        self._starts = np.zeros(1, dtype=np.int64)
        self._alice = np.zeros(1, dtype=np.uint8)
        self._odd = np.zeros(1, dtype=np.bool_)
        self._round = 0
        self._query: ParityQuery | None = None
        self._expected_bits = 0
        self._planned: tuple[NDArray[np.int64], NDArray[np.int64]] | None = None
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

    @property
    def passes_active(self) -> int:
        """Number of passes activated so far (all of them once finished)."""
        return self._active

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

    # ---------------------------------------------------------------- global helpers
    def _bob_parity(self, starts: NDArray[np.int64], ends: NDArray[np.int64]) -> NDArray[np.uint8]:
        """Bob's current parity of the global ranges [starts, ends) (each inside one pass)."""
        parity = self._prefix[ends] ^ self._prefix[starts]
        if self._pending.shape[0]:
            flips = np.searchsorted(self._pending, ends) - np.searchsorted(self._pending, starts)
            parity ^= (flips & 1).astype(np.uint8)
        return parity

    def _part_ends(self, part: NDArray[np.int64]) -> NDArray[np.int64]:
        # The last part of pass p ends where pass p + 1 starts, at (p + 1) * n; the sentinel
        # start active * n (never odd) ends the last active pass.
        ends: NDArray[np.int64] = self._starts[part + 1]
        return ends

    # ---------------------------------------------------------------- later rounds
    def _receive_splits(self, parities: NDArray[np.uint8]) -> None:
        assert self._planned is not None
        part, middle = self._planned
        left_alice = parities
        left_odd = (left_alice ^ self._bob_parity(self._starts[part], middle)).astype(np.bool_)
        right_alice = self._alice[part] ^ left_alice
        right_odd = self._odd[part] ^ left_odd
        self._alice[part] = left_alice
        self._odd[part] = left_odd
        self._starts, self._alice, self._odd = _insert_after(
            (self._starts, self._alice, self._odd), part, (middle, right_alice, right_odd)
        )
        self._planned = None

    def _activate(self) -> None:
        n = self._n
        p = self._active
        size = self._block_sizes[p]
        base = p * n
        perm = cascade_permutation(self._seed, n, p)
        self._perm_all[base : base + n] = perm
        self._inverse_all[p, perm] = np.arange(n, dtype=np.int32)
        segment = self._prefix[base + 1 : base + n + 1]
        np.bitwise_xor.accumulate(self._bits[perm], out=segment)
        if self._prefix[base]:  # keep the prefix continuous across passes
            np.bitwise_xor(segment, 1, out=segment)
        starts = np.arange(base, base + n, size, dtype=np.int64)
        ends = np.minimum(starts + size, base + n)
        alice = self._top_alice[p]
        odd = (alice ^ self._prefix[ends] ^ self._prefix[starts]).astype(np.bool_)
        # Replace the sentinel by the new blocks and put it back after them.
        self._starts = np.concatenate((self._starts[:-1], starts, [base + n]))
        self._alice = np.concatenate((self._alice[:-1], alice, [0]))
        self._odd = np.concatenate((self._odd[:-1], odd, [False]))
        self._active = p + 1

    def _correct(self, positions: NDArray[np.int64]) -> None:
        """Flip Bob's bits at original ``positions`` (distinct) and update every active pass."""
        self._bits[positions] ^= 1
        self.errors_corrected += int(positions.shape[0])
        active = self._active
        offsets = np.arange(active, dtype=np.int64)[:, None] * self._n
        keys = np.sort((self._inverse_all[:active, positions] + offsets).ravel())
        part = np.searchsorted(self._starts, keys, side="right") - 1
        # keys are sorted, so parts are too: count the hits of each part, flip the odd counts.
        edges = np.flatnonzero(np.diff(part)) + 1
        first = np.concatenate(([0], edges))
        hits = np.diff(np.append(first, part.shape[0]))
        self._odd[part[first[(hits & 1) == 1]]] ^= True
        self._pending = np.insert(self._pending, np.searchsorted(self._pending, keys), keys)

    def _fix_known_errors(self) -> NDArray[np.int64]:
        """Flip every bit that is an odd part of length 1 in some pass, until none is left.

        Returns the (global) indices of the odd parts left, none of length 1.
        """
        while True:
            part = np.flatnonzero(self._odd)
            if part.shape[0] == 0:
                return part
            single = (self._starts[part + 1] - self._starts[part]) == 1
            if not bool(single.any()):
                return part
            found = self._perm_all[self._starts[part[single]]].astype(np.int64)
            self._correct(np.unique(found))

    def _select(self, part: NDArray[np.int64]) -> NDArray[np.int64]:
        """The odd parts (global indices) to binary-search this round."""
        if part.shape[0] == 0 or self._variant.sub_block_reuse:
            return part
        # Classic Cascade: search an odd top-level block through its first odd part.
        starts = self._starts[part]
        pass_index = starts // self._n
        block = (
            self._block_offset[pass_index]
            + (starts - pass_index * self._n) // self._sizes[pass_index]
        )
        _, first, count = np.unique(block, return_index=True, return_counts=True)
        chosen: NDArray[np.int64] = part[first[(count & 1) == 1]]
        return chosen

    def _plan(self) -> None:
        while True:
            part = self._select(self._fix_known_errors())
            if part.shape[0]:
                starts = self._starts[part]
                middle = (starts + self._part_ends(part)) // 2
                pass_index = starts // self._n
                local = pass_index * self._n
                triples = np.column_stack((pass_index, starts - local, middle - local))
                self._planned = (part, middle)
                self._expected_bits = int(part.shape[0])
                self._query = ParityQuery(round_index=self._round, ranges=encode_triples(triples))
                return
            if self._active < len(self._block_sizes):
                self._activate()
                continue
            self._finished = True
            self._query = None
            return
