"""Cascade parameter sets: number of passes, block size per pass, sub-block reuse.

Block sizes follow Martinez-Mateo, Pacher, Peev, Ciurana, Martin, "Demystifying the information
reconciliation protocol Cascade", arXiv:1407.3257 (Sec. 3, Table 1 and the list of
optimisations), with Q the estimated error rate and n the frame length:

- ``ORIGINAL`` (Brassard & Salvail 1993, "Cascade orig."): 4 passes, k1 = ceil(0.73 / Q),
  k_{i+1} = 2 k_i; only top-level blocks are re-searched when a correction makes them odd.
- ``YAN`` (Yan et al., ICNC 2008, "Cascade opt. (2)" in Martinez-Mateo et al.): 10 passes,
  k1 = ceil(0.80 / Q), k2 = 5 k1, k_i = ceil(n / 2) for i >= 3; no sub-block reuse.
- ``SUBBLOCK_REUSE`` (ours, after "Cascade opt. (8)" of Martinez-Mateo et al.): every sub-block
  whose parity is known (asked or derived) is re-searched when a correction makes it odd, even
  inside an even top-level block. With a = log2(1/Q) - 0.5: k1 = 2**ceil(a) (opt. (7)/(8)),
  k2 = max(2 k1, 2**ceil((a + c) / 2)) (opt. (8) has c = 12), then T *tail* passes.

  c, measured with ``scripts/bench_postprocess.py`` (5-150 frames a point, standard errors
  0.001-0.006): c = 8 below n = 2**15, where big pass-2 blocks cost f (n = 10**4: f 1.075 /
  1.071 / 1.070 / 1.078 at Q = 1 / 2 / 5 / 8 %, c = 12: 1.10-1.14); c = 11 for
  2**15 <= n < 2**19, equal to opt. (8) at Q = 2, 5, 8 % and halving its k2 = 1024 at 1 %,
  whose f has a heavy tail (n = 10**5, 50 frames: mean 1.045, max 1.18; k2 = 512: mean 1.039,
  max 1.11); c = 10 from 2**19 on: at n = 10**6 the larger k2 of c = 12 buys ~0.005 of f but
  doubles the round trips (long chains of corrections between passes 1 and 2): c = 10 gives
  f 1.033 / 1.040 / 1.047 / 1.057 with 310-540 round trips, c = 12 f 1.029-1.052 with
  640-1300 (and at n = 10**5, c = 10 leaves f = 1.049 at 5 %, too close to 1.05).

  Tail: T passes of B = 2**b top-level blocks, k = ceil(n / B), T = ceil(14 / b), b the
  largest in 1..7 whose tail costs (B - 1) T top-level parities <= n h(Q) / 500. A residual
  error pair survives a tail pass with probability ~1/B, so every choice keeps the 2**-14 of
  opt. (8)'s 14 passes of n/2 (b = 1, T = 14: exactly opt. (8) without its k3 = 4096 pass);
  large frames use fewer, wider passes (n = 10**6, Q = 2 %: b = 7, T = 2, 4 passes in all),
  since each pass costs each role one permutation of n (the time), while its B - 1 top-level
  parities (the leak) stay below 0.2 % of the leak.

Every size is clamped to [1, n]. A tiny Q therefore gives one block spanning the frame, never
an overflow. ``passes`` is the most passes a variant can use (what a responder accepts);
``block_sizes`` may return fewer.
"""

from __future__ import annotations

import enum
import math

from qkdnode.errors import ProtocolError


def _entropy(q: float) -> float:
    """Binary entropy h(q) in bits."""
    return -q * math.log2(q) - (1.0 - q) * math.log2(1.0 - q)


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
        """Largest number of Cascade passes (iterations) of this variant, for any Q and n."""
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
            a = math.log2(1.0 / q) - 0.5
            k1 = 2 ** math.ceil(a)
            # Near opt. (8)'s k2 (c = 12) for 2**15 <= n < 2**19, smaller elsewhere (module doc).
            c = 8.0 if n_bits < 2**15 else 11.0 if n_bits < 2**19 else 10.0
            k2 = max(2 * k1, 2 ** math.ceil((a + c) / 2.0))
            # Widest tail whose top-level parities stay under 0.2 % of n h(Q) (see above).
            budget = n_bits * _entropy(q) / 500.0
            b = max([1] + [w for w in range(2, 8) if (2**w - 1) * math.ceil(14 / w) <= budget])
            tail = math.ceil(14 / b)
            sizes = [k1, k2] + [-(-n_bits // 2**b)] * tail
        return tuple(max(1, min(int(k), n_bits)) for k in sizes)
