"""The security statement every committed key carries.

A consumer key of a block is ε-secure in the composable sense: no test tells it apart, with
advantage above ε, from a key that is uniform, identical at both ends and unknown to anyone else.
By the triangle inequality of composable security (Portmann & Renner, "Cryptographic security of
quantum key distribution", arXiv:1409.3525), ε is the sum of:

- ``epsilon_block``: the block's own distillation, eps_sec + eps_cor (privacy amplification
  sized by the finite-key bound, and the verification tag);
- ``epsilon_tag_forgery``: every Wegman–Carter tag since the ledger began may have been forged
  with probability at most 8 ceil(L / 16) / 2^106 (one-time Poly1305,
  ``qkdnode.channel.wegman_carter``); the ledger sums them;
- ``epsilon_tag_keys``: those tags were keyed with pool bits of earlier blocks, each only as
  close to uniform as that block's own ε (Portmann, "Key recycling in authentication",
  IEEE Trans. Inf. Theory 60, 4383 (2014)); the ledger sums them at each deposit.

The sum grows with every block: past ``[auth] security_budget_epsilon`` the node alerts.

A block authenticated in a bootstrap session (certificates or a pre-shared key) has no
information-theoretic tag terms: its classical channel was authenticated computationally, which
protects it if the bootstrap credentials were not broken *during* that session (authentication is
real time). Every key-derived chain starts at such a bootstrap, so every statement names its
``chain_root`` and says ``computational_root``.
"""

from __future__ import annotations

from dataclasses import dataclass

from qkdnode.channel.ledger import LedgerState
from qkdnode.channel.messages import SessionMode


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySecurityStatement:
    """ε of one block's keys and what it is made of (public figures only)."""

    epsilon_total: float
    epsilon_block: float
    epsilon_tag_forgery: float
    epsilon_tag_keys: float
    authentication: SessionMode
    chain_root: str
    computational_root: bool = True

    def fields(self) -> dict[str, float | str | bool]:
        """The statement as flat log and JSON fields."""
        return {
            "epsilon_total": self.epsilon_total,
            "epsilon_block": self.epsilon_block,
            "epsilon_tag_forgery": self.epsilon_tag_forgery,
            "epsilon_tag_keys": self.epsilon_tag_keys,
            "authentication": self.authentication.value,
            "chain_root": self.chain_root,
            "computational_root": self.computational_root,
        }


def key_security_statement(
    *, mode: SessionMode, ledger: LedgerState, block_epsilon: float, chain_root: str
) -> KeySecurityStatement:
    """The statement for a block authenticated in ``mode``, with the ledger as it stands when
    the block is staged (later than its tags, so the tag terms are an upper bound).

    ``block_epsilon`` is eps_sec + eps_cor; ``chain_root`` names the bootstrap ("pki", "psk",
    "web-of-trust").
    """
    if not 0.0 <= block_epsilon < 1.0:
        raise ValueError("block_epsilon must be in [0, 1)")
    if mode is SessionMode.KEY_DERIVED:
        forgery, tag_keys = ledger.forgery_bound, ledger.tag_key_epsilon
    else:
        forgery = tag_keys = 0.0
    return KeySecurityStatement(
        epsilon_total=min(1.0, block_epsilon + forgery + tag_keys),
        epsilon_block=block_epsilon,
        epsilon_tag_forgery=forgery,
        epsilon_tag_keys=tag_keys,
        authentication=mode,
        chain_root=chain_root,
    )
