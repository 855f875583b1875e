"""The numpy Cascade roles the compiled ones must equal bit for bit (test reference).

``ReferenceReconciler`` and ``ReferenceResponder`` are the vectorised numpy implementation of
Bob's and Alice's Cascade roles that ``qkdnode.postprocess.cascade`` replaced by numba kernels.
They follow the same wire protocol and the same decisions (see the module docstring of
``qkdnode.postprocess.cascade.reconciler`` for the algorithm); the tests run both on seeded
random frames and compare every query, every answer, the corrected key and the leak.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.cascade.messages import ParityAnswer, ParityQuery, encode_triples
from qkdnode.postprocess.cascade.permutation import cascade_permutation, check_seed
from qkdnode.postprocess.cascade.responder import check_frame_bits
from qkdnode.postprocess.cascade.variants import CascadeVariant
from qkdnode.postprocess.finitekey import binary_entropy

_EMPTY_INT: Final = np.zeros(0, dtype=np.int64)
# Sub-block reuse (see the module doc): weighted cuts for parts of at most this many bits.
_WEIGHTED_LENGTH: Final = 64
# ... and 4-way cuts while a round searches at most n h(Q) / _MULTI_DIVISOR parts.
_MULTI_DIVISOR: Final = 16384.0
# Part code (per bit of every active pass): bit 7 = odd; bits 0-6 = length class, the length
# itself up to _EXACT_LENGTHS, then _CODES_PER_DOUBLING classes per doubling (up to ~2**22).
_EXACT_LENGTHS: Final = 64
_CODES_PER_DOUBLING: Final = 4
# Code of an even part of length 1: its bit is known right.
_KNOWN_RIGHT: Final = 1
# Largest |log-likelihood ratio| of a part; a known-right bit's is _KNOWN_LR, far below any sum of
# the others (>= -_LR_CAP each over <= 15 other passes, plus the prior log(q / (1 - q)) > -50).
_LR_CAP: Final = 30.0
_KNOWN_LR: Final = -1.0e4


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


class ReferenceReconciler:
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
        # Weighted splits (sub-block reuse only, from 2 active passes on): at global position
        # g, the code (length class, parity) of the part holding g; see _part_code.
        self._weighted = variant.sub_block_reuse
        self._q = float(qber_estimate)
        self._code_all: NDArray[np.uint8] | None = None
        # Position in pass 0 of each position of pass 1 (most weights are of pass-1 parts).
        self._pass1_to_0: NDArray[np.int32] | None = None
        entropy = binary_entropy(self._q)
        self._multi_parts = int(n * entropy / _MULTI_DIVISOR) if self._weighted else 0
        self._round = 0
        self._query: ParityQuery | None = None
        self._expected_bits = 0
        # (part of each asked range, range start, range end = cut, whether some part has 2+ cuts)
        self._planned: (
            tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], bool] | None
        ) = None
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
            f"ReferenceReconciler(n_bits={self._n}, variant={self._variant.value}, "
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

    # ---------------------------------------------------------------- weights
    def _q_now(self) -> float:
        """Error rate assumed for the bits not yet corrected (Q minus the corrected fraction)."""
        return max(self._q - self.errors_corrected / self._n, self._q / 100.0)

    @staticmethod
    def _part_code(length: NDArray[np.int64], odd: NDArray[np.bool_]) -> NDArray[np.uint8]:
        """Code of parts: bit 7 = odd, bits 0-6 = length class (exact up to 64, then log)."""
        with np.errstate(divide="ignore"):
            log_class = _EXACT_LENGTHS + np.floor(
                _CODES_PER_DOUBLING * np.log2(length / _EXACT_LENGTHS)
            )
        cls = np.where(length <= _EXACT_LENGTHS, length, np.minimum(log_class, 127))
        code: NDArray[np.uint8] = cls.astype(np.uint8)
        code[odd] |= np.uint8(128)
        return code

    def _lr_table(self) -> NDArray[np.float32]:
        """log P(parity seen | bit wrong) / P(parity seen | bit right) for every part code.

        A part of ``s`` bits with i.i.d. error rate q: the other s - 1 bits are odd with
        probability (1 - r**(s-1)) / 2, r = 1 - 2q; an odd part raises the odds of each of its
        bits by (1 + r**(s-1)) / (1 - r**(s-1)), an even one lowers them by the same factor.
        q is the current estimate of the uncorrected error rate (``_q_now``).
        """
        cls = np.arange(128, dtype=np.float64)
        steps = (cls - _EXACT_LENGTHS + 0.5) / _CODES_PER_DOUBLING
        length = np.where(cls <= _EXACT_LENGTHS, np.maximum(cls, 1.0), _EXACT_LENGTHS * 2.0**steps)
        rs = np.exp((length - 1.0) * math.log1p(-2.0 * self._q_now()))
        with np.errstate(divide="ignore"):
            lr = np.minimum(np.log1p(rs) - np.log1p(-rs), _LR_CAP)
        table: NDArray[np.float32] = np.concatenate((-lr, lr)).astype(np.float32)
        table[_KNOWN_RIGHT] = _KNOWN_LR
        return table

    def _range_positions(
        self, starts: NDArray[np.int64], ends: NDArray[np.int64]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Global positions of the ranges [starts, ends) concatenated, and each range's length."""
        length = ends - starts
        offset = np.cumsum(length) - length
        total = int(length.sum())
        return np.repeat(starts - offset, length) + np.arange(total, dtype=np.int64), length

    def _set_code(self, part: NDArray[np.int64]) -> None:
        """Rewrite the code of the bits of ``part`` after its parity or length changed."""
        if self._code_all is None or part.shape[0] == 0:
            return
        glob, length = self._range_positions(self._starts[part], self._part_ends(part))
        self._code_all[glob] = np.repeat(self._part_code(length, self._odd[part]), length)

    def _split_weights(self, part: NDArray[np.int64]) -> NDArray[np.float32]:
        """Per bit of the parts: probability of an error given every other pass (naive Bayes).

        Exactly 0 for a bit known to be right: a part of length 1 in another pass (a corrected
        bit, or the even sibling found when bisecting down to one bit).
        """
        code_all = self._code_all
        assert code_all is not None
        table = self._lr_table()
        n = self._n
        glob, _ = self._range_positions(self._starts[part], self._part_ends(part))
        q = self._q_now()
        log_odds = np.full(glob.shape[0], math.log(q / (1.0 - q)), dtype=np.float32)
        # glob is sorted: one slice per pass of the parts, each summing the other passes.
        bounds = np.searchsorted(glob, np.arange(self._active + 1, dtype=np.int64) * n).tolist()
        for own in range(self._active):
            lo, hi = bounds[own], bounds[own + 1]
            if hi == lo:
                continue
            if own == 1 and self._pass1_to_0 is not None and self._active == 2:
                log_odds[lo:hi] += table[code_all[self._pass1_to_0[glob[lo:hi] - n]]]
                continue
            bits = self._perm_all[glob[lo:hi]]
            for p in range(self._active):
                if p != own:
                    log_odds[lo:hi] += table[code_all[p * n + self._inverse_all[p, bits]]]
        # A known bit's ratio (_KNOWN_LR) outweighs all others: its sum stays far below -1000.
        known = log_odds < -1000.0
        # weight = 1 / (1 + exp(-log_odds)), in place; > 0 (>= ~2e-22) unless known
        np.clip(log_odds, -50.0, 50.0, out=log_odds)
        np.negative(log_odds, out=log_odds)
        np.exp(log_odds, out=log_odds)
        log_odds += 1.0
        weight: NDArray[np.float32] = np.reciprocal(log_odds, out=log_odds)
        weight[known] = 0.0
        return weight

    def _cuts(
        self, part: NDArray[np.int64], arity: int
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Cut positions (parts, arity - 1), non-decreasing, strictly inside each part; and the
        global positions of the certain errors: the only bit not known right of an odd part.

        Middle (equal lengths) without weights; else at the weight quantiles, so each piece is
        about equally likely to hold the error (the likelier piece is the shorter one), with
        bits not known right on both sides of every cut. If some part has a certain error, only
        those are returned (the cuts are then empty).
        """
        starts = self._starts[part]
        ends = self._part_ends(part)
        length = ends - starts
        fractions = np.arange(1, arity, dtype=np.int64)
        even_cuts = starts[:, None] + (length[:, None] * fractions[None, :]) // arity
        cuts: NDArray[np.int64] = np.clip(even_cuts, starts[:, None] + 1, ends[:, None] - 1)
        small = np.flatnonzero(length <= _WEIGHTED_LENGTH)
        if self._code_all is None or small.shape[0] == 0:
            return cuts, _EMPTY_INT
        part, starts, length = part[small], starts[small], length[small]
        weight = self._split_weights(part)
        offset = np.cumsum(length) - length
        # Bits not known right: how many in each part, and the first and last one's index.
        open_count = np.zeros(weight.shape[0] + 1, dtype=np.int32)
        np.cumsum(weight > 0.0, out=open_count[1:])
        open_before = open_count[offset]
        opened = open_count[offset + length] - open_before
        first_open = np.searchsorted(open_count, open_before + 1) - 1
        last_open = np.searchsorted(open_count, open_before + np.maximum(opened, 1)) - 1
        first_open = np.clip(first_open, offset, offset + length - 1)
        last_open = np.clip(last_open, offset, offset + length - 1)
        single = opened == 1
        if bool(single.any()):
            found: NDArray[np.int64] = starts[single] + first_open[single] - offset[single]
            return cuts[:0], found
        cum0 = np.zeros(weight.shape[0] + 1, dtype=np.float64)
        np.cumsum(weight, out=cum0[1:])
        cum = cum0[1:]
        base = cum0[offset]
        total = cum0[offset + length] - base
        target = base[:, None] + total[:, None] * (fractions / arity)[None, :]
        at = np.searchsorted(cum, target.ravel()).reshape(target.shape)
        # Cut before or after the bit where the target is reached, whichever is nearer, with
        # a bit not known right on each side.
        at = np.clip(at, first_open[:, None], last_open[:, None])
        before = np.abs(cum0[at] - target) <= np.abs(cum[at] - target)
        at = np.clip(np.where(before, at, at + 1), first_open[:, None] + 1, last_open[:, None])
        if arity > 2:  # cuts with the same open bits on their left are one question: merge them
            at = np.searchsorted(open_count, open_count[at])
        # No open bit at all (inconsistent parities): keep the plain halving, never a crash.
        consistent = opened > 1
        cuts[small[consistent]] = (starts[:, None] + at - offset[:, None])[consistent]
        return cuts, _EMPTY_INT

    # ---------------------------------------------------------------- later rounds
    def _receive_splits(self, parities: NDArray[np.uint8]) -> None:
        assert self._planned is not None
        part, left, cut, multi = self._planned
        # Each asked range [left, cut) is a new part; the rest of each part [last cut, end) is
        # derived. ``part`` is sorted; a part with several cuts appears on consecutive rows.
        asked_odd = (parities ^ self._bob_parity(left, cut)).astype(np.bool_)
        if not multi:
            self._receive_halves(part, cut, parities, asked_odd)
            return
        count = part.shape[0]
        first = np.ones(part.shape[0], dtype=np.bool_)
        first[1:] = part[1:] != part[:-1]
        last = np.ones(part.shape[0], dtype=np.bool_)
        last[:-1] = first[1:]
        group = np.cumsum(first) - 1
        if bool(first.all()):
            rest_alice = self._alice[part] ^ parities
            rest_odd = self._odd[part] ^ asked_odd
        else:
            sum_alice = np.bitwise_xor.reduceat(parities, np.flatnonzero(first))
            sum_odd = np.bitwise_xor.reduceat(asked_odd, np.flatnonzero(first))
            rest_alice = (self._alice[part[first]] ^ sum_alice)[group]
            rest_odd = (self._odd[part[first]] ^ sum_odd)[group]
        # The part starting at each cut: the next asked range, or the derived rest.
        next_alice = np.where(last, rest_alice, np.roll(parities, -1)).astype(np.uint8)
        next_odd = np.where(last, rest_odd, np.roll(asked_odd, -1)).astype(np.bool_)
        self._alice[part[first]] = parities[first]
        self._odd[part[first]] = asked_odd[first]
        self._starts, self._alice, self._odd = _insert_after(
            (self._starts, self._alice, self._odd), part, (cut, next_alice, next_odd)
        )
        self._planned = None
        if self._code_all is not None:
            # Rows of the new parts: each old part's row moved by the rows inserted before it.
            row = part[first] + np.flatnonzero(first)
            new_rows = np.concatenate((row, part + 1 + np.arange(count)))
            new_rows.sort()
            self._set_code(new_rows)

    def _receive_halves(
        self,
        part: NDArray[np.int64],
        middle: NDArray[np.int64],
        left_alice: NDArray[np.uint8],
        left_odd: NDArray[np.bool_],
    ) -> None:
        """``_receive_splits`` when every part was cut once (``part`` strictly increasing)."""
        right_alice = self._alice[part] ^ left_alice
        right_odd = self._odd[part] ^ left_odd
        self._alice[part] = left_alice
        self._odd[part] = left_odd
        self._starts, self._alice, self._odd = _insert_after(
            (self._starts, self._alice, self._odd), part, (middle, right_alice, right_odd)
        )
        self._planned = None
        if self._code_all is not None:
            count = part.shape[0]
            rows = np.empty(2 * count, dtype=np.int64)
            rows[0::2] = part + np.arange(count)  # each part's row moved by the rows before it
            rows[1::2] = rows[0::2] + 1
            self._set_code(rows)

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
        if self._code_all is not None:
            self._code_all[base : base + n] = np.repeat(self._part_code(ends - starts, odd), size)[
                :n
            ]
        elif self._weighted and self._active >= 2:  # weights are first needed now
            self._pass1_to_0 = self._inverse_all[0, perm]
            self._code_all = np.empty(len(self._block_sizes) * n, dtype=np.uint8)
            length = np.diff(self._starts)  # the parts tile [0, active * n)
            self._code_all[: self._active * n] = np.repeat(
                self._part_code(length, self._odd[:-1]), length
            )

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
        flipped = part[first[(hits & 1) == 1]]
        self._odd[flipped] ^= True
        self._pending = np.insert(self._pending, np.searchsorted(self._pending, keys), keys)
        self._set_code(flipped)

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
                arity = 4 if part.shape[0] <= self._multi_parts else 2
                cuts, found = self._cuts(part, arity)
                if found.shape[0]:  # certain errors: correct them, no question needed
                    self._correct(np.unique(self._perm_all[found].astype(np.int64)))
                    continue
                row = np.repeat(part, arity - 1)
                cut = cuts.ravel()
                # Drop repeated cuts (parts shorter than the arity); each range starts at the
                # previous cut of its part, or at the part's start.
                same = np.zeros(cut.shape[0], dtype=np.bool_)
                same[1:] = row[1:] == row[:-1]
                keep = ~same
                keep[1:] |= same[1:] & (cut[1:] > cut[:-1])
                row, cut, same = row[keep], cut[keep], same[keep]
                left = np.where(same, np.roll(cut, 1), self._starts[row])
                pass_index = left // self._n
                local = pass_index * self._n
                triples = np.column_stack((pass_index, left - local, cut - local))
                self._planned = (row, left, cut, arity > 2)
                self._expected_bits = int(row.shape[0])
                self._query = ParityQuery(round_index=self._round, ranges=encode_triples(triples))
                return
            if self._active < len(self._block_sizes):
                self._activate()
                continue
            self._finished = True
            self._query = None
            return


class ReferenceResponder:
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
            f"ReferenceResponder(n_bits={self.n_bits}, variant={self._variant.value}, "
            f"rounds_answered={self._next_round}, parity_bits_sent={self.parity_bits_sent})"
        )

    def _pass_prefix(self, pass_index: int) -> NDArray[np.uint8]:
        n = self.n_bits
        prefix = self._prefix_all[pass_index * (n + 1) : (pass_index + 1) * (n + 1)]
        if not self._prefix_ready[pass_index]:
            perm = cascade_permutation(self._seed, n, pass_index)
            np.bitwise_xor.accumulate(self._bits[perm], out=prefix[1:])
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
        offset = 0
        for pass_index, block_size, count in tops.tolist():
            prefix = self._pass_prefix(pass_index)
            starts = np.arange(count, dtype=np.int64) * block_size
            ends = np.minimum(starts + block_size, n)
            out[offset : offset + count] = prefix[ends] ^ prefix[starts]
            offset += count
        if ranges.shape[0]:
            passes = np.flatnonzero(np.bincount(ranges[:, 0], minlength=self._variant.passes))
            for pass_index in passes[~self._prefix_ready[passes]].tolist():
                self._pass_prefix(pass_index)
            base = ranges[:, 0] * (n + 1)
            out[offset:] = (
                self._prefix_all[base + ranges[:, 2]] ^ self._prefix_all[base + ranges[:, 1]]
            )
        self._next_round += 1
        self.parity_bits_sent += total
        return ParityAnswer.from_bits(round_index=query.round_index, bits=out)
