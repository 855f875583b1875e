"""Scenario 5: the authentication-key ledger over >= 10^5 tags.

Two checks against a naive model of the pool (every byte ever deposited, as one append-only
stream; a draw at offset o of n bits must return stream[o/8 : (o+n)/8] and no two draws may
overlap):

- through real ``PeerConnection`` pairs in key-derived mode (every block draws its MAC, hash and
  pad keys, issues 2 one-time tags, and deposits fresh key at the block's mark): a short run by
  default, ``QKDNODE_SOAK_LEDGER_BLOCKS`` blocks in the soak;
- the ledgers alone, driven with the connection's draw schedule (``BLOCK_DRAWS``) for 5 * 10^4
  blocks = 10^5 tags, with deposits as the daemon makes them.

Figures reported: bits per tag (``BLOCK_DRAW_BITS / 2``) and the accumulated forgery bound
(tags * (max_block_chunks + 1) / 2^128, Wegman and Carter 1981; polynomial hash bound of
Bernstein 2005, "The Poly1305-AES message-authentication code", sect. 3).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from qkdnode.channel.auth import BLOCK_DRAW_BITS, BLOCK_DRAWS
from qkdnode.channel.connection import ChannelConfig
from tests.reliability.memory import (
    RecordingLedger,
    clean_block,
    key_derived_wire,
    ledger_pair,
)

CONNECTION_BLOCKS = int(os.environ.get("QKDNODE_SOAK_LEDGER_BLOCKS", "1500"))
LEDGER_BLOCKS = 50_000  # 10^5 tags
TARGET_BITS = 1 << 16


def check_against_stream(ledger: RecordingLedger) -> int:
    """No bit drawn twice; every draw equals the naive stream at its offset. Returns bits drawn."""
    end = -1
    drawn_bits = 0
    for offset, data in ledger.drawn:
        assert offset % 8 == 0 and offset >= end, f"draw at {offset} overlaps one ending at {end}"
        expected = bytes(ledger.stream[offset // 8 : offset // 8 + len(data)])
        assert data == expected, f"draw at offset {offset} is not the stream's bytes there"
        end = offset + 8 * len(data)
        drawn_bits += 8 * len(data)
    return drawn_bits


def naive_forgery_bound(tags: int, max_block_chunks: int) -> float:
    return tags * (max_block_chunks + 1) / 2.0**128


@pytest.mark.slow  # runs long
def test_ledgers_through_key_derived_connections_never_reuse_a_bit() -> None:
    rng = np.random.default_rng(5)
    alice, bob, alice_log, bob_log = ledger_pair(seed=5, target_bits=TARGET_BITS)
    wire = key_derived_wire(alice, bob, seed=50)
    tags_before = alice.tags_issued
    for block_id in range(CONNECTION_BLOCKS):
        a_auth, b_auth = clean_block(wire, block_id, data_frames=0)
        assert a_auth.ledger_mark_bits == b_auth.ledger_mark_bits
        fresh = rng.bytes(256)  # the block's key: both sides deposit it at the block's mark
        assert alice.deposit(fresh, mark_consumed_bits=a_auth.ledger_mark_bits) == bob.deposit(
            fresh, mark_consumed_bits=b_auth.ledger_mark_bits
        )
    tags = alice.tags_issued - tags_before
    assert tags == 2 * CONNECTION_BLOCKS
    assert alice.state == bob.state  # pool, offsets, tag count, bound and deposit digest
    assert alice_log.draws == bob_log.draws
    assert alice.stream == bob.stream
    drawn_a, drawn_b = check_against_stream(alice), check_against_stream(bob)
    assert drawn_a == drawn_b == alice.consumed_bits
    # every block drew exactly BLOCK_DRAW_BITS: 512 bits per one-time tag
    block_draws = [d for d in alice_log.draws if d[2].startswith("block ")]
    assert sum(n for _, n, _ in block_draws) == CONNECTION_BLOCKS * BLOCK_DRAW_BITS
    bound = naive_forgery_bound(alice.tags_issued, ChannelConfig().max_block_chunks)
    assert np.isclose(alice.forgery_bound, bound, rtol=1e-12, atol=0.0)


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
        fresh = rng.bytes(BLOCK_DRAW_BITS // 8)
        taken = [
            ledger.deposit(fresh, mark_consumed_bits=mark)
            for ledger, mark in zip((alice, bob), marks, strict=True)
        ]
        # the need is counted from the block's mark (the level at its open), so a deposit
        # refills what the previous block drew: the pool stays within one block of its target
        assert taken[0] == taken[1] in (0, BLOCK_DRAW_BITS // 8)
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
    assert alice.forgery_bound < 1e-24  # 10^5 tags of <= 2^26 chunks: about 2.0e-26
    print(
        f"scenario 5: {tags} tags, {alice.consumed_bits // tags} bits per tag, "
        f"accumulated forgery bound {alice.forgery_bound:.3e}"
    )
