"""The privacy-amplification family of a block: which one, its seed message, and hashing with it.

Both sides configure the family (``postprocess.pa_family``); Alice draws the seed and sends it in
the family's message, and Bob refuses a message of another family, or of one he does not know,
with ProtocolError(field="pa_family") / (field="family"), so the block aborts before any key.

- ``toeplitz-fft-v1``: Toeplitz hashing by float64 FFT (``amplification``), two-universal, seed
  n + m − 1 bits, message ``ToeplitzSeed`` (the wire form of earlier releases, unchanged).
- ``mersenne-gmp-v1``: ((a·x + b) mod p) mod 2^m with p = 2^k − 1 (``amplification_mersenne``),
  two-universal; seed 2k bits, message ``AmplificationSeed``.

Both families are two-universal, so the finite-key bound sizes the key the same way for either.
"""

from __future__ import annotations

import enum

import numpy as np

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import amplification_mersenne as mersenne
from qkdnode.postprocess.amplification import ToeplitzSeed, draw_toeplitz_seed, toeplitz_hash
from qkdnode.postprocess.amplification_mersenne import AmplificationSeed
from qkdnode.postprocess.bitpack import Bits

AmplificationMessage = ToeplitzSeed | AmplificationSeed


class AmplificationFamily(enum.Enum):
    """A privacy-amplification family and its version; values are the names on the wire."""

    TOEPLITZ_FFT_V1 = "toeplitz-fft-v1"
    MERSENNE_GMP_V1 = "mersenne-gmp-v1"

    @property
    def max_input_bits(self) -> int | None:
        """Largest input the family hashes, or None when only memory limits it."""
        if self is AmplificationFamily.MERSENNE_GMP_V1:
            return mersenne.MAX_INPUT_BITS
        return None


def family_of(message: AmplificationMessage) -> AmplificationFamily:
    """The family a seed message belongs to."""
    if isinstance(message, ToeplitzSeed):
        return AmplificationFamily.TOEPLITZ_FFT_V1
    return AmplificationFamily(message.family)


def draw_amplification_seed(
    family: AmplificationFamily, *, input_bits: int, output_bits: int, rng: np.random.Generator
) -> AmplificationMessage:
    """Alice's seed message for hashing ``input_bits`` to ``output_bits`` with ``family``.

    ``rng`` must be seeded from OS entropy for each block (the seed is public once sent, but
    must be independent of the key and of Eve's information).
    """
    if family is AmplificationFamily.TOEPLITZ_FFT_V1:
        return ToeplitzSeed.from_bits(
            draw_toeplitz_seed(input_bits, output_bits, rng),
            input_bits=input_bits,
            output_bits=output_bits,
        )
    return AmplificationSeed(
        family=family.value,
        input_bits=input_bits,
        output_bits=output_bits,
        seed=mersenne.draw_mersenne_seed(input_bits, rng),
    )


def check_amplification_seed(
    message: AmplificationMessage, family: AmplificationFamily, *, input_bits: int
) -> None:
    """Bob's check of Alice's seed message: this side's family and reconciled key length.

    ProtocolError(field="pa_family") when the peer hashes with another family (both names in
    the message), (field="input_bits") when the shape does not match this side's key.
    """
    theirs = family_of(message)
    if theirs is not family:
        raise ProtocolError(
            f"peer hashes with {theirs.value!r}, this side is configured for {family.value!r}",
            field="pa_family",
        )
    if message.input_bits != input_bits:
        raise ProtocolError("does not match the reconciled key length", field="input_bits")


def amplify(bits: Bits, message: AmplificationMessage) -> Bits:
    """Hash the reconciled key ``bits`` with the family and seed of ``message``."""
    if isinstance(message, ToeplitzSeed):
        return toeplitz_hash(bits, message.seed_bits(), message.output_bits)
    return mersenne.mersenne_hash(bits, message.seed, message.output_bits)
