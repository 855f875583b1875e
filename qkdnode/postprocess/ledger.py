"""The leakage ledger: one per block, counting every bit disclosed about the key.

Privacy amplification is sized from this ledger and nothing else, so every stage that sends
information correlated with the key must record it here, once per distinct bit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class LeakageLedger:
    """Bits of one block disclosed on the classical channel, by kind.

    - ``estimation_sample_bits``: key-basis bits disclosed for QBER estimation (removed from the
      key, so they are recorded but do not enter the privacy-amplification leak term);
    - ``reconciliation_bits``: every distinct parity bit sent, in either direction;
    - ``verification_bits``: verification tag bits.
    """

    estimation_sample_bits: int = 0
    reconciliation_bits: int = 0
    verification_bits: int = 0

    def record_estimation_sample(self, bits: int) -> None:
        self._check(bits)
        self.estimation_sample_bits += bits

    def record_reconciliation(self, bits: int) -> None:
        self._check(bits)
        self.reconciliation_bits += bits

    def record_verification(self, bits: int) -> None:
        self._check(bits)
        self.verification_bits += bits

    @property
    def leak_ec_bits(self) -> int:
        """Information about the remaining key leaked by error correction and verification."""
        return self.reconciliation_bits + self.verification_bits

    @property
    def total_bits(self) -> int:
        return self.estimation_sample_bits + self.leak_ec_bits

    @staticmethod
    def _check(bits: int) -> None:
        if bits < 0:
            raise ValueError(f"disclosed bit count must be >= 0, got {bits}")
