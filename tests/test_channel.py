"""The pure classical-channel protocol: two PeerConnections driven against each other in memory."""

from __future__ import annotations

import contextlib
import hmac
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.channel.auth import (
    BLOCK_DRAW_BITS,
    HANDSHAKE_KEY_BITS,
    ROTATION_KEY_BITS,
    BlockTranscript,
    PskCredentials,
    Role,
)
from qkdnode.channel.connection import (
    NEED_DATA,
    BlockAuthenticated,
    BlockOpened,
    ChannelConfig,
    ConnectionState,
    Event,
    HandshakeComplete,
    NeedData,
    PeerClosed,
    PongReceived,
    PoolExhausted,
    Rotated,
)
from qkdnode.channel.framing import NO_BLOCK, pack_frame, pack_header
from qkdnode.channel.ledger import HANDSHAKE_SLOTS_PER_DEPOSIT, AuthKeyLedger, DrawRecord
from qkdnode.channel.messages import (
    BlockOpen,
    CloseReason,
    Control,
    Data,
    SessionMode,
    decode_payload,
    encode_payload,
)
from qkdnode.channel.wegman_carter import OneTimeTag, forgery_bound
from qkdnode.errors import (
    AuthenticationFailed,
    AuthKeyExhausted,
    ProtocolError,
)
from tests.helpers_channel import (
    NAMED_ERRORS,
    REGISTRY,
    Pair,
    assert_rejected,
    established,
    flip,
    funded_ledger,
    make_creds,
    make_pair,
    rotated_pair,
    snapshot,
)
from tests.helpers_pki import NOW_S, credentials_pair
from tests.reliability.naive import poly1305, transcript_tag

# ---- in-memory shuttle (h11's ConnectionPair idea) --------------------------------------------


# ---- Wegman–Carter tag: one-time Poly1305 --------------------------------------------------
# (the independent reference lives in tests/reliability/naive.py, shared with the start-up
# self-test vectors)

# RFC 8439: section 2.5.2, and test vectors #1 and #5 to #10 of appendix A.3 (key r || s, hex)
RFC8439_VECTORS = [
    (
        "85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b",
        b"Cryptographic Forum Research Group".hex(),
        "a8061dc1305136c6c22b8baf0c0127a9",
    ),
    ("00" * 32, "00" * 64, "00" * 16),
    ("02" + "00" * 31, "ff" * 16, "03" + "00" * 15),
    ("02" + "00" * 15 + "ff" * 16, "02" + "00" * 15, "03" + "00" * 15),
    ("01" + "00" * 31, "ff" * 16 + "f0" + "ff" * 15 + "11" + "00" * 15, "05" + "00" * 15),
    ("01" + "00" * 31, "ff" * 16 + "fb" + "fe" * 15 + "01" * 16, "00" * 16),
    ("02" + "00" * 31, "fd" + "ff" * 15, "fa" + "ff" * 15),
    (
        "01" + "00" * 7 + "04" + "00" * 7 + "00" * 16,
        "e33594d7505e43b9" + "00" * 8 + "3394d7505e4379cd01" + "00" * 7 + "00" * 16
        + "01" + "00" * 15,
        "14" + "00" * 7 + "55" + "00" * 7,
    ),
]  # fmt: skip


@pytest.mark.parametrize(("key_hex", "message_hex", "tag_hex"), RFC8439_VECTORS)
def test_one_time_tag_gives_the_rfc8439_vectors_at_every_split(
    key_hex: str, message_hex: str, tag_hex: str
) -> None:
    key, message, expected = (bytes.fromhex(h) for h in (key_hex, message_hex, tag_hex))
    assert poly1305(key, message) == expected  # the naive reference agrees with the RFC
    for split in range(len(message) + 1):
        tag = OneTimeTag(key[:16], key[16:])
        tag.update(message[:split])
        tag.update(message[split:])
        assert tag.message_bytes == len(message)
        assert tag.finish() == expected
        checker = OneTimeTag(key[:16], key[16:])
        checker.update(message)
        checker.verify(expected)


def test_one_time_tag_matches_the_naive_reference_fed_in_random_pieces() -> None:
    rng = np.random.default_rng(1305)
    for _ in range(40):
        key = rng.bytes(32)
        message = rng.bytes(int(rng.integers(0, 3000)))
        cuts = sorted(int(c) for c in rng.integers(0, len(message) + 1, size=5))
        tag = OneTimeTag(key[:16], key[16:])
        for lo, hi in zip([0, *cuts], [*cuts, len(message)], strict=True):
            tag.update(message[lo:hi])
        assert tag.finish() == poly1305(key, message)


def test_one_time_tag_is_used_once_and_rejects_a_changed_tag() -> None:
    key = bytes(range(32))
    tag = OneTimeTag(key[:16], key[16:])
    tag.update(b"transcript")
    good = tag.finish()
    for use in (lambda: tag.update(b"more"), tag.finish, lambda: tag.verify(good)):
        with pytest.raises(ProtocolError):
            use()
    for bad in (flip(good, 0), flip(good, 15), good + b"\x00", good[:15], b""):
        checker = OneTimeTag(key[:16], key[16:])
        checker.update(b"transcript")
        with pytest.raises(AuthenticationFailed):
            checker.verify(bad)
        with pytest.raises(ProtocolError):  # a second check under the same key is refused
            checker.verify(good)
    for r, s in ((bytes(15), bytes(16)), (bytes(16), bytes(17))):
        with pytest.raises(ProtocolError):
            OneTimeTag(r, s)
    assert key.hex() not in repr(tag) and key[:16].hex() not in repr(OneTimeTag(key[:16], key[16:]))


def test_block_transcript_tag_is_poly1305_over_length_prefixed_records() -> None:
    rng = np.random.default_rng(17)
    for _ in range(20):
        r, s = rng.bytes(16), rng.bytes(16)
        records = [rng.bytes(int(n)) for n in rng.integers(0, 200, size=int(rng.integers(1, 6)))]
        expected = transcript_tag(r, s, records)
        sender = BlockTranscript(r=r, s=s, hmac_key=None)
        receiver = BlockTranscript(r=r, s=s, hmac_key=None)
        for record in records[:-1]:
            cut = len(record) // 3
            sender.absorb(record[:cut], record[cut:])  # a record given in parts is one record
            receiver.absorb(record)
        sender.absorb(records[-1])
        assert sender.message_bytes == sum(8 + len(record) for record in records)
        assert sender.tag() == expected
        receiver.verify_final(records[-1], expected)
    # a record boundary moved is another transcript
    boundary = BlockTranscript(r=r, s=s, hmac_key=None)
    boundary.absorb(b"ab")
    with pytest.raises(AuthenticationFailed):
        boundary.verify_final(b"c", transcript_tag(r, s, [b"a", b"bc"]))


def test_forgery_bound_is_bernsteins_for_the_longest_transcript_allowed() -> None:
    # 8 ceil(L / 16) / 2^106 (Bernstein 2005, section 3)
    assert forgery_bound(0) == 0.0
    assert forgery_bound(1) == forgery_bound(16) == 8 / 2.0**106
    assert forgery_bound(17) == 16 / 2.0**106
    assert ChannelConfig().max_block_chunks == 1 << 26
    assert ChannelConfig().tag_forgery_bound == 2.0**-77  # 8 * 2^26 / 2^106
    assert ChannelConfig(max_block_chunks=1000).tag_forgery_bound == 8000 / 2.0**106


def test_a_key_derived_block_records_two_tags_at_the_configured_bound() -> None:
    pair = rotated_pair()
    ledger = pair.alice.ledger
    assert ledger is not None
    tags, bound = ledger.tags_issued, ledger.forgery_bound
    pair.run_block(0)
    assert ledger.tags_issued == tags + 2
    assert ledger.forgery_bound == pytest.approx(bound + 2 * 2.0**-77, rel=1e-12)


# ---- ledger ---------------------------------------------------------------------------------


def test_ledger_deposit_takes_only_what_reaches_target_and_draw_respects_reserve() -> None:
    ledger = AuthKeyLedger(target_bits=1024, reserve_bits=256)
    key = bytes(range(200))
    # 1024 bits for the pool, then two whole 256-bit handshake-key slots from the 72 bytes left
    assert ledger.deposit(key, mark_consumed_bits=0) == 128 + 64
    assert ledger.level_bits == 1024 and ledger.state.handshake_pool == key[128:192]
    assert ledger.deposit(key, mark_consumed_bits=0) == 192  # pool at target: slots only
    first = ledger.draw(512, "t")
    assert first == key[:64]
    assert ledger.draw(256, "t") == key[64:96]
    before = ledger.state
    with pytest.raises(AuthKeyExhausted):
        ledger.draw(8, "t")  # would break the 256-bit reserve
    assert ledger.state == before
    assert ledger.draw(256, "t", allow_reserve=True) == key[96:128]
    with pytest.raises(AuthKeyExhausted):
        ledger.draw(8, "t", allow_reserve=True)
    assert ledger.level_bits == 0 and ledger.consumed_bits == 1024
    # the need is measured against the mark, so a late deposit takes the same amount
    assert ledger.deposit(key, mark_consumed_bits=512) == 64 + 4 * 32  # and four whole slots
    for text in (repr(ledger), repr(ledger.state)):
        assert key[:8].hex() not in text and "pool=" not in text


def test_draw_many_takes_consecutive_keys_in_one_reported_draw() -> None:
    records: list[DrawRecord] = []
    ledger = AuthKeyLedger(target_bits=1024, reserve_bits=256, observer=records.append)
    key = bytes(range(128))
    ledger.deposit(key, mark_consumed_bits=0)
    ledger.draw(64, "first")
    keys = ledger.draw_many([128, 256, 64], "block keys")
    assert keys == [key[8:24], key[24:56], key[56:64]]
    # one write-ahead for the three keys: one record covering them, after the first draw
    assert records == [
        DrawRecord(offset_bits=0, nbits=64, purpose="first"),
        DrawRecord(offset_bits=64, nbits=448, purpose="block keys"),
    ]
    before = ledger.state
    with pytest.raises(AuthKeyExhausted, match="needs 512 bits"):
        ledger.draw_many([256, 256], "block keys")  # 512 > 512 - 256 reserve
    with pytest.raises(ValueError):
        ledger.draw_many([8, 12], "block keys")  # not whole bytes: nothing is drawn
    assert ledger.state == before and len(records) == 2


def test_a_ledger_advanced_past_its_deposits_burns_them_as_they_arrive() -> None:
    """Bob has only staged the block Alice committed and drew from: the handshake moves him to
    her offset all the same, and the limbo commit's deposit leaves both with the same bits."""
    first, second = bytes(range(200)), bytes(range(50, 250))
    alice = AuthKeyLedger(target_bits=2048, reserve_bits=0)
    bob = AuthKeyLedger(target_bits=2048, reserve_bits=0)
    for ledger in (alice, bob):
        ledger.deposit(first, mark_consumed_bits=0)
    alice.deposit(second, mark_consumed_bits=0)  # committed at Alice, staged at Bob
    alice.draw(1800, "block")  # Alice opened blocks from the second deposit too
    assert alice.consumed_bits - bob.consumed_bits > bob.level_bits
    bob.advance_to(alice.consumed_bits, tags_issued=0, forgery_bound=0.0)
    assert bob.level_bits == 0 and bob.consumed_bits == alice.consumed_bits
    bob.deposit(second, mark_consumed_bits=0)  # the limbo commit
    assert bob.state.pool == alice.state.pool and bob.state == alice.state
    assert bob.draw(248, "block") == alice.draw(248, "block")
    with pytest.raises(ProtocolError, match="cannot advance"):
        bob.advance_to(bob.consumed_bits - 8, tags_issued=0, forgery_bound=0.0)


def test_an_advanced_ledger_is_persisted_at_its_new_offset_before_any_draw() -> None:
    """The observer persists the state it is handed: after a handshake's advance that is the
    new offset, so a crash before the next draw cannot bring the old one back (the peer would
    then run ahead of this side a session's draws at a time)."""
    persisted: list[int] = []
    ledger = AuthKeyLedger(target_bits=2048, reserve_bits=0)
    ledger.observer = lambda _record: persisted.append(ledger.consumed_bits)
    ledger.deposit(bytes(range(200)), mark_consumed_bits=0)
    ledger.advance_to(1024, tags_issued=3, forgery_bound=1e-30)
    assert persisted == [1024]


def test_ledger_fingerprint_tracks_public_counters_only() -> None:
    one, two = funded_ledger(1), funded_ledger(2)  # different key bytes, same counters
    assert one.fingerprint() == two.fingerprint()
    one.draw(256, "x")
    assert one.fingerprint() != two.fingerprint()
    two.draw(256, "x")
    assert one.fingerprint() == two.fingerprint()


# ---- messages and framing -------------------------------------------------------------------


def test_payload_schema_names_the_bad_field() -> None:
    good = Data(block_id=3, kind="estimate", body={"qber": 0.02, "ok": True})
    assert decode_payload(Data, encode_payload(good, REGISTRY), REGISTRY) == good
    bad_bodies: list[tuple[dict[str, object], str]] = [
        ({"qber": 0.9, "ok": True}, "body.qber"),
        ({"qber": 1, "ok": True}, "body.qber"),  # int where float is required
        ({"qber": 0.1, "ok": 1}, "body.ok"),
        ({"qber": 0.1}, "body.ok"),
        ({"qber": 0.1, "ok": True, "extra": 1}, "body.extra"),
    ]
    import msgpack

    for body, field in bad_bodies:
        payload = msgpack.packb({"block_id": 3, "kind": "estimate", "body": body})
        with pytest.raises(ProtocolError) as info:
            decode_payload(Data, payload, REGISTRY)
        assert info.value.field == field
    payload = msgpack.packb({"block_id": -1, "kind": "estimate", "body": {}})
    with pytest.raises(ProtocolError, match="block_id"):
        decode_payload(Data, payload, REGISTRY)
    payload = msgpack.packb({"block_id": 1, "kind": "nope", "body": {}})
    with pytest.raises(ProtocolError, match="kind"):
        decode_payload(Data, payload, REGISTRY)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_payload_decoder_raises_only_protocol_error(blob: bytes) -> None:
    for cls in (Data, BlockOpen):
        with contextlib.suppress(ProtocolError):
            decode_payload(cls, blob, REGISTRY)


def _block_stream(pair: Pair) -> list[bytes]:
    frames = [pair.alice.open_block(0)]
    frames += [
        pair.alice.send_data(0, "cascade_query", {"pass_index": i, "ranges": bytes([i]) * 20})
        for i in range(2)
    ]
    frames.append(pair.alice.ping(5))
    return frames


@pytest.mark.parametrize("mode", ["psk", "ed25519"])
def test_frames_split_at_every_offset_give_the_same_events(mode: str) -> None:
    creds = make_creds(mode)
    probe = make_pair(mode, creds=creds)
    probe.handshake()
    length = len(b"".join(_block_stream(probe)))
    for cut in range(length + 1):
        pair = make_pair(mode, creds=creds)
        pair.handshake()
        start = pair.bob.recv_seq
        frames = _block_stream(pair)
        stream = b"".join(frames)
        assert len(stream) == length
        got: list[Event] = []
        for part in (stream[:cut], stream[cut:]):
            if part:
                pair.bob.receive_data(part)
            while not isinstance(event := pair.bob.next_event(now_s=NOW_S), NeedData):
                got.append(event)
        assert [type(e).__name__ for e in got] == ["BlockOpened", "Data", "Data"]
        assert pair.bob.recv_seq == start + len(frames)
        assert pair.bob.data_to_send()  # the pong to Alice's ping


# ---- handshakes, rotation, key-derived blocks ------------------------------------------------


@pytest.mark.parametrize("mode", ["ed25519", "mldsa65", "psk"])
def test_bootstrap_handshake_then_blocks(mode: str) -> None:
    pair = make_pair(mode)
    pair.handshake()
    expected = SessionMode.PSK if mode == "psk" else SessionMode.CERTIFICATE
    for role in Role:
        (event,) = pair.events[role]
        assert isinstance(event, HandshakeComplete) and event.mode is expected
        assert pair.end(role).mode is expected
        assert pair.end(role).state is ConnectionState.ESTABLISHED
    assert pair.alice.session_id == pair.bob.session_id
    pair.run_block(0)
    for role in Role:
        done = [e for e in pair.events[role] if isinstance(e, BlockAuthenticated)]
        assert [e.block_id for e in done] == [0] and done[0].mode is expected
    data = [e for e in pair.events[Role.BOB] if isinstance(e, Data)]
    assert [d.body["pass_index"] for d in data] == [0, 1]
    pair.deliver(Role.BOB, pair.alice.ping(9))
    assert PongReceived(nonce=9) in pair.events[Role.ALICE]


def test_the_last_close_of_a_block_queues_its_authentication_for_the_shell_to_fetch() -> None:
    pair = make_pair("psk")
    pair.handshake()
    pair.deliver(Role.BOB, pair.alice.open_block(0))
    pair.deliver(Role.BOB, pair.alice.close_block(0))
    pending = [pair.bob.has_pending_events]
    pair.deliver(Role.ALICE, pair.bob.close_block(0))  # no bytes reach Bob after this
    pending.append(pair.bob.has_pending_events)
    pair.drain(Role.BOB)
    pending.append(pair.bob.has_pending_events)
    assert pending == [False, True, False]
    assert isinstance(pair.events[Role.BOB][-1], BlockAuthenticated)


@pytest.mark.slow  # runs long
def test_rotation_then_1000_key_derived_blocks_keep_ledgers_equal() -> None:
    draws: tuple[list[DrawRecord], list[DrawRecord]] = ([], [])
    pair = rotated_pair(observers=draws)
    for role in Role:
        assert isinstance(pair.events[role][-1], Rotated)
        assert pair.end(role).mode is SessionMode.KEY_DERIVED
    rng = np.random.default_rng(99)
    assert pair.alice.ledger is not None and pair.bob.ledger is not None
    for block_id in range(1000):
        pair.run_block(block_id, rounds=1, payload_bytes=int(rng.integers(0, 64)))
        done = {
            role: [e for e in pair.events[role] if isinstance(e, BlockAuthenticated)][-1]
            for role in Role
        }
        assert done[Role.ALICE].block_id == done[Role.BOB].block_id == block_id
        assert done[Role.ALICE].ledger_mark_bits == done[Role.BOB].ledger_mark_bits
        assert done[Role.ALICE].auth_bits_spent == BLOCK_DRAW_BITS
        # both commit the block's key: the pool refills to its target from it
        key = rng.bytes(256)
        taken = {
            role: pair.end(role).ledger.deposit(  # type: ignore[union-attr]
                key, mark_consumed_bits=done[role].ledger_mark_bits
            )
            for role in Role
        }
        spent_bits = BLOCK_DRAW_BITS + (ROTATION_KEY_BITS if block_id == 0 else 0)
        slot_bytes = min(HANDSHAKE_SLOTS_PER_DEPOSIT, (256 - spent_bits // 8) // 32) * 32
        assert taken[Role.ALICE] == taken[Role.BOB] == spent_bits // 8 + slot_bytes
        assert pair.alice.ledger.state == pair.bob.ledger.state
    assert pair.alice.ledger.tags_issued == 2000
    # 2,000 one-time Poly1305 tags at 8 * 2^26 / 2^106 each
    assert pair.alice.ledger.forgery_bound == pytest.approx(2000 * 2.0**-77, rel=1e-9)
    # no one-time bit drawn twice: pool draws tile [0, consumed) without overlap, same on both
    # sides (the handshake-key stream and state changes are not pool draws)
    assert draws[0] == draws[1]
    position = 0
    for record in (r for r in draws[0] if r.purpose not in ("activate", "handshake")):
        assert record.offset_bits == position
        position += record.nbits
    assert position == pair.alice.ledger.consumed_bits
    assert position == ROTATION_KEY_BITS + 1000 * BLOCK_DRAW_BITS


def test_pool_exhaustion_surfaces_an_event_and_opens_no_block() -> None:
    config = ChannelConfig()
    small = (
        AuthKeyLedger(target_bits=4096, reserve_bits=1024),
        AuthKeyLedger(target_bits=4096, reserve_bits=1024),
    )
    for ledger in small:
        ledger.deposit(bytes(range(256)) * 2, mark_consumed_bits=0)
    pair = make_pair("psk", ledgers=small, config=config)
    pair.handshake()
    pair.deliver(Role.BOB, pair.alice.announce_rotation())
    pair.run_block(0)
    pair.run_block(1)
    before = snapshot(pair.alice)
    with pytest.raises(AuthKeyExhausted):
        pair.alice.open_block(2)
    assert snapshot(pair.alice) == before
    event = pair.alice.next_event(now_s=NOW_S)
    assert isinstance(event, PoolExhausted) and event.needed_bits == BLOCK_DRAW_BITS
    assert small[0].level_bits >= small[0].state.reserve_bits


# ---- negative tests: the named error, and nothing advanced ----------------------------------


@pytest.mark.parametrize("mode", ["ed25519", "psk", "key_derived"])
def test_flipped_data_frame_byte_is_rejected_without_state_change(mode: str) -> None:
    frame_len = len(established(mode).alice.send_data(7, "estimate", {"qber": 0.01, "ok": True}))
    for offset in range(frame_len):
        pair = established(mode)
        frame = pair.alice.send_data(7, "estimate", {"qber": 0.01, "ok": True})
        before = snapshot(pair.bob)
        pair.bob.receive_data(flip(frame, offset))
        try:
            event = pair.bob.next_event(now_s=NOW_S)
        except NAMED_ERRORS:
            assert snapshot(pair.bob) == before
            continue
        # only a length prefix grown past the data can leave Bob waiting
        assert event is NEED_DATA and offset < 4, offset
        assert snapshot(pair.bob) == before


@pytest.mark.parametrize("mode", ["psk", "key_derived"])
def test_replayed_and_reordered_frames_are_rejected(mode: str) -> None:
    pair = established(mode)
    first = pair.alice.send_data(7, "estimate", {"qber": 0.01, "ok": True})
    second = pair.alice.send_data(7, "estimate", {"qber": 0.02, "ok": False})
    pair.deliver(Role.BOB, first)
    error = assert_rejected(pair.bob, first, ProtocolError)  # replay
    assert isinstance(error, ProtocolError) and error.field == "seq"

    pair = established(mode)
    first = pair.alice.send_data(7, "estimate", {"qber": 0.01, "ok": True})
    second = pair.alice.send_data(7, "estimate", {"qber": 0.02, "ok": False})
    error = assert_rejected(pair.bob, second + first, ProtocolError)  # reorder (a gap)
    assert isinstance(error, ProtocolError) and error.field == "seq"


def test_frame_replayed_into_a_new_session_is_rejected() -> None:
    creds = make_creds("psk")
    old = make_pair("psk", creds=creds)
    old.handshake()
    recorded = old.alice.open_block(0)
    new = make_pair("psk", creds=creds, seed=77)
    new.handshake()
    assert_rejected(new.bob, recorded, AuthenticationFailed)


def test_truncated_oversized_unknown_and_out_of_state_frames() -> None:
    # truncated: the stream ends inside a frame
    pair = established("psk")
    frame = pair.alice.send_data(7, "estimate", {"qber": 0.01, "ok": True})
    before = snapshot(pair.bob)
    pair.bob.receive_data(frame[:-5])
    assert pair.bob.next_event(now_s=NOW_S) is NEED_DATA
    pair.bob.receive_data(b"")
    with pytest.raises(ProtocolError, match="length"):
        pair.bob.next_event(now_s=NOW_S)
    assert snapshot(pair.bob) == before
    # a length prefix shorter than header + tag
    pair = established("psk")
    error = assert_rejected(pair.bob, (20).to_bytes(4, "big") + bytes(20), ProtocolError)
    assert isinstance(error, ProtocolError) and error.field == "length"
    # oversized length prefix: refused on the first four bytes, nothing buffered after it
    limit = 1 << 17
    config = ChannelConfig(max_frame_bytes=limit)
    pair = make_pair("psk", config=config)
    pair.handshake()
    error = assert_rejected(pair.bob, (limit + 1).to_bytes(4, "big"), ProtocolError)
    assert isinstance(error, ProtocolError) and error.field == "length"
    # exactly at the limit is accepted as far as length goes (then waits for the body)
    pair = make_pair("psk", config=config)
    pair.handshake()
    pair.bob.receive_data(limit.to_bytes(4, "big"))
    assert pair.bob.next_event(now_s=NOW_S) is NEED_DATA
    # unknown type, correctly tagged
    pair = established("psk")
    mac = pair.alice._send_control
    assert mac is not None
    header = pack_header(99, pair.alice.send_seq, NO_BLOCK)
    forged = pack_frame(header, b"\x80", mac.tag(header, b"\x80"))
    error = assert_rejected(pair.bob, forged, ProtocolError)
    assert isinstance(error, ProtocolError) and error.field == "type"


def test_message_valid_in_another_state_is_rejected() -> None:
    # a second BlockOpen for an id already used, and a Finish after the handshake
    pair = established("psk")
    mac = pair.alice._send_control
    assert mac is not None
    payload = encode_payload(BlockOpen(block_id=7), REGISTRY)
    header = pack_header(BlockOpen.CODE, pair.alice.send_seq, NO_BLOCK)
    error = assert_rejected(
        pair.bob, pack_frame(header, payload, mac.tag(header, payload)), ProtocolError
    )
    assert isinstance(error, ProtocolError) and error.field == "block_id"
    # Bob receiving a HelloReply (Alice's message) while established
    pair = established("psk")
    mac = pair.alice._send_control
    assert mac is not None
    probe = make_pair("psk")
    probe.bob.receive_data(probe.alice.start_handshake())
    probe.bob.next_event(now_s=NOW_S)
    reply = probe.bob.data_to_send()
    payload = reply[4 + 17 :]
    header = pack_header(2, pair.alice.send_seq, NO_BLOCK)
    error = assert_rejected(
        pair.bob, pack_frame(header, payload, mac.tag(header, payload)), ProtocolError
    )
    assert isinstance(error, ProtocolError) and error.field == "type"


def test_close_frame_reports_reason() -> None:
    pair = established("key_derived")
    pair.deliver(Role.BOB, pair.alice.close(CloseReason.SHUTDOWN, "bye"))
    assert pair.events[Role.BOB][-1] == PeerClosed(reason=CloseReason.SHUTDOWN, detail="bye")


def test_no_secret_in_reprs() -> None:
    alice_c, _, _ = credentials_pair("ed25519")
    psk = PskCredentials(psk=b"\xaa" * 32)
    pair = established("key_derived")
    ledger = pair.alice.ledger
    assert ledger is not None
    pool_hex = ledger.state.pool[:8].hex()
    for obj in (alice_c, psk, pair.alice, ledger, ledger.state, pair.alice._blocks[7]):
        text = repr(obj)
        assert "aaaaaaaa" not in text and pool_hex not in text


def test_pure_channel_modules_import_no_trio_or_socket() -> None:
    import pkgutil

    import qkdnode.channel

    names = [
        info.name
        for info in pkgutil.walk_packages(qkdnode.channel.__path__, prefix="qkdnode.channel.")
    ]
    assert {"qkdnode.channel.connection", "qkdnode.channel.auth"} <= set(names)
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(','.join(m for m in ('trio', 'socket', 'selectors', 'asyncio') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ},
    )
    assert out.stdout.strip() == ""


def test_block_open_events_and_handshake_key_budget() -> None:
    pair = rotated_pair()
    pair.deliver(Role.BOB, pair.alice.open_block(3))
    assert pair.events[Role.BOB][-1] == BlockOpened(block_id=3)
    ledger = pair.alice.ledger
    assert ledger is not None
    assert ledger.consumed_bits == ROTATION_KEY_BITS + BLOCK_DRAW_BITS
    assert HANDSHAKE_KEY_BITS == 256


@pytest.mark.parametrize("mode", ["psk", "key_derived"])
def test_control_messages_travel_outside_blocks_and_are_authenticated(mode: str) -> None:
    pair = make_pair(mode) if mode != "key_derived" else rotated_pair()
    if mode != "key_derived":
        pair.handshake()
    body: dict[str, int | float | bool | bytes] = {"qber": 0.03, "ok": True}
    got = pair.deliver(Role.ALICE, pair.bob.send_control("estimate", body))
    assert len(got) == 1 and isinstance(got[0], Control)
    assert got[0].kind == "estimate" and dict(got[0].body) == body
    frame = pair.alice.send_control("estimate", body)
    for offset in range(0, len(frame), 7):
        before = snapshot(pair.bob)
        pair.bob.receive_data(flip(frame, offset))
        try:
            event = pair.bob.next_event(now_s=NOW_S)
        except NAMED_ERRORS:
            assert snapshot(pair.bob) == before
            pair = make_pair(mode) if mode != "key_derived" else rotated_pair()
            if mode != "key_derived":
                pair.handshake()
            frame = pair.alice.send_control("estimate", body)
            continue
        assert event is NEED_DATA and offset < 4, offset
    with pytest.raises(ProtocolError):
        pair.alice.send_control("no_such_kind", body)


def test_control_message_before_the_handshake_is_refused() -> None:
    pair = make_pair("psk")
    with pytest.raises(ProtocolError):
        pair.alice.send_control("estimate", {"qber": 0.0, "ok": True})


def test_a_control_frame_crossing_alices_rotation_announce_is_accepted() -> None:
    pair = make_pair("psk", ledgers=(funded_ledger(1), funded_ledger(1)))
    pair.handshake()
    announce = pair.alice.announce_rotation()  # Alice is ROTATING until Bob's ack arrives
    control = pair.bob.send_control("estimate", {"qber": 0.01, "ok": True})
    (event,) = pair.deliver(Role.ALICE, control)
    assert isinstance(event, Control) and event.kind == "estimate"
    pair.deliver(Role.BOB, announce)
    assert any(isinstance(e, Rotated) for e in pair.events[Role.ALICE])


@pytest.mark.parametrize("block_id", [2**63, 2**64 - 1])
def test_block_ids_beyond_the_stores_keys_are_refused(block_id: int) -> None:
    pair = established("psk")
    with pytest.raises(ProtocolError) as refused:
        pair.alice.open_block(block_id)
    assert refused.value.field == "block_id"


def test_a_block_key_into_a_filling_pool_still_refills_the_handshake_key_stream() -> None:
    """The slots' share is kept from a pool far from its target: a reconnection after the
    first commits always finds a handshake key."""
    ledger = AuthKeyLedger(target_bits=1 << 20, reserve_bits=1 << 16)
    key = bytes(range(256)) * 24  # 6,144 bytes, far below the pool's need
    taken = ledger.deposit(key, mark_consumed_bits=0)
    assert taken == len(key)
    assert ledger.state.handshake_deposited == HANDSHAKE_SLOTS_PER_DEPOSIT
    assert ledger.level_bits == 8 * (len(key) - HANDSHAKE_SLOTS_PER_DEPOSIT * 32)
    slot = key[-HANDSHAKE_SLOTS_PER_DEPOSIT * 32 :][:32]
    # the first key of the first slot: HMAC-SHA256 of the slot over the key's number
    expected = hmac.digest(slot, b"qkdnode-v1 handshake key " + bytes(4), "sha256")
    assert ledger.take_handshake_key(0) == expected
