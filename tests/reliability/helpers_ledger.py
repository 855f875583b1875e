"""Scenario 5's checks against a naive model of the authentication-key pool (also run by soak)."""

from __future__ import annotations

import numpy as np

from qkdnode.channel.auth import BLOCK_DRAW_BITS
from qkdnode.channel.connection import ChannelConfig
from tests.reliability.memory import (
    RecordingLedger,
    clean_block,
    key_derived_wire,
    ledger_pair,
)

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
    """Bernstein 2005, section 3: 8 ceil(L / 16) / 2^106 per one-time Poly1305 tag, for
    transcripts of at most L = 16 max_block_chunks bytes."""
    return tags * 8 * max_block_chunks / 2.0**106


def ledgers_through_key_derived_connections(blocks: int) -> None:
    """``blocks`` key-derived blocks through real connections: ledgers equal, no bit drawn twice,
    every draw the naive stream's bytes, 512 bits per tag, the forgery bound as computed."""
    rng = np.random.default_rng(5)
    alice, bob, alice_log, bob_log = ledger_pair(seed=5, target_bits=TARGET_BITS)
    wire = key_derived_wire(alice, bob, seed=50)
    tags_before = alice.tags_issued
    for block_id in range(blocks):
        a_auth, b_auth = clean_block(wire, block_id, data_frames=0)
        assert a_auth.ledger_mark_bits == b_auth.ledger_mark_bits
        fresh = rng.bytes(256)  # the block's key: both sides deposit it at the block's mark
        assert alice.deposit(fresh, mark_consumed_bits=a_auth.ledger_mark_bits) == bob.deposit(
            fresh, mark_consumed_bits=b_auth.ledger_mark_bits
        )
    tags = alice.tags_issued - tags_before
    assert tags == 2 * blocks
    assert alice.state == bob.state  # pool, offsets, tag count, bound and deposit digest
    assert alice_log.draws == bob_log.draws
    assert alice.stream == bob.stream
    drawn_a, drawn_b = check_against_stream(alice), check_against_stream(bob)
    assert drawn_a == drawn_b == alice.consumed_bits
    # every block drew exactly BLOCK_DRAW_BITS: 512 bits per one-time tag
    block_draws = [d for d in alice_log.draws if d[2].startswith("block ")]
    assert sum(n for _, n, _ in block_draws) == blocks * BLOCK_DRAW_BITS
    bound = naive_forgery_bound(alice.tags_issued, ChannelConfig().max_block_chunks)
    assert np.isclose(alice.forgery_bound, bound, rtol=1e-12, atol=0.0)
