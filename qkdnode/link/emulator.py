"""A QKD device emulator on a pseudo-terminal, speaking docs/device-protocol.md.

``qkdnode device-emulator --role alice|bob`` (CLI entry: ``main(argv)``) opens a pty pair, prints
the slave path (and keeps a stable symlink to it with ``--link PATH``), and serves the master side
like a device. Its physics is the simulated link's (``qkdnode.link.physics``: ``Source`` for Alice,
``Receiver`` for Bob). The Alice and Bob emulators share a "fibre" carrying the pulse
descriptions of ``qkdnode.link.fibre`` (TCP on loopback between processes, a socketpair in
tests), so their records describe the same pulses with the same absolute pulse
indices. Bob acknowledges each chunk on the fibre's return direction; Alice keeps at most
``FIBRE_WINDOW_CHUNKS`` chunks in flight.

Behaviour of the emulated device:

- Alice's source emits only while started, in chunks of ``chunk_pulses``: each chunk goes to the
  fibre, then its records to the line. Nothing is paced by a clock: backpressure of the line and
  the fibre sets the speed, so a slow host slows the whole link instead of losing data.
- Bob's detector always consumes the fibre (the pulses keep their indices) and reports detections
  only while started.
- A line drop (fault ``drop_line``) closes the pty and removes the symlink; acquisition stops. The
  line comes back after ``down_s`` (a new pty; the symlink points to it).
- Faults: ``inject_noise(p)`` (garbage bytes before a frame with probability p), ``corrupt_crc(p)``
  (one byte of a frame flipped with probability p), ``raise_alarm(...)``, ``stall(s)`` (nothing
  written for s seconds), ``drop_line(s)``. Fault randomness has its own generator, so faults do not
  change the physics' random stream.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import trio

from qkdnode.config.link import DEFAULT_MODEL, SimulatedLinkConfig
from qkdnode.config.table import parse_host_port
from qkdnode.errors import BadDeviceData, ConfigError, LinkError
from qkdnode.link.fibre import FibreDecoder, PulseFrame, encode_pulse_frame
from qkdnode.link.interface import Role
from qkdnode.link.physics import AfterpulseCarry, Receiver, Source
from qkdnode.link.serial import set_raw_mode
from qkdnode.link.serialproto import (
    CONFIGURE_NAMES,
    PARAMETER_NAMES,
    PROTOCOL_VERSION,
    Ack,
    Alarm,
    AlarmCode,
    Command,
    Configure,
    DeviceError,
    DeviceStatus,
    ErrorCode,
    FrameDecoder,
    Identity,
    Message,
    MessageType,
    Parameters,
    Received,
    encode_frame,
)
from qkdnode.link.serialrecords import EmissionChunk, split_detections, split_emissions
from qkdnode.link.simulated import TcpFibreListener, tcp_fibre_connector

DEFAULT_CHUNK_PULSES: Final = 1 << 16
_READ_BYTES: Final = 1 << 16
_MAX_NOISE_BYTES: Final = 64
FIBRE_WINDOW_CHUNKS: Final = 2
_ACK: Final = b"\x06"


class DeviceEmulator:
    """One emulated device (Alice's source or Bob's detector) served on a pty."""

    def __init__(
        self,
        role: Role,
        config: SimulatedLinkConfig,
        *,
        rng: np.random.Generator,
        fault_rng: np.random.Generator | None = None,
        link_path: str | None = None,
        model: str = DEFAULT_MODEL,
        firmware: str = "emu-1.0",
        serial_number: str = "EMU-0001",
        protocol_version: int = PROTOCOL_VERSION,
        chunk_pulses: int = DEFAULT_CHUNK_PULSES,
        baud_rate: int = 3_000_000,
    ) -> None:
        if role not in ("alice", "bob"):
            raise ValueError("role must be 'alice' or 'bob'")
        if not 1 <= chunk_pulses <= 1 << 24:
            raise ValueError("chunk_pulses must be in [1, 2^24]")
        self.role: Role = role
        self._config = config
        self._rng = rng
        self._fault_rng = fault_rng if fault_rng is not None else np.random.default_rng(0)
        self._link_path = link_path
        self._model = model
        self._firmware = firmware
        self._serial_number = serial_number
        self._protocol_version = protocol_version
        self._chunk_pulses = chunk_pulses
        self._baud_rate = baud_rate
        self._build_physics()
        self._next_pulse_index = 0
        self._seq = 0
        self._running = False
        self._started = trio.Event()
        self._master: trio.lowlevel.FdStream | None = None
        self._slave_fd: int | None = None
        self._slave_path: str | None = None
        self._write_lock = trio.Lock()
        self._line_scope: trio.CancelScope | None = None
        self._down_s = 0.0
        self._closed = False
        self._nursery: trio.Nursery | None = None
        self._active_alarms: set[int] = set()
        # Fault switches.
        self.noise_probability = 0.0
        self.corrupt_probability = 0.0
        self._stall_s = 0.0
        self.frames_written = 0
        self.frames_corrupted = 0
        self.noise_bursts = 0

    def _build_physics(self) -> None:
        self._parameters = self._config.nominal_parameters()
        self._source = Source(self._parameters)
        self._receiver = Receiver(self._parameters)
        self._carry = AfterpulseCarry()

    @property
    def path(self) -> str:
        """The path a driver opens: the symlink if there is one, else the current pty slave."""
        if self._link_path is not None:
            return self._link_path
        if self._slave_path is None:
            raise RuntimeError("the emulator's line is not open")
        return self._slave_path

    @property
    def running(self) -> bool:
        return self._running

    def _set_running(self, running: bool) -> None:
        self._running = running
        if running:
            self._started.set()
        elif self._started.is_set():  # a waiter on an unset event keeps waiting on it
            self._started = trio.Event()

    def _is_running(self) -> bool:  # a method: other tasks change the flag between awaits
        return self._running

    @property
    def next_pulse_index(self) -> int:
        return self._next_pulse_index

    # ---- fault switches ---------------------------------------------------------------------

    def inject_noise(self, probability: float) -> None:
        """Before each frame, with this probability, write 1-64 random bytes."""
        self.noise_probability = _probability(probability)

    def corrupt_crc(self, probability: float) -> None:
        """With this probability, flip one byte of a frame (its CRC no longer matches)."""
        self.corrupt_probability = _probability(probability)

    def stall(self, duration_s: float) -> None:
        """Write nothing (records nor replies) for ``duration_s`` from the next frame on."""
        self._stall_s = max(0.0, duration_s)

    def drop_line(self, down_s: float) -> None:
        """Hang up: close the pty (and remove the symlink); a new line opens after ``down_s``."""
        self._down_s = max(0.0, down_s)
        if self._line_scope is not None:
            self._line_scope.cancel()

    def raise_alarm(self, code: AlarmCode, *, active: bool = True, value: float = 0.0) -> None:
        """Send an ALARM event (``active=False`` clears it) as soon as the line takes it."""
        if self._nursery is None:
            raise RuntimeError("the emulator is not running")
        if active:
            self._active_alarms.add(int(code))
        else:
            self._active_alarms.discard(int(code))
        self._nursery.start_soon(self._write, Alarm(code=int(code), active=active, value=value))

    def close(self) -> None:
        """Stop serving: the line goes down for good (``run`` returns)."""
        self._closed = True
        self.drop_line(0.0)

    # ---- serving ----------------------------------------------------------------------------

    async def run(
        self,
        fibre: trio.abc.Stream,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the line until ``close()``; reports the path with ``task_status.started``."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.role == "alice":
                nursery.start_soon(self._alice_source, fibre)
            else:
                nursery.start_soon(self._bob_detector, fibre)
            reported = False
            while not self._closed:
                self._open_line()
                if not reported:
                    task_status.started(self.path)
                    reported = True
                try:
                    with trio.CancelScope() as scope:
                        self._line_scope = scope
                        await self._serve_commands()
                finally:
                    self._line_scope = None
                    await self._close_line()
                if not self._closed and self._down_s > 0:
                    await trio.sleep(self._down_s)
            nursery.cancel_scope.cancel()
        self._nursery = None

    def _open_line(self) -> None:
        master, slave = os.openpty()
        # Raw mode before any host opens the slave: no echo of commands back to the device.
        set_raw_mode(slave, self._baud_rate)
        self._slave_fd = slave
        self._slave_path = os.ttyname(slave)
        self._master = trio.lowlevel.FdStream(master)
        if self._link_path is not None:
            temporary = f"{self._link_path}.{os.getpid()}.tmp"
            os.symlink(self._slave_path, temporary)
            os.replace(temporary, self._link_path)

    async def _close_line(self) -> None:
        self._set_running(False)
        if self._link_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._link_path)
        master, self._master = self._master, None
        if master is not None:
            await master.aclose()  # the host sees a hang-up (EIO / end of file)
        if self._slave_fd is not None:
            os.close(self._slave_fd)
            self._slave_fd = None

    async def _serve_commands(self) -> None:
        assert self._master is not None
        master = self._master
        decoder = FrameDecoder()
        while True:
            try:
                data = await master.receive_some(_READ_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            decoder.receive_data(data)
            while (event := decoder.next_event()) is not None:
                if isinstance(event, Received):
                    await self._write(self._answer(event))

    def _answer(self, received: Received) -> Message:
        seq, message = received.seq, received.message
        if isinstance(message, Configure):
            if self._running:
                return _error(seq, ErrorCode.WRONG_STATE, "stop before configuring")
            changes: dict[str, Any] = dict(zip(CONFIGURE_NAMES, message.values, strict=True))
            try:
                self._config = dataclasses.replace(self._config, **changes)
            except ConfigError as exc:
                return _error(seq, ErrorCode.BAD_ARGUMENT, str(exc))
            self._build_physics()
            return self._parameters_reply(seq)
        if not isinstance(message, Command):
            return _error(seq, ErrorCode.UNKNOWN_COMMAND, f"{type(message).__name__}")
        kind = message.kind
        if kind is MessageType.IDENTIFY:
            return Identity(
                ack_seq=seq,
                protocol_version=self._protocol_version,
                role=self.role,
                model=self._model,
                firmware=self._firmware,
                serial_number=self._serial_number,
            )
        if kind is MessageType.GET_PARAMETERS:
            return self._parameters_reply(seq)
        if kind is MessageType.START:
            self._set_running(True)
            return Ack(ack_seq=seq, command=int(kind))
        if kind is MessageType.STOP:
            self._set_running(False)
            return Ack(ack_seq=seq, command=int(kind))
        return DeviceStatus(
            ack_seq=seq,
            running=self._running,
            next_pulse_index=self._next_pulse_index,
            active_alarms=sum(1 << (code - 1) for code in self._active_alarms),
            detector_temperature_c=-40.0,
            laser_power_mw=1.0,
        )

    def _parameters_reply(self, seq: int) -> Parameters:
        values = tuple(float(getattr(self._parameters, name)) for name in PARAMETER_NAMES)
        return Parameters(ack_seq=seq, values=values)

    async def _write(self, message: Message) -> None:
        """Write one frame, with the configured faults; dropped silently if the line is down."""
        rng = self._fault_rng
        async with self._write_lock:
            if self._stall_s > 0:
                stall_s, self._stall_s = self._stall_s, 0.0
                await trio.sleep(stall_s)
            master = self._master
            if master is None:
                return
            seq = self._seq
            self._seq = (seq + 1) & 0xFFFF
            data = encode_frame(message, seq)
            if self.corrupt_probability and rng.random() < self.corrupt_probability:
                corrupted = bytearray(data)
                position = int(rng.integers(1, len(data) - 1))
                corrupted[position] ^= int(rng.integers(1, 256))
                data = bytes(corrupted)
                self.frames_corrupted += 1
            if self.noise_probability and rng.random() < self.noise_probability:
                noise = rng.integers(0, 256, int(rng.integers(1, _MAX_NOISE_BYTES + 1)))
                data = noise.astype(np.uint8).tobytes() + data
                self.noise_bursts += 1
            try:
                await master.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the line dropped under us
            self.frames_written += 1

    # ---- physics ----------------------------------------------------------------------------

    async def _alice_source(self, fibre: trio.abc.Stream) -> None:
        in_flight = 0
        while True:
            # Bob acknowledges every chunk once its detections are on his line: a window of
            # chunks in flight keeps both record streams within a fraction of a block of each
            # other, as on a real fibre, whatever the transport buffers.
            while in_flight >= FIBRE_WINDOW_CHUNKS:
                acks = await fibre.receive_some(_READ_BYTES)
                if not acks:
                    raise BadDeviceData("fibre closed by Bob's device")
                in_flight -= len(acks)
            if not self._running:
                await self._started.wait()
                continue
            size = self._chunk_pulses
            first = self._next_pulse_index
            emission = self._source.emit(size, self._rng)
            span = self._parameters.fibre_transmittance
            await fibre.send_all(
                encode_pulse_frame(
                    PulseFrame(
                        first_pulse_index=first, span_transmittance=span, pulses=emission.pulses
                    )
                )
            )
            in_flight += 1
            self._next_pulse_index = first + size
            chunk = EmissionChunk(
                first_pulse_index=first,
                bit=emission.bit,
                basis=emission.basis,
                intensity=emission.intensity,
            )
            for part in split_emissions(chunk):
                if not self._is_running():
                    break  # stopped mid-chunk: the host sees a gap and drops the block
                await self._write(part)

    async def _bob_detector(self, fibre: trio.abc.Stream) -> None:
        decoder = FibreDecoder()
        while True:
            data = await fibre.receive_some(_READ_BYTES)
            if not data:
                raise BadDeviceData("fibre closed by Alice's device")
            decoder.receive_data(data)
            while (frame := decoder.next_frame()) is not None:
                if not isinstance(frame, PulseFrame):
                    continue
                first, count = frame.first_pulse_index, frame.pulse_count
                self._next_pulse_index = first + count
                if self._running:
                    detections, self._carry = self._receiver.detect(
                        frame.pulses, frame.span_transmittance, self._rng, self._carry
                    )
                    for part in split_detections(
                        first, count, detections.offset + first, detections.basis, detections.bit
                    ):
                        if not self._is_running():
                            break
                        await self._write(part)
                await fibre.send_all(_ACK)


def _probability(value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError("a probability in [0, 1]")
    return float(value)


def _error(seq: int, code: ErrorCode, text: str) -> DeviceError:
    return DeviceError(ack_seq=seq, code=int(code), text=text[:200])


# ---- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdnode device-emulator",
        description="Emulate a serial-attached QKD device on a pseudo-terminal.",
    )
    parser.add_argument("--role", choices=("alice", "bob"), required=True)
    parser.add_argument("--link", help="keep a symlink to the pty slave at this path")
    parser.add_argument(
        "--fibre",
        default="127.0.0.1:7340",
        help="HOST:PORT of the fibre: Alice listens there, Bob connects (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, help="seed of the physics (default: OS entropy)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a simulated-link setting, e.g. fiber_km=25 (repeatable)",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--firmware", default="emu-1.0")
    parser.add_argument("--protocol-version", type=int, default=PROTOCOL_VERSION)
    parser.add_argument("--chunk-pulses", type=int, default=DEFAULT_CHUNK_PULSES)
    parser.add_argument("--noise", type=float, default=0.0, help="noise probability per frame")
    parser.add_argument("--corrupt", type=float, default=0.0, help="CRC corruption per frame")
    return parser


def _link_config(settings: Sequence[str]) -> SimulatedLinkConfig:
    values: dict[str, object] = {}
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item}", "NAME=VALUE")
        try:
            values[name] = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise ConfigError(f"link.{name}", "a number") from None
    return SimulatedLinkConfig.from_mapping(values)


async def _control(emulator: DeviceEmulator) -> None:
    """Fault switches from stdin, one per line: ``drop S``, ``noise P``, ``corrupt P``,
    ``stall S``, ``alarm NAME`` / ``clear NAME`` (NAME: laser_power, detector_temperature,
    sync_lost, overflow)."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    while data := await stream.receive_some(4096):
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            words = line.decode(errors="replace").split()
            if len(words) != 2:
                continue
            verb, argument = words
            try:
                if verb == "drop":
                    emulator.drop_line(float(argument))
                elif verb == "noise":
                    emulator.inject_noise(float(argument))
                elif verb == "corrupt":
                    emulator.corrupt_crc(float(argument))
                elif verb == "stall":
                    emulator.stall(float(argument))
                elif verb in ("alarm", "clear"):
                    code = AlarmCode[argument.upper()]
                    emulator.raise_alarm(code, active=verb == "alarm")
                else:
                    print(f"unknown control {verb!r}", file=sys.stderr, flush=True)
            except (ValueError, KeyError):
                print(f"bad control line {line!r}", file=sys.stderr, flush=True)


async def _serve(args: argparse.Namespace) -> None:
    config = _link_config(args.param)
    seed = np.random.SeedSequence(args.seed)
    physics_seed, fault_seed = seed.spawn(2)
    emulator = DeviceEmulator(
        args.role,
        config,
        rng=np.random.default_rng(physics_seed),
        fault_rng=np.random.default_rng(fault_seed),
        link_path=args.link,
        model=args.model,
        firmware=args.firmware,
        protocol_version=args.protocol_version,
        chunk_pulses=args.chunk_pulses,
    )
    emulator.inject_noise(args.noise)
    emulator.corrupt_crc(args.corrupt)
    host, port = parse_host_port(args.fibre)
    fibre: trio.abc.Stream
    async with trio.open_nursery() as nursery:
        if args.role == "alice":
            listener = TcpFibreListener(host, port)
            await listener.bind()  # Alice's line opens at once; her source waits for Bob's fibre
            fibre = _AcceptingFibre(listener)
        else:
            fibre = await tcp_fibre_connector(host, port)()
        path = await nursery.start(emulator.run, fibre)
        print(f"device-emulator role={args.role} path={path}", flush=True)
        nursery.start_soon(_control, emulator)


class _AcceptingFibre(trio.abc.Stream):
    """Alice's end of the TCP fibre: accepts Bob's connection on first use."""

    def __init__(self, listener: TcpFibreListener) -> None:
        self._listener = listener
        self._stream: trio.SocketStream | None = None

    async def _connected(self) -> trio.SocketStream:
        if self._stream is None:
            self._stream = await self._listener.accept()
        return self._stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await (await self._connected()).send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await (await self._connected()).wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await (await self._connected()).receive_some(max_bytes)

    async def send_eof(self) -> None:
        await (await self._connected()).send_eof()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        await self._listener.aclose()


def main(argv: list[str]) -> int:
    """``qkdnode device-emulator ...``: serve until interrupted. Returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        trio.run(_serve, args)
    except KeyboardInterrupt:
        return 0
    except (ConfigError, ValueError) as exc:
        print(f"device-emulator: {exc}", file=sys.stderr)
        return 2
    except (OSError, LinkError, trio.BrokenResourceError, ExceptionGroup) as exc:
        # The fibre peer went away or the pty failed: say what, without a traceback.
        print(f"device-emulator: stopped: {_describe(exc)}", file=sys.stderr)
        return 1
    return 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
