"""The fibre byte encoding: round trips, frames split at every offset, defensive parsing."""

from __future__ import annotations

import contextlib
import math
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdnode.errors import BadDeviceData
from qkdnode.link.fibre import (
    MAX_PULSES_PER_FRAME,
    BlockStart,
    FibreDecoder,
    Frame,
    PulseFrame,
    encode_frame,
)


def _frames() -> list[Frame]:
    rng = np.random.default_rng(0)
    return [
        BlockStart(first_pulse_index=0, pulse_count=7),
        PulseFrame(
            first_pulse_index=0,
            span_transmittance=0.01,
            pulses=rng.integers(0, 256, 4, dtype=np.uint8),
        ),
        PulseFrame(
            first_pulse_index=4,
            span_transmittance=1.0,
            pulses=rng.integers(0, 256, 3, dtype=np.uint8),
        ),
    ]


def _same(a: Frame, b: Frame) -> bool:
    if isinstance(a, BlockStart) or isinstance(b, BlockStart):
        return a == b
    return (
        a.first_pulse_index == b.first_pulse_index
        and a.span_transmittance == b.span_transmittance
        and np.array_equal(a.pulses, b.pulses)
    )


def _decode_all(decoder: FibreDecoder) -> list[Frame]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_round_trip_split_at_every_offset() -> None:
    frames = _frames()
    stream = b"".join(encode_frame(f) for f in frames)
    for cut in range(len(stream) + 1):
        decoder = FibreDecoder()
        decoder.receive_data(stream[:cut])
        got = _decode_all(decoder)
        decoder.receive_data(stream[cut:])
        got += _decode_all(decoder)
        assert len(got) == len(frames)
        assert all(_same(a, b) for a, b in zip(got, frames, strict=True))
        assert decoder.buffered_bytes == 0


def test_byte_by_byte() -> None:
    frames = _frames()
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FibreDecoder()
    got: list[Frame] = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        got += _decode_all(decoder)
    assert len(got) == 3 and all(_same(a, b) for a, b in zip(got, frames, strict=True))


def _pulse_header(count: int, span: float, first: int = 0) -> bytes:
    return b"QF\x01\x02" + struct.pack("<QId", first, count, span)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"XX\x01\x01" + bytes(16), "magic"),
        (b"QF\x02\x01" + bytes(16), "version"),
        (b"QF\x01\x09" + bytes(16), "kind"),
        (b"QF\x01\x01" + struct.pack("<QQ", 0, 0), "block range"),
        (b"QF\x01\x01" + struct.pack("<QQ", 2**63, 2**63), "block range"),
        (_pulse_header(0, 0.5), "pulse count"),
        (_pulse_header(MAX_PULSES_PER_FRAME + 1, 0.5), "pulse count"),
        (_pulse_header(10, math.nan), "span"),
        (_pulse_header(10, 1.5), "span"),
        (_pulse_header(10, -0.1), "span"),
        (_pulse_header(10, 0.5, first=2**63 - 5), "range"),
    ],
)
def test_malformed_frames_are_bad_device_data(data: bytes, reason: str) -> None:
    decoder = FibreDecoder()
    decoder.receive_data(data)
    with pytest.raises(BadDeviceData, match=reason):
        decoder.next_frame()
    with pytest.raises(BadDeviceData):  # stays failed
        decoder.next_frame()


@given(
    st.sampled_from([b"", b"QF", b"QF\x01\x01", b"QF\x01\x02"]),
    st.binary(min_size=1, max_size=200),
)
def test_arbitrary_bytes_never_escape_as_another_exception(prefix: bytes, data: bytes) -> None:
    decoder = FibreDecoder()
    decoder.receive_data(prefix + data)
    with contextlib.suppress(BadDeviceData):
        _decode_all(decoder)


def test_encoder_rejects_out_of_range_frames() -> None:
    with pytest.raises(ValueError):
        encode_frame(
            PulseFrame(first_pulse_index=0, span_transmittance=2.0, pulses=np.zeros(3, np.uint8))
        )
    with pytest.raises(ValueError):
        encode_frame(
            PulseFrame(first_pulse_index=0, span_transmittance=0.5, pulses=np.zeros(3, np.int64))
        )
    with pytest.raises(ValueError):
        encode_frame(BlockStart(first_pulse_index=-1, pulse_count=3))


def test_pulse_frame_repr_hides_the_pulses() -> None:
    frame = PulseFrame(
        first_pulse_index=3, span_transmittance=0.5, pulses=np.array([7, 5, 1], np.uint8)
    )
    text = repr(frame)
    assert "pulse_count=3" in text and "7, 5" not in text and "[" not in text
