"""The per-pass permutation of Cascade, as a specified function of (seed, size, pass index).

Both roles must compute bit-identical permutations, possibly in different implementations, so
the function is specified here completely, independently of any library.

Specification v2 (``seed``: 32 bytes, ``n`` >= 1 bits, ``pass_index`` >= 0)::

    digest = SHA-256( b"qkdnode/cascade/permutation/v2"
                      || seed
                      || pass_index as 4 bytes, little-endian unsigned
                      || n as 8 bytes, little-endian unsigned )
    state  = int.from_bytes(digest[0:16],  "little")          # 128-bit PCG state
    inc    = int.from_bytes(digest[16:32], "little") | 1      # 128-bit odd increment

    PCG64 (XSL-RR 128/64, O'Neill 2014), one 64-bit word per step, the state advanced *before*
    each output:
        state = (state * 0x2360ED051FC65DA44385DF649FCCF645 + inc) mod 2**128
        word  = rotr64((state >> 64) XOR (state mod 2**64), state >> 122)

    32-bit draws: each word gives two draws, its low half first, then its high half.

    Fisher-Yates (Durstenfeld) shuffle of perm = [0, 1, ..., n-1]:
        for i = n-1 down to 1:
            mask = smallest 2**b - 1 >= i
            repeat: j = (next 32-bit draw) AND mask   until j <= i     # rejection: exact
            swap perm[i], perm[j]
    (n < 2**31, so every i fits in a 32-bit draw.)

``perm[i]`` is the original index of the bit at permuted position ``i``: pass ``pass_index``
looks at the bits in the order ``bits[perm]``. The rejection sampling makes every one of the n!
permutations equally likely given a uniform PCG stream (no ties, unlike the v1 sort of 32-bit
keys). The v1 domain string is not accepted: a peer on v1 fails at verification, never silently.

Implementation: the numba kernel ``kernels.pcg64_permutation`` follows the specification
directly (128-bit state in two 64-bit words), on int32. It is exactly what numpy's
``Generator.permutation`` does with a ``PCG64`` bit generator (Fisher-Yates with
``random_interval`` on buffered 32-bit halves), which the tests use as a second reference with the
plain-Python specification below; numpy does not promise that stream across versions, the
kernel does not depend on it.

Cache: drawing a permutation of 10**6 positions costs more than a whole warm Cascade frame, so
frames with the same seed and length reuse the permutations of every pass. The permutations of
the last ``PERMUTATION_CACHE_SETS`` (seed, n) pairs used are kept with their inverses (and the
map between passes 0 and 1 that Bob's weights use) in ``PermutationSet`` objects, least recently
used first out, within ``PERMUTATION_CACHE_BYTES``; returned arrays are read-only. It is a memo
of a pure function: the result is the same with or without it. The pipeline draws a fresh seed
per block, so a node gains nothing from older sets: few are kept, and a node's memory does not
grow with the blocks it has reconciled.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import OrderedDict
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.cascade import kernels

SEED_BYTES: Final = 32
PERMUTATION_DOMAIN: Final = b"qkdnode/cascade/permutation/v2"
MAX_BITS: Final = 2**31 - 1  # permuted positions travel as int32

# Permutations and inverses kept for reuse (module doc): 4 passes of a 10**6-bit frame take 32 MB.
PERMUTATION_CACHE_BYTES: Final = 160 * 2**20
PERMUTATION_CACHE_SETS: Final = 2
# Passes of the largest variant (``CascadeVariant.passes``): the rows a permutation set reserves.
MAX_PASSES: Final = 16

_PCG_MULTIPLIER: Final = 0x2360ED051FC65DA44385DF649FCCF645
_MASK64: Final = (1 << 64) - 1
_MASK128: Final = (1 << 128) - 1


def check_seed(seed: bytes) -> bytes:
    """Return ``seed`` if it is exactly 32 bytes, else raise ProtocolError(field="seed")."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ProtocolError(f"must be {SEED_BYTES} bytes", field="seed")
    return bytes(seed)


def pcg64_state(seed: bytes, n: int, pass_index: int) -> tuple[int, int]:
    """The (state, increment) pair of the specification for this pass."""
    check_seed(seed)
    if not 1 <= n <= MAX_BITS:
        raise ProtocolError(f"must be in [1, {MAX_BITS}]", field="n_bits")
    if not 0 <= pass_index < 2**32:
        raise ProtocolError("must be in [0, 2**32)", field="pass_index")
    digest = hashlib.sha256(
        PERMUTATION_DOMAIN + seed + struct.pack("<I", pass_index) + struct.pack("<Q", n)
    ).digest()
    return int.from_bytes(digest[:16], "little"), int.from_bytes(digest[16:], "little") | 1


def _numpy_permutation(state: int, inc: int, n: int) -> NDArray[np.int32]:
    generator = np.random.PCG64()
    generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": state, "inc": inc},
        "has_uint32": 0,
        "uinteger": 0,
    }
    result: NDArray[np.int32] = (
        np.random.Generator(generator).permutation(n).astype(np.int32, copy=False)
    )
    return result


def _python_permutation(state: int, inc: int, n: int) -> list[int]:
    """The specification, literally, in Python integers (the tests' reference)."""
    perm = list(range(n))
    spare: int | None = None
    for i in range(n - 1, 0, -1):
        mask = (1 << i.bit_length()) - 1
        while True:
            if spare is None:
                state = (state * _PCG_MULTIPLIER + inc) & _MASK128
                x = ((state >> 64) ^ state) & _MASK64
                rot = state >> 122
                word = ((x >> rot) | (x << (64 - rot))) & _MASK64
                draw, spare = word & 0xFFFFFFFF, word >> 32
            else:
                draw, spare = spare, None
            j = draw & mask
            if j <= i:
                break
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@functools.cache
def numpy_follows_specification() -> bool:
    """Whether this numpy's ``Generator.permutation`` equals the specification (checked once;
    the tests then use numpy as a fast second reference)."""
    for n, pass_index in ((1, 0), (2, 1), (97, 2), (1000, 3)):
        state, inc = pcg64_state(bytes(range(32)), n, pass_index)
        if _numpy_permutation(state, inc, n).tolist() != _python_permutation(state, inc, n):
            return False
    return True


def _draw_permutation(seed: bytes, n: int, pass_index: int) -> NDArray[np.int32]:
    state, inc = pcg64_state(seed, n, pass_index)
    perm: NDArray[np.int32] = kernels.pcg64_permutation(
        np.uint64(state >> 64),
        np.uint64(state & _MASK64),
        np.uint64(inc >> 64),
        np.uint64(inc & _MASK64),
        n,
    )
    return perm


class PermutationSet:
    """The permutations of every pass for one (seed, n), drawn on first use, and their inverses.

    Pass ``p`` occupies ``[p * n, (p + 1) * n)`` of the flat arrays ``perm_all`` and
    ``inverse_all`` (``MAX_PASSES`` passes reserved; memory is only touched for the passes
    drawn), so a role can index every pass through one array. Callers must not write them.
    """

    def __init__(self, seed: bytes, n: int) -> None:
        self.seed = check_seed(seed)
        pcg64_state(seed, n, 0)  # validates n
        self.n = n
        self.perm_all = np.empty(MAX_PASSES * n, dtype=np.int32)
        self.inverse_all = np.empty(MAX_PASSES * n, dtype=np.int32)
        self._drawn = [False] * MAX_PASSES
        self._inverted = [False] * MAX_PASSES
        self._cross: NDArray[np.int32] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the passes drawn, their inverses and the cross map so far."""
        rows = sum(self._drawn) + sum(self._inverted)
        return rows * self.n * 4 + (0 if self._cross is None else self._cross.nbytes)

    def perm(self, pass_index: int) -> NDArray[np.int32]:
        """The permutation of pass ``pass_index`` (< MAX_PASSES), read-only."""
        n = self.n
        row = self.perm_all[pass_index * n : (pass_index + 1) * n]
        if not self._drawn[pass_index]:
            row[:] = _draw_permutation(self.seed, n, pass_index)
            self._drawn[pass_index] = True
            _trim()
        return _read_only(row)

    def inverse(self, pass_index: int) -> NDArray[np.int32]:
        """``inverse[perm[i]] = i`` for pass ``pass_index``, read-only."""
        n = self.n
        row = self.inverse_all[pass_index * n : (pass_index + 1) * n]
        if not self._inverted[pass_index]:
            row[self.perm(pass_index)] = np.arange(n, dtype=np.int32)
            self._inverted[pass_index] = True
            _trim()
        return _read_only(row)

    def cross01(self) -> NDArray[np.int32]:
        """Pass-local position in the other pass of the bit at every position of passes 0 and
        1 (``[0, n)``: pass 0 -> pass 1; ``[n, 2 n)``: pass 1 -> pass 0), read-only."""
        if self._cross is None:
            n = self.n
            cross = np.empty(2 * n, dtype=np.int32)
            cross[n:] = self.inverse(0)[self.perm(1)]
            cross[cross[n:]] = np.arange(n, dtype=np.int32)
            cross.flags.writeable = False
            self._cross = cross
            _trim()
        return self._cross


def _read_only(array: NDArray[np.int32]) -> NDArray[np.int32]:
    view = array.view()
    view.flags.writeable = False
    return view


_cache: OrderedDict[tuple[bytes, int], PermutationSet] = OrderedDict()


def _trim() -> None:
    """Drop the least recently used sets until at most PERMUTATION_CACHE_SETS remain and they
    fit in PERMUTATION_CACHE_BYTES (none stays if the most recent alone is larger)."""
    used = sum(entry.nbytes for entry in list(_cache.values()))
    while len(_cache) > 1 and (
        used > PERMUTATION_CACHE_BYTES or len(_cache) > PERMUTATION_CACHE_SETS
    ):
        try:
            _, dropped = _cache.popitem(last=False)
        except KeyError:  # emptied meanwhile
            break
        used -= dropped.nbytes
    if used > PERMUTATION_CACHE_BYTES:
        _cache.clear()


def permutation_set(seed: bytes, n: int) -> PermutationSet:
    """The (cached) permutation set of (seed, n); see the module doc for the cache."""
    key = (check_seed(seed), n)
    found = _cache.get(key)
    if found is None:
        found = PermutationSet(seed, n)
        _cache[key] = found
        _trim()
    else:
        _cache.move_to_end(key)
    return found


def cascade_permutation(seed: bytes, n: int, pass_index: int) -> NDArray[np.int32]:
    """The permutation of the module specification: ``perm[i]`` = original index at position i.

    Read-only; repeated calls reuse a cached array (module doc).
    """
    if not 0 <= pass_index < MAX_PASSES:  # beyond any variant: drawn, never cached
        return _draw_permutation(seed, n, pass_index)
    return permutation_set(seed, n).perm(pass_index)


def cascade_inverse_permutation(seed: bytes, n: int, pass_index: int) -> NDArray[np.int32]:
    """``inverse[perm[i]] = i``: the permuted position of every original index (read-only)."""
    if not 0 <= pass_index < MAX_PASSES:
        perm = _draw_permutation(seed, n, pass_index)
        inverse = np.empty(n, dtype=np.int32)
        inverse[perm] = np.arange(n, dtype=np.int32)
        return inverse
    return permutation_set(seed, n).inverse(pass_index)


def forget_permutations(seed: bytes, n: int) -> None:
    """Drop the cached set of (seed, n), if any: its frame is done and the seed never recurs
    (the frames of ``cascade.frames``), so it would only hold memory."""
    _cache.pop((seed, n), None)


def clear_permutation_cache() -> None:
    """Drop every cached permutation (benchmarks measure the cold path with it)."""
    _cache.clear()
