"""The per-pass permutation of Cascade, as a specified function of (seed, size, pass index).

Both roles must compute bit-identical permutations, possibly in different implementations, so
the function is specified here completely, independently of any library.

Specification v3 (``seed``: 32 bytes, ``n`` >= 1 bits, ``pass_index`` >= 0). Let
``size`` = the smallest power of two >= n. The *base* permutation of (seed, size, pass_index)::

    digest = SHA-256( b"qkdnode/cascade/permutation/v3"
                      || seed
                      || pass_index as 4 bytes, little-endian unsigned
                      || size as 8 bytes, little-endian unsigned )
    state  = int.from_bytes(digest[0:16],  "little")          # 128-bit PCG state
    inc    = int.from_bytes(digest[16:32], "little") | 1      # 128-bit odd increment

    PCG64 (XSL-RR 128/64, O'Neill 2014), one 64-bit word per step, the state advanced *before*
    each output:
        state = (state * 0x2360ED051FC65DA44385DF649FCCF645 + inc) mod 2**128
        word  = rotr64((state >> 64) XOR (state mod 2**64), state >> 122)

    32-bit draws: each word gives two draws, its low half first, then its high half.

    Fisher-Yates (Durstenfeld) shuffle of base = [0, 1, ..., size-1]:
        for i = size-1 down to 1:
            mask = smallest 2**b - 1 >= i
            repeat: j = (next 32-bit draw) AND mask   until j <= i     # rejection: exact
            swap base[i], base[j]
    (size <= 2**31, so every i fits in a 32-bit draw.)

The permutation of (seed, n, pass_index) is the base permutation with the values >= n left
out, in their order: ``perm = [v for v in base if v < n]``.

``perm[i]`` is the original index of the bit at permuted position ``i``: pass ``pass_index``
looks at the bits in the order ``bits[perm]``. The rejection sampling makes every one of the
size! base permutations equally likely given a uniform PCG stream, and leaving values out of a
uniform permutation keeps the relative order of the rest uniform, so every one of the n!
permutations is equally likely. The v2 domain (one shuffle of exactly n positions) is not
accepted: peers on different versions are refused at the handshake (the channel protocol
version names this one).

Why a base of a power-of-two size: a node's blocks vary in length (whatever sifting leaves), so a
shuffle of exactly n positions could never be reused. Alice keeps one reconciliation seed per
session (the seed is public; Cascade's leakage is counted bit by bit and the verification hash,
keyed after Cascade, catches whatever the passes leave, so a seed known in advance lets an
attacker at most make a block fail verification, which cutting the channel does anyway). Blocks
of lengths within one power of two then share their base permutations, and only the cheap
restriction is computed per block.

Implementation: the numba kernel ``kernels.pcg64_permutation`` follows the base shuffle directly
(128-bit state in two 64-bit words), on int32. It is exactly what numpy's
``Generator.permutation`` does with a ``PCG64`` bit generator (Fisher-Yates with
``random_interval`` on buffered 32-bit halves), which the tests use as a second reference with the
plain-Python specification below; numpy does not promise that stream across versions, the
kernel does not depend on it.

Caches (memos of a pure function: results are the same with or without them; returned arrays
are read-only):

- Base permutations per (seed, size), each pass drawn on first use, the last
  ``BASE_CACHE_SETS`` pairs used within ``BASE_CACHE_BYTES``, least recently used first out (the
  passes of one set beyond that budget are drawn per use).
  Bases above ``BASE_CACHE_MAX_SIZE`` are drawn per use and not kept (frames of 2^22 bits, whose
  drawing is small beside their reconciliation; keeping them would raise a large block's peak).
- Restricted permutations per (seed, n) with their inverses (and the map between passes 0 and
  1 that Bob's weights use) in ``PermutationSet`` objects: the last ``PERMUTATION_CACHE_SETS``
  within ``PERMUTATION_CACHE_BYTES``. A role holds its set while it runs and forgets it when its
  frame is done (``forget_permutations``), so a node's memory does not grow with its blocks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import struct
from collections import OrderedDict
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.cascade import kernels
from qkdnode.postprocess.jit import kernel

SEED_BYTES: Final = 32
PERMUTATION_DOMAIN: Final = b"qkdnode/cascade/permutation/v3"
MAX_BITS: Final = 2**31 - 1  # permuted positions travel as int32 (base size <= 2**31)

# Restricted permutations and inverses kept for reuse (module doc): 4 passes of a 10**6-bit frame
# take 32 MB.
PERMUTATION_CACHE_BYTES: Final = 160 * 2**20
PERMUTATION_CACHE_SETS: Final = 2
# Base permutations kept across blocks (module doc): a 2**20 base of 8 passes, or of 2**21 and 4;
# larger bases are drawn per use.
BASE_CACHE_BYTES: Final = 32 * 2**20
BASE_CACHE_SETS: Final = 2
BASE_CACHE_MAX_SIZE: Final = 2**21
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


def check_length(n: int) -> int:
    """Return ``n`` if it is a valid permutation length, else raise ProtocolError (n_bits)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BITS:
        raise ProtocolError(f"must be in [1, {MAX_BITS}]", field="n_bits")
    return n


def base_size(n: int) -> int:
    """The size of the base permutation of an ``n``-position permutation: the smallest power
    of two >= n (module doc)."""
    return 1 << (check_length(n) - 1).bit_length()


def pcg64_state(seed: bytes, size: int, pass_index: int) -> tuple[int, int]:
    """The (state, increment) pair of the base shuffle of ``size`` positions for this pass."""
    check_seed(seed)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BITS + 1:
        raise ProtocolError(f"must be in [1, {MAX_BITS + 1}]", field="n_bits")
    if not 0 <= pass_index < 2**32:
        raise ProtocolError("must be in [0, 2**32)", field="pass_index")
    digest = hashlib.sha256(
        PERMUTATION_DOMAIN + seed + struct.pack("<I", pass_index) + struct.pack("<Q", size)
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
    """The base shuffle of the specification, literally, in Python integers (the tests'
    reference)."""
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


def _draw_base(seed: bytes, size: int, pass_index: int) -> NDArray[np.int32]:
    state, inc = pcg64_state(seed, size, pass_index)
    base: NDArray[np.int32] = kernels.pcg64_permutation(
        np.uint64(state >> 64),
        np.uint64(state & _MASK64),
        np.uint64(inc >> 64),
        np.uint64(inc & _MASK64),
        size,
    )
    return base


@kernel
def restrict_permutation(
    base: NDArray[np.int32], n: int, perm: NDArray[np.int32], inverse: NDArray[np.int32]
) -> None:
    """``perm`` = the values of ``base`` below ``n``, in their order, and ``inverse[perm[i]] =
    i`` unless ``inverse`` is empty; in one pass. ``perm`` may be ``base`` itself (of n values:
    the permutation is then only inverted)."""
    want_inverse = inverse.shape[0] > 0
    kept = 0
    for position in range(base.shape[0]):
        value = base[position]
        if value < n:
            perm[kept] = value
            if want_inverse:
                inverse[value] = kept
            kept += 1


@kernel
def cross_map(
    inverse0: NDArray[np.int32], perm1: NDArray[np.int32], cross: NDArray[np.int32]
) -> None:
    """``cross[n + i]`` = the pass-0 position of pass 1's position ``i``, and ``cross[j]`` = the
    pass-1 position of pass 0's position ``j`` (``PermutationSet.cross01``)."""
    n = perm1.shape[0]
    for position in range(n):
        other = inverse0[perm1[position]]
        cross[n + position] = other
        cross[other] = position


_NO_INVERSE: Final = np.empty(0, dtype=np.int32)


def _draw_permutation(seed: bytes, n: int, pass_index: int) -> NDArray[np.int32]:
    perm = np.empty(n, dtype=np.int32)
    restrict_permutation(_draw_base(seed, base_size(n), pass_index), n, perm, _NO_INVERSE)
    return perm


# (seed, size) -> {pass index: read-only base permutation}, least recently used first
_base_cache: OrderedDict[tuple[bytes, int], dict[int, NDArray[np.int32]]] = OrderedDict()


def base_permutation(seed: bytes, size: int, pass_index: int) -> NDArray[np.int32]:
    """The base permutation of (seed, size, pass_index), read-only, kept for later blocks if
    the base cache's budget allows (module doc)."""
    key = (check_seed(seed), size)
    rows = _base_cache.get(key)
    if rows is not None:
        found = rows.get(pass_index)
        if found is not None:
            with contextlib.suppress(KeyError):  # dropped meanwhile by another thread
                _base_cache.move_to_end(key)
            return found
    drawn = _draw_base(seed, size, pass_index)
    drawn.flags.writeable = False
    kept = 0 if rows is None else len(rows)
    # a set never outgrows the budget alone: passes beyond it are drawn per use
    if size <= BASE_CACHE_MAX_SIZE and size * 4 * (kept + 1) <= BASE_CACHE_BYTES:
        _base_cache.setdefault(key, {})[pass_index] = drawn
        _trim_base()
    return drawn


def _trim_base() -> None:
    """Drop the least recently used base sets until at most BASE_CACHE_SETS remain within
    BASE_CACHE_BYTES (the most recent one, within the budget by itself, stays)."""

    def set_bytes(item: tuple[tuple[bytes, int], dict[int, NDArray[np.int32]]]) -> int:
        (_, size), rows = item
        return size * 4 * len(rows)

    used = sum(set_bytes(item) for item in list(_base_cache.items()))
    while len(_base_cache) > 1 and (used > BASE_CACHE_BYTES or len(_base_cache) > BASE_CACHE_SETS):
        try:
            dropped = _base_cache.popitem(last=False)
        except KeyError:  # emptied meanwhile
            break
        used -= set_bytes(dropped)


class PermutationSet:
    """The permutations of every pass for one (seed, n), drawn on first use, and their inverses.

    Pass ``p`` occupies ``[p * n, (p + 1) * n)`` of the flat arrays ``perm_all`` and
    ``inverse_all`` (``MAX_PASSES`` passes reserved; memory is only touched for the passes
    drawn), so a role can index every pass through one array. Callers must not write them.
    """

    def __init__(self, seed: bytes, n: int) -> None:
        self.seed = check_seed(seed)
        self.n = check_length(n)
        self._base_size = base_size(n)
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
        if not self._drawn[pass_index]:
            self._fill(pass_index, with_inverse=False)
        n = self.n
        return _read_only(self.perm_all[pass_index * n : (pass_index + 1) * n])

    def inverse(self, pass_index: int) -> NDArray[np.int32]:
        """``inverse[perm[i]] = i`` for pass ``pass_index``, read-only."""
        if not self._inverted[pass_index]:
            self._fill(pass_index, with_inverse=True)
        n = self.n
        return _read_only(self.inverse_all[pass_index * n : (pass_index + 1) * n])

    def _fill(self, pass_index: int, *, with_inverse: bool) -> None:
        n = self.n
        row = self.perm_all[pass_index * n : (pass_index + 1) * n]
        inverse = self.inverse_all[pass_index * n : (pass_index + 1) * n]
        drawn = self._drawn[pass_index]
        source = row if drawn else base_permutation(self.seed, self._base_size, pass_index)
        restrict_permutation(source, n, row, inverse if with_inverse else _NO_INVERSE)
        self._drawn[pass_index] = True
        self._inverted[pass_index] = self._inverted[pass_index] or with_inverse
        _trim()

    def cross01(self) -> NDArray[np.int32]:
        """Pass-local position in the other pass of the bit at every position of passes 0 and
        1 (``[0, n)``: pass 0 -> pass 1; ``[n, 2 n)``: pass 1 -> pass 0), read-only."""
        if self._cross is None:
            cross = np.empty(2 * self.n, dtype=np.int32)
            cross_map(self.inverse(0), self.perm(1), cross)
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
        perm, inverse = np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int32)
        restrict_permutation(_draw_base(seed, base_size(n), pass_index), n, perm, inverse)
        return inverse
    return permutation_set(seed, n).inverse(pass_index)


def forget_permutations(seed: bytes, n: int) -> None:
    """Drop the cached set of (seed, n), if any: its frame is done and another frame of the
    same seed and length is unlikely (blocks vary in length), so it would only hold memory. The
    base permutations stay kept for the session's next blocks."""
    _cache.pop((seed, n), None)


def clear_permutation_cache() -> None:
    """Drop every cached permutation, base and restricted (benchmarks measure the cold path
    with it)."""
    _cache.clear()
    _base_cache.clear()
