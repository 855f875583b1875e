"""The serial-attached QKD device backend: a ``QuantumLink`` over a tty or pty, on trio.

The protocol (framing, messages, record encoding, block assembly) is pure and lives in
``qkdnode.link.serialproto``; see docs/device-protocol.md. This module is the thin I/O shell:

- the tty is opened with ``O_RDWR | O_NOCTTY | O_NONBLOCK``, put in raw mode at the configured
  baud rate with RTS/CTS flow control (termios), input flushed, and wrapped in
  ``trio.lowlevel.FdStream``;
- ``open()`` identifies the device (model, protocol version, role), reads its parameters and
  starts acquisition; a wrong device or protocol version is ``BadDeviceData`` naming what was found;
- ``next_block(n)`` returns the next gap-free block ``[k·n, (k+1)·n)`` of pulse indices; garbage,
  CRC failures and malformed frames are dropped and counted (``counters()``); device alarms are
  logged and listed in ``status().alarms``;
- when the device goes away (EOF/EIO) ``next_block`` raises ``LinkLost`` once and marks the link
  FAILED; the next call polls the device path every ``reconnect_interval_s``, re-identifies and
  resumes. The block in progress at the loss is discarded, so no block mixes data from before and
  after a gap; the ends re-align with ``discard_before(peer_first_pulse_index)``;
- ``BlockReader`` reads a link continuously in the daemon's nursery (a device must never wait for
  its host) and hands out blocks by first pulse index, for the block protocol to pair them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import termios
from collections import deque
from dataclasses import dataclass
from typing import Final, TypeVar

import structlog
import trio

from qkdnode.config.link import SerialLinkConfig
from qkdnode.errors import BadDeviceData, LinkError, LinkLost, LinkTimeout
from qkdnode.link.interface import LinkParameters, LinkState, LinkStatus, Role
from qkdnode.link.serialproto import (
    PARAMETER_NAMES,
    Ack,
    Alarm,
    Command,
    DeviceError,
    Dropped,
    FrameDecoder,
    Identity,
    Message,
    MessageType,
    Parameters,
    Received,
    encode_frame,
)
from qkdnode.link.serialrecords import BlockAssembler, DetectionChunk, EmissionChunk
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords

log = structlog.get_logger("qkdnode.link.serial")
_R = TypeVar("_R", bound=Message)

_READ_BYTES: Final = 1 << 16
MAX_BLOCK_PULSES: Final = 1 << 34


@dataclass(frozen=True, slots=True, kw_only=True)
class SerialCounters:
    """Counters of the serial link since construction (public, no secrets)."""

    frames: int
    crc_errors: int
    framing_errors: int
    oversize_frames: int
    malformed_frames: int
    lost_frames: int
    device_errors: int
    reconnects: int
    gaps: int
    discarded_blocks: int
    discarded_pulses: int


def open_tty(path: str, baud_rate: int) -> int:
    """Open a tty/pty without making it our controlling terminal; raw 8N1, RTS/CTS, flushed."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        set_raw_mode(fd, baud_rate)
        termios.tcflush(fd, termios.TCIOFLUSH)  # nothing stale from before we opened
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_raw_mode(fd: int, baud_rate: int) -> None:
    """Raw mode (no echo, no line editing, no signals, 8 data bits, no parity) at ``baud_rate``."""
    iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(fd)
    iflag &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
        | termios.IXOFF
        | termios.IXANY
    )
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB | termios.CSTOPB)
    cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL | termios.CRTSCTS
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    speed = getattr(termios, f"B{baud_rate}")
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, speed, speed, cc])


class SerialLink:
    """One end (Alice's source or Bob's detector) of a serial-attached QKD device."""

    def __init__(self, config: SerialLinkConfig, role: Role) -> None:
        if role not in ("alice", "bob"):
            raise ValueError("role must be 'alice' or 'bob'")
        self._config = config
        self._role: Role = role
        self._stream: trio.lowlevel.FdStream | None = None
        self._decoder = FrameDecoder()
        self._assembler = BlockAssembler()
        self._state = LinkState.CLOSED
        self._opened = False
        self._seq = 0
        self._parameters: LinkParameters | None = None
        self._identity: Identity | None = None
        self._alarms: list[str] = []
        self._active_alarms: set[str] = set()
        self._last_error: str | None = None
        self._pulses = 0
        self._detections = 0
        self._blocks = 0
        self._reconnects = 0
        self._device_errors = 0

    # ---- QuantumLink ------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self._role

    @property
    def identity(self) -> Identity | None:
        """What the device said it is at the last (re)connection."""
        return self._identity

    async def open(self) -> None:
        """Open the device, identify it, read its parameters, start acquisition.

        Raises ``LinkLost`` (cannot open the path), ``LinkTimeout`` (no reply) or
        ``BadDeviceData`` (wrong model, protocol version or role).
        """
        if self._opened:
            raise LinkError("link is already open")
        try:
            await self._connect()
        except LinkError as exc:
            self._note_failure(exc)
            raise
        self._opened = True

    async def aclose(self) -> None:
        """Stop acquisition (best effort) and close the device. Idempotent."""
        self._opened = False
        self._state = LinkState.CLOSED
        if self._stream is not None:
            with trio.move_on_after(min(1.0, self._config.read_timeout_s)):
                with contextlib.suppress(LinkError):
                    await self._send(Command(kind=MessageType.STOP))
            await self._close_stream()

    async def next_block(self, pulse_count: int) -> EmissionRecords | DetectionRecords:
        """The next complete, gap-free block of ``pulse_count`` pulses starting at a multiple of
        ``pulse_count`` (and at or after ``discard_before``'s index).

        Raises ``LinkTimeout`` when no frame arrives for ``read_timeout_s`` (the partial block is
        kept), ``LinkLost`` when the device goes away (the partial block is discarded; the next
        call waits for the device to return).
        """
        if not self._opened:
            raise LinkError(f"link is {self._state.value}, not open")
        if isinstance(pulse_count, bool) or not isinstance(pulse_count, int):
            raise TypeError("pulse_count must be an int")
        if not 1 <= pulse_count <= MAX_BLOCK_PULSES:
            raise ValueError(f"pulse_count must be in [1, {MAX_BLOCK_PULSES}], got {pulse_count}")
        self._assembler.set_block_size(pulse_count)
        while True:
            block = self._assembler.pop_block()
            if block is not None:
                self._blocks += 1
                if isinstance(block, DetectionRecords):
                    self._detections += block.detection_count
                return block
            if self._stream is None:
                await self._reconnect()
            received = await self._receive()
            self._handle_event(received.message)

    def discard_before(self, pulse_index: int) -> None:
        """Skip every pulse before ``pulse_index`` (the peer's block starts there)."""
        self._assembler.discard_before(pulse_index)

    def nominal_parameters(self) -> LinkParameters:
        if self._parameters is None:
            raise LinkError("the device's parameters are known once the link is open")
        return self._parameters

    def status(self) -> LinkStatus:
        rate = self._parameters.pulse_rate_hz if self._parameters is not None else 0.0
        return LinkStatus(
            role=self._role,
            state=self._state,
            blocks=self._blocks,
            pulses_sent=self._pulses if self._role == "alice" else 0,
            pulses_received=self._pulses if self._role == "bob" else 0,
            detections=self._detections,
            simulated_time_s=self._pulses / rate if rate > 0 else 0.0,
            alarms=tuple(self._alarms),
            last_error=self._last_error,
        )

    def active_alarms(self) -> frozenset[str]:
        """Device alarms currently raised (and not yet cleared by the device)."""
        return frozenset(self._active_alarms)

    def counters(self) -> SerialCounters:
        d, a = self._decoder.counters, self._assembler.counters
        return SerialCounters(
            frames=d.frames,
            crc_errors=d.crc_errors,
            framing_errors=d.framing_errors,
            oversize_frames=d.oversize_frames,
            malformed_frames=d.malformed_frames,
            lost_frames=d.lost_frames,
            device_errors=self._device_errors,
            reconnects=self._reconnects,
            gaps=a.gaps,
            discarded_blocks=a.discarded_blocks,
            discarded_pulses=a.discarded_pulses,
        )

    # ---- connection -------------------------------------------------------------------------

    async def _connect(self) -> None:
        path = self._config.device_path
        try:
            fd = open_tty(path, self._config.baud_rate)
        except OSError as exc:
            raise LinkLost(f"cannot open serial device {path}: {exc.strerror}") from exc
        self._stream = trio.lowlevel.FdStream(fd)
        self._decoder.resync()
        self._assembler.gap()
        try:
            await self._send(Command(kind=MessageType.STOP))
            identity = await self._request(Command(kind=MessageType.IDENTIFY), Identity)
            self._check_identity(identity)
            parameters = await self._request(Command(kind=MessageType.GET_PARAMETERS), Parameters)
            self._parameters = _link_parameters(parameters)
            await self._request(Command(kind=MessageType.START), Ack)
        except BaseException:
            await self._close_stream()
            raise
        self._state = LinkState.OPEN
        log.info(
            "serial_device_ready",
            device_path=path,
            model=identity.model,
            firmware=identity.firmware,
            protocol_version=identity.protocol_version,
            role=identity.role,
        )

    def _check_identity(self, identity: Identity) -> None:
        config, path = self._config, self._config.device_path
        found = (
            f"model {identity.model!r}, firmware {identity.firmware!r}, "
            f"protocol version {identity.protocol_version}, role {identity.role}"
        )
        if identity.protocol_version != config.expected_protocol_version:
            raise BadDeviceData(
                f"device at {path} speaks protocol version {identity.protocol_version} ({found}); "
                f"this driver expects version {config.expected_protocol_version}"
            )
        if identity.model != config.expected_model:
            raise BadDeviceData(
                f"unknown device at {path}: {found}; expected model {config.expected_model!r}"
            )
        if identity.role != self._role:
            raise BadDeviceData(
                f"device at {path} is an {identity.role} device ({found}); this end is {self._role}"
            )
        self._identity = identity

    async def _reconnect(self) -> None:
        """Poll the device path until it opens and identifies again (cancel to give up)."""
        path = self._config.device_path
        attempts = 0
        while True:
            attempts += 1
            if os.path.exists(path):
                try:
                    await self._connect()
                except (LinkLost, LinkTimeout) as exc:
                    log.debug("serial_reconnect_failed", device_path=path, error=str(exc))
                else:
                    self._reconnects += 1
                    log.info("serial_device_reconnected", device_path=path, attempts=attempts)
                    return
            await trio.sleep(self._config.reconnect_interval_s)

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()

    async def _lost(self, reason: str) -> LinkLost:
        await self._close_stream()
        self._assembler.gap()
        error = LinkLost(f"serial device {self._config.device_path} lost: {reason}")
        self._note_failure(error)
        log.warning("serial_device_lost", device_path=self._config.device_path, reason=reason)
        return error

    def _note_failure(self, error: LinkError) -> None:
        alarm = {LinkLost: "lost", LinkTimeout: "timeout", BadDeviceData: "bad_device_data"}.get(
            type(error), "error"
        )
        if isinstance(error, LinkLost | BadDeviceData):
            self._state = LinkState.FAILED
        self._raise_alarm(alarm)
        self._last_error = str(error)

    def _raise_alarm(self, name: str) -> None:
        if name not in self._alarms:
            self._alarms.append(name)

    # ---- frames -----------------------------------------------------------------------------

    async def _send(self, message: Command) -> int:
        assert self._stream is not None
        seq = self._seq
        self._seq = (self._seq + 1) & 0xFFFF
        try:
            await self._stream.send_all(encode_frame(message, seq))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise await self._lost(f"write failed ({type(exc).__name__})") from exc
        return seq

    async def _request(self, command: Command, reply_type: type[_R]) -> _R:
        """Send a command and wait for the reply carrying its sequence number."""
        seq = await self._send(command)
        timeout_s = self._config.read_timeout_s
        with trio.move_on_after(timeout_s):
            while True:
                received = await self._receive()
                message = received.message
                if isinstance(message, DeviceError) and message.ack_seq == seq:
                    self._device_errors += 1
                    raise BadDeviceData(
                        f"device refused {command.kind.name}: error {message.code} "
                        f"({message.text!r})"
                    )
                if getattr(message, "ack_seq", None) == seq:
                    if not isinstance(message, reply_type):
                        raise BadDeviceData(
                            f"device answered {command.kind.name} with {type(message).__name__}"
                        )
                    return message
                if isinstance(message, Alarm | DeviceError):
                    self._handle_event(message)
                # Records and stale replies from before this connection are dropped.
        raise LinkTimeout(
            f"no reply to {command.kind.name} from {self._config.device_path} within "
            f"{timeout_s} s ({self._decoder.counters.frames} frames decoded): "
            "is it a qkdnode serial device?"
        )

    async def _receive(self) -> Received:
        decoder = self._decoder
        while True:
            event = decoder.next_event()
            if isinstance(event, Received):
                return event
            if isinstance(event, Dropped):
                log.debug("serial_frame_dropped", reason=event.reason, detail=event.detail)
                self._raise_alarm(f"{event.reason}_errors")
                continue
            stream = self._stream
            if stream is None:
                raise LinkError("link closed")
            timeout_s = self._config.read_timeout_s
            data = b""
            with trio.move_on_after(timeout_s) as scope:
                try:
                    data = await stream.receive_some(_READ_BYTES)
                except trio.ClosedResourceError as exc:
                    if not self._opened:  # aclose() from another task
                        raise LinkError("link closed") from exc
                    raise await self._lost("read failed (closed)") from exc
                except trio.BrokenResourceError as exc:
                    cause = exc.__cause__
                    if isinstance(cause, OSError) and cause.errno == errno.EIO:
                        raise await self._lost("I/O error (hung up)") from exc
                    raise await self._lost(f"read failed ({type(exc).__name__})") from exc
            if scope.cancelled_caught:
                error = LinkTimeout(
                    f"no data from serial device {self._config.device_path} for {timeout_s} s"
                )
                self._note_failure(error)
                log.warning("serial_device_stalled", device_path=self._config.device_path)
                raise error
            if not data:
                raise await self._lost("end of file")
            if self._state is not LinkState.OPEN:
                self._state = LinkState.OPEN
            decoder.receive_data(data)

    def _handle_event(self, message: Message) -> None:
        wrong = DetectionChunk if self._role == "alice" else EmissionChunk
        if isinstance(message, wrong):
            # A device that identified as the other role must not mix records into blocks.
            self._device_errors += 1
            self._raise_alarm("bad_device_data")
            log.warning("serial_records_of_wrong_role", record=type(message).__name__)
            self._assembler.gap()
            return
        if isinstance(message, EmissionChunk):
            self._pulses += message.pulse_count
            self._assembler.feed(message)
        elif isinstance(message, DetectionChunk):
            self._pulses += message.pulse_span
            self._assembler.feed(message)
        elif isinstance(message, Alarm):
            name = message.name
            if message.active:
                self._active_alarms.add(name)
                self._raise_alarm(name)
                log.warning("device_alarm", alarm=name, value=message.value)
            else:
                self._active_alarms.discard(name)
                log.info("device_alarm_cleared", alarm=name, value=message.value)
        elif isinstance(message, DeviceError):
            self._device_errors += 1
            log.warning("device_error", code=message.code, text=message.text)
        # Unsolicited replies (e.g. to a command of a previous connection) are ignored.


def _link_parameters(parameters: Parameters) -> LinkParameters:
    values = parameters.as_dict()
    for name, value in values.items():
        if value < 0 or (name.startswith("p_") and value > 1):
            raise BadDeviceData(f"device parameter {name} out of range")
    if values["pulse_rate_hz"] <= 0:
        raise BadDeviceData("device parameter pulse_rate_hz must be > 0")
    assert tuple(values) == PARAMETER_NAMES
    return LinkParameters(**values)


class BlockReader:
    """Reads a link continuously into a buffer of its newest blocks; pairs are taken by index.

    A serial device must never wait for its host: a device whose line is full stops taking
    pulses from the fibre, which stops the other device too. So each daemon runs ``run()`` in its
    nursery for the whole life of the link, and the block protocol takes blocks from here:
    Alice ``take()``s the oldest block and announces its ``first_pulse_index``; Bob
    ``take(index)``s the block with that start, or gets ``None`` if his side lost those pulses
    (then both move on to a later block). Blocks older than what is taken are dropped, and so is
    the oldest block when more than ``keep_blocks`` wait. ``LinkLost`` and ``LinkTimeout`` are
    recorded in ``errors`` (with the link's status at that moment) and the link is asked again:
    the serial driver reconnects by itself.
    """

    def __init__(self, link: SerialLink, pulse_count: int, *, keep_blocks: int = 4) -> None:
        if keep_blocks < 1:
            raise ValueError("keep_blocks must be >= 1")
        self._link = link
        self._pulse_count = pulse_count
        self._blocks: deque[EmissionRecords | DetectionRecords] = deque(maxlen=keep_blocks)
        self._changed = trio.Event()
        self.errors: deque[tuple[LinkError, LinkStatus]] = deque(maxlen=100)
        self.dropped_blocks = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read blocks until cancelled. Other link errors (a wrong device) propagate."""
        task_status.started()
        while True:
            try:
                block = await self._link.next_block(self._pulse_count)
            except (LinkLost, LinkTimeout) as exc:
                self.errors.append((exc, self._link.status()))
                continue
            if len(self._blocks) == self._blocks.maxlen:
                self.dropped_blocks += 1
            self._blocks.append(block)
            self._changed.set()
            self._changed = trio.Event()

    async def take(
        self, first_pulse_index: int | None = None
    ) -> EmissionRecords | DetectionRecords | None:
        """The oldest buffered block, or the one starting at ``first_pulse_index`` (waiting for
        it); ``None`` when this side has already moved past that index (it lost those pulses).
        Buffered blocks older than the one returned are dropped."""
        if first_pulse_index is not None:
            self._link.discard_before(first_pulse_index)
        while True:
            while self._blocks:
                block = self._blocks[0]
                if first_pulse_index is None or block.first_pulse_index == first_pulse_index:
                    return self._blocks.popleft()
                if block.first_pulse_index > first_pulse_index:
                    return None
                self._blocks.popleft()
                self.dropped_blocks += 1
            await self._changed.wait()
