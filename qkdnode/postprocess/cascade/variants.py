"""Cascade parameter sets: number of passes, block size per pass, sub-block reuse.

Block sizes follow Martinez-Mateo, Pacher, Peev, Ciurana, Martin, "Demystifying the information
reconciliation protocol Cascade", arXiv:1407.3257 (Sec. 3, Table 1 and the list of
optimisations), with Q the estimated error rate and n the frame length:

- ``ORIGINAL`` (Brassard & Salvail 1993, "Cascade orig."): 4 passes, k1 = ceil(0.73 / Q),
  k_{i+1} = 2 k_i; only top-level blocks are re-searched when a correction makes them odd.
- ``YAN`` (Yan et al., ICNC 2008, "Cascade opt. (2)" in Martinez-Mateo et al.): 10 passes,
  k1 = ceil(0.80 / Q), k2 = 5 k1, k_i = ceil(n / 2) for i >= 3; no sub-block reuse.
- ``SUBBLOCK_REUSE`` (ours, after "Cascade opt. (7)/(8)" of Martinez-Mateo et al.): 16 passes,
  k1 = 2**ceil(log2(1/Q) - 0.5), k2 = 4 k1, k_i = ceil(n / 2) for i >= 3, and every sub-block
  whose parity is known (asked or derived) is re-searched when a correction makes it odd,
  even inside an even top-level block.

Every size is clamped to [1, n]. A tiny Q therefore gives one block spanning the frame, never
an overflow.
"""

from __future__ import annotations

import enum
import math

from qkdnode.errors import ProtocolError


class CascadeVariant(enum.Enum):
    """A named Cascade parameter set; the value is the stable name used in config and JSON."""

    ORIGINAL = "original"
    YAN = "yan"
    SUBBLOCK_REUSE = "subblock-reuse"

    @classmethod
    def from_name(cls, name: str) -> CascadeVariant:
        """The variant called ``name``; ProtocolError(field="variant") listing the choices."""
        for variant in cls:
            if variant.value == name:
                return variant
        choices = ", ".join(repr(v.value) for v in cls)
        raise ProtocolError(
            f"unknown Cascade variant {name!r}; choose one of {choices}", field="variant"
        )

    @property
    def passes(self) -> int:
        """Number of Cascade passes (iterations)."""
        return {"original": 4, "yan": 10, "subblock-reuse": 16}[self.value]

    @property
    def sub_block_reuse(self) -> bool:
        """Whether odd sub-blocks inside even top-level blocks are searched too."""
        return self is CascadeVariant.SUBBLOCK_REUSE

    def block_sizes(self, qber_estimate: float, n_bits: int) -> tuple[int, ...]:
        """Top-level block size of every pass for estimated error rate Q and frame length n.

        Raises ValueError unless 0 < Q < 0.5 and n >= 1.
        """
        q = float(qber_estimate)
        if not 0.0 < q < 0.5 or math.isnan(q):
            raise ValueError(f"qber_estimate must be in (0, 0.5), got {qber_estimate!r}")
        if n_bits < 1:
            raise ValueError(f"n_bits must be >= 1, got {n_bits}")
        half = (n_bits + 1) // 2
        sizes: list[int]
        if self is CascadeVariant.ORIGINAL:
            k1 = math.ceil(0.73 / q)
            sizes = [k1 * 2**i for i in range(4)]
        elif self is CascadeVariant.YAN:
            k1 = math.ceil(0.80 / q)
            sizes = [k1, 5 * k1] + [half] * 8
        else:
            k1 = 2 ** math.ceil(math.log2(1.0 / q) - 0.5)
            sizes = [k1, 4 * k1] + [half] * 14
        return tuple(max(1, min(int(k), n_bits)) for k in sizes)
