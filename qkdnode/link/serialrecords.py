"""Device records, pure: chunks of Alice's emissions and Bob's detections, cut into frames and
assembled into blocks.

- ``split_emissions`` / ``split_detections`` cut a range of records into chunks that each fit one
  frame (the frame codec is ``qkdnode.link.serialproto``).
- ``BlockAssembler`` turns contiguous chunks into blocks aligned on multiples of the block size; a
  gap in pulse coverage discards the partial block, so no block mixes data from both sides of a
  gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.postprocess.records import DetectionRecords, EmissionRecords

# Records per frame, chosen so that a full frame stays below MAX_PAYLOAD_BYTES.
MAX_EMISSION_PULSES_PER_FRAME: Final = 32_000
MAX_DETECTIONS_PER_FRAME: Final = 8_000
MAX_DETECTION_GAP: Final = (1 << 14) - 1

U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]


@dataclass(frozen=True, slots=True, kw_only=True)
class EmissionChunk:
    """Alice's records of the pulses ``[first_pulse_index, first_pulse_index + pulse_count)``."""

    first_pulse_index: int
    bit: U8
    basis: U8
    intensity: U8

    @property
    def pulse_count(self) -> int:
        return int(self.bit.shape[0])

    @property
    def end_pulse_index(self) -> int:
        return self.first_pulse_index + self.pulse_count

    def slice(self, start: int, end: int) -> EmissionChunk:
        a, b = start - self.first_pulse_index, end - self.first_pulse_index
        return EmissionChunk(
            first_pulse_index=start,
            bit=self.bit[a:b],
            basis=self.basis[a:b],
            intensity=self.intensity[a:b],
        )

    def __repr__(self) -> str:  # bits and bases are key material
        return f"EmissionChunk(first_pulse_index={self.first_pulse_index}, n={self.pulse_count})"


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectionChunk:
    """Bob's detections among the pulses ``[first_pulse_index, first_pulse_index + span)``."""

    first_pulse_index: int
    pulse_span: int
    pulse_index: I64
    basis: U8
    bit: U8

    @property
    def end_pulse_index(self) -> int:
        return self.first_pulse_index + self.pulse_span

    def slice(self, start: int, end: int) -> DetectionChunk:
        lo, hi = np.searchsorted(self.pulse_index, (start, end))
        return DetectionChunk(
            first_pulse_index=start,
            pulse_span=end - start,
            pulse_index=self.pulse_index[lo:hi],
            basis=self.basis[lo:hi],
            bit=self.bit[lo:hi],
        )

    def __repr__(self) -> str:
        return (
            f"DetectionChunk(first_pulse_index={self.first_pulse_index}, "
            f"pulse_span={self.pulse_span}, detections={self.pulse_index.shape[0]})"
        )


def split_detections(
    first_pulse_index: int, pulse_span: int, pulse_index: I64, basis: U8, bit: U8
) -> list[DetectionChunk]:
    """Cut the detections of a pulse range (span < 2^32) into frames covering it contiguously.

    A frame ends after ``MAX_DETECTIONS_PER_FRAME`` detections or before a gap longer than
    ``MAX_DETECTION_GAP``; the next frame then starts at its first detection (gap 0).
    """
    if not 1 <= pulse_span <= 0xFFFFFFFF:
        raise ValueError("pulse_span must be in [1, 2^32)")
    end = first_pulse_index + pulse_span
    gaps = np.diff(pulse_index, prepend=np.int64(first_pulse_index - 1)) - 1
    frames: list[DetectionChunk] = []
    record, start_pulse, count = 0, first_pulse_index, int(pulse_index.shape[0])
    while start_pulse < end:
        if record < count and int(pulse_index[record]) - start_pulse > MAX_DETECTION_GAP:
            frames.append(_empty_detections(start_pulse, int(pulse_index[record]) - start_pulse))
            start_pulse = int(pulse_index[record])
        stop = min(count, record + MAX_DETECTIONS_PER_FRAME)
        far = gaps[record + 1 : stop] > MAX_DETECTION_GAP
        if far.any():
            stop = record + 1 + int(np.argmax(far))
        frame_end = int(pulse_index[stop]) if stop < count else end
        frames.append(
            DetectionChunk(
                first_pulse_index=start_pulse,
                pulse_span=frame_end - start_pulse,
                pulse_index=pulse_index[record:stop],
                basis=basis[record:stop],
                bit=bit[record:stop],
            )
        )
        record, start_pulse = stop, frame_end
    return frames


def _empty_detections(first: int, span: int) -> DetectionChunk:
    return DetectionChunk(
        first_pulse_index=first,
        pulse_span=span,
        pulse_index=np.empty(0, np.int64),
        basis=np.empty(0, np.uint8),
        bit=np.empty(0, np.uint8),
    )


def split_emissions(chunk: EmissionChunk) -> list[EmissionChunk]:
    """Cut Alice's records into frames of at most ``MAX_EMISSION_PULSES_PER_FRAME`` pulses."""
    first, end = chunk.first_pulse_index, chunk.end_pulse_index
    return [
        chunk.slice(s, min(end, s + MAX_EMISSION_PULSES_PER_FRAME))
        for s in range(first, end, MAX_EMISSION_PULSES_PER_FRAME)
    ]


Chunk = EmissionChunk | DetectionChunk


Block = EmissionRecords | DetectionRecords


@dataclass(slots=True)
class AssemblerCounters:
    blocks: int = 0
    discarded_blocks: int = 0
    discarded_pulses: int = 0
    gaps: int = 0


@dataclass(slots=True)
class BlockAssembler:
    """Contiguous record chunks in, complete blocks out (pure).

    Blocks cover ``[k·P, (k+1)·P)`` for the block size P, so two ends that lose different
    stretches still cut the same blocks. A chunk that does not start where the previous one
    ended is a gap: the partial block is discarded and assembly restarts at the next multiple of
    P. ``discard_before(i)`` skips everything before pulse ``i`` (to catch up with the peer).
    """

    pulse_count: int = 1
    cursor: int = 0
    counters: AssemblerCounters = field(default_factory=AssemblerCounters)
    _start: int | None = None
    _next: int | None = None
    _segments: list[Chunk] = field(default_factory=list)
    _ready: list[Block] = field(default_factory=list)

    def set_block_size(self, pulse_count: int) -> None:
        if pulse_count < 1:
            raise ValueError("pulse_count must be >= 1")
        if pulse_count != self.pulse_count:
            self._drop_partial()
            self._ready.clear()
            self.pulse_count = pulse_count

    def discard_before(self, pulse_index: int) -> None:
        self.cursor = max(self.cursor, pulse_index)
        if self._start is not None and self._start < self.cursor:
            self._drop_partial()
        self._ready = [b for b in self._ready if b.first_pulse_index >= self.cursor]

    def gap(self) -> None:
        """The stream broke (device lost, frames dropped): what follows starts a new block."""
        if self._next is not None:
            self.counters.gaps += 1
        self._drop_partial()
        self._next = None

    def _drop_partial(self) -> None:
        if self._start is not None:
            end = self._next if self._next is not None else self._start
            if end > self._start:
                self.counters.discarded_blocks += 1
                self.counters.discarded_pulses += end - self._start
        self._start = None
        self._segments = []

    def pop_block(self) -> Block | None:
        while self._ready:
            block = self._ready.pop(0)
            if block.first_pulse_index >= self.cursor:
                self.cursor = block.first_pulse_index + self.pulse_count
                self.counters.blocks += 1
                return block
        return None

    def feed(self, chunk: Chunk) -> None:
        first, end = chunk.first_pulse_index, chunk.end_pulse_index
        if self._next is not None and first != self._next:
            self.counters.gaps += 1
            self._drop_partial()
        self._next = end
        size = self.pulse_count
        pos = first
        while pos < end:
            if self._start is None:
                boundary = -(-max(pos, self.cursor) // size) * size
                if boundary >= end:
                    return
                self._start, self._segments, pos = boundary, [], boundary
            block_end = self._start + size
            take = min(end, block_end)
            self._segments.append(chunk.slice(pos, take))
            pos = take
            if take == block_end:
                self._ready.append(_build(self._start, size, self._segments))
                self._start, self._segments = block_end, []


def _build(start: int, size: int, segments: list[Chunk]) -> Block:
    if isinstance(segments[0], EmissionChunk):
        parts = [s for s in segments if isinstance(s, EmissionChunk)]
        return EmissionRecords(
            first_pulse_index=start,
            bit=np.concatenate([s.bit for s in parts]),
            basis=np.concatenate([s.basis for s in parts]),
            intensity=np.concatenate([s.intensity for s in parts]),
        )
    found = [s for s in segments if isinstance(s, DetectionChunk)]
    return DetectionRecords(
        first_pulse_index=start,
        pulse_count=size,
        pulse_index=np.concatenate([s.pulse_index for s in found]).astype(np.int64, copy=False),
        basis=np.concatenate([s.basis for s in found]),
        bit=np.concatenate([s.bit for s in found]),
    )
