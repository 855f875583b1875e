"""Sifting between simulated Alice and Bob, wire encodings, malformed announcements and replies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import bitpack
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords
from qkdnode.postprocess.sifting import (
    SiftAnnouncement,
    SiftedBlock,
    SiftReply,
    announce_detections,
    sift_alice,
    sift_bob,
)


def simulate_block(
    seed: int,
    *,
    pulse_count: int,
    p_key_basis: float,
    detection_probability: float,
    flip_probability: float,
    first_pulse_index: int = 0,
) -> tuple[EmissionRecords, DetectionRecords]:
    """Random emissions, a random subset detected; matched-basis bits flipped at random."""
    rng = np.random.default_rng(seed)
    alice_basis = (rng.random(pulse_count) >= p_key_basis).astype(np.uint8)
    emissions = EmissionRecords(
        first_pulse_index=first_pulse_index,
        bit=rng.integers(0, 2, pulse_count, dtype=np.uint8),
        basis=alice_basis,
        intensity=rng.choice(3, size=pulse_count, p=[0.7, 0.2, 0.1]).astype(np.uint8),
    )
    detected = np.flatnonzero(rng.random(pulse_count) < detection_probability)
    bob_basis = (rng.random(detected.size) >= p_key_basis).astype(np.uint8)
    same = bob_basis == alice_basis[detected]
    flips = (rng.random(detected.size) < flip_probability).astype(np.uint8)
    random_bits = rng.integers(0, 2, detected.size, dtype=np.uint8)
    bob_bit = np.where(same, emissions.bit[detected] ^ flips, random_bits).astype(np.uint8)
    detections = DetectionRecords(
        first_pulse_index=first_pulse_index,
        pulse_count=pulse_count,
        pulse_index=(detected + first_pulse_index).astype(np.int64),
        basis=bob_basis,
        bit=bob_bit,
    )
    return emissions, detections


def run_sifting(
    emissions: EmissionRecords, detections: DetectionRecords
) -> tuple[SiftedBlock, SiftedBlock]:
    announcement = announce_detections(detections)
    reply, alice = sift_alice(emissions, announcement)
    bob = sift_bob(detections, reply)
    return alice, bob


def naive_sift(
    emissions: EmissionRecords, detections: DetectionRecords, basis: int
) -> tuple[list[int], list[int], list[int]]:
    """Alice's bits, Bob's bits and intensities of the detections matched in ``basis``."""
    alice_bits, bob_bits, intensities = [], [], []
    for k in range(detections.detection_count):
        offset = int(detections.pulse_index[k]) - emissions.first_pulse_index
        if emissions.basis[offset] == detections.basis[k] == basis:
            alice_bits.append(int(emissions.bit[offset]))
            bob_bits.append(int(detections.bit[k]))
            intensities.append(int(emissions.intensity[offset]))
    return alice_bits, bob_bits, intensities


@pytest.mark.parametrize(
    ("p_key_basis", "first_pulse_index"), [(0.5, 0), (0.9, 0), (0.75, 123_456_789)]
)
def test_sifting_matches_naive_sift_and_aligns_both_sides(
    p_key_basis: float, first_pulse_index: int
) -> None:
    emissions, detections = simulate_block(
        7,
        pulse_count=20_000,
        p_key_basis=p_key_basis,
        detection_probability=0.2,
        flip_probability=0.05,
        first_pulse_index=first_pulse_index,
    )
    alice, bob = run_sifting(emissions, detections)
    for basis, a_bits, b_bits, a_int, b_int in (
        (0, alice.key_bits, bob.key_bits, alice.key_intensity, bob.key_intensity),
        (1, alice.test_bits, bob.test_bits, alice.test_intensity, bob.test_intensity),
    ):
        want_alice, want_bob, want_intensity = naive_sift(emissions, detections, basis)
        assert a_bits.tolist() == want_alice
        assert b_bits.tolist() == want_bob
        assert a_int.tolist() == want_intensity
        assert b_int.tolist() == want_intensity
    # The flips survive sifting: about 5 % of the matched key bits differ, not 50 %.
    error_rate = float(np.mean(alice.key_bits != bob.key_bits))
    assert 0.03 < error_rate < 0.07
    expected_key_fraction = p_key_basis**2 / (p_key_basis**2 + (1 - p_key_basis) ** 2)
    share = alice.key_length / (alice.key_length + alice.test_length)
    assert abs(share - expected_key_fraction) < 0.03


def test_counts_per_intensity_match_naive_counts() -> None:
    emissions, detections = simulate_block(
        3, pulse_count=5_000, p_key_basis=0.8, detection_probability=0.3, flip_probability=0.0
    )
    alice, bob = run_sifting(emissions, detections)
    for basis, counts in (
        (0, alice.key_counts_per_intensity()),
        (1, alice.test_counts_per_intensity()),
    ):
        _, _, intensities = naive_sift(emissions, detections, basis)
        assert counts == tuple(intensities.count(k) for k in range(3))
    assert bob.key_counts_per_intensity() == alice.key_counts_per_intensity()
    assert bob.test_counts_per_intensity() == alice.test_counts_per_intensity()
    assert np.array_equal(alice.key_bits, bob.key_bits)  # no flips in this block


def test_empty_block_sifts_to_empty_arrays() -> None:
    emissions, detections = simulate_block(
        1, pulse_count=100, p_key_basis=0.5, detection_probability=0.0, flip_probability=0.0
    )
    assert detections.detection_count == 0
    alice, bob = run_sifting(emissions, detections)
    assert alice.key_length == bob.key_length == alice.test_length == 0
    assert alice.key_counts_per_intensity() == (0, 0, 0)


def test_announcement_is_compact() -> None:
    # Detection probability 1e-3: gaps around 1000 need two varint bytes, bases 1/8 byte.
    emissions, detections = simulate_block(
        11, pulse_count=2_000_000, p_key_basis=0.5, detection_probability=1e-3, flip_probability=0.0
    )
    announcement = announce_detections(detections)
    wire_bytes = len(announcement.pulse_gaps) + len(announcement.bases)
    assert wire_bytes < 2.3 * detections.detection_count
    reply, _ = sift_alice(emissions, announcement)
    assert len(reply.matches) + len(reply.intensities) < 0.5 * detections.detection_count


def test_sifted_block_repr_shows_no_bits() -> None:
    emissions, detections = simulate_block(
        5, pulse_count=200, p_key_basis=0.5, detection_probability=0.5, flip_probability=0.0
    )
    alice, _ = run_sifting(emissions, detections)
    text = repr(alice)
    assert f"key_length={alice.key_length}" in text
    assert "[" not in text and "array" not in text


# ---- malformed announcements and replies ------------------------------------------------------


def good_announcement() -> tuple[EmissionRecords, DetectionRecords, SiftAnnouncement]:
    emissions, detections = simulate_block(
        9, pulse_count=1_000, p_key_basis=0.5, detection_probability=0.1, flip_probability=0.0
    )
    return emissions, detections, announce_detections(detections)


def announcement_with(**changes: object) -> SiftAnnouncement:
    _, _, announcement = good_announcement()
    fields: dict[str, object] = {
        "first_pulse_index": announcement.first_pulse_index,
        "pulse_count": announcement.pulse_count,
        "detection_count": announcement.detection_count,
        "pulse_gaps": announcement.pulse_gaps,
        "bases": announcement.bases,
    }
    fields.update(changes)
    return SiftAnnouncement(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"pulse_count": -1}, "pulse_count"),
        ({"first_pulse_index": -5}, "first_pulse_index"),
        ({"detection_count": True}, "detection_count"),
        ({"pulse_count": 3}, "detection_count"),  # more detections than pulses
        ({"detection_count": 1}, "bases"),  # bases length no longer fits the count
        ({"bases": b"\x00"}, "bases"),
        ({"pulse_gaps": b""}, "pulse_gaps"),
        ({"pulse_gaps": b"\x80" * 200}, "pulse_gaps"),
        ({"pulse_count": 150}, "pulse_gaps"),  # announced pulses beyond the block
        ({"bases": "not bytes"}, "bases"),
    ],
)
def test_malformed_announcement_raises_protocol_error(
    changes: dict[str, object], field: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        announcement_with(**changes)
    assert info.value.field == field


def test_announcement_past_the_block_end_is_rejected() -> None:
    # Offsets 0 and 10 in a 10-pulse block: the second is outside.
    with pytest.raises(ProtocolError, match="below 10") as info:
        SiftAnnouncement(
            first_pulse_index=0,
            pulse_count=10,
            detection_count=2,
            pulse_gaps=bytes([0, 9]),
            bases=b"\x00",
        )
    assert info.value.field == "pulse_gaps"


def test_gap_encoding_cannot_express_unsorted_or_duplicate_indices() -> None:
    # Gaps are non-negative by construction: decoded offsets are always strictly increasing,
    # and the encoder refuses unsorted or repeated offsets.
    with pytest.raises(ValueError):
        bitpack.encode_gaps(np.array([3, 3], dtype=np.int64))
    with pytest.raises(ValueError):
        bitpack.encode_gaps(np.array([5, 2], dtype=np.int64))
    offsets = bitpack.decode_gaps(bytes([0, 0, 0]), 3, 10, field="x")
    assert offsets.tolist() == [0, 1, 2]


@pytest.mark.parametrize("indices", [[3, 3], [5, 4], [2, 7, 6, 9]])
def test_detections_out_of_order_are_rejected(indices: list[int]) -> None:
    with pytest.raises(ProtocolError, match="strictly increasing") as info:
        DetectionRecords(
            first_pulse_index=0,
            pulse_count=10,
            pulse_index=np.array(indices, dtype=np.int64),
            basis=np.zeros(len(indices), dtype=np.uint8),
            bit=np.zeros(len(indices), dtype=np.uint8),
        )
    assert info.value.field == "pulse_index"


def test_announcement_for_another_block_is_rejected_by_alice() -> None:
    emissions, detections, _ = good_announcement()
    shifted = DetectionRecords(
        first_pulse_index=detections.first_pulse_index + 1,
        pulse_count=detections.pulse_count,
        pulse_index=detections.pulse_index + 1,
        basis=detections.basis,
        bit=detections.bit,
    )
    with pytest.raises(ProtocolError) as info:
        sift_alice(emissions, announce_detections(shifted))
    assert info.value.field == "first_pulse_index"
    longer = DetectionRecords(
        first_pulse_index=detections.first_pulse_index,
        pulse_count=detections.pulse_count + 1,
        pulse_index=detections.pulse_index,
        basis=detections.basis,
        bit=detections.bit,
    )
    with pytest.raises(ProtocolError) as info:
        sift_alice(emissions, announce_detections(longer))
    assert info.value.field == "pulse_count"


def test_malformed_reply_raises_protocol_error() -> None:
    emissions, detections, announcement = good_announcement()
    reply, _ = sift_alice(emissions, announcement)
    with pytest.raises(ProtocolError) as info:
        SiftReply(
            detection_count=reply.detection_count,
            matched_count=reply.matched_count + 1,
            matches=reply.matches,
            intensities=reply.intensities,
        )
    assert info.value.field == "matched_count"
    with pytest.raises(ProtocolError) as info:
        SiftReply(
            detection_count=reply.detection_count,
            matched_count=reply.matched_count,
            matches=reply.matches,
            intensities=reply.intensities + b"\x00",
        )
    assert info.value.field == "intensities"
    # Intensity label 3 does not exist.
    with pytest.raises(ProtocolError) as info:
        SiftReply(detection_count=1, matched_count=1, matches=b"\x01", intensities=b"\x03")
    assert info.value.field == "intensities"
    # A reply for a different number of detections than Bob announced.
    other = SiftReply(detection_count=1, matched_count=0, matches=b"\x00", intensities=b"")
    with pytest.raises(ProtocolError) as info:
        sift_bob(detections, other)
    assert info.value.field == "detection_count"


# ---- bit packing and varints -----------------------------------------------------------------


@given(st.lists(st.integers(0, 1), max_size=100))
def test_pack_bits_round_trip_and_little_endian_order(values: list[int]) -> None:
    bits = np.array(values, dtype=np.uint8)
    data = bitpack.pack_bits(bits)
    assert len(data) == (len(values) + 7) // 8
    # Naive reference: bit i is worth 1 << (i % 8) in byte i // 8.
    expected = bytearray((len(values) + 7) // 8)
    for i, bit in enumerate(values):
        expected[i // 8] |= bit << (i % 8)
    assert data == bytes(expected)
    assert bitpack.unpack_bits(data, len(values), field="x").tolist() == values


def test_unpack_bits_rejects_nonzero_padding_and_wrong_length() -> None:
    with pytest.raises(ProtocolError, match="padding"):
        bitpack.unpack_bits(b"\x08", 3, field="x")
    with pytest.raises(ProtocolError, match="expected 1 bytes"):
        bitpack.unpack_bits(b"\x00\x00", 3, field="x")


@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50))
def test_gaps_are_leb128_varints(values: list[int]) -> None:
    offsets = sorted(set(values))
    data = bitpack.encode_gaps(np.array(offsets, dtype=np.int64))
    expected = bytearray()
    for previous, offset in zip([-1, *offsets[:-1]], offsets, strict=True):  # naive LEB128 gaps
        value = offset - previous - 1
        while True:
            group, value = value & 0x7F, value >> 7
            expected.append(group | (0x80 if value else 0))
            if not value:
                break
    assert data == bytes(expected)
    assert bitpack.decode_gaps(data, len(offsets), 2**63, field="x").tolist() == offsets


@given(st.lists(st.integers(0, 3), max_size=60))
def test_labels_round_trip(values: list[int]) -> None:
    labels = np.array(values, dtype=np.uint8)
    data = bitpack.pack_labels(labels, 2)
    assert bitpack.unpack_labels(data, len(values), 2, 4, field="x").tolist() == values


@pytest.mark.parametrize(
    ("data", "count", "message"),
    [
        (b"\x80", 1, "exactly"),  # truncated
        (b"\x01\x02", 1, "exactly"),  # too many
        (b"\x81\x00", 1, "non-canonical"),
        (b"\xff" * 9 + b"\x01", 1, "longer than 9"),
        (b"\x01", 0, "no data"),
    ],
)
def test_decode_gaps_rejects_malformed_varints(data: bytes, count: int, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        bitpack.decode_gaps(data, count, 2**63, field="x")


def test_decode_gaps_rejects_sums_that_would_wrap() -> None:
    # Each gap is below the limit, but their running sum overflows 64 bits.
    huge = bytes([0x80] * 8 + [0x40])  # the varint of 2**62
    with pytest.raises(ProtocolError, match="below"):
        bitpack.decode_gaps(huge * 5, 5, 2**63 - 1, field="x")
