"""Compiled kernels of both Cascade roles (numba, see ``qkdnode.postprocess.jit``).

Bob's state lives in flat arrays over the *global* position space of the active passes
(position ``i`` of pass ``p`` is ``g = p * n + i``), so no kernel ever resizes an array:

- ``pbits``: a bitmap, bit ``g & 63`` of word ``g >> 6`` Bob's current bit at permuted position
  ``i`` of pass ``p`` (a range's parity reads a word per 64 bits);
- ``part_starts``: a bit per position, bit ``g & 63`` of word ``g >> 6`` set if a part starts
  at ``g``, and at the end of every active pass: the part holding ``g`` starts at the nearest
  set bit at or before it, and ends before the next one (a split sets one bit, where a
  per-position map of starts would be rewritten over the part);
- ``part_code[s]`` at a part's start ``s``: its length class and parity (see ``reconciler``);
- ``odd_bits``: a bit per position, set at the start of each part whose parity differs from
  Alice's (an odd number of errors inside): all Bob needs of Alice's parities, which are not
  kept;
- ``pos_code[g]``: the code of the part holding ``g`` if that part has at most ``SHORT_PART``
  bits, else ``LONG_PART`` (then read ``part_code`` at its start): the weights look codes up at
  random positions, and one load is cheaper than two. Codes are kept only once the weights need
  them (``codes`` True: sub-block reuse from the second pass on; ``bob_activate`` fills them
  then);
- ``cross[g]`` (sub-block reuse, while exactly two passes are active; ``PermutationSet.cross01``):
  the position in the other pass of the bit at ``g`` (pass-local), so the weights of that phase,
  where nearly all of them are computed, cost one random load per bit;
- ``odd_words``: bit ``(g >> 6) & 63`` of ``odd_words[g >> 12]`` set when word ``g >> 6`` of
  ``odd_bits`` is not 0, so the odd parts are listed in increasing order in time proportional
  to the passes' length / 4096 plus their number.

Parts only ever split, so a start stays a start. Alice's kernels answer from prefix parities of
her permuted bits; ``pcg64_permutation`` draws the permutations of ``permutation``'s
specification. Every decision (which parts are searched, where
they are cut, what is deduced) is the one documented in ``reconciler``; these kernels only keep
the state incrementally: a round costs the questions it asks and the bits it touches, not n.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from qkdnode.postprocess.jit import helper, kernel

# Part code: bit 7 = odd; bits 0-6 = length class, the length itself up to EXACT_LENGTHS, then
# classes by thresholds (see ``reconciler.length_class_thresholds``).
EXACT_LENGTHS = 64
ODD_CODE = 128
SHORT_PART = 256
# Code of an even part of length 1: its bit is known right.
KNOWN_RIGHT = 1
LONG_PART = 255  # never the code of a part of at most SHORT_PART bits (class <= 72)


@helper
def _length_class(length: int, thresholds: NDArray[np.int64]) -> int:
    if length <= EXACT_LENGTHS:
        return length
    above = 0
    while above < thresholds.shape[0] and thresholds[above] <= length:
        above += 1
    return EXACT_LENGTHS + above


@helper
def _code(length: int, odd: int, thresholds: NDArray[np.int64]) -> np.uint8:
    return np.uint8(_length_class(length, thresholds) | (ODD_CODE if odd else 0))


@helper
def _exponent(log_odds: np.float32) -> np.float32:
    """-clip(log_odds, -50, 50) in float32, or +inf for a known-right bit (below -1000): then
    1 / (1 + exp(.)) is the bit's weight, exactly 0 when known."""
    if log_odds < -1000.0:
        return np.float32(np.inf)
    return -min(max(log_odds, np.float32(-50.0)), np.float32(50.0))


@helper
def _set_code(
    part_code: NDArray[np.uint8],
    pos_code: NDArray[np.uint8],
    s: int,
    length: int,
    odd: int,
    thresholds: NDArray[np.int64],
    mark_long: bool,
    codes: bool,
) -> None:
    if not codes:  # nothing reads the codes yet (module doc)
        return
    code = _code(length, odd, thresholds)
    part_code[s] = code
    # slice fills: an indexing loop checks each index for wrap-around, a slice is one fill
    if length <= SHORT_PART:
        pos_code[s : s + length] = code
    elif mark_long:
        pos_code[s : s + length] = LONG_PART


@helper
def _set_odd(odd_bits: NDArray[np.uint64], odd_words: NDArray[np.uint64], g: int, odd: int) -> None:
    w = g >> 6
    word = odd_bits[w]
    bit = np.uint64(1) << np.uint64(g & 63)
    new = word | bit if odd else word & ~bit
    if new != word:
        odd_bits[w] = new
        summary = np.uint64(1) << np.uint64(w & 63)
        if word == 0:
            odd_words[w >> 6] |= summary
        elif new == 0:
            odd_words[w >> 6] &= ~summary


@helper
def _bit(words: NDArray[np.uint64], g: int) -> int:
    return 1 if (words[g >> 6] >> np.uint64(g & 63)) & np.uint64(1) else 0


@helper
def _highest_bit(word: np.uint64) -> int:
    """Index of the highest set bit of a non-zero word: the bits below it set too, then counted
    with the bit tricks of a popcount, without a branch (branches on the bits would be
    mispredicted half the time: parts sit anywhere) and without a multiply (which would
    overflow numpy's scalars when run as plain Python)."""
    x = word | (word >> np.uint64(1))
    x |= x >> np.uint64(2)
    x |= x >> np.uint64(4)
    x |= x >> np.uint64(8)
    x |= x >> np.uint64(16)
    x |= x >> np.uint64(32)
    x -= (x >> np.uint64(1)) & np.uint64(0x5555555555555555)
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    x += x >> np.uint64(8)
    x += x >> np.uint64(16)
    x += x >> np.uint64(32)
    return int(x & np.uint64(127)) - 1


@helper
def _mark_start(part_starts: NDArray[np.uint64], g: int) -> None:
    part_starts[g >> 6] |= np.uint64(1) << np.uint64(g & 63)


@helper
def _is_start(part_starts: NDArray[np.uint64], g: int) -> bool:
    return bool((part_starts[g >> 6] >> np.uint64(g & 63)) & np.uint64(1))


@helper
def _part_end(part_starts: NDArray[np.uint64], s: int) -> int:
    """Global end (exclusive) of the part starting at ``s``: the next marked position (the end
    of every active pass is marked)."""
    g = s + 1
    w = g >> 6
    word = part_starts[w] & (np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(g & 63))
    while word == 0:
        w += 1
        word = part_starts[w]
    return (w << 6) + _lowest_bit(word)


@helper
def _part_start(part_starts: NDArray[np.uint64], g: int) -> int:
    """Global start of the part holding ``g``: the nearest marked position at or before it (the
    first position of every pass is a start, so the search stays in ``g``'s pass)."""
    w = g >> 6
    word = part_starts[w] & (np.uint64(0xFFFFFFFFFFFFFFFF) >> np.uint64(63 - (g & 63)))
    while word == 0:
        w -= 1
        word = part_starts[w]
    return (w << 6) + _highest_bit(word)


@helper
def _parity(pbits: NDArray[np.uint64], start: int, end: int) -> int:
    """Parity of the bits at positions [start, end) of the bitmap ``pbits``."""
    if start >= end:
        return 0
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    first = start >> 6
    last = (end - 1) >> 6
    x = pbits[first] & (ones << np.uint64(start & 63))
    if first == last:
        x &= ones >> np.uint64(63 - ((end - 1) & 63))
    else:
        for w in range(first + 1, last):
            x ^= pbits[w]
        x ^= pbits[last] & (ones >> np.uint64(63 - ((end - 1) & 63)))
    for shift in (32, 16, 8, 4, 2, 1):
        x ^= x >> np.uint64(shift)
    return 1 if x & np.uint64(1) else 0


@helper
def _lowest_bit(word: np.uint64) -> int:
    """Index of the lowest set bit of a non-zero word: the highest of that bit alone."""
    return _highest_bit(word & (~word + np.uint64(1)))


@helper
def _odd_parts(odd_bits: NDArray[np.uint64], odd_words: NDArray[np.uint64]) -> NDArray[np.int64]:
    total = 0
    for c in range(odd_words.shape[0]):
        summary = odd_words[c]
        while summary:
            word = odd_bits[(c << 6) + _lowest_bit(summary)]
            summary &= summary - np.uint64(1)
            while word:
                total += 1
                word &= word - np.uint64(1)
    out = np.empty(total, dtype=np.int64)
    k = 0
    for c in range(odd_words.shape[0]):
        summary = odd_words[c]
        while summary:
            w = (c << 6) + _lowest_bit(summary)
            summary &= summary - np.uint64(1)
            word = odd_bits[w]
            while word:
                out[k] = (w << 6) + _lowest_bit(word)
                word &= word - np.uint64(1)
                k += 1
    return out


@helper
def _correct(
    positions: NDArray[np.int64],
    active: int,
    n: int,
    bits: NDArray[np.uint8],
    inverse_all: NDArray[np.int32],
    pbits: NDArray[np.uint64],
    part_starts: NDArray[np.uint64],
    odd_bits: NDArray[np.uint64],
    part_code: NDArray[np.uint8],
    pos_code: NDArray[np.uint8],
    odd_words: NDArray[np.uint64],
    thresholds: NDArray[np.int64],
    codes: bool,
) -> None:
    # In phases, each a loop of independent random loads (the processor overlaps their cache
    # misses): the position of every flipped bit in every active pass, then the part holding
    # it, then the parts' updates in the order (bit, pass). A part's parity only toggles, so
    # the result is the one of updating bit after bit.
    m = positions.shape[0]
    if m == 0:
        return
    total = m * active
    at = np.empty(total, dtype=np.int64)
    for k in range(m):
        position = positions[k]
        bits[position] ^= 1
        for p in range(active):
            base = p * n
            at[k * active + p] = base + inverse_all[base + position]
    start = np.empty(total, dtype=np.int64)
    for i in range(total):
        g = at[i]
        pbits[g >> 6] ^= np.uint64(1) << np.uint64(g & 63)
        start[i] = _part_start(part_starts, g)
    length = np.zeros(total, dtype=np.int64)
    if codes:  # only the codes need the lengths
        for i in range(total):
            s = start[i]
            length[i] = _part_end(part_starts, s) - s
    for i in range(total):
        s = start[i]
        odd = 1 - _bit(odd_bits, s)
        _set_odd(odd_bits, odd_words, s, odd)
        _set_code(part_code, pos_code, s, length[i], odd, thresholds, False, codes)


@helper
def _gather_bits(bits: NDArray[np.uint8], perm: NDArray[np.int32], out: NDArray[np.uint8]) -> None:
    """``out[i] = bits[perm[i]]``, through a packed copy of ``bits`` (8 per byte): the random
    reads then fall in an eighth of the memory, which the caches hold."""
    n = bits.shape[0]
    packed = np.zeros((n + 7) >> 3, dtype=np.uint8)
    for j in range(n):
        packed[j >> 3] |= bits[j] << (j & 7)
    for i in range(perm.shape[0]):
        j = perm[i]
        out[i] = (packed[j >> 3] >> (j & 7)) & 1


@helper
def _gather_bitmap(
    bits: NDArray[np.uint8], perm: NDArray[np.int32], words: NDArray[np.uint64], base: int
) -> None:
    """Set bit ``base + i`` of the bitmap ``words`` to ``bits[perm[i]]`` (those bits are 0 before;
    the bits below ``base`` are kept), through a packed copy of ``bits`` as ``_gather_bits``."""
    n = bits.shape[0]
    packed = np.zeros((n + 7) >> 3, dtype=np.uint8)
    for j in range(n):
        packed[j >> 3] |= bits[j] << (j & 7)
    count = perm.shape[0]
    i = 0
    while i < count and (base + i) & 63:  # up to the first whole word
        j = perm[i]
        g = base + i
        words[g >> 6] |= np.uint64((packed[j >> 3] >> (j & 7)) & 1) << np.uint64(g & 63)
        i += 1
    while i + 64 <= count:  # whole words, built in a register
        word = np.uint64(0)
        for b in range(64):
            j = perm[i + b]
            word |= np.uint64((packed[j >> 3] >> (j & 7)) & 1) << np.uint64(b)
        words[(base + i) >> 6] = word
        i += 64
    while i < count:
        j = perm[i]
        g = base + i
        words[g >> 6] |= np.uint64((packed[j >> 3] >> (j & 7)) & 1) << np.uint64(g & 63)
        i += 1


@kernel
def bob_activate(
    p: int,
    n: int,
    size: int,
    top_alice: NDArray[np.uint8],
    bits: NDArray[np.uint8],
    perm_all: NDArray[np.int32],
    pbits: NDArray[np.uint64],
    part_starts: NDArray[np.uint64],
    odd_bits: NDArray[np.uint64],
    part_code: NDArray[np.uint8],
    pos_code: NDArray[np.uint8],
    odd_words: NDArray[np.uint64],
    thresholds: NDArray[np.int64],
    codes: bool,
    codes_all: bool,
) -> None:
    """Pass ``p``: Bob's permuted bits and its top-level blocks as parts (``perm_all`` filled).

    ``codes_all``: then compute the codes of every part of passes 0..p, when the weights first
    need them (until then the kernels skip them: ``codes`` False).
    """
    base = p * n
    _gather_bitmap(bits, perm_all[base : base + n], pbits, base)
    # the end of the pass too (the next pass's first start), so that a part of length 1 is one
    # whose next position is marked
    _mark_start(part_starts, base + n)
    for j in range(top_alice.shape[0]):
        start = j * size
        end = min(start + size, n)
        s = base + start
        _mark_start(part_starts, s)
        odd = top_alice[j] ^ _parity(pbits, s, base + end)
        _set_odd(odd_bits, odd_words, s, odd)
        _set_code(part_code, pos_code, s, end - start, odd, thresholds, True, codes)
    if codes_all:
        for q in range(p + 1):
            start = q * n
            while start < (q + 1) * n:
                end = _part_end(part_starts, start)
                _set_code(
                    part_code,
                    pos_code,
                    start,
                    end - start,
                    _bit(odd_bits, start),
                    thresholds,
                    True,
                    True,
                )
                start = end


@kernel
def bob_fix_known_errors(
    active: int,
    n: int,
    bits: NDArray[np.uint8],
    perm_all: NDArray[np.int32],
    inverse_all: NDArray[np.int32],
    pbits: NDArray[np.uint64],
    part_starts: NDArray[np.uint64],
    odd_bits: NDArray[np.uint64],
    part_code: NDArray[np.uint8],
    pos_code: NDArray[np.uint8],
    odd_words: NDArray[np.uint64],
    thresholds: NDArray[np.int64],
    codes: bool,
    marks: NDArray[np.uint8],
    first: NDArray[np.int64],
) -> tuple[NDArray[np.int64], int]:
    """Flip the bits at the global positions ``first`` (certain errors found by the cuts, maybe
    repeated), then every bit that is an odd part of length 1 in some pass, until none is left.

    Returns the global starts of the odd parts left (increasing, none of length 1) and the
    number of bits flipped. ``marks`` (n zeros, left zero) deduplicates bits found in several
    passes.
    """
    corrected = 0
    if first.shape[0]:
        positions = np.empty(first.shape[0], dtype=np.int64)
        j = 0
        for k in range(first.shape[0]):
            position = perm_all[first[k]]
            if marks[position] == 0:
                marks[position] = 1
                positions[j] = position
                j += 1
        for k in range(j):
            marks[positions[k]] = 0
        _correct(
            positions[:j],
            active,
            n,
            bits,
            inverse_all,
            pbits,
            part_starts,
            odd_bits,
            part_code,
            pos_code,
            odd_words,
            thresholds,
            codes,
        )
        corrected += j
    while True:
        parts = _odd_parts(odd_bits, odd_words)
        singles = 0
        for k in range(parts.shape[0]):
            if _is_start(part_starts, parts[k] + 1):  # a part of length 1
                singles += 1
        if singles == 0:
            return parts, corrected
        found = np.empty(singles, dtype=np.int64)
        j = 0
        for k in range(parts.shape[0]):
            s = parts[k]
            if _is_start(part_starts, s + 1) and marks[perm_all[s]] == 0:
                marks[perm_all[s]] = 1
                found[j] = perm_all[s]
                j += 1
        positions = found[:j]
        for k in range(j):
            marks[positions[k]] = 0
        _correct(
            positions,
            active,
            n,
            bits,
            inverse_all,
            pbits,
            part_starts,
            odd_bits,
            part_code,
            pos_code,
            odd_words,
            thresholds,
            codes,
        )
        corrected += positions.shape[0]


@kernel
def bob_plan_classic(
    parts: NDArray[np.int64],
    n: int,
    sizes: NDArray[np.int64],
    part_starts: NDArray[np.uint64],
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int32]]:
    """Classic Cascade's round: the first odd part of every top-level block holding an odd
    number of them (``parts``: every odd part, increasing), halved as ``bob_even_cuts`` with
    arity 2. Returns the chosen parts, their cuts and the wire triples of ``bob_query``."""
    m = parts.shape[0]
    chosen = np.empty(m, dtype=np.int64)
    chosen_pass = np.empty(m, dtype=np.int64)
    k = 0
    # the parts come in order: a block's end tells when the next begins, a pass's the next pass
    block_end = -1
    pass_end = -1
    p = -1
    base = 0
    size = 1
    in_block = 0
    for i in range(m):
        s = parts[i]
        if s >= block_end:
            if in_block & 1:
                k += 1
            if s >= pass_end:
                p = s // n
                base = p * n
                pass_end = base + n
                size = sizes[p]
            block_end = min(base + (s - base) // size * size + size, pass_end)
            chosen[k] = s
            chosen_pass[k] = p
            in_block = 0
        in_block += 1
    if in_block & 1:
        k += 1
    cuts = np.empty(k, dtype=np.int64)
    triples = np.empty((k, 3), dtype=np.int32)
    for i in range(k):
        s = chosen[i]
        end = _part_end(part_starts, s)
        cut = min(max(s + (end - s) // 2, s + 1), end - 1)
        base = chosen_pass[i] * n
        cuts[i] = cut
        triples[i, 0] = chosen_pass[i]
        triples[i, 1] = s - base
        triples[i, 2] = cut - base
    return chosen[:k], cuts, triples


@kernel
def bob_even_cuts(
    parts: NDArray[np.int64],
    arity: int,
    n: int,
    part_starts: NDArray[np.uint64],
    small_length: int,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Cuts at equal lengths (parts, arity - 1), clipped strictly inside each part; and the
    indices (into ``parts``) of the parts of at most ``small_length`` bits."""
    m = parts.shape[0]
    cuts = np.empty((m, arity - 1), dtype=np.int64)
    small = np.empty(m, dtype=np.int64)
    count = 0
    for k in range(m):
        s = parts[k]
        end = _part_end(part_starts, s)
        length = end - s
        for f in range(1, arity):
            cuts[k, f - 1] = min(max(s + (length * f) // arity, s + 1), end - 1)
        if length <= small_length:
            small[count] = k
            count += 1
    return cuts, small[:count]


@kernel
def bob_log_odds(
    parts: NDArray[np.int64],
    active: int,
    n: int,
    perm_all: NDArray[np.int32],
    inverse_all: NDArray[np.int32],
    cross: NDArray[np.int32],
    part_starts: NDArray[np.uint64],
    part_code: NDArray[np.uint8],
    pos_code: NDArray[np.uint8],
    table: NDArray[np.float32],
    prior: np.float32,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Per bit of ``parts`` (concatenated): the log-odds of an error (prior plus the
    log-likelihood ratios of the parts holding that bit in every other active pass, added in
    pass order in float32), returned as ``_exponent`` of it. ``cross`` is used when exactly two
    passes are active (else it may be empty).

    Also the global positions of the certain errors: the only bit of a part not known right
    (``_exponent`` +inf: weight 0; every other bit has a positive weight). If there are any,
    no cut is made this round and the weights are not needed (see ``bob_weighted_cuts``).
    """
    m = parts.shape[0]
    total = 0
    for k in range(m):
        s = parts[k]
        total += _part_end(part_starts, s) - s
    out = np.empty(total, dtype=np.float32)
    found = np.empty(m, dtype=np.int64)
    singles = 0
    j = 0
    for k in range(m):
        s = parts[k]
        own = s // n
        end = _part_end(part_starts, s)
        first = j
        if active == 2:
            other = (1 - own) * n
            for g in range(s, end):
                h = other + cross[g]
                code = pos_code[h]
                if code == LONG_PART:
                    code = part_code[_part_start(part_starts, h)]
                out[j] = _exponent(prior + table[code])
                j += 1
        else:
            for g in range(s, end):
                position = perm_all[g]
                acc = prior
                for p in range(active):
                    if p != own:
                        base = p * n
                        h = base + inverse_all[base + position]
                        code = pos_code[h]
                        if code == LONG_PART:
                            code = part_code[_part_start(part_starts, h)]
                        acc = acc + table[code]
                out[j] = _exponent(acc)
                j += 1
        opened = 0
        at = 0
        for i in range(first, j):
            if out[i] != np.inf:
                if opened == 0:
                    at = i
                opened += 1
        if opened == 1:
            found[singles] = s + at - first
            singles += 1
    return out, found[:singles]


@kernel
def bob_weighted_cuts(
    cuts: NDArray[np.int64],
    small: NDArray[np.int64],
    starts: NDArray[np.int64],
    n: int,
    part_starts: NDArray[np.uint64],
    exp_exponent: NDArray[np.float32],
    arity: int,
) -> NDArray[np.int64]:
    """Cut the small parts at their weight quantiles (``reconciler._cuts``), in place.

    ``starts``: the small parts (global starts); ``exp_exponent``: numpy's float32 ``exp`` of
    ``bob_log_odds``, so a bit's weight is 1 / (1 + that), in float32 as numpy computes it. If
    some part has a single bit of positive weight, nothing is cut and the global positions of
    those bits are returned (certain errors); else an empty array.
    """
    weight = np.empty(exp_exponent.shape[0], dtype=np.float32)
    for i in range(exp_exponent.shape[0]):
        weight[i] = np.float32(1.0) / (exp_exponent[i] + np.float32(1.0))
    return _weighted_cuts(cuts, small, starts, n, part_starts, weight, arity)


@helper
def _cut_at_quantiles(
    cuts: NDArray[np.int64],
    small: NDArray[np.int64],
    starts: NDArray[np.int64],
    offset: NDArray[np.int64],
    lengths: NDArray[np.int64],
    first_open: NDArray[np.int64],
    last_open: NDArray[np.int64],
    opened: NDArray[np.int64],
    cum0: NDArray[np.float64],
    weight: NDArray[np.float32],
    arity: int,
) -> None:
    """The weighted cuts of the small parts (``_weighted_cuts``), in place."""
    m = small.shape[0]
    for k in range(m):
        if opened[k] <= 1:
            continue  # no open bit (inconsistent parities): keep the plain halving
        lo = offset[k]
        end = lo + lengths[k]
        base = cum0[lo]
        total = cum0[end] - base
        for f in range(1, arity):
            target = base + total * (f / arity)
            # first bit i of the part with cum0[i + 1] >= target (or the part's end)
            a = lo + 1
            b = end + 1
            while a < b:
                middle = (a + b) >> 1
                if cum0[middle] < target:
                    a = middle + 1
                else:
                    b = middle
            at = min(max(a - 1, first_open[k]), last_open[k])
            # before or after the bit where the target is reached, whichever is nearer
            chosen = at if abs(cum0[at] - target) <= abs(cum0[at + 1] - target) else at + 1
            chosen = min(max(chosen, first_open[k] + 1), last_open[k])
            if arity > 2:  # the leftmost cut with the same open bits on its left
                while not weight[chosen - 1] > 0.0:
                    chosen -= 1
            cuts[small[k], f - 1] = starts[k] + chosen - lo


@helper
def _weighted_cuts(
    cuts: NDArray[np.int64],
    small: NDArray[np.int64],
    starts: NDArray[np.int64],
    n: int,
    part_starts: NDArray[np.uint64],
    weight: NDArray[np.float32],
    arity: int,
) -> NDArray[np.int64]:
    # Every search stays inside its part: the numpy formulation searched the concatenation of
    # all parts, but after its clipping to the part's open bits the result is the same.
    m = small.shape[0]
    lengths = np.empty(m, dtype=np.int64)
    for k in range(m):
        lengths[k] = _part_end(part_starts, starts[k]) - starts[k]
    total_bits = weight.shape[0]
    cum0 = np.empty(total_bits + 1, dtype=np.float64)
    cum0[0] = 0.0
    running = 0.0
    for i in range(total_bits):
        running += np.float64(weight[i])
        cum0[i + 1] = running
    offset = np.empty(m, dtype=np.int64)
    first_open = np.empty(m, dtype=np.int64)
    last_open = np.empty(m, dtype=np.int64)
    opened = np.empty(m, dtype=np.int64)
    singles = 0
    lo = 0
    for k in range(m):
        offset[k] = lo
        hi = lo + lengths[k] - 1
        first = -1
        last = -1
        count = 0
        for i in range(lo, hi + 1):
            if weight[i] > 0.0:
                if first < 0:
                    first = i
                last = i
                count += 1
        # no open bit: both at the part's last bit
        first_open[k] = first if first >= 0 else hi
        last_open[k] = last if last >= 0 else hi
        opened[k] = count
        if count == 1:
            singles += 1
        lo = hi + 1
    if singles:
        found = np.empty(singles, dtype=np.int64)
        j = 0
        for k in range(m):
            if opened[k] == 1:
                found[j] = starts[k] + first_open[k] - offset[k]
                j += 1
        return found
    _cut_at_quantiles(
        cuts, small, starts, offset, lengths, first_open, last_open, opened, cum0, weight, arity
    )
    return np.empty(0, dtype=np.int64)


@kernel
def bob_cuts_two_passes(
    parts: NDArray[np.int64],
    arity: int,
    n: int,
    small_length: int,
    cross: NDArray[np.int32],
    part_starts: NDArray[np.uint64],
    part_code: NDArray[np.uint8],
    pos_code: NDArray[np.uint8],
    exp_exponent_of_code: NDArray[np.float32],
) -> tuple[
    NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int32], NDArray[np.int64]
]:
    """``bob_even_cuts``, ``bob_log_odds``, ``bob_weighted_cuts`` and ``bob_query`` in one,
    while exactly two passes are active: a bit's weight then depends only on the code of its
    part in the other pass, 1 / (1 + ``exp_exponent_of_code[code]``) (numpy's float32 exp of
    ``_exponent`` of the prior plus the code's log-likelihood ratio), 0 for a known-right bit.

    Returns the asked ranges as ``bob_query``, then the global positions of the certain errors
    (if there are any, nothing is asked: the ranges are empty).
    """
    weight_of_code = np.empty(256, dtype=np.float32)
    for code in range(256):
        weight_of_code[code] = np.float32(1.0) / (exp_exponent_of_code[code] + np.float32(1.0))
    weight_of_code[KNOWN_RIGHT] = 0.0
    m_all = parts.shape[0]
    ends = np.empty(m_all, dtype=np.int64)
    small = np.empty(m_all, dtype=np.int64)
    starts = np.empty(m_all, dtype=np.int64)
    lengths = np.empty(m_all, dtype=np.int64)
    m = 0
    for k in range(m_all):
        s = parts[k]
        ends[k] = _part_end(part_starts, s)
        length = ends[k] - s
        if length <= small_length:
            small[m] = k
            starts[m] = s
            lengths[m] = length
            m += 1
    # The certain errors first, each part read only up to its second open bit: a round that
    # has some corrects them and lists its parts again, so their weights would be thrown away.
    found = np.empty(m, dtype=np.int64)
    singles = 0
    for k in range(m):
        s = starts[k]
        other = (1 - s // n) * n
        count = 0
        at = 0
        for g in range(s, s + lengths[k]):
            h = other + cross[g]
            code = pos_code[h]
            if code == LONG_PART:
                code = part_code[_part_start(part_starts, h)]
            if weight_of_code[code] > 0.0:
                count += 1
                if count == 2:
                    break
                at = g
        if count == 1:
            found[singles] = at
            singles += 1
    if singles:
        none = np.empty(0, dtype=np.int64)
        return none, none, none, np.empty((0, 3), dtype=np.int32), found[:singles]
    # equal lengths as ``bob_even_cuts``; the small parts' are replaced by their weighted cuts
    cuts = np.empty((m_all, arity - 1), dtype=np.int64)
    for k in range(m_all):
        s = parts[k]
        for f in range(1, arity):
            cuts[k, f - 1] = min(max(s + ((ends[k] - s) * f) // arity, s + 1), ends[k] - 1)
    if m == 0:
        rows, left, right, triples = _query(parts, cuts, n)
        return rows, left, right, triples, found
    small = small[:m]
    starts = starts[:m]
    lengths = lengths[:m]
    total = 0
    for k in range(m):
        total += lengths[k]
    # one pass over the bits: their weights, the running sum over all parts (in the order of
    # ``_weighted_cuts``), each part's first and last open bit and their number
    weight = np.empty(total, dtype=np.float32)
    cum0 = np.empty(total + 1, dtype=np.float64)
    cum0[0] = 0.0
    running = 0.0
    offset = np.empty(m, dtype=np.int64)
    first_open = np.empty(m, dtype=np.int64)
    last_open = np.empty(m, dtype=np.int64)
    opened = np.empty(m, dtype=np.int64)
    j = 0
    for k in range(m):
        s = starts[k]
        other = (1 - s // n) * n
        offset[k] = j
        first = -1
        last = -1
        count = 0
        for g in range(s, s + lengths[k]):
            h = other + cross[g]
            code = pos_code[h]
            if code == LONG_PART:
                code = part_code[_part_start(part_starts, h)]
            w = weight_of_code[code]
            weight[j] = w
            running += np.float64(w)
            cum0[j + 1] = running
            if w > 0.0:
                if first < 0:
                    first = j
                last = j
                count += 1
            j += 1
        # no open bit: both at the part's last bit
        first_open[k] = first if first >= 0 else j - 1
        last_open[k] = last if last >= 0 else j - 1
        opened[k] = count
    _cut_at_quantiles(
        cuts, small, starts, offset, lengths, first_open, last_open, opened, cum0, weight, arity
    )
    rows, left, right, triples = _query(parts, cuts, n)
    return rows, left, right, triples, found[:0]


@kernel
def bob_query(
    parts: NDArray[np.int64], cuts: NDArray[np.int64], n: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int32]]:
    """The asked ranges of a round: (part start, range start, range end = cut) per question,
    global, and the wire triples (pass, start, end), pass-local.

    A part's ranges follow one another from its start; repeated cuts (parts shorter than the
    arity) are dropped.
    """
    return _query(parts, cuts, n)


@helper
def _query(
    parts: NDArray[np.int64], cuts: NDArray[np.int64], n: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int32]]:
    m, width = cuts.shape
    rows = np.empty(m * width, dtype=np.int64)
    left = np.empty(m * width, dtype=np.int64)
    right = np.empty(m * width, dtype=np.int64)
    triples = np.empty((m * width, 3), dtype=np.int32)
    k = 0
    for i in range(m):
        previous = parts[i]
        pass_index = previous // n
        base = pass_index * n
        for f in range(width):
            cut = cuts[i, f]
            if f == 0 or cut > cuts[i, f - 1]:
                rows[k] = parts[i]
                left[k] = previous
                right[k] = cut
                triples[k, 0] = pass_index
                triples[k, 1] = previous - base
                triples[k, 2] = cut - base
                previous = cut
                k += 1
    return rows[:k], left[:k], right[:k], triples[:k]


@kernel
def bob_receive(
    parities: NDArray[np.uint8],
    rows: NDArray[np.int64],
    right: NDArray[np.int64],
    left: NDArray[np.int64],
    n: int,
    pbits: NDArray[np.uint64],
    part_starts: NDArray[np.uint64],
    odd_bits: NDArray[np.uint64],
    part_code: NDArray[np.uint8],
    pos_code: NDArray[np.uint8],
    odd_words: NDArray[np.uint64],
    thresholds: NDArray[np.int64],
    codes: bool,
) -> None:
    """Split every asked part at its cuts: each asked range becomes a part whose syndrome is
    Alice's parity xor Bob's; the rest's is derived (the part's xor the asked ones)."""
    m = rows.shape[0]
    i = 0
    while i < m:
        s = rows[i]
        end = _part_end(part_starts, s) if codes else 0  # only the codes need the end
        rest_odd = _bit(odd_bits, s)
        j = i
        while j < m and rows[j] == s:
            start = left[j]
            cut = right[j]
            alice = parities[j]
            odd = alice ^ _parity(pbits, start, cut)
            rest_odd ^= odd
            if start != s:
                _mark_start(part_starts, start)
            _set_odd(odd_bits, odd_words, start, odd)
            _set_code(part_code, pos_code, start, cut - start, odd, thresholds, False, codes)
            j += 1
        start = right[j - 1]
        _mark_start(part_starts, start)
        _set_odd(odd_bits, odd_words, start, rest_odd)
        _set_code(part_code, pos_code, start, end - start, rest_odd, thresholds, False, codes)
        i = j


@kernel
def responder_prefix(
    bits: NDArray[np.uint8], perm: NDArray[np.int32], prefix: NDArray[np.uint8]
) -> None:
    """``prefix[i + 1]`` = parity of ``bits[perm[0..i]]``, ``prefix[0]`` = 0."""
    _gather_bits(bits, perm, prefix[1:])
    acc = 0
    prefix[0] = 0
    for i in range(1, perm.shape[0] + 1):
        acc ^= prefix[i]
        prefix[i] = acc


@kernel
def responder_answer(
    prefix_all: NDArray[np.uint8],
    n: int,
    tops: NDArray[np.int64],
    ranges: NDArray[np.int64],
    out: NDArray[np.uint8],
) -> None:
    """Alice's parities: every requested top-level block of ``tops`` (pass, size, count) in
    order, then every range of ``ranges`` (pass, start, end); pass ``p``'s prefix parities are
    ``prefix_all[p * (n + 1):(p + 1) * (n + 1)]``."""
    k = 0
    for t in range(tops.shape[0]):
        base = tops[t, 0] * (n + 1)
        size = tops[t, 1]
        for j in range(tops[t, 2]):
            start = j * size
            end = min(start + size, n)
            out[k] = prefix_all[base + end] ^ prefix_all[base + start]
            k += 1
    for r in range(ranges.shape[0]):
        base = ranges[r, 0] * (n + 1)
        out[k] = prefix_all[base + ranges[r, 2]] ^ prefix_all[base + ranges[r, 1]]
        k += 1


@helper
def _mul_64x64(a: np.uint64, b: np.uint64) -> tuple[np.uint64, np.uint64]:
    """The 128-bit product of two 64-bit words as (high, low) words."""
    low32 = np.uint64(0xFFFFFFFF)
    half = np.uint64(32)
    a0 = a & low32
    a1 = a >> half
    b0 = b & low32
    b1 = b >> half
    p00 = a0 * b0
    p01 = a0 * b1
    p10 = a1 * b0
    p11 = a1 * b1
    middle = (p00 >> half) + (p01 & low32) + (p10 & low32)
    low = (middle << half) | (p00 & low32)
    high = p11 + (p01 >> half) + (p10 >> half) + (middle >> half)
    return high, low


@kernel
def pcg64_permutation(
    state_high: np.uint64,
    state_low: np.uint64,
    inc_high: np.uint64,
    inc_low: np.uint64,
    n: int,
) -> NDArray[np.int32]:
    """The base Fisher-Yates shuffle of ``permutation``'s specification, from the 128-bit PCG64
    state and increment given as (high, low) 64-bit words: one XSL-RR word per step (state
    advanced first), two 32-bit draws per word (low half first), masked rejection sampling."""
    mult_high = np.uint64(0x2360ED051FC65DA4)
    mult_low = np.uint64(0x4385DF649FCCF645)
    one = np.uint64(1)
    perm = np.arange(n).astype(np.int32)
    spare = np.uint64(0)
    have_spare = False
    for i in range(n - 1, 0, -1):
        bound = np.uint64(i)
        mask = bound
        mask |= mask >> one
        mask |= mask >> np.uint64(2)
        mask |= mask >> np.uint64(4)
        mask |= mask >> np.uint64(8)
        mask |= mask >> np.uint64(16)
        while True:
            if have_spare:
                draw = spare
                have_spare = False
            else:
                # state = state * multiplier + increment (mod 2**128)
                high, low = _mul_64x64(state_low, mult_low)
                high += state_low * mult_high + state_high * mult_low
                state_low = low + inc_low
                state_high = high + inc_high + (one if state_low < low else np.uint64(0))
                x = state_high ^ state_low
                rotation = state_high >> np.uint64(58)
                word = (x >> rotation) | (x << ((np.uint64(64) - rotation) & np.uint64(63)))
                draw = word & np.uint64(0xFFFFFFFF)
                spare = word >> np.uint64(32)
                have_spare = True
            j = draw & mask
            if j <= bound:
                break
        k = np.int64(j)
        swap = perm[i]
        perm[i] = perm[k]
        perm[k] = swap
    return perm
