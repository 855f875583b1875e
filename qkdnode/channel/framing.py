"""Length-prefixed frames.

    frame  = length:u32 | header | payload | tag
    header = type:u8 | seq:u64 | block:u64          (big-endian, 17 bytes)

``length`` counts everything after itself. ``payload`` is a msgpack map (``messages``); ``tag`` is
empty during the handshake and 32 bytes (HMAC-SHA256) afterwards. ``block`` is the block whose
keys authenticate the frame, or ``NO_BLOCK`` for control frames. The length is checked against
the configured maximum as soon as its four bytes are in, before the body is buffered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from qkdnode.errors import ProtocolError

LENGTH_BYTES: Final = 4
HEADER_BYTES: Final = 17
NO_BLOCK: Final = 2**64 - 1
DEFAULT_MAX_FRAME_BYTES: Final = 1 << 20
_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BQQ")


def pack_header(code: int, seq: int, block: int) -> bytes:
    return _HEADER.pack(code, seq, block)


def pack_frame(header: bytes, payload: bytes, tag: bytes) -> bytes:
    return _LENGTH.pack(len(header) + len(payload) + len(tag)) + header + payload + tag


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One complete frame, split but not yet authenticated or decoded."""

    code: int
    seq: int
    block: int
    header: bytes
    payload: bytes
    tag: bytes
    size: int  # bytes the frame occupies in the stream, length prefix included

    def __repr__(self) -> str:
        return f"RawFrame(code={self.code}, seq={self.seq}, block={self.block}, size={self.size})"


class FrameReader:
    """Receive buffer that yields whole frames; never holds more than one frame plus a read.

    ``peek(tag_bytes)`` returns the next complete frame without consuming it (``None`` if more
    data is needed); ``consume(frame)`` drops it once the frame has been accepted, so a rejected
    frame leaves the reader unchanged.
    """

    __slots__ = ("_buffer", "_start", "max_feed_bytes", "max_frame_bytes")

    def __init__(
        self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, max_feed_bytes: int = 1 << 20
    ) -> None:
        if max_frame_bytes < HEADER_BYTES + 64:
            raise ValueError("max_frame_bytes is too small")
        self.max_frame_bytes = max_frame_bytes
        self.max_feed_bytes = max_feed_bytes
        self._buffer = bytearray()
        self._start = 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._start

    def feed(self, data: bytes | bytearray) -> None:
        """Append received bytes.

        The buffer stays bounded: at most ``max_feed_bytes`` per call, and only once the frames
        already buffered have been drained (what is left then is less than one frame).
        """
        if len(data) > self.max_feed_bytes:
            raise ProtocolError(f"more than {self.max_feed_bytes} bytes at once", field="buffer")
        if self.buffered_bytes >= self.max_frame_bytes + LENGTH_BYTES:
            raise ProtocolError("receive buffer full: drain events first", field="buffer")
        if self._start and self._start >= len(self._buffer) // 2:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def peek(self, tag_bytes: int) -> RawFrame | None:
        buffer, start = self._buffer, self._start
        if len(buffer) - start < LENGTH_BYTES:
            return None
        (length,) = _LENGTH.unpack_from(buffer, start)
        if length > self.max_frame_bytes:
            raise ProtocolError(
                f"frame of {length} bytes exceeds the maximum {self.max_frame_bytes}",
                field="length",
            )
        if length < HEADER_BYTES + tag_bytes:
            raise ProtocolError(f"frame of {length} bytes is truncated", field="length")
        end = start + LENGTH_BYTES + length
        if len(buffer) < end:
            return None
        body = start + LENGTH_BYTES
        code, seq, block = _HEADER.unpack_from(buffer, body)
        payload_end = end - tag_bytes
        return RawFrame(
            code=code,
            seq=seq,
            block=block,
            header=bytes(buffer[body : body + HEADER_BYTES]),
            payload=bytes(buffer[body + HEADER_BYTES : payload_end]),
            tag=bytes(buffer[payload_end:end]),
            size=LENGTH_BYTES + length,
        )

    def consume(self, frame: RawFrame) -> None:
        self._start += frame.size
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
