"""The leakage ledger: one per block, counting everything the block's transcript discloses.

Privacy amplification is sized from this ledger and nothing else, so every stage that sends
information correlated with the key must record it here, once per distinct bit.

Where each term goes (Tupkary & Lutkenhaus, "Using Cascade in Quantum Key Distribution",
arXiv:2307.00576, PRApplied 20, 064040 (2023)): the Cascade transcript is a function of Alice's
parities and the error positions W = X xor Y (Bob's parity of a range is Alice's xor the parity
of W on it), so H(X | E, transcript) >= H(X | E, W) - (Alice's parity bits). Hence

- lambda_EC (subtracted from the key length): Alice's parity bits and the verification tag;
- the entropy side (the key term is a bound on H(X | E, W)): Bob's binary-search queries, which
  reveal which half of an odd block held an error, and his report of the errors corrected per
  intensity class, the weight of W on each class (a function of W and the public class labels,
  so it reveals nothing W does not; the ledger records its sum).
  Their number of bits is not subtracted; W being public changes the bound itself (the vacuum
  term is dropped, see ``qkdnode.postprocess.keylength.decoy``).

Nothing is counted twice: Bob's parities are never sent, and the queries and the error weight are
not added to lambda_EC. This split is the structure of the authors' public code for the paper
(an error-flag register F conditioned on in the entropy, the leakage a separate term, no vacuum
contribution); the paper's own text beyond its abstract was not available, so no equation number
of it is cited. The argument step by step is in ``qkdnode.postprocess.keylength.decoy``; the
single-photon bound (``keylength.tomamichel2012``) is unchanged by W and ignores
``error_positions_disclosed``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class LeakageLedger:
    """What one block disclosed on the classical channel, by kind.

    - ``estimation_sample_bits``: key-basis bits disclosed for QBER estimation (removed from the
      key, so they are recorded but do not enter the privacy-amplification leak term);
    - ``reconciliation_bits``: Alice's parity bits (every ``ParityAnswer`` bit), lambda_EC;
    - ``verification_bits``: verification tag bits, lambda_EC;
    - ``query_ranges``: Bob's binary-search ranges (each reveals a parity of W), entropy side;
      his top-level block requests are fixed by public data (variant, length, QBER estimate);
    - ``error_weight``: the errors corrected as disclosed (the weight of W; Bob reports it
      per intensity class), entropy side; ``None`` until disclosed.
    """

    estimation_sample_bits: int = 0
    reconciliation_bits: int = 0
    verification_bits: int = 0
    query_ranges: int = 0
    error_weight: int | None = None

    def record_estimation_sample(self, bits: int) -> None:
        self._check(bits)
        self.estimation_sample_bits += bits

    def record_reconciliation(self, bits: int) -> None:
        self._check(bits)
        self.reconciliation_bits += bits

    def record_verification(self, bits: int) -> None:
        self._check(bits)
        self.verification_bits += bits

    def record_query(self, ranges: int) -> None:
        """Bob's binary-search ranges of one query (entropy side, not lambda_EC)."""
        self._check(ranges)
        self.query_ranges += ranges

    def record_error_weight(self, weight: int) -> None:
        """The disclosed number of corrected errors (entropy side, not lambda_EC)."""
        self._check(weight)
        if self.error_weight is not None:
            raise ValueError("the error weight is disclosed once per block")
        self.error_weight = weight

    @property
    def leak_ec_bits(self) -> int:
        """lambda_EC: Alice's parity bits and the verification tag."""
        return self.reconciliation_bits + self.verification_bits

    @property
    def error_positions_disclosed(self) -> bool:
        """True once the transcript reveals information about W (two-way reconciliation)."""
        return self.query_ranges > 0 or self.error_weight is not None

    @property
    def total_bits(self) -> int:
        return self.estimation_sample_bits + self.leak_ec_bits

    @staticmethod
    def _check(bits: int) -> None:
        if bits < 0:
            raise ValueError(f"disclosed bit count must be >= 0, got {bits}")
