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

With sub-block reuse (``SUBBLOCK_REUSE``), once two passes are active, a picked part of at most
``_WEIGHTED_LENGTH`` bits is not halved but cut where its bits' error probabilities balance
(Bayesian bisection). A bit's probability is naive Bayes over the parts holding it in the other
active passes: a part of length s with a known syndrome multiplies the odds of each of its bits
by (1 + r**(s-1)) / (1 - r**(s-1)) if odd, by the inverse if even (r = 1 - 2q, q = Q minus the
fraction corrected so far). A bit alone in a part of some pass is *known right* (a corrected bit,
or the even sibling reached at the end of a search): its weight is 0, no cut leaves only known
bits on one side (such a question would tell nothing), and an odd part with a single bit not
known right has its error there — corrected at once, nothing asked. With few parts left to
search (at most n h(Q) / ``_MULTI_DIVISOR``: the long tail of rounds of large frames) a part is
cut into 4 (3 questions for 2 levels): fewer round trips for a few more bits. Cuts only choose
which parities are asked; every parity Alice sends is still counted once, and a weighted cut
never asks a parity Bob could derive (both sides hold a bit not known right). Measured at
n = 10**5 and 10**6, Q = 1-8 %, with plain halving as the reference at equal block sizes: the
weights lower f by 0.007-0.019, the deductions by a further 0.002-0.012 (more at high Q), which
``variants`` spends on a smaller k2 (fewer round trips); weights for parts longer than
_WEIGHTED_LENGTH did not change f (within 0.0005), so those are halved (cheaper).

Round 0 asks every top-level parity of every pass at once (Alice's parities never change, so
asking early leaks nothing more and saves one round trip per pass). The parity of the whole frame
is known from pass 0, so the last top-level block of every later pass is derived, not asked.
Every question is a distinct parity Bob could not derive: ``parity_bits_received`` equals the
bits Alice sent. Passes activate one after the other as in Cascade: pass p+1 only when no part
of passes 0..p is left to search.

Implementation: all active passes live in one *global* position space, position ``i`` of pass
``p`` being ``p * n + i``; the state (Bob's permuted bits per pass, a bit marking each part's
start, and at each part's start the syndrome and a length code) is
kept incrementally by the numba kernels of ``cascade.kernels``, so a round costs what it asks and
the bits it touches, not the frame length. The log-likelihood sums of the weighted cuts are
added in float32 in the kernel, in pass order; of the logistic step from log-odds to weights
only the float32 ``exp`` runs in numpy (numpy's own), the exact float32 clip, add and divide
around it in the kernels, so every cut, and therefore every query, is the one of the numpy
formulation kept in the tests as the reference. While exactly two passes are active (where
nearly all weights are computed) a bit's weight depends only on the code of its part in the
other pass: the exponent of each of the 256 codes goes through numpy's ``exp`` once per
error-rate estimate, with the same float32 operations around it (its ``exp`` is elementwise:
the same value gives the same bits in any array), and one kernel turns them into weights, looks
the weights up and cuts.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.cascade import kernels
from qkdnode.postprocess.cascade.messages import ParityAnswer, ParityQuery, encode_triples
from qkdnode.postprocess.cascade.permutation import check_seed, permutation_set
from qkdnode.postprocess.cascade.responder import check_frame_bits
from qkdnode.postprocess.cascade.variants import CascadeVariant
from qkdnode.postprocess.finitekey import binary_entropy

# Sub-block reuse (see the module doc): weighted cuts for parts of at most this many bits.
_WEIGHTED_LENGTH: Final = 64
# ... and 4-way cuts while a round searches at most n h(Q) / _MULTI_DIVISOR parts.
_MULTI_DIVISOR: Final = 16384.0
# Part code (per part): bit 7 = odd; bits 0-6 = length class, the length itself up to
# _EXACT_LENGTHS, then _CODES_PER_DOUBLING classes per doubling (up to ~2**22).
_EXACT_LENGTHS: Final = kernels.EXACT_LENGTHS
_CODES_PER_DOUBLING: Final = 4
# Code of an even part of length 1: its bit is known right.
_KNOWN_RIGHT: Final = kernels.KNOWN_RIGHT
# Largest |log-likelihood ratio| of a part; a known-right bit's is _KNOWN_LR, far below any sum of
# the others (>= -_LR_CAP each over <= 15 other passes, plus the prior log(q / (1 - q)) > -50).
_LR_CAP: Final = 30.0
_KNOWN_LR: Final = -1.0e4


def _class_length_minus_1() -> NDArray[np.float64]:
    """s - 1 for the representative length s of every length class (the middle of the class in
    log scale above _EXACT_LENGTHS)."""
    cls = np.arange(128, dtype=np.float64)
    steps = (cls - _EXACT_LENGTHS + 0.5) / _CODES_PER_DOUBLING
    length = np.where(cls <= _EXACT_LENGTHS, np.maximum(cls, 1.0), _EXACT_LENGTHS * 2.0**steps)
    minus_1: NDArray[np.float64] = length - 1.0
    minus_1.flags.writeable = False
    return minus_1


_CLASS_LENGTH_MINUS_1: Final = _class_length_minus_1()
_EMPTY_INT: Final = np.zeros(0, dtype=np.int64)
# Bob's state arrays kept for the next frames (see _Workspace), if they are at most this large:
# a large frame's (under 2.5 bytes per position of every pass: 95 MB at 10^7 bits and 4 passes)
# would stay in memory beside the next frame's, whose length differs.
_POOL: Final = 2
_POOL_MAX_BYTES: Final = 32 * 2**20
_EMPTY_READ_ONLY: Final = np.zeros(0, dtype=np.int32)
_EMPTY_READ_ONLY.flags.writeable = False


def length_class(length: NDArray[np.int64]) -> NDArray[np.int64]:
    """Length class of parts: the length up to 64, then 64 + floor(4 log2(length / 64)), <= 127."""
    with np.errstate(divide="ignore"):
        log_class = _EXACT_LENGTHS + np.floor(
            _CODES_PER_DOUBLING * np.log2(length / _EXACT_LENGTHS)
        )
    classes: NDArray[np.int64] = np.where(
        length <= _EXACT_LENGTHS, length, np.minimum(log_class, 127)
    ).astype(np.int64)
    return classes


@functools.cache
def length_class_thresholds() -> NDArray[np.int64]:
    """Entry k - 1: the smallest length whose ``length_class`` is at least 64 + k (k = 1..63).

    The kernels classify a length by counting the thresholds at or below it, which gives exactly
    ``length_class`` (evaluated here with numpy's own log2 around each boundary).
    """
    out = np.empty(127 - _EXACT_LENGTHS, dtype=np.int64)
    for k in range(1, 128 - _EXACT_LENGTHS):
        guess = int(_EXACT_LENGTHS * 2.0 ** (k / _CODES_PER_DOUBLING))
        candidates = np.arange(max(_EXACT_LENGTHS + 1, guess - 4), guess + 6, dtype=np.int64)
        reached = length_class(candidates) >= _EXACT_LENGTHS + k
        if reached[0] or not reached[-1]:
            raise AssertionError(f"length class boundary {k} not bracketed")
        out[k - 1] = candidates[int(np.argmax(reached))]
    out.flags.writeable = False
    return out


class _Workspace:
    """Bob's state arrays (``cascade.kernels``) for frames of up to ``capacity`` positions
    over all passes, reused by the next frame once a frame has finished: fresh arrays of
    megabytes cost a frame its page faults. At most ``_POOL`` are kept."""

    _pool: ClassVar[list[_Workspace]] = []

    def __init__(self, capacity: int, n: int) -> None:
        self.capacity = capacity
        self.n = n
        self.part_code = np.empty(capacity, dtype=np.uint8)
        self.pos_code = np.empty(capacity, dtype=np.uint8)
        padded = -(-capacity // 4096) * 4096  # bitmaps of whole summary words
        self.pbits = np.zeros(padded // 64, dtype=np.uint64)
        self.part_starts = np.zeros(padded // 64 + 1, dtype=np.uint64)  # + the end
        self.odd_bits = np.zeros(padded // 64, dtype=np.uint64)
        self.odd_words = np.zeros(padded // 4096, dtype=np.uint64)
        self.marks = np.zeros(n, dtype=np.uint8)  # the kernels leave it zero

    @classmethod
    def take(cls, size: int, n: int) -> _Workspace:
        """A pooled workspace of at least ``size`` positions (at most twice that), reset, or a
        new one. Each pool operation is one atomic list call, so roles may live in threads."""
        unfit = []
        found = None
        while found is None:
            try:
                work = cls._pool.pop()
            except IndexError:
                break
            if size <= work.capacity <= 2 * size and n <= work.n <= 2 * n:
                found = work
            else:
                unfit.append(work)
        cls._pool.extend(unfit)
        if found is None:
            return cls(size, n)
        # a classic Cascade frame may finish with odd parts left (in even blocks)
        found.pbits.fill(0)
        found.part_starts.fill(0)
        found.odd_bits.fill(0)
        found.odd_words.fill(0)
        return found

    def give_back(self) -> None:
        """Return to the pool (its frame has finished and never touches it again), unless it
        is larger than ``_POOL_MAX_BYTES``."""
        if 5 * self.capacity // 2 > _POOL_MAX_BYTES:
            return
        self._pool.append(self)
        while len(self._pool) > _POOL:
            try:
                self._pool.pop(0)
            except IndexError:
                break


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
        self._top_alice: list[NDArray[np.uint8]] = []
        # Global state over all passes, filled pass by pass on activation (module doc and
        # ``cascade.kernels``).
        size = passes * n
        self._active = 0
        # The session's permutations of every pass (cached per seed and n), indexed in place.
        self._perms = permutation_set(self._seed, n)
        self._perm_all = self._perms.perm_all
        self._inverse_all = self._perms.inverse_all
        self._workspace = _Workspace.take(size, n)
        work = self._workspace
        self._pbits, self._part_starts = work.pbits, work.part_starts
        self._part_code, self._pos_code = work.part_code, work.pos_code
        self._odd_bits, self._odd_words = work.odd_bits, work.odd_words
        self._marks = work.marks
        # The pass 0 <-> 1 map once pass 1 is active (read-only like the map itself: one
        # compiled signature).
        self._cross = _EMPTY_READ_ONLY
        self._thresholds = length_class_thresholds()
        # Part codes are kept once the weights need them (``cascade.kernels``).
        self._codes = False
        self._weighted = variant.sub_block_reuse
        self._q = float(qber_estimate)
        # The tables of ``_negated_lr_table``, ``_lr_table`` and ``_exp_exponent_of_code``, each
        # rewritten in place when the error-rate estimate it was computed for (NaN: none yet)
        # changes.
        self._rs = np.empty(128, dtype=np.float64)
        self._lr_even = np.empty(128, dtype=np.float64)
        self._negated_lr = np.empty(256, dtype=np.float32)
        self._negated_lr_q = math.nan
        self._lr = np.empty(256, dtype=np.float32)
        self._lr_q = math.nan
        self._exp_exponent = np.empty(256, dtype=np.float32)
        self._exp_exponent_q = math.nan
        entropy = binary_entropy(self._q)
        self._multi_parts = int(n * entropy / _MULTI_DIVISOR) if self._weighted else 0
        self._round = 0
        self._query: ParityQuery | None = None
        self._expected_bits = 0
        # (part start of each asked range, range start, range end = cut)
        self._planned: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]] | None = None
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

    # ---------------------------------------------------------------- weights
    def _q_now(self) -> float:
        """Error rate assumed for the bits not yet corrected (Q minus the corrected fraction)."""
        return max(self._q - self.errors_corrected / self._n, self._q / 100.0)

    def _negated_lr_table(self) -> NDArray[np.float32]:
        """Minus ``_lr_table``, computed first: the two-pass weights need this sign."""
        q_now = self._q_now()
        if q_now == self._negated_lr_q:
            return self._negated_lr
        # np.exp(s_minus_1 * log1p(-2 q)), then np.minimum(log1p(rs) - log1p(-rs), _LR_CAP) in
        # float64 (a part's log-likelihood ratio if odd), cast to float32: numpy's own ufuncs,
        # each in place (their call overhead, not the 128 values, is the cost). Negating is
        # exact, in either precision.
        rs, even, table = self._rs, self._lr_even, self._negated_lr
        np.multiply(_CLASS_LENGTH_MINUS_1, math.log1p(-2.0 * q_now), out=rs)
        np.exp(rs, out=rs)
        np.negative(rs, out=even)
        with np.errstate(divide="ignore"):  # rs = 1 for parts of one bit
            np.log1p(even, out=even)
        np.log1p(rs, out=rs)
        np.subtract(rs, even, out=rs)
        np.minimum(rs, _LR_CAP, out=rs)
        table[:128] = rs
        np.negative(table[:128], out=table[128:])
        table[_KNOWN_RIGHT] = -_KNOWN_LR
        self._negated_lr_q = q_now
        return table

    def _lr_table(self) -> NDArray[np.float32]:
        """log P(parity seen | bit wrong) / P(parity seen | bit right) for every part code.

        A part of ``s`` bits with i.i.d. error rate q: the other s - 1 bits are odd with
        probability (1 - r**(s-1)) / 2, r = 1 - 2q; an odd part raises the odds of each of its
        bits by (1 + r**(s-1)) / (1 - r**(s-1)), an even one lowers them by the same factor.
        q is the current estimate of the uncorrected error rate (``_q_now``).
        """
        q_now = self._q_now()
        if q_now != self._lr_q:
            np.negative(self._negated_lr_table(), out=self._lr)
            self._lr_q = q_now
        return self._lr

    def _exp_exponent_of_code(self) -> NDArray[np.float32]:
        """While exactly two passes are active, for every code of a bit's part in the other
        pass: numpy's float32 exp of ``kernels._exponent`` of the bit's log-odds (the prior plus
        the code's log-likelihood ratio), so that ``kernels.bob_cuts_two_passes`` finds the
        weight 1 / (1 + that) of ``_split_weights`` and ``kernels.bob_weighted_cuts`` (numpy's
        exp is elementwise). Not the known-right code's: its weight is 0.

        The exponent -clip(lr + prior, -50, 50) is computed as clip(-lr - prior, -50, 50):
        negating is exact and rounding symmetric, so it is the same float32.
        """
        q = self._q_now()
        if q == self._exp_exponent_q:
            return self._exp_exponent
        exponent = self._exp_exponent
        np.add(self._negated_lr_table(), -math.log(q / (1.0 - q)), out=exponent)
        np.maximum(exponent, -50.0, out=exponent)
        np.minimum(exponent, 50.0, out=exponent)
        np.exp(exponent, out=exponent)
        self._exp_exponent_q = q
        return exponent

    def _split_weights(
        self, part: NDArray[np.int64]
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Per bit of the parts: exp(-log-odds of an error given every other pass) (naive
        Bayes), the bit's error probability being 1 / (1 + that); +inf (probability exactly 0)
        for a bit known to be right: a part of length 1 in another pass (a corrected bit, or
        the even sibling found when bisecting down to one bit). And the global positions of the
        certain errors (an odd part's only bit not known right), if any: then the first array
        is not exponentiated."""
        q = self._q_now()
        exponent, found = kernels.bob_log_odds(
            part,
            self._active,
            self._n,
            self._perm_all,
            self._inverse_all,
            self._cross,
            self._part_starts,
            self._part_code,
            self._pos_code,
            self._lr_table(),
            np.float32(math.log(q / (1.0 - q))),
        )
        if found.shape[0]:  # certain errors: no cut this round, the weights are not needed
            return exponent, found
        # weight = 1 / (1 + exp(-clip(log_odds, -50, 50))), > 0 (>= ~2e-22) unless known (0).
        # numpy's own float32 exp here; the clip before and the rest after are exact float32
        # operations, done in the kernels.
        np.exp(exponent, out=exponent)
        return exponent, found

    def _cuts(
        self, part: NDArray[np.int64], arity: int
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Cut positions (parts, arity - 1), non-decreasing, strictly inside each part; and the
        global positions of the certain errors: the only bit not known right of an odd part.

        Middle (equal lengths) without weights; else at the weight quantiles, so each piece is
        about equally likely to hold the error (the likelier piece is the shorter one), with
        bits not known right on both sides of every cut. If some part has a certain error, only
        those are returned (the cuts are then empty). (While exactly two passes are active,
        ``_plan`` cuts with ``kernels.bob_cuts_two_passes`` instead.)
        """
        cuts, small = kernels.bob_even_cuts(
            part, arity, self._n, self._part_starts, _WEIGHTED_LENGTH
        )
        if not (self._weighted and self._active >= 2) or small.shape[0] == 0:
            return cuts, np.zeros(0, dtype=np.int64)
        starts = part[small]
        exp_exponent, found = self._split_weights(starts)
        if found.shape[0]:
            return cuts, found
        found = kernels.bob_weighted_cuts(
            cuts, small, starts, self._n, self._part_starts, exp_exponent, arity
        )
        return cuts, found

    # ---------------------------------------------------------------- state changes
    def _receive_splits(self, parities: NDArray[np.uint8]) -> None:
        assert self._planned is not None
        rows, left, right = self._planned
        kernels.bob_receive(
            parities,
            rows,
            right,
            left,
            self._n,
            self._pbits,
            self._part_starts,
            self._odd_bits,
            self._part_code,
            self._pos_code,
            self._odd_words,
            self._thresholds,
            self._codes,
        )
        self._planned = None

    def _activate(self) -> None:
        n = self._n
        p = self._active
        self._perms.perm(p)  # drawn into perm_all / inverse_all unless cached
        self._perms.inverse(p)
        # the weights need the part codes from the second pass on (``kernels``)
        codes_all = self._weighted and p == 1
        kernels.bob_activate(
            p,
            n,
            self._block_sizes[p],
            self._top_alice[p],
            self._bits,
            self._perm_all,
            self._pbits,
            self._part_starts,
            self._odd_bits,
            self._part_code,
            self._pos_code,
            self._odd_words,
            self._thresholds,
            self._codes,
            codes_all,
        )
        self._active = p + 1
        if codes_all:
            self._cross = self._perms.cross01()
            self._codes = True

    def _fix_known_errors(self, first: NDArray[np.int64]) -> NDArray[np.int64]:
        """Flip the bits at the global positions ``first`` (certain errors of the cuts), then
        every bit that is an odd part of length 1 in some pass, until none is left.

        Returns the global starts of the odd parts left, none of length 1.
        """
        parts, corrected = kernels.bob_fix_known_errors(
            self._active,
            self._n,
            self._bits,
            self._perm_all,
            self._inverse_all,
            self._pbits,
            self._part_starts,
            self._odd_bits,
            self._part_code,
            self._pos_code,
            self._odd_words,
            self._thresholds,
            self._codes,
            self._marks,
            first,
        )
        self.errors_corrected += int(corrected)
        return parts

    def _plan(self) -> None:
        found = _EMPTY_INT
        while True:
            part = self._fix_known_errors(found)
            found = _EMPTY_INT
            if not self._weighted:
                # Classic Cascade: halve the first odd part of every odd top-level block.
                part, cuts, triples = kernels.bob_plan_classic(
                    part, self._n, self._sizes, self._part_starts
                )
                if part.shape[0]:
                    self._ask(part, part, cuts, triples)
                    return
            elif part.shape[0]:
                arity = 4 if part.shape[0] <= self._multi_parts else 2
                if self._active == 2:
                    rows, left, right, triples, found = kernels.bob_cuts_two_passes(
                        part,
                        arity,
                        self._n,
                        _WEIGHTED_LENGTH,
                        self._cross,
                        self._part_starts,
                        self._part_code,
                        self._pos_code,
                        self._exp_exponent_of_code(),
                    )
                    if found.shape[0]:  # certain errors: corrected first, nothing asked
                        continue
                    self._ask(rows, left, right, triples)
                    return
                cuts, found = self._cuts(part, arity)
                if found.shape[0]:  # certain errors: corrected first thing, no question needed
                    continue
                self._ask(*kernels.bob_query(part, cuts, self._n))
                return
            if self._active < len(self._block_sizes):
                self._activate()
                continue
            self._finished = True
            self._workspace.give_back()
            self._query = None
            return

    def _ask(
        self,
        rows: NDArray[np.int64],
        left: NDArray[np.int64],
        right: NDArray[np.int64],
        triples: NDArray[np.int32],
    ) -> None:
        """Make the round's query: the ranges [left, right) of the parts starting at ``rows``
        (global), ``triples`` on the wire."""
        self._planned = (rows, left, right)
        self._expected_bits = int(rows.shape[0])
        self._query = ParityQuery(round_index=self._round, ranges=encode_triples(triples))
