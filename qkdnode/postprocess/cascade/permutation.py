"""The per-pass permutation of Cascade, as a specified function of (seed, size, pass index).

Both roles must compute bit-identical permutations, possibly in different implementations, so
the function is specified here completely; nothing depends on numpy's ``Generator`` methods
(whose streams may change between numpy versions) nor on Python's ``random``.

Specification (``seed``: 32 bytes, ``n`` >= 1 bits, ``pass_index`` >= 0)::

    digest = SHA-256( b"qkdnode/cascade/permutation/v1"
                      || seed
                      || pass_index as 4 bytes, little-endian unsigned
                      || n as 8 bytes, little-endian unsigned )
    state  = int.from_bytes(digest[0:16],  "little")          # 128-bit PCG state
    inc    = int.from_bytes(digest[16:32], "little") | 1      # 128-bit odd increment

    PCG64 (XSL-RR 128/64, O'Neill 2014; numpy's ``PCG64`` bit generator), one 64-bit word per
    step, the state advanced *before* each output:
        state = (state * 0x2360ED051FC65DA44385DF649FCCF645 + inc) mod 2**128
        word  = rotr64((state >> 64) XOR (state mod 2**64), state >> 122)

    words w_0 .. w_{ceil(n/2)-1}; 32-bit keys, low half first:
        key[2i] = w_i mod 2**32,   key[2i+1] = w_i >> 32,   keys key[0 .. n-1]

    perm = the indices 0 .. n-1 sorted by (key[j], j)     # stable sort of the keys

``perm[i]`` is the original index of the bit at permuted position ``i``: pass ``pass_index``
looks at the bits in the order ``bits[perm]``. Ties between equal 32-bit keys (about
n**2 / 2**33 pairs) are broken by index, which is part of the specification.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError

SEED_BYTES: Final = 32
PERMUTATION_DOMAIN: Final = b"qkdnode/cascade/permutation/v1"
MAX_BITS: Final = 2**31 - 1  # permuted positions travel as int32


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


def _raw_words(seed: bytes, n: int, pass_index: int) -> NDArray[np.uint64]:
    state, inc = pcg64_state(seed, n, pass_index)
    generator = np.random.PCG64()
    generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": state, "inc": inc},
        "has_uint32": 0,
        "uinteger": 0,
    }
    # Little-endian words, so the 16-bit views below do not depend on the machine's byte order.
    words: NDArray[np.uint64] = generator.random_raw((n + 1) // 2).astype("<u8", copy=False)
    return words


def permutation_keys(seed: bytes, n: int, pass_index: int) -> NDArray[np.uint32]:
    """The n 32-bit sort keys of the specification (exposed for test vectors)."""
    keys: NDArray[np.uint32] = _raw_words(seed, n, pass_index).view("<u4")[:n].astype(np.uint32)
    return keys


def cascade_permutation(seed: bytes, n: int, pass_index: int) -> NDArray[np.int32]:
    """The permutation of the module specification: ``perm[i]`` = original index at position i."""
    # Key j is 16-bit digits (low, high) = halfwords 2j and 2j + 1 of the little-endian words.
    digits = _raw_words(seed, n, pass_index).view("<u2")
    low = digits[0 : 2 * n : 2]
    high = digits[1 : 2 * n : 2]
    # Stable LSD radix sort on the two 16-bit digits: numpy sorts uint16 stably by radix sort,
    # about twice as fast as a stable argsort of uint32 and equal to it by construction.
    by_low = np.argsort(low, kind="stable")
    by_high = np.argsort(high[by_low], kind="stable")
    result: NDArray[np.int32] = by_low[by_high].astype(np.int32)
    return result


def inverse_permutation(perm: NDArray[np.int32]) -> NDArray[np.int32]:
    """``inverse[perm[i]] = i``: the permuted position of every original index."""
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.shape[0], dtype=np.int32)
    return inverse
