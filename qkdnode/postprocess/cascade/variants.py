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
  inside an even top-level block; short odd parts are cut where their bits' error probabilities
  balance, and a part's only bit not known right is corrected without a question (see
  ``reconciler``). With a = log2(1/Q) - 0.5: k1 = 2**ceil(a) (opt. (7)/(8)); then k2, then T
  *tail* passes.

  k2 trades f against round trips: the larger k2, the fewer pass-2 parities, but the longer the
  chains of corrections between passes 1 and 2 (each link a search of log2(part) rounds), so
  the round trips grow with k2 and with n. Below n = 2**15: k2 = max(2 k1, 2**ceil((a + 8) / 2))
  (opt. (8) has a + 12: big pass-2 blocks cost f on short frames). From n = 2**15 on, k2 is
  read off the optima measured at n = 10**6 (``_K2_AT``: 320 / 184 / 96 / 48 at Q = 1 / 2 / 5 /
  8 %; log2 k2 piecewise linear in log2(1/Q), extended below 1 %, 48 above 8 %: at Q = 11 %,
  n = 10**5, k2 = 32 / 48 / 64 gave f 1.051 / 1.041 / 1.037 with 86 / 146 / 196 round trips),
  times 2**0.25 below n = 2**19 (shorter frames, shorter chains, so a larger k2 fits), rounded
  to a multiple of 8, at least 2 k1. Measured at n = 10**6 (8-10 frames a point; f / mean round
  trips): Q = 1 %: k2 288 1.029 / 205, 320 1.026 / 220; 2 %: 176 1.030 / 209, 184 1.029 / 222,
  192 1.029 / 237, 208 1.028 / 255; 5 %: 80 1.038 / 149, 96 1.035 / 175; 8 %: 48 1.039 / 184,
  56 1.037 / 211. The old rule (c = 10) gave 1.033 / 1.039 / 1.047 / 1.056 with 390 / 380 /
  300 / 650 round trips (plain halving, no deductions; see ``reconciler``).

  Tail: T passes of B = 2**b top-level blocks, k = ceil(n / B), T = ceil(S / b), b the
  largest in 1..7 whose tail costs (B - 1) T top-level parities <= n h(Q) / 500 (at least the
  smallest b with T <= 14). A residual error pair survives a tail pass with probability ~1/B,
  so every choice keeps 2**-S per pair: S = 14 from n = 2**15 on, the 2**-14 of opt. (8)'s 14
  passes of n/2 (b = 1, T = 14: exactly opt. (8) without its k3 = 4096 pass); large frames use
  fewer, wider passes (n = 10**6, Q = 2 %: b = 7, T = 2, 4 passes in all), since each pass
  costs each role one permutation of n (the time), while its B - 1 top-level parities (the
  leak) stay below 0.2 % of the leak. Below n = 2**15, S = 18 (b = 2, T = 9: 27 parities instead
  of 14): at n = 10**4 a frame enters the tail with 1.5-4 hidden pairs on average (measured,
  Q = 1-8 %), so S = 14 left a residual error in about 1 frame in 3000 at Q = 8 % (frame
  error rate ~2e-4); S = 18 divides that by 16.

Every size is clamped to [1, n]. A tiny Q therefore gives one block spanning the frame, never
an overflow. ``passes`` is the most passes a variant can use (what a responder accepts);
``block_sizes`` may return fewer.
"""

from __future__ import annotations

import enum
import math

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.finitekey import binary_entropy

# (Q, k2) of SUBBLOCK_REUSE measured at n = 10**6, Q decreasing (module doc).
_K2_AT = ((0.08, 48), (0.05, 96), (0.02, 184), (0.01, 320))


def _k2_log2(q: float) -> float:
    """log2 k2 at n = 10**6: piecewise linear in log2(1/Q) through _K2_AT, extended below the
    smallest Q, constant above the largest."""
    points = [(math.log2(1.0 / at), math.log2(k2)) for at, k2 in _K2_AT]
    x = max(math.log2(1.0 / q), points[0][0])
    i = 0
    while i < len(points) - 2 and x > points[i + 1][0]:
        i += 1
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


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
            if n_bits < 2**15:  # short frames (module doc)
                k2 = max(2 * k1, 2 ** math.ceil((a + 8.0) / 2.0))
            else:  # measured optima (module doc)
                y = _k2_log2(q) + (0.25 if n_bits < 2**19 else 0.0)
                k2 = max(2 * k1, 8 * round(2.0 ** min(y, 62.0) / 8))
            # Widest tail whose top-level parities stay under 0.2 % of n h(Q) (see above).
            # Short frames: 2**-18 per hidden pair, not 2**-14 (module doc).
            security = 18 if n_bits < 2**15 else 14
            budget = n_bits * binary_entropy(q) / 500.0
            fit = [w for w in range(1, 8) if math.ceil(security / w) <= self.passes - 2]
            b = max([fit[0]] + [w for w in fit if (2**w - 1) * math.ceil(security / w) <= budget])
            tail = math.ceil(security / b)
            sizes = [k1, k2] + [-(-n_bits // 2**b)] * tail
        return tuple(max(1, min(int(k), n_bits)) for k in sizes)
