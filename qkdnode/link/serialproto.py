"""The serial device protocol (docs/device-protocol.md), pure and sans-IO.

- Framing: SLIP (RFC 1055) with a CRC-32 (IEEE 802.3, ``zlib.crc32``) after the payload, an END
  byte before and after every frame, at most ``MAX_PAYLOAD_BYTES`` of payload.
- Payload: ``type u8 | seq u16`` then the body of the message type, little-endian.
- Records: Alice's emissions packed 4 bits per pulse; Bob's detections 2 bytes per detection
  (14-bit gap to the previous detection, basis, bit), decoded with numpy.
- ``FrameDecoder`` never raises on line garbage: bad escapes, CRC failures, oversize and
  malformed frames are dropped and counted (``DecoderCounters``); the next END resynchronises.
- Record chunks, their cutting into frames and their assembly into blocks are
  ``qkdnode.link.serialrecords``.

No I/O, clock or global randomness here: the trio driver is ``qkdnode.link.serial``.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from qkdnode.config.link import SERIAL_PROTOCOL_VERSION
from qkdnode.errors import ProtocolError
from qkdnode.link.serialrecords import (
    MAX_DETECTION_GAP,
    MAX_DETECTIONS_PER_FRAME,
    MAX_EMISSION_PULSES_PER_FRAME,
    DetectionChunk,
    EmissionChunk,
)

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


HostMessage = Command | Configure
Reply = Identity | Parameters | Ack | DeviceStatus | DeviceError
DeviceMessage = Reply | Alarm | EmissionChunk | DetectionChunk
Message = HostMessage | DeviceMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """A decoded frame: the sender's sequence number and the message."""

    seq: int
    message: Message


# ---- message bodies --------------------------------------------------------------------------


def _text(value: str, name: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_TEXT_BYTES:
        raise ValueError(f"{name} longer than {MAX_TEXT_BYTES} bytes")
    return bytes([len(raw)]) + raw


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


def _identity_body(m: Identity) -> bytes:
    return (
        _ACK_SEQ.pack(m.ack_seq)
        + bytes([m.protocol_version, ROLE_CODES[m.role]])
        + _text(m.model, "model")
        + _text(m.firmware, "firmware")
        + _text(m.serial_number, "serial_number")
    )


def _decode_identity(reader: _Reader, kind: MessageType) -> Identity:
    ack = _ack_seq(reader)
    version = reader.byte("protocol_version")
    role = _ROLE_NAMES.get(reader.byte("role"))
    if role is None:
        raise ProtocolError("must be 0 (alice) or 1 (bob)", field="role")
    return Identity(
        ack_seq=ack,
        protocol_version=version,
        role=role,
        model=reader.text("model"),
        firmware=reader.text("firmware"),
        serial_number=reader.text("serial_number"),
    )


def _status_body(m: DeviceStatus) -> bytes:
    return _ACK_SEQ.pack(m.ack_seq) + _STATUS.pack(
        int(m.running),
        m.next_pulse_index,
        m.active_alarms,
        m.detector_temperature_c,
        m.laser_power_mw,
    )


def _decode_status(reader: _Reader, kind: MessageType) -> DeviceStatus:
    ack = _ack_seq(reader)
    running, index, alarms, temperature, power = reader.unpack(_STATUS, "status")
    return DeviceStatus(
        ack_seq=ack,
        running=bool(running),
        next_pulse_index=int(index),  # type: ignore[call-overload]
        active_alarms=int(alarms),  # type: ignore[call-overload]
        detector_temperature_c=float(temperature),  # type: ignore[arg-type]
        laser_power_mw=float(power),  # type: ignore[arg-type]
    )


def _decode_alarm(reader: _Reader, kind: MessageType) -> Alarm:
    code, active, value = reader.unpack(_ALARM, "alarm")
    return Alarm(code=int(code), active=bool(active), value=float(value))  # type: ignore[call-overload, arg-type]


def _emissions_body(chunk: EmissionChunk) -> bytes:
    """The body of an EMISSIONS frame: 4 bits per pulse, ``bit | basis << 1 | intensity << 2``."""
    n = chunk.pulse_count
    if not 1 <= n <= MAX_EMISSION_PULSES_PER_FRAME:
        raise ValueError(f"an EMISSIONS frame carries 1..{MAX_EMISSION_PULSES_PER_FRAME} pulses")
    codes = np.zeros(n + (n & 1), dtype=np.uint8)
    codes[:n] = chunk.bit | (chunk.basis << 1) | (chunk.intensity << 2)
    packed = codes[0::2] | (codes[1::2] << 4)
    return _EMISSIONS.pack(chunk.first_pulse_index, n) + packed.tobytes()


def _detections_body(chunk: DetectionChunk) -> bytes:
    """The body of a DETECTIONS frame: u16 per detection, ``gap << 2 | basis << 1 | bit``.

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
        _DETECTIONS.pack(chunk.first_pulse_index, chunk.pulse_span, count)
        + words.astype("<u2").tobytes()
    )


def _decode_emissions(reader: _Reader, kind: MessageType) -> EmissionChunk:
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


def _decode_detections(reader: _Reader, kind: MessageType) -> DetectionChunk:
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


# ---- the codec table ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Codec:
    """How one message class travels: its type bytes, its body encoder and decoder."""

    kinds: frozenset[MessageType]
    encode: Callable[[Any], bytes]  # the message -> its body (after type and seq)
    decode: Callable[[_Reader, MessageType], Message]  # the body -> the message


_NO_ARGUMENT_COMMANDS: Final = frozenset(
    {
        MessageType.IDENTIFY,
        MessageType.GET_PARAMETERS,
        MessageType.START,
        MessageType.STOP,
        MessageType.GET_STATUS,
    }
)


_CODECS: Final[dict[type, _Codec]] = {
    Command: _Codec(_NO_ARGUMENT_COMMANDS, lambda m: b"", lambda r, kind: Command(kind=kind)),
    Configure: _Codec(
        frozenset({MessageType.CONFIGURE}),
        lambda m: _CONFIGURE.pack(*m.values),
        lambda r, kind: Configure(values=_floats(r, _CONFIGURE, "configure")),
    ),
    Identity: _Codec(frozenset({MessageType.IDENTITY}), _identity_body, _decode_identity),
    Parameters: _Codec(
        frozenset({MessageType.PARAMETERS}),
        lambda m: _ACK_SEQ.pack(m.ack_seq) + _PARAMETERS.pack(*m.values),
        lambda r, kind: Parameters(
            ack_seq=_ack_seq(r), values=_floats(r, _PARAMETERS, "parameters")
        ),
    ),
    Ack: _Codec(
        frozenset({MessageType.ACK}),
        lambda m: _ACK_SEQ.pack(m.ack_seq) + bytes([m.command]),
        lambda r, kind: Ack(ack_seq=_ack_seq(r), command=r.byte("command")),
    ),
    DeviceStatus: _Codec(frozenset({MessageType.STATUS}), _status_body, _decode_status),
    DeviceError: _Codec(
        frozenset({MessageType.ERROR}),
        lambda m: _ACK_SEQ.pack(m.ack_seq) + bytes([m.code]) + _text(m.text, "text"),
        lambda r, kind: DeviceError(ack_seq=_ack_seq(r), code=r.byte("code"), text=r.text("text")),
    ),
    Alarm: _Codec(
        frozenset({MessageType.ALARM}),
        lambda m: _ALARM.pack(m.code, int(m.active), m.value),
        _decode_alarm,
    ),
    EmissionChunk: _Codec(frozenset({MessageType.EMISSIONS}), _emissions_body, _decode_emissions),
    DetectionChunk: _Codec(
        frozenset({MessageType.DETECTIONS}), _detections_body, _decode_detections
    ),
}
_DECODERS: Final = {kind: codec.decode for codec in _CODECS.values() for kind in codec.kinds}


def encode_payload(message: Message, seq: int) -> bytes:
    """The payload (type, seq, body) of one message."""
    if not 0 <= seq <= 0xFFFF:
        raise ValueError("seq must fit in 16 bits")
    codec = _CODECS[type(message)]
    kind = message.kind if isinstance(message, Command) else next(iter(codec.kinds))
    if kind not in codec.kinds:
        raise ValueError(f"{kind.name} is not an argument-free command")
    return _HEADER.pack(kind, seq) + codec.encode(message)


def decode_payload(payload: bytes) -> Received:
    """Parse one payload (CRC already checked). Raises ``ProtocolError(field=...)``."""
    reader = _Reader(payload)
    kind_value, seq = reader.unpack(_HEADER, "header")
    assert isinstance(kind_value, int) and isinstance(seq, int)
    try:
        kind = MessageType(kind_value)
    except ValueError:
        raise ProtocolError(f"unknown message type 0x{kind_value:02x}", field="type") from None
    message = _DECODERS[kind](reader, kind)
    reader.done(kind.name.lower())
    return Received(seq=seq, message=message)


def frame(payload: bytes) -> bytes:
    """SLIP-frame a payload with its CRC-32: ``END escaped(payload | crc32 LE) END``."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload longer than {MAX_PAYLOAD_BYTES} bytes")
    body = payload + _CRC.pack(zlib.crc32(payload))
    # Escape ESC first, so that the ESC bytes introduced for END are not escaped again.
    return _END + body.replace(_ESC, _ESCAPED_ESC).replace(_END, _ESCAPED_END) + _END


def encode_frame(message: Message, seq: int) -> bytes:
    return frame(encode_payload(message, seq))


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
