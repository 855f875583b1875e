"""Large blocks: Alice's records of the detected pulses only, sifting streamed in chunks.

Each path is checked bit for bit against the dense records on small seeded blocks: the
simulated source's re-drawn records, records of the detected pulses only, sifting with either,
and a whole block's outcome.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trio

from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.errors import ConfigError, ProtocolError
from qkdnode.link.physics import RedrawnEmissions, Source
from qkdnode.link.recording import pack_block
from qkdnode.link.simulated import SimulatedAliceLink, SimulatedBobLink, memory_fibre
from qkdnode.postprocess import bitpack
from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.cascade.frames import (
    FramedReconciler,
    FramedResponder,
    frame_bounds,
    frame_seed,
)
from qkdnode.postprocess.pipeline import BlockKey, run_block
from qkdnode.postprocess.records import (
    AliceRecords,
    DetectedEmissionRecords,
    DetectionRecords,
    EmissionLookup,
    EmissionRecords,
)
from qkdnode.postprocess.sifting import announce_detections, sift_alice
from tests import helpers_bitpack_reference as bitpack_reference
from tests.helpers_blocks import SINGLE_PHOTON, detected_records, make_block

PARAMS = SimulatedLinkConfig().nominal_parameters()


def _dense(seed: int, pulses: int, chunk: int) -> EmissionRecords:
    """Alice's dense records as her link builds them: chunk after chunk from one generator."""
    source = Source(PARAMS)
    rng = np.random.default_rng(seed)
    parts = [source.emit(min(chunk, pulses - s), rng) for s in range(0, pulses, chunk)]
    return EmissionRecords(
        first_pulse_index=0,
        bit=np.concatenate([p.bit for p in parts]),
        basis=np.concatenate([p.basis for p in parts]),
        intensity=np.concatenate([p.intensity for p in parts]),
    )


@pytest.mark.parametrize(("emit_chunk", "redraw_chunk"), [(1000, 4096), (4096, 1000), (7, 1 << 20)])
def test_redrawn_records_equal_the_emitted_ones(emit_chunk: int, redraw_chunk: int) -> None:
    pulses = 50_000
    rng = np.random.default_rng(11)
    redrawn = RedrawnEmissions(
        Source(PARAMS), rng, first_pulse_index=0, pulse_count=pulses, chunk_pulses=redraw_chunk
    )
    dense = _dense(11, pulses, emit_chunk)  # the generator state redrawn holds is its start
    picks = np.random.default_rng(1)
    for offsets in (
        np.flatnonzero(picks.random(pulses) < 0.02),
        np.arange(pulses, dtype=np.int64),
        np.array([0, pulses - 1], dtype=np.int64),
        np.empty(0, dtype=np.int64),
    ):
        offsets = offsets.astype(np.int64)
        for mine, theirs in zip(
            redrawn.records_at(offsets), dense.records_at(offsets), strict=True
        ):
            assert mine.dtype == np.uint8
            assert np.array_equal(mine, theirs)
    assert isinstance(redrawn, EmissionLookup)
    assert "pulse_count=50000" in repr(redrawn)


def test_redrawing_leaves_the_emitting_generator_alone() -> None:
    rng = np.random.default_rng(5)
    redrawn = RedrawnEmissions(Source(PARAMS), rng, first_pulse_index=10, pulse_count=1000)
    before = rng.bit_generator.state
    redrawn.records_at(np.arange(0, 1000, 3, dtype=np.int64))
    assert rng.bit_generator.state == before


@pytest.mark.parametrize(
    "offsets",
    [np.array([5, 5], dtype=np.int64), np.array([3, 1]), np.array([-1, 2]), np.array([1000])],
)
def test_lookups_refuse_bad_offsets(offsets: np.ndarray) -> None:
    redrawn = RedrawnEmissions(
        Source(PARAMS), np.random.default_rng(0), first_pulse_index=0, pulse_count=1000
    )
    with pytest.raises(ProtocolError):
        redrawn.records_at(offsets)


def test_detected_records_give_their_pulses_and_refuse_others() -> None:
    dense = _dense(3, 10_000, 4096)
    kept = np.arange(0, 10_000, 7, dtype=np.int64)
    detected = detected_records(dense, kept)
    asked = kept[::3]
    for mine, theirs in zip(detected.records_at(asked), dense.records_at(asked), strict=True):
        assert np.array_equal(mine, theirs)
    for missing in ([1], [0, 8], [kept[-1] + 1]):
        with pytest.raises(ProtocolError):
            detected.records_at(np.array(missing, dtype=np.int64))
    with pytest.raises(ProtocolError):
        DetectedEmissionRecords(
            first_pulse_index=0,
            pulse_count=10,
            offset=np.array([2, 1], dtype=np.int64),
            bit=np.zeros(2, np.uint8),
            basis=np.zeros(2, np.uint8),
            intensity=np.zeros(2, np.uint8),
        )


async def _link_block(
    alice_records: str, pulses: int, chunk: int, blocks: int = 2
) -> list[tuple[AliceRecords, DetectionRecords]]:
    config = SimulatedLinkConfig(alice_records=alice_records, chunk_pulses=chunk)
    seeds = np.random.SeedSequence(42).spawn(2)
    send, receive = memory_fibre()
    alice = SimulatedAliceLink(config, fibre=send, rng=np.random.default_rng(seeds[0]))
    bob = SimulatedBobLink(config, fibre=receive, rng=np.random.default_rng(seeds[1]))
    await alice.open()
    await bob.open()
    pairs = []
    for _ in range(blocks):
        sent: list[AliceRecords] = []

        async def emit(sent: list[AliceRecords] = sent) -> None:
            sent.append(await alice.next_block(pulses))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(emit)
            detections = await bob.next_block(pulses)
        pairs.append((sent[0], detections))
    await alice.aclose()
    await bob.aclose()
    return pairs


async def test_the_link_keeping_detected_pulses_only_is_the_same_link() -> None:
    pulses, chunk = 300_000, 65_536
    dense_pairs = await _link_block("every_pulse", pulses, chunk)
    sparse_pairs = await _link_block("detected_pulses", pulses, chunk)
    for (dense, bob), (sparse, bob_again) in zip(dense_pairs, sparse_pairs, strict=True):
        assert isinstance(dense, EmissionRecords)
        assert isinstance(sparse, RedrawnEmissions)
        assert sparse.first_pulse_index == dense.first_pulse_index
        assert sparse.pulse_count == dense.pulse_count
        # the same pulses on the fibre: Bob's detections are identical
        assert np.array_equal(bob.pulse_index, bob_again.pulse_index)
        assert np.array_equal(bob.bit, bob_again.bit)
        assert np.array_equal(bob.basis, bob_again.basis)
        assert bob.detection_count > 1000
        offsets = bob.pulse_index - bob.first_pulse_index
        for mine, theirs in zip(sparse.records_at(offsets), dense.records_at(offsets), strict=True):
            assert np.array_equal(mine, theirs)
        # and the sifting on them, and a recording of them
        announcement = announce_detections(bob)
        assert sift_alice(sparse, announcement)[0] == sift_alice(dense, announcement)[0]
        sparse_packed, dense_packed = pack_block(sparse, bob), pack_block(dense, bob)
        assert all(
            np.array_equal(sparse_packed[i], dense_packed[i]) for i in range(len(dense_packed))
        )


def _assert_same_sifting(
    dense: EmissionRecords, lookup: AliceRecords, bob: DetectionRecords
) -> None:
    announcement = announce_detections(bob)
    reply, sifted = sift_alice(dense, announcement)
    reply_again, sifted_again = sift_alice(lookup, announcement)
    assert reply_again == reply
    for field in ("key_bits", "key_intensity", "test_bits", "test_intensity"):
        assert np.array_equal(getattr(sifted_again, field), getattr(sifted, field)), field


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sifting_from_a_lookup_equals_sifting_the_dense_records(seed: int) -> None:
    emissions, detections = make_block(np.random.default_rng(seed), pulse_count=200_000)
    offsets = detections.pulse_index - detections.first_pulse_index
    detected = detected_records(emissions, offsets)
    _assert_same_sifting(emissions, detected, detections)


def test_sifting_refuses_an_announcement_of_pulses_alice_has_no_record_of() -> None:
    emissions, detections = make_block(np.random.default_rng(4), pulse_count=50_000)
    offsets = detections.pulse_index - detections.first_pulse_index
    detected = detected_records(emissions, offsets[1:])
    with pytest.raises(ProtocolError):
        sift_alice(detected, announce_detections(detections))


def test_a_block_from_the_detected_records_gives_the_same_key() -> None:
    emissions, detections = make_block(
        np.random.default_rng(21),
        pulse_count=2_000_000,
        qber=0.02,
        vacuum_qber=0.02,
        p_key_basis=0.7,
    )
    offsets = detections.pulse_index - detections.first_pulse_index
    detected = detected_records(emissions, offsets)
    params = SINGLE_PHOTON
    for dense, sparse in zip(
        run_block(emissions, detections, params, np.random.default_rng(8)),
        run_block(detected, detections, params, np.random.default_rng(8)),
        strict=True,
    ):
        assert isinstance(dense, BlockKey) and isinstance(sparse, BlockKey)
        assert dense.statistics == sparse.statistics
        assert np.array_equal(dense.key, sparse.key)


def test_alice_records_setting() -> None:
    assert SimulatedLinkConfig().alice_records == "every_pulse"
    config = SimulatedLinkConfig.from_mapping({"alice_records": "detected_pulses"})
    assert config.alice_records == "detected_pulses"
    with pytest.raises(ConfigError) as info:
        SimulatedLinkConfig.from_mapping({"alice_records": "some"})
    assert info.value.key == "link.alice_records"


def test_frame_bounds() -> None:
    assert frame_bounds(10, 0) == [(0, 10)]
    assert frame_bounds(10, 10) == [(0, 10)]
    assert frame_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert frame_bounds(12, 4) == [(0, 4), (4, 8), (8, 12)]
    assert frame_bounds(9, 8) == [(0, 5), (5, 9)]
    seed = bytes(range(32))
    assert frame_seed(seed, 0) == seed
    assert len({frame_seed(seed, i) for i in range(4)}) == 4


def test_framed_cascade_corrects_every_frame() -> None:
    rng = np.random.default_rng(9)
    alice = rng.integers(0, 2, 50_000, dtype=np.uint8)
    bob = alice ^ (rng.random(alice.size) < 0.02).astype(np.uint8)
    seed = bytes(32)
    variant = CascadeVariant.SUBBLOCK_REUSE
    responder = FramedResponder(alice, seed=seed, variant=variant, max_frame_bits=16_000)
    reconciler = FramedReconciler(
        bob, seed=seed, variant=variant, qber_estimate=0.02, max_frame_bits=16_000
    )
    assert reconciler.frames == responder.frames == 4
    while (query := reconciler.next_query()) is not None:
        reconciler.receive_answer(responder.answer(query))
    assert reconciler.finished and responder.frames_started == 4
    assert np.array_equal(reconciler.corrected_bits, alice)
    assert reconciler.errors_corrected == int(np.count_nonzero(alice != bob))
    assert reconciler.parity_bits_received == responder.parity_bits_sent
    assert reconciler.round_trips == responder.rounds_answered
    # one query too many: past the last frame
    with pytest.raises(ProtocolError):
        responder.answer(
            FramedReconciler(
                bob, seed=seed, variant=variant, qber_estimate=0.02, max_frame_bits=16_000
            ).next_query()  # type: ignore[arg-type]
        )


def test_a_block_in_cascade_frames_gives_the_same_key_on_both_sides() -> None:
    emissions, detections = make_block(
        np.random.default_rng(21),
        pulse_count=2_000_000,
        qber=0.02,
        vacuum_qber=0.02,
        p_key_basis=0.7,
    )
    whole = run_block(emissions, detections, SINGLE_PHOTON, np.random.default_rng(8))
    one_frame = run_block(
        emissions,
        detections,
        dataclasses.replace(SINGLE_PHOTON, cascade_frame_bits=10**6),
        np.random.default_rng(8),
    )
    framed = run_block(
        emissions,
        detections,
        dataclasses.replace(SINGLE_PHOTON, cascade_frame_bits=12_000),
        np.random.default_rng(8),
    )
    for reference, same, other in zip(whole, one_frame, framed, strict=True):
        assert isinstance(reference, BlockKey) and isinstance(same, BlockKey)
        assert isinstance(other, BlockKey)
        # a key within one frame: plain Cascade, bit for bit
        assert same.statistics == reference.statistics
        assert np.array_equal(same.key, reference.key)
        assert other.statistics.reconciled_bits == reference.statistics.reconciled_bits
        assert other.statistics.round_trips > reference.statistics.round_trips
    alice, bob = framed
    assert isinstance(alice, BlockKey) and isinstance(bob, BlockKey)
    assert np.array_equal(alice.key, bob.key) and alice.statistics == bob.statistics


@pytest.mark.parametrize("chunk", [64, 1000])
def test_gap_coding_equals_the_numpy_coding_in_chunks(chunk: int) -> None:
    rng = np.random.default_rng(chunk)
    offsets = np.cumsum(rng.geometric(0.01, 20_000)).astype(np.int64)  # some gaps >= 128
    offsets[100] = offsets[99] + 1  # a zero gap
    limit = int(offsets[-1]) + 1
    whole = bitpack.encode_gaps(offsets)
    assert bitpack_reference.encode_gaps(offsets, chunk) == whole
    assert np.array_equal(bitpack.decode_gaps(whole, offsets.size, limit, field="f"), offsets)
    assert np.array_equal(
        bitpack_reference.decode_gaps(whole, offsets.size, limit, field="f", chunk=chunk), offsets
    )
    for data, count, bad_limit in (
        (whole[:-1], offsets.size, limit),  # truncated
        (whole + b"\x00", offsets.size, limit),  # one varint too many
        (whole, offsets.size + 1, limit),  # too few varints
        (whole, offsets.size, limit - 1),  # the last offset out of range
        (b"\x80" * 20 + whole[20:], offsets.size, limit),  # overlong varint
    ):
        with pytest.raises(ProtocolError):
            bitpack.decode_gaps(data, count, bad_limit, field="f")
