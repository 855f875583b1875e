"""The serial device protocol (docs/device-protocol.md), pure and sans-IO.

- Framing: SLIP (RFC 1055) with a CRC-32 (IEEE 802.3, ``zlib.crc32``) after the payload, an END
  byte before and after every frame, at most ``MAX_PAYLOAD_BYTES`` of payload.
- Payload: ``type u8 | seq u16`` then the body of the message type, little-endian.
- Records: Alice's emissions packed 4 bits per pulse; Bob's detections 2 bytes per detection
  (14-bit gap to the previous detection, basis, bit), decoded with numpy.
- ``FrameDecoder`` never raises on line garbage: bad escapes, CRC failures, oversize and
  malformed frames are dropped and counted (``DecoderCounters``); the next END resynchronises.
- ``BlockAssembler`` turns contiguous record chunks into blocks aligned on multiples of the block
  size; a gap in pulse coverage discards the partial block, so no block mixes data from both
  sides of a gap.

No I/O, clock or global randomness here: the trio driver is ``qkdnode.link.serial``.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray

from qkdnode.config.link import SERIAL_PROTOCOL_VERSION
from qkdnode.errors import ProtocolError
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords

PROTOCOL_VERSION: Final = SERIAL_PROTOCOL_VERSION
END: Final = 0xC0
ESC: Final = 0xDB
ESC_END: Final = 0xDC
ESC_ESC: Final = 0xDD
_END = b"\xc0"
_ESC = b"\xdb"
_ESCAPED_END = b"\xdb\xdc"
_ESCAPED_ESC = b"\xdb\xdd"

MAX_PAYLOAD_BYTES: Final = 16384
CRC_BYTES: Final = 4
# Every payload byte may be escaped to two; the CRC too.
MAX_ESCAPED_BYTES: Final = 2 * (MAX_PAYLOAD_BYTES + CRC_BYTES)
MAX_TEXT_BYTES: Final = 200

_HEADER = struct.Struct("<BH")
_EMISSIONS = struct.Struct("<QI")
_DETECTIONS = struct.Struct("<QIH")
_ALARM = struct.Struct("<BBd")
_ACK_SEQ = struct.Struct("<H")
_CONFIGURE = struct.Struct("<8d")
_PARAMETERS = struct.Struct("<14d")
_STATUS = struct.Struct("<BQHdd")
_CRC = struct.Struct("<I")

# Records per frame, chosen so that a full frame stays below MAX_PAYLOAD_BYTES.
MAX_EMISSION_PULSES_PER_FRAME: Final = 32_000
MAX_DETECTIONS_PER_FRAME: Final = 8_000
MAX_DETECTION_GAP: Final = (1 << 14) - 1
MAX_PULSE_INDEX: Final = 1 << 62


class MessageType(enum.IntEnum):
    """Payload type byte. Host commands 0x01-0x0F, replies 0x81-0x8F, events 0xA1-0xAF."""

    IDENTIFY = 0x01
    GET_PARAMETERS = 0x02
    CONFIGURE = 0x03
    START = 0x04
    STOP = 0x05
    GET_STATUS = 0x06
    IDENTITY = 0x81
    PARAMETERS = 0x82
    ACK = 0x83
    STATUS = 0x84
    ERROR = 0x85
    EMISSIONS = 0xA1
    DETECTIONS = 0xA2
    ALARM = 0xA3


class AlarmCode(enum.IntEnum):
    """Device alarms; names are stable (they appear in ``LinkStatus.alarms``)."""

    LASER_POWER = 1
    DETECTOR_TEMPERATURE = 2
    SYNC_LOST = 3
    OVERFLOW = 4


class ErrorCode(enum.IntEnum):
    UNKNOWN_COMMAND = 1
    BAD_ARGUMENT = 2
    WRONG_STATE = 3


ROLE_CODES: Final[dict[str, int]] = {"alice": 0, "bob": 1}
_ROLE_NAMES: Final = {0: "alice", 1: "bob"}
PARAMETER_NAMES: Final = (
    "mu_signal",
    "mu_decoy",
    "mu_vacuum",
    "p_signal",
    "p_decoy",
    "p_vacuum",
    "p_key_basis",
    "pulse_rate_hz",
    "fiber_km",
    "attenuation_db_per_km",
    "receiver_transmittance",
    "dark_count_probability_per_gate",
    "afterpulse_probability",
    "misalignment_error",
)
CONFIGURE_NAMES: Final = PARAMETER_NAMES[:8]

U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]


# ---- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A host command without arguments (IDENTIFY, GET_PARAMETERS, START, STOP, GET_STATUS)."""

    kind: MessageType


@dataclass(frozen=True, slots=True, kw_only=True)
class Configure:
    """Set the source: intensities, their probabilities, basis bias and pulse rate."""

    values: tuple[float, ...]  # in the order of CONFIGURE_NAMES


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    ack_seq: int
    protocol_version: int
    role: str
    model: str
    firmware: str
    serial_number: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Parameters:
    """The settings and calibration in effect (in the order of PARAMETER_NAMES)."""

    ack_seq: int
    values: tuple[float, ...]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(PARAMETER_NAMES, self.values, strict=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    ack_seq: int
    command: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceStatus:
    ack_seq: int
    running: bool
    next_pulse_index: int
    active_alarms: int  # bit (code - 1) set for each active AlarmCode
    detector_temperature_c: float
    laser_power_mw: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceError:
    ack_seq: int
    code: int
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Alarm:
    code: int
    active: bool
    value: float

    @property
    def name(self) -> str:
        try:
            return AlarmCode(self.code).name.lower()
        except ValueError:
            return f"alarm_{self.code}"


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


HostMessage = Command | Configure
Reply = Identity | Parameters | Ack | DeviceStatus | DeviceError
DeviceMessage = Reply | Alarm | EmissionChunk | DetectionChunk
Message = HostMessage | DeviceMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """A decoded frame: the sender's sequence number and the message."""

    seq: int
    message: Message


# ---- encoding --------------------------------------------------------------------------------


def _text(value: str, name: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_TEXT_BYTES:
        raise ValueError(f"{name} longer than {MAX_TEXT_BYTES} bytes")
    return bytes([len(raw)]) + raw


def encode_payload(message: Message, seq: int) -> bytes:
    """The payload (type, seq, body) of one message."""
    if not 0 <= seq <= 0xFFFF:
        raise ValueError("seq must fit in 16 bits")
    if isinstance(message, Command):
        if message.kind not in _NO_ARGUMENT_COMMANDS:
            raise ValueError(f"{message.kind.name} is not an argument-free command")
        return _HEADER.pack(message.kind, seq)
    if isinstance(message, Configure):
        return _HEADER.pack(MessageType.CONFIGURE, seq) + _CONFIGURE.pack(*message.values)
    if isinstance(message, Identity):
        return (
            _HEADER.pack(MessageType.IDENTITY, seq)
            + _ACK_SEQ.pack(message.ack_seq)
            + bytes([message.protocol_version, ROLE_CODES[message.role]])
            + _text(message.model, "model")
            + _text(message.firmware, "firmware")
            + _text(message.serial_number, "serial_number")
        )
    if isinstance(message, Parameters):
        return (
            _HEADER.pack(MessageType.PARAMETERS, seq)
            + _ACK_SEQ.pack(message.ack_seq)
            + _PARAMETERS.pack(*message.values)
        )
    if isinstance(message, Ack):
        return (
            _HEADER.pack(MessageType.ACK, seq)
            + _ACK_SEQ.pack(message.ack_seq)
            + bytes([message.command])
        )
    if isinstance(message, DeviceStatus):
        return (
            _HEADER.pack(MessageType.STATUS, seq)
            + _ACK_SEQ.pack(message.ack_seq)
            + _STATUS.pack(
                int(message.running),
                message.next_pulse_index,
                message.active_alarms,
                message.detector_temperature_c,
                message.laser_power_mw,
            )
        )
    if isinstance(message, DeviceError):
        return (
            _HEADER.pack(MessageType.ERROR, seq)
            + _ACK_SEQ.pack(message.ack_seq)
            + bytes([message.code])
            + _text(message.text, "text")
        )
    if isinstance(message, Alarm):
        return _HEADER.pack(MessageType.ALARM, seq) + _ALARM.pack(
            message.code, int(message.active), message.value
        )
    if isinstance(message, EmissionChunk):
        return encode_emissions(message, seq)
    return encode_detections(message, seq)


_NO_ARGUMENT_COMMANDS: Final = frozenset(
    {
        MessageType.IDENTIFY,
        MessageType.GET_PARAMETERS,
        MessageType.START,
        MessageType.STOP,
        MessageType.GET_STATUS,
    }
)


def encode_emissions(chunk: EmissionChunk, seq: int) -> bytes:
    """One EMISSIONS payload: 4 bits per pulse, ``bit | basis << 1 | intensity << 2``."""
    n = chunk.pulse_count
    if not 1 <= n <= MAX_EMISSION_PULSES_PER_FRAME:
        raise ValueError(f"an EMISSIONS frame carries 1..{MAX_EMISSION_PULSES_PER_FRAME} pulses")
    codes = np.zeros(n + (n & 1), dtype=np.uint8)
    codes[:n] = chunk.bit | (chunk.basis << 1) | (chunk.intensity << 2)
    packed = codes[0::2] | (codes[1::2] << 4)
    return (
        _HEADER.pack(MessageType.EMISSIONS, seq)
        + _EMISSIONS.pack(chunk.first_pulse_index, n)
        + packed.tobytes()
    )


def encode_detections(chunk: DetectionChunk, seq: int) -> bytes:
    """One DETECTIONS payload: u16 per detection, ``gap << 2 | basis << 1 | bit``.

    ``gap`` is the number of pulses without a detection since the previous detection of the frame
    (for the first, since ``first_pulse_index``); it must fit in 14 bits (``split_detections``).
    """
    count = int(chunk.pulse_index.shape[0])
    if count > MAX_DETECTIONS_PER_FRAME:
        raise ValueError(f"a DETECTIONS frame carries at most {MAX_DETECTIONS_PER_FRAME}")
    if not 1 <= chunk.pulse_span <= 0xFFFFFFFF:
        raise ValueError("pulse_span must be in [1, 2^32)")
    gaps = np.diff(chunk.pulse_index, prepend=np.int64(chunk.first_pulse_index - 1)) - 1
    if count and (
        int(gaps.min()) < 0
        or int(gaps.max()) > MAX_DETECTION_GAP
        or int(chunk.pulse_index[-1]) >= chunk.end_pulse_index
    ):
        raise ValueError("detections out of order, outside the span or too far apart")
    words = (gaps.astype(np.uint16) << 2) | (chunk.basis.astype(np.uint16) << 1) | chunk.bit
    return (
        _HEADER.pack(MessageType.DETECTIONS, seq)
        + _DETECTIONS.pack(chunk.first_pulse_index, chunk.pulse_span, count)
        + words.astype("<u2").tobytes()
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


def frame(payload: bytes) -> bytes:
    """SLIP-frame a payload with its CRC-32: ``END escaped(payload | crc32 LE) END``."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload longer than {MAX_PAYLOAD_BYTES} bytes")
    body = payload + _CRC.pack(zlib.crc32(payload))
    # Escape ESC first, so that the ESC bytes introduced for END are not escaped again.
    return _END + body.replace(_ESC, _ESCAPED_ESC).replace(_END, _ESCAPED_END) + _END


def encode_frame(message: Message, seq: int) -> bytes:
    return frame(encode_payload(message, seq))


# ---- decoding --------------------------------------------------------------------------------


class _Reader:
    __slots__ = ("_data", "_offset")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def take(self, size: int, name: str) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise ProtocolError("frame too short", field=name)
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def unpack(self, layout: struct.Struct, name: str) -> tuple[object, ...]:
        return layout.unpack(self.take(layout.size, name))

    def byte(self, name: str) -> int:
        return self.take(1, name)[0]

    def text(self, name: str) -> str:
        raw = self.take(self.byte(name), name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("not UTF-8", field=name) from None

    def rest(self) -> bytes:
        chunk = self._data[self._offset :]
        self._offset = len(self._data)
        return chunk

    def done(self, name: str) -> None:
        if self._offset != len(self._data):
            raise ProtocolError("trailing bytes", field=name)


def _ack_seq(reader: _Reader) -> int:
    (value,) = reader.unpack(_ACK_SEQ, "ack_seq")
    assert isinstance(value, int)
    return value


def _floats(reader: _Reader, layout: struct.Struct, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in reader.unpack(layout, name))  # type: ignore[arg-type]
    if not all(np.isfinite(values)):
        raise ProtocolError("values must be finite", field=name)
    return values


def decode_payload(payload: bytes) -> Received:
    """Parse one payload (CRC already checked). Raises ``ProtocolError(field=...)``."""
    reader = _Reader(payload)
    kind_value, seq = reader.unpack(_HEADER, "header")
    assert isinstance(kind_value, int) and isinstance(seq, int)
    try:
        kind = MessageType(kind_value)
    except ValueError:
        raise ProtocolError(f"unknown message type 0x{kind_value:02x}", field="type") from None
    message: Message
    if kind in _NO_ARGUMENT_COMMANDS:
        message = Command(kind=kind)
    elif kind is MessageType.CONFIGURE:
        message = Configure(values=_floats(reader, _CONFIGURE, "configure"))
    elif kind is MessageType.IDENTITY:
        ack = _ack_seq(reader)
        version = reader.byte("protocol_version")
        role = _ROLE_NAMES.get(reader.byte("role"))
        if role is None:
            raise ProtocolError("must be 0 (alice) or 1 (bob)", field="role")
        message = Identity(
            ack_seq=ack,
            protocol_version=version,
            role=role,
            model=reader.text("model"),
            firmware=reader.text("firmware"),
            serial_number=reader.text("serial_number"),
        )
    elif kind is MessageType.PARAMETERS:
        ack = _ack_seq(reader)
        message = Parameters(ack_seq=ack, values=_floats(reader, _PARAMETERS, "parameters"))
    elif kind is MessageType.ACK:
        ack = _ack_seq(reader)
        message = Ack(ack_seq=ack, command=reader.byte("command"))
    elif kind is MessageType.STATUS:
        ack = _ack_seq(reader)
        running, index, alarms, temperature, power = reader.unpack(_STATUS, "status")
        message = DeviceStatus(
            ack_seq=ack,
            running=bool(running),
            next_pulse_index=int(index),  # type: ignore[call-overload]
            active_alarms=int(alarms),  # type: ignore[call-overload]
            detector_temperature_c=float(temperature),  # type: ignore[arg-type]
            laser_power_mw=float(power),  # type: ignore[arg-type]
        )
    elif kind is MessageType.ERROR:
        ack = _ack_seq(reader)
        message = DeviceError(ack_seq=ack, code=reader.byte("code"), text=reader.text("text"))
    elif kind is MessageType.ALARM:
        code, active, value = reader.unpack(_ALARM, "alarm")
        message = Alarm(code=int(code), active=bool(active), value=float(value))  # type: ignore[call-overload, arg-type]
    elif kind is MessageType.EMISSIONS:
        message = _decode_emissions(reader)
    else:
        message = _decode_detections(reader)
    reader.done(kind.name.lower())
    return Received(seq=seq, message=message)


def _decode_emissions(reader: _Reader) -> EmissionChunk:
    first, count = reader.unpack(_EMISSIONS, "emissions")
    assert isinstance(first, int) and isinstance(count, int)
    if not 1 <= count <= MAX_EMISSION_PULSES_PER_FRAME:
        raise ProtocolError(f"must be in [1, {MAX_EMISSION_PULSES_PER_FRAME}]", field="pulse_count")
    if first + count > MAX_PULSE_INDEX:
        raise ProtocolError("pulse range out of bounds", field="first_pulse_index")
    packed = np.frombuffer(reader.take((count + 1) // 2, "emissions.records"), dtype=np.uint8)
    codes = np.empty(packed.shape[0] * 2, dtype=np.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    if count & 1 and codes[-1]:
        raise ProtocolError("padding nibble must be 0", field="emissions.records")
    codes = codes[:count]
    one = np.uint8(1)
    intensity = (codes >> np.uint8(2)).astype(np.uint8)
    if int(intensity.max()) > 2:
        raise ProtocolError("intensity class 3 does not exist", field="emissions.records")
    return EmissionChunk(
        first_pulse_index=first,
        bit=(codes & one).astype(np.uint8),
        basis=((codes >> one) & one).astype(np.uint8),
        intensity=intensity,
    )


def _decode_detections(reader: _Reader) -> DetectionChunk:
    first, span, count = reader.unpack(_DETECTIONS, "detections")
    assert isinstance(first, int) and isinstance(span, int) and isinstance(count, int)
    if span == 0 or first + span > MAX_PULSE_INDEX:
        raise ProtocolError("empty or out-of-bounds pulse range", field="pulse_span")
    if count > MAX_DETECTIONS_PER_FRAME:
        raise ProtocolError(f"must be <= {MAX_DETECTIONS_PER_FRAME}", field="detection_count")
    raw = reader.take(2 * count, "detections.records")
    words = np.frombuffer(raw, dtype="<u2")
    index = np.cumsum((words >> 2).astype(np.int64) + 1) + (first - 1)
    if words.shape[0] and int(index[-1]) >= first + span:
        raise ProtocolError("detection beyond the frame's pulse span", field="detections.records")
    return DetectionChunk(
        first_pulse_index=first,
        pulse_span=span,
        pulse_index=index,
        basis=((words >> 1) & 1).astype(np.uint8),
        bit=(words & 1).astype(np.uint8),
    )


@dataclass(slots=True)
class DecoderCounters:
    """What the decoder dropped, by reason (monotonic, never reset by resync)."""

    frames: int = 0
    crc_errors: int = 0
    framing_errors: int = 0
    oversize_frames: int = 0
    malformed_frames: int = 0
    lost_frames: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Dropped:
    """A frame the decoder dropped; ``reason`` is a stable name, ``detail`` never has data."""

    reason: Literal["crc", "framing", "oversize", "malformed"]
    detail: str


class FrameDecoder:
    """Incremental SLIP + CRC-32 decoder: ``receive_data(bytes)``, then ``next_event()``.

    Events are ``Received`` (a valid frame) or ``Dropped`` (counted, for logging). Line garbage
    never raises. Sequence gaps (frames lost in between) are counted in ``lost_frames``.
    """

    __slots__ = ("_buffer", "_expected_seq", "_skipping", "counters")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skipping = True  # until the first END: the line may start mid-frame
        self._expected_seq: int | None = None
        self.counters = DecoderCounters()

    def resync(self) -> None:
        """Forget buffered bytes and the sequence: a new connection to the device."""
        self._buffer.clear()
        self._skipping = True
        self._expected_seq = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def next_event(self) -> Received | Dropped | None:
        while True:
            buffer = self._buffer
            end = buffer.find(_END)
            if end < 0:
                if len(buffer) > MAX_ESCAPED_BYTES:
                    self._buffer.clear()
                    if not self._skipping:
                        self._skipping = True
                        self.counters.oversize_frames += 1
                        return Dropped(reason="oversize", detail="no frame end within limit")
                return None
            piece = bytes(buffer[:end])
            del buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if not piece:
                continue  # back-to-back END bytes between frames
            return self._decode(piece)

    def _decode(self, piece: bytes) -> Received | Dropped:
        counters = self.counters
        if len(piece) > MAX_ESCAPED_BYTES:
            counters.oversize_frames += 1
            return Dropped(reason="oversize", detail=f"{len(piece)} escaped bytes")
        escapes = piece.count(_ESC)
        if escapes and escapes != piece.count(_ESCAPED_END) + piece.count(_ESCAPED_ESC):
            counters.framing_errors += 1
            return Dropped(reason="framing", detail="invalid SLIP escape")
        body = piece.replace(_ESCAPED_END, _END).replace(_ESCAPED_ESC, _ESC) if escapes else piece
        if len(body) < _HEADER.size + CRC_BYTES or len(body) > MAX_PAYLOAD_BYTES + CRC_BYTES:
            counters.framing_errors += 1
            return Dropped(reason="framing", detail=f"frame of {len(body)} bytes")
        payload = body[:-CRC_BYTES]
        (crc,) = _CRC.unpack(body[-CRC_BYTES:])
        if zlib.crc32(payload) != crc:
            counters.crc_errors += 1
            return Dropped(reason="crc", detail="CRC-32 mismatch")
        try:
            received = decode_payload(payload)
        except ProtocolError as exc:
            counters.malformed_frames += 1
            return Dropped(reason="malformed", detail=str(exc))
        if self._expected_seq is not None:
            counters.lost_frames += (received.seq - self._expected_seq) & 0xFFFF
        self._expected_seq = (received.seq + 1) & 0xFFFF
        counters.frames += 1
        return received


# ---- blocks ----------------------------------------------------------------------------------


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
