"""Scenario 5: the authentication-key ledger over >= 10^5 tags.

Two checks against a naive model of the pool (every byte ever deposited, as one append-only
stream; a draw at offset o of n bits must return stream[o/8 : (o+n)/8] and no two draws may
overlap):

- through real ``PeerConnection`` pairs in key-derived mode (every block draws its MAC, hash and
  pad keys, issues 2 one-time tags, and deposits fresh key at the block's mark): a short run by
  default (``QKDNODE_SOAK_LEDGER_BLOCKS`` blocks when set; ``scripts/soak --ledger-blocks N``);
- the ledgers alone, driven with the connection's draw schedule (``BLOCK_DRAWS``) for 5 * 10^4
  blocks = 10^5 tags, with deposits as the daemon makes them.

Figures reported: bits per tag (``BLOCK_DRAW_BITS / 2``) and the accumulated forgery bound
(tags * 8 max_block_chunks / 2^106: Wegman and Carter 1981 with the one-time Poly1305 bound of
Bernstein 2005, "The Poly1305-AES message-authentication code", sect. 3).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from qkdnode.channel.auth import BLOCK_DRAW_BITS, BLOCK_DRAWS
from qkdnode.channel.connection import ChannelConfig
from qkdnode.channel.ledger import HANDSHAKE_SLOT_BYTES
from tests.reliability.helpers_ledger import (
    TARGET_BITS,
    check_against_stream,
    ledgers_through_key_derived_connections,
    naive_forgery_bound,
)
from tests.reliability.memory import (
    ledger_pair,
)

CONNECTION_BLOCKS = int(os.environ.get("QKDNODE_SOAK_LEDGER_BLOCKS", "1500"))
LEDGER_BLOCKS = 50_000  # 10^5 tags


@pytest.mark.slow  # runs long
def test_ledgers_through_key_derived_connections_never_reuse_a_bit() -> None:
    ledgers_through_key_derived_connections(CONNECTION_BLOCKS)


@pytest.mark.slow  # runs long
def test_ledgers_alone_over_1e5_tags_stay_equal_and_never_reuse_a_bit() -> None:
    rng = np.random.default_rng(55)
    config = ChannelConfig()
    alice, bob, alice_log, bob_log = ledger_pair(seed=55, target_bits=TARGET_BITS)
    per_tag = config.tag_forgery_bound
    for _ in range(LEDGER_BLOCKS):
        marks = []
        for ledger in (alice, bob):
            marks.append(ledger.consumed_bits)
            for name, bits in BLOCK_DRAWS:
                ledger.draw(bits, f"block {name}")
            ledger.record_tags(2, per_tag)
        # a block's key: what the pool needs, and one handshake-key slot's share
        fresh = rng.bytes(BLOCK_DRAW_BITS // 8 + HANDSHAKE_SLOT_BYTES)
        taken = [
            ledger.deposit(fresh, mark_consumed_bits=mark)
            for ledger, mark in zip((alice, bob), marks, strict=True)
        ]
        # the need is counted from the block's mark (the level at its open), so a deposit
        # refills what the previous block drew: the pool stays within one block of its target
        assert taken[0] == taken[1] == len(fresh)
        assert alice.level_bits >= TARGET_BITS - BLOCK_DRAW_BITS
    tags = alice.tags_issued
    assert tags == 2 * LEDGER_BLOCKS >= 100_000
    assert alice.state == bob.state
    assert alice_log.draws == bob_log.draws
    assert check_against_stream(alice) == alice.consumed_bits == LEDGER_BLOCKS * BLOCK_DRAW_BITS
    assert check_against_stream(bob) == bob.consumed_bits
    assert alice.consumed_bits // tags == BLOCK_DRAW_BITS // 2 == 512  # bits per tag
    bound = naive_forgery_bound(tags, config.max_block_chunks)
    assert np.isclose(alice.forgery_bound, bound, rtol=1e-9, atol=0.0)
    assert alice.forgery_bound < 1e-18  # 10^5 tags of <= 2^26 chunks: about 6.6e-19
    print(
        f"scenario 5: {tags} tags, {alice.consumed_bits // tags} bits per tag, "
        f"accumulated forgery bound {alice.forgery_bound:.3e}"
    )
