"""The serial device protocol, pure: SLIP + CRC-32 framing, messages, record codecs, blocks."""

from __future__ import annotations

import contextlib
import itertools
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.errors import ProtocolError
from qkdnode.link.serialproto import (
    MAX_ESCAPED_BYTES,
    MAX_PAYLOAD_BYTES,
    Ack,
    Alarm,
    AlarmCode,
    Command,
    Configure,
    DeviceError,
    DeviceStatus,
    Dropped,
    FrameDecoder,
    Identity,
    Message,
    MessageType,
    Parameters,
    Received,
    decode_payload,
    encode_frame,
    encode_payload,
    frame,
)
from qkdnode.link.serialrecords import (
    MAX_DETECTION_GAP,
    MAX_DETECTIONS_PER_FRAME,
    BlockAssembler,
    DetectionChunk,
    EmissionChunk,
    split_detections,
    split_emissions,
)
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords


def naive_slip(payload: bytes) -> bytes:
    """RFC 1055, byte by byte, with the CRC-32 of the payload appended little-endian."""
    out = bytearray([0xC0])
    for byte in payload + struct.pack("<I", zlib.crc32(payload)):
        if byte == 0xC0:
            out += b"\xdb\xdc"
        elif byte == 0xDB:
            out += b"\xdb\xdd"
        else:
            out.append(byte)
    out.append(0xC0)
    return bytes(out)


def drain(decoder: FrameDecoder) -> list[Received | Dropped]:
    events: list[Received | Dropped] = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


def messages_of(events: list[Received | Dropped]) -> list[Message]:
    return [e.message for e in events if isinstance(e, Received)]


def sample_messages() -> list[Message]:
    rng = np.random.default_rng(1)
    n = 1001
    emissions = EmissionChunk(
        first_pulse_index=12345,
        bit=rng.integers(0, 2, n, dtype=np.uint8),
        basis=rng.integers(0, 2, n, dtype=np.uint8),
        intensity=rng.integers(0, 3, n, dtype=np.uint8),
    )
    index = np.sort(rng.choice(50_000, 700, replace=False)).astype(np.int64) + 10
    detections = DetectionChunk(
        first_pulse_index=10,
        pulse_span=50_000,
        pulse_index=index,
        basis=rng.integers(0, 2, 700, dtype=np.uint8),
        bit=rng.integers(0, 2, 700, dtype=np.uint8),
    )
    return [
        Command(kind=MessageType.IDENTIFY),
        Command(kind=MessageType.START),
        Configure(values=(0.5, 0.1, 0.0, 0.7, 0.2, 0.1, 0.9, 1e9)),
        Identity(
            ack_seq=3,
            protocol_version=1,
            role="bob",
            model="qkd\u00e9",
            firmware="1.2",
            serial_number="X",
        ),
        Parameters(ack_seq=4, values=tuple(float(i) / 7 for i in range(14))),
        Ack(ack_seq=5, command=4),
        DeviceStatus(
            ack_seq=6,
            running=True,
            next_pulse_index=1 << 40,
            active_alarms=5,
            detector_temperature_c=-40.5,
            laser_power_mw=1.25,
        ),
        DeviceError(ack_seq=7, code=2, text="bad argument"),
        Alarm(code=int(AlarmCode.SYNC_LOST), active=True, value=3.5),
        emissions,
        detections,
    ]


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    if isinstance(a, EmissionChunk):
        assert isinstance(b, EmissionChunk)
        assert a.first_pulse_index == b.first_pulse_index
        for name in ("bit", "basis", "intensity"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    elif isinstance(a, DetectionChunk):
        assert isinstance(b, DetectionChunk)
        assert (a.first_pulse_index, a.pulse_span) == (b.first_pulse_index, b.pulse_span)
        for name in ("pulse_index", "basis", "bit"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    else:
        assert a == b


def test_crc32_check_value() -> None:
    # The CRC-32 (IEEE 802.3) check value of "123456789" from the CRC RevEng catalogue
    # (reveng.sourceforge.io/crc-catalogue, CRC-32/ISO-HDLC): 0xCBF43926.
    framed = frame(b"123456789")
    assert framed == naive_slip(b"123456789")
    assert framed[-5:-1] == struct.pack("<I", 0xCBF43926)


def test_every_message_round_trips_and_matches_the_naive_slip_encoder() -> None:
    decoder = FrameDecoder()
    stream = b""
    for seq, message in enumerate(sample_messages()):
        payload = encode_payload(message, seq)
        assert encode_frame(message, seq) == naive_slip(payload)
        stream += encode_frame(message, seq)
    decoder.receive_data(b"\xc0" + stream)
    events = drain(decoder)
    assert all(isinstance(e, Received) for e in events)
    assert [e.seq for e in events if isinstance(e, Received)] == list(range(len(events)))
    for got, sent in zip(messages_of(events), sample_messages(), strict=True):
        assert_same(got, sent)
    assert decoder.counters.frames == len(events)
    assert decoder.counters.lost_frames == 0


def test_stream_split_at_every_offset_gives_the_same_frames() -> None:
    messages = sample_messages()[:9]  # the small ones: the test is quadratic in stream length
    stream = b"".join(encode_frame(m, i) for i, m in enumerate(messages))
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        decoder.resync()
        decoder.receive_data(b"\xc0" + stream[:cut])
        events = drain(decoder)
        decoder.receive_data(stream[cut:])
        events += drain(decoder)
        got = messages_of(events)
        assert len(got) == len(messages), cut
        for a, b in zip(got, messages, strict=True):
            assert_same(a, b)


@settings(max_examples=200)
@given(
    payload=st.binary(max_size=300),
    garbage=st.lists(st.binary(min_size=1, max_size=80), min_size=1, max_size=4),
)
def test_garbage_between_frames_is_dropped_and_counted_never_raised(
    payload: bytes, garbage: list[bytes]
) -> None:
    good = encode_frame(DeviceError(ack_seq=1, code=1, text=payload.hex()[:150]), 9)
    stream = b"".join(g + good for g in garbage)
    decoder = FrameDecoder()
    decoder.receive_data(b"\xc0" + stream)
    events = drain(decoder)
    received = messages_of(events)
    # Garbage may swallow the start of a frame only if it ends without END; never forge one.
    assert all(m == DeviceError(ack_seq=1, code=1, text=payload.hex()[:150]) for m in received)
    assert len(received) >= sum(1 for g in garbage if g.endswith(b"\xc0"))
    dropped = [e for e in events if isinstance(e, Dropped)]
    c = decoder.counters
    assert len(dropped) == c.crc_errors + c.framing_errors + c.oversize_frames + c.malformed_frames


def test_every_single_byte_corruption_is_dropped() -> None:
    message = sample_messages()[9]  # EMISSIONS, ~500 bytes
    good = encode_frame(message, 77)
    neighbour = encode_frame(Ack(ack_seq=1, command=4), 78)
    rng = np.random.default_rng(5)
    for position in range(1, len(good) - 1):
        corrupted = bytearray(good)
        corrupted[position] ^= int(rng.integers(1, 256))
        decoder = FrameDecoder()
        decoder.receive_data(b"\xc0" + bytes(corrupted) + neighbour)
        events = drain(decoder)
        received = [e for e in events if isinstance(e, Received)]
        # Only the neighbour survives; the corrupted frame is dropped and counted.
        assert [r.message for r in received] == [Ack(ack_seq=1, command=4)], position
        c = decoder.counters
        assert c.crc_errors + c.framing_errors + c.malformed_frames >= 1


def test_sequence_gaps_are_counted() -> None:
    decoder = FrameDecoder()
    ack = Ack(ack_seq=0, command=4)
    decoder.receive_data(
        b"\xc0" + encode_frame(ack, 65534) + encode_frame(ack, 65535) + encode_frame(ack, 2)
    )
    assert len(drain(decoder)) == 3
    assert decoder.counters.lost_frames == 2  # 0 and 1 missing across the wrap-around


def test_oversize_line_without_frame_end_is_dropped_then_resynchronised() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\xc0" + b"\x01" * (MAX_ESCAPED_BYTES + 10))
    assert drain(decoder) == [Dropped(reason="oversize", detail="no frame end within limit")]
    decoder.receive_data(b"\x01" * 100 + encode_frame(Ack(ack_seq=2, command=5), 0))
    assert messages_of(drain(decoder)) == [Ack(ack_seq=2, command=5)]
    with pytest.raises(ValueError):
        frame(b"\x00" * (MAX_PAYLOAD_BYTES + 1))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_malformed_payloads_raise_protocol_error_only(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_payload(payload)


def test_truncated_payloads_name_the_field() -> None:
    for message in sample_messages():
        payload = encode_payload(message, 1)
        for size in range(len(payload)):
            if size == 3 and isinstance(message, Command):
                continue
            with pytest.raises(ProtocolError) as info:
                decode_payload(payload[:size])
            assert info.value.field, (message, size)
        with pytest.raises(ProtocolError, match="trailing"):
            decode_payload(payload + b"\x00\x00")


def test_emission_intensity_class_3_is_refused() -> None:
    chunk = sample_messages()[9]
    assert isinstance(chunk, EmissionChunk)
    payload = bytearray(encode_payload(chunk, 0))
    payload[-1] |= 0xC0  # intensity 3 in the last full pulse
    with pytest.raises(ProtocolError) as info:
        decode_payload(bytes(payload))
    assert info.value.field == "emissions.records"


def _naive_detection_words(chunk: DetectionChunk) -> list[int]:
    words, previous = [], chunk.first_pulse_index - 1
    for index, basis, bit in zip(chunk.pulse_index, chunk.basis, chunk.bit, strict=True):
        words.append((int(index) - previous - 1) << 2 | int(basis) << 1 | int(bit))
        previous = int(index)
    return words


@pytest.mark.parametrize("density", [0.3, 1e-3, 2e-5])
def test_detection_frames_cover_the_range_and_round_trip(density: float) -> None:
    rng = np.random.default_rng(int(1 / density))
    first, span = 1_000_003, 3_000_000
    index = (np.flatnonzero(rng.random(span) < density) + first).astype(np.int64)
    basis = rng.integers(0, 2, index.size, dtype=np.uint8)
    bit = rng.integers(0, 2, index.size, dtype=np.uint8)
    frames = split_detections(first, span, index, basis, bit)
    assert frames[0].first_pulse_index == first
    assert frames[-1].end_pulse_index == first + span
    for before, after in itertools.pairwise(frames):
        assert before.end_pulse_index == after.first_pulse_index
    decoded: list[DetectionChunk] = []
    total_bytes = 0
    for seq, chunk in enumerate(frames):
        assert chunk.pulse_index.shape[0] <= MAX_DETECTIONS_PER_FRAME
        payload = encode_payload(chunk, seq & 0xFFFF)
        words = np.frombuffer(payload[17:], dtype="<u2").tolist()
        assert words == _naive_detection_words(chunk)
        assert max((w >> 2 for w in words), default=0) <= MAX_DETECTION_GAP
        total_bytes += len(frame(payload))
        message = decode_payload(payload).message
        assert isinstance(message, DetectionChunk)
        decoded.append(message)
    assert np.array_equal(np.concatenate([d.pulse_index for d in decoded]), index)
    assert np.array_equal(np.concatenate([d.basis for d in decoded]), basis)
    assert np.array_equal(np.concatenate([d.bit for d in decoded]), bit)
    if density >= 1e-3:
        assert total_bytes / index.size < 2.1  # compact: ~2 bytes per detection on the line


def test_emission_frames_pack_two_pulses_per_byte() -> None:
    rng = np.random.default_rng(8)
    n = 100_001
    chunk = EmissionChunk(
        first_pulse_index=5,
        bit=rng.integers(0, 2, n, dtype=np.uint8),
        basis=rng.integers(0, 2, n, dtype=np.uint8),
        intensity=rng.integers(0, 3, n, dtype=np.uint8),
    )
    parts = split_emissions(chunk)
    payloads = [encode_payload(p, i) for i, p in enumerate(parts)]
    # Two pulses per byte; a frame with an odd count pads its last byte.
    assert [len(p) - 15 for p in payloads] == [(part.pulse_count + 1) // 2 for part in parts]
    decoded = [decode_payload(p).message for p in payloads]
    for name in ("bit", "basis", "intensity"):
        got = np.concatenate([getattr(d, name) for d in decoded])
        assert np.array_equal(got, getattr(chunk, name)), name


# ---- block assembly ----------------------------------------------------------------------------


def _emission_chunks(first: int, sizes: list[int], rng: np.random.Generator) -> list[EmissionChunk]:
    chunks, position = [], first
    for size in sizes:
        chunks.append(
            EmissionChunk(
                first_pulse_index=position,
                bit=rng.integers(0, 2, size, dtype=np.uint8),
                basis=rng.integers(0, 2, size, dtype=np.uint8),
                intensity=rng.integers(0, 3, size, dtype=np.uint8),
            )
        )
        position += size
    return chunks


def _drain_blocks(assembler: BlockAssembler) -> list[EmissionRecords | DetectionRecords]:
    blocks = []
    while (block := assembler.pop_block()) is not None:
        blocks.append(block)
    return blocks


def test_blocks_are_aligned_and_never_span_a_gap() -> None:
    rng = np.random.default_rng(3)
    before = _emission_chunks(250, [300, 700, 1000, 450], rng)  # pulses [250, 2700)
    after = _emission_chunks(2900, [2000, 1234], rng)  # a gap [2700, 2900), then [2900, 6134)
    reference = np.full(7000, 9, dtype=np.uint8)  # 9 marks "no record"
    for chunk in before + after:
        reference[chunk.first_pulse_index : chunk.end_pulse_index] = chunk.bit
    assembler = BlockAssembler()
    assembler.set_block_size(1000)
    for chunk in before + after:
        assembler.feed(chunk)
    blocks = _drain_blocks(assembler)
    # [2000, 3000) would span the gap and [6000, 7000) is incomplete: neither is returned.
    assert [b.first_pulse_index for b in blocks] == [1000, 3000, 4000, 5000]
    assert assembler.counters.gaps == 1
    assert assembler.counters.discarded_blocks == 1
    for block in blocks:
        assert isinstance(block, EmissionRecords)
        assert block.pulse_count == 1000
        start = block.first_pulse_index
        assert np.array_equal(block.bit, reference[start : start + 1000])


def test_block_2000_is_returned_only_when_complete() -> None:
    rng = np.random.default_rng(4)
    assembler = BlockAssembler()
    assembler.set_block_size(1000)
    for chunk in _emission_chunks(0, [2700], rng):
        assembler.feed(chunk)
    assert [b.first_pulse_index for b in _drain_blocks(assembler)] == [0, 1000]
    assembler.gap()  # e.g. the device was lost: [2000, 2700) is discarded
    for chunk in _emission_chunks(2700, [1300], rng):
        assembler.feed(chunk)
    assert [b.first_pulse_index for b in _drain_blocks(assembler)] == [3000]
    assert assembler.counters.discarded_pulses == 700


def test_detection_blocks_and_discard_before() -> None:
    rng = np.random.default_rng(6)
    span = 10_000
    index = (np.flatnonzero(rng.random(span) < 0.05)).astype(np.int64)
    chunks = split_detections(
        0,
        span,
        index,
        rng.integers(0, 2, index.size, dtype=np.uint8),
        rng.integers(0, 2, index.size, dtype=np.uint8),
    )
    assembler = BlockAssembler()
    assembler.set_block_size(3000)
    assembler.discard_before(2500)  # the peer's first block starts at 3000
    for chunk in chunks:
        assembler.feed(chunk)
    blocks = _drain_blocks(assembler)
    assert [b.first_pulse_index for b in blocks] == [3000, 6000]
    for block in blocks:
        assert isinstance(block, DetectionRecords)
        expected = index[
            (index >= block.first_pulse_index) & (index < block.first_pulse_index + 3000)
        ]
        assert np.array_equal(block.pulse_index, expected)


def test_protocol_module_is_pure() -> None:
    code = (
        "import sys, qkdnode.link.serialproto\n"
        "print(','.join(m for m in ('trio', 'socket', 'serial', 'termios', 'selectors')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


@settings(max_examples=100)
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=40_000), max_size=300),
    tail=st.integers(min_value=1, max_value=50_000),
    first=st.integers(min_value=0, max_value=1 << 40),
)
def test_any_detection_pattern_round_trips(gaps: list[int], tail: int, first: int) -> None:
    index = first + np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1
    span = (int(index[-1]) - first if index.size else 0) + tail
    rng = np.random.default_rng(len(gaps))
    basis = rng.integers(0, 2, index.size, dtype=np.uint8)
    bit = rng.integers(0, 2, index.size, dtype=np.uint8)
    decoder = FrameDecoder()
    frames = split_detections(first, span, index.astype(np.int64), basis, bit)
    decoder.receive_data(b"\xc0" + b"".join(encode_frame(f, i) for i, f in enumerate(frames)))
    decoded = [m for m in messages_of(drain(decoder)) if isinstance(m, DetectionChunk)]
    assert len(decoded) == len(frames)
    assert decoded[0].first_pulse_index == first
    assert decoded[-1].end_pulse_index == first + span
    assert np.array_equal(np.concatenate([d.pulse_index for d in decoded]), index)
    assert np.array_equal(np.concatenate([d.bit for d in decoded]), bit)
