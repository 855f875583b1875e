"""The byte-stream encoding of pulse descriptions on the simulated fibre (pure, sans-IO).

A fibre stream is a sequence of frames, little-endian::

    header        magic b"QF" | version u8 (= 1) | kind u8
    BLOCK (1)     first_pulse_index u64 | pulse_count u64
    PULSES (2)    first_pulse_index u64 | pulse_count u32 | span_transmittance f64
                  | pulse_count bytes, one per pulse

A BLOCK frame announces the block boundary that Alice's next ``next_block`` call chose; the
PULSES frames that follow cover the block's pulses contiguously, in chunks. Each pulse byte is
``photons << 2 | basis << 1 | bit`` (``qkdnode.link.physics``). ``span_transmittance`` is the
transmittance the pulses still have to cross before Bob's receiver: Alice writes the fibre's
10^(−αL/10); an eavesdropper who replaces the fibre with her own channel rewrites it.

``FibreDecoder`` parses defensively: any malformed header, unknown kind or version, an oversized
frame or a transmittance outside [0, 1] raises ``BadDeviceData`` and the decoder stays failed.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import BadDeviceData

MAGIC: Final = b"QF"
VERSION: Final = 1
KIND_BLOCK: Final = 1
KIND_PULSES: Final = 2
MAX_PULSES_PER_FRAME: Final = 1 << 24
MAX_PULSE_INDEX: Final = 1 << 62

_HEADER = struct.Struct("<2sBB")
_BLOCK = struct.Struct("<QQ")
_PULSES = struct.Struct("<QId")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockStart:
    """Alice starts a block of ``pulse_count`` pulses at ``first_pulse_index``."""

    first_pulse_index: int
    pulse_count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PulseFrame:
    """Consecutive pulses starting at ``first_pulse_index``, one description byte each."""

    first_pulse_index: int
    span_transmittance: float
    pulses: NDArray[np.uint8]

    @property
    def pulse_count(self) -> int:
        return int(self.pulses.shape[0])

    def __repr__(self) -> str:  # pulse bytes carry Alice's bits and bases
        return (
            f"PulseFrame(first_pulse_index={self.first_pulse_index}, "
            f"pulse_count={self.pulse_count}, span_transmittance={self.span_transmittance})"
        )


Frame = BlockStart | PulseFrame


def encode_block_start(frame: BlockStart) -> bytes:
    _check_index(frame.first_pulse_index, frame.pulse_count)
    return _HEADER.pack(MAGIC, VERSION, KIND_BLOCK) + _BLOCK.pack(
        frame.first_pulse_index, frame.pulse_count
    )


def encode_pulse_frame(frame: PulseFrame) -> bytes:
    count = frame.pulse_count
    if count > MAX_PULSES_PER_FRAME or frame.pulses.dtype != np.uint8 or frame.pulses.ndim != 1:
        raise ValueError(f"pulses must be 1-D uint8 of at most {MAX_PULSES_PER_FRAME} entries")
    if not 0.0 <= frame.span_transmittance <= 1.0:
        raise ValueError("span_transmittance must be in [0, 1]")
    _check_index(frame.first_pulse_index, count)
    head = _HEADER.pack(MAGIC, VERSION, KIND_PULSES) + _PULSES.pack(
        frame.first_pulse_index, count, frame.span_transmittance
    )
    return head + frame.pulses.tobytes()


def encode_frame(frame: Frame) -> bytes:
    if isinstance(frame, BlockStart):
        return encode_block_start(frame)
    return encode_pulse_frame(frame)


def _check_index(first: int, count: int) -> None:
    if first < 0 or count < 0 or first + count > MAX_PULSE_INDEX:
        raise ValueError("pulse range out of bounds")


class FibreDecoder:
    """Incremental parser of a fibre byte stream: ``receive_data`` then ``next_frame``."""

    __slots__ = ("_buffer", "_failed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed = False

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed. Raises BadDeviceData."""
        if self._failed:
            raise BadDeviceData("fibre stream already failed to parse")
        try:
            return self._parse()
        except BadDeviceData:
            self._failed = True
            raise

    def _parse(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < _HEADER.size:
            return None
        magic, version, kind = _HEADER.unpack_from(buffer)
        if magic != MAGIC:
            raise BadDeviceData("fibre frame: bad magic")
        if version != VERSION:
            raise BadDeviceData(f"fibre frame: unsupported version {version}")
        if kind == KIND_BLOCK:
            end = _HEADER.size + _BLOCK.size
            if len(buffer) < end:
                return None
            first, count = _BLOCK.unpack_from(buffer, _HEADER.size)
            if first + count > MAX_PULSE_INDEX or count == 0:
                raise BadDeviceData("fibre frame: block range out of bounds")
            del buffer[:end]
            return BlockStart(first_pulse_index=first, pulse_count=count)
        if kind == KIND_PULSES:
            start = _HEADER.size + _PULSES.size
            if len(buffer) < start:
                return None
            first, count, span = _PULSES.unpack_from(buffer, _HEADER.size)
            if count == 0 or count > MAX_PULSES_PER_FRAME:
                raise BadDeviceData(f"fibre frame: pulse count {count} out of range")
            if first + count > MAX_PULSE_INDEX:
                raise BadDeviceData("fibre frame: pulse range out of bounds")
            if not (math.isfinite(span) and 0.0 <= span <= 1.0):
                raise BadDeviceData("fibre frame: span transmittance outside [0, 1]")
            end = start + count
            if len(buffer) < end:
                return None
            pulses = np.frombuffer(bytes(buffer[start:end]), dtype=np.uint8)
            del buffer[:end]
            return PulseFrame(first_pulse_index=first, span_transmittance=span, pulses=pulses)
        raise BadDeviceData(f"fibre frame: unknown kind {kind}")
