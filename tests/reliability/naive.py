"""Naive, independent reference implementations used to generate and re-check pinned vectors.

Written from the definitions (RFC 8439 for Poly1305, the module docstrings of
``qkdnode.channel.wegman_carter``, ``qkdnode.postprocess.verification`` and
``qkdnode.postprocess.amplification``), sharing no code with them: Horner modulo 2^130 - 5 and
modulo a Mersenne prime on Python ints, and the Toeplitz matrix product written out entry by
entry.
"""

from __future__ import annotations

import hmac


def poly1305(key: bytes, message: bytes) -> bytes:
    """RFC 8439, section 2.5.1, on Python ints: clamp r, accumulate (acc + chunk) r modulo
    2^130 - 5 over 16-byte chunks with a 1 byte appended, add s, keep 128 bits."""
    assert len(key) == 32
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:], "little")
    prime = (1 << 130) - 5
    acc = 0
    for start in range(0, len(message), 16):
        chunk = message[start : start + 16] + b"\x01"
        acc = (acc + int.from_bytes(chunk, "little")) * r % prime
    return ((acc + s) % (1 << 128)).to_bytes(16, "little")


class StreamingPoly1305:
    """``cryptography``'s ``Poly1305`` interface (update, finalize, verify) on ``poly1305``
    above, buffering the message: slow, but a live connection holding it can be deep-copied
    (OpenSSL's contexts cannot), which tests that copy connections need."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._message = bytearray()

    def update(self, data: bytes) -> None:
        self._message += data

    def finalize(self) -> bytes:
        return poly1305(self._key, bytes(self._message))

    def verify(self, tag: bytes) -> None:
        from cryptography.exceptions import InvalidSignature

        if not hmac.compare_digest(self.finalize(), tag):
            raise InvalidSignature


def transcript_tag(r: bytes, s: bytes, records: list[bytes]) -> bytes:
    """The block transcript tag: Poly1305 under r || s over u64-length-prefixed records."""
    message = b"".join(len(record).to_bytes(8, "big") + record for record in records)
    return poly1305(r + s, message)


def bits_of(data: bytes, count: int) -> list[int]:
    """The first ``count`` bits of ``data``, least significant bit of each byte first."""
    return [(data[i // 8] >> (i % 8)) & 1 for i in range(count)]


def mersenne_poly_hash(bits: list[int], hash_key: int, field_bits: int) -> int:
    """H_r = sum c_i r^(d-i) mod 2^p - 1 with c_0 = n and (p-1)-bit little-endian chunks."""
    modulus = (1 << field_bits) - 1
    width = field_bits - 1
    coefficients = [len(bits)]
    for start in range(0, len(bits), width):
        piece = bits[start : start + width]
        coefficients.append(sum(bit << j for j, bit in enumerate(piece)))
    value = 0
    for coefficient in coefficients:
        value = (value * hash_key + coefficient) % modulus
    return value


def toeplitz(bits: list[int], seed: list[int], output_bits: int) -> list[int]:
    """out[i] = XOR_j s[i - j + n - 1] x[j] (the documented indexing), entry by entry."""
    n = len(bits)
    assert len(seed) == n + output_bits - 1
    return [sum(seed[i - j + n - 1] & bits[j] for j in range(n)) % 2 for i in range(output_bits)]


def mersenne_pa(bits: list[int], a: int, b: int, exponent: int, output_bits: int) -> list[int]:
    """((a x + b) mod (2^exponent − 1)) mod 2^output_bits, x = Σ bits[j] 2^j, as bits."""
    x = sum(bit << j for j, bit in enumerate(bits))
    y = ((a * x + b) % ((1 << exponent) - 1)) % (1 << output_bits)
    return [(y >> i) & 1 for i in range(output_bits)]


def pack_bits_le(bits: list[int]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        out[i // 8] |= bit << (i % 8)
    return bytes(out)


# ---- the inputs of the pinned self-test vectors (also used by qkdnode.ops.selftest) ----------

TRANSCRIPT_R = bytes(range(16))
TRANSCRIPT_S = bytes(range(16, 32))
TRANSCRIPT_RECORDS = [b"", b"abc", bytes(range(40))]
MERSENNE_DATA = bytes((7 * i + 3) % 256 for i in range(38))
MERSENNE_BITS = 300
MERSENNE_KEYS = {61: 0x0123456789ABCDEF % ((1 << 61) - 1), 127: (1 << 126) + 0x1234567}
TOEPLITZ_INPUT = bytes((13 * i + 5) % 256 for i in range(8))
TOEPLITZ_SEED = bytes((29 * i + 11) % 256 for i in range(11))
TOEPLITZ_N, TOEPLITZ_M = 64, 24
# mersenne-gmp-v1 on 600 bits: k = 607, a and b are 76 bytes each, the top bit of byte 75 zero
PA_MERSENNE_INPUT = bytes((11 * i + 7) % 256 for i in range(75))
PA_MERSENNE_SEED = (
    bytes((17 * i + 1) % 256 for i in range(75)) + b"\x15"
    + bytes((23 * i + 9) % 256 for i in range(75)) + b"\x2a"
)  # fmt: skip
PA_MERSENNE_N, PA_MERSENNE_M, PA_MERSENNE_EXPONENT = 600, 300, 607


def expected_vectors() -> dict[str, str]:
    """The pinned values, recomputed naively (hex)."""
    tag = transcript_tag(TRANSCRIPT_R, TRANSCRIPT_S, TRANSCRIPT_RECORDS)
    bits = bits_of(MERSENNE_DATA, MERSENNE_BITS)
    out = {"transcript_tag": tag.hex()}
    for field_bits, key in MERSENNE_KEYS.items():
        out[f"mersenne_{field_bits}"] = format(mersenne_poly_hash(bits, key, field_bits), "x")
    toe = toeplitz(
        bits_of(TOEPLITZ_INPUT, TOEPLITZ_N),
        bits_of(TOEPLITZ_SEED, TOEPLITZ_N + TOEPLITZ_M - 1),
        TOEPLITZ_M,
    )
    out["toeplitz"] = pack_bits_le(toe).hex()
    pa = mersenne_pa(
        bits_of(PA_MERSENNE_INPUT, PA_MERSENNE_N),
        int.from_bytes(PA_MERSENNE_SEED[:76], "little"),
        int.from_bytes(PA_MERSENNE_SEED[76:], "little"),
        PA_MERSENNE_EXPONENT,
        PA_MERSENNE_M,
    )
    out["pa_mersenne"] = pack_bits_le(pa).hex()
    return out


if __name__ == "__main__":  # regenerate: python -m tests.reliability.naive
    for name, value in expected_vectors().items():
        print(f"{name} = {value}")
