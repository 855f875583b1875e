"""The simulated link's trio shell: Alice's source and Bob's receiver joined by a fibre stream.

The fibre is any trio byte stream carrying ``qkdnode.link.fibre`` frames: an in-process bounded
memory stream (``memory_fibre``) for tests and the demo, or a TCP connection on loopback between
two daemons (Alice listens, Bob connects: ``TcpFibreListener``, ``tcp_fibre_connector``). An
eavesdropper (``qkdnode.link.eve``) can sit on the stream as a proxy.

All physics is in ``qkdnode.link.physics`` (pure, seeded by the injected Generators). Alice sends
a BLOCK frame then the block's pulses in chunks of ``chunk_pulses``; Bob turns each chunk into
detections as it arrives, so memory is bounded by one block's records plus one chunk. Each
chunk's physics (Alice's emission and its encoding, Bob's detection) runs in a worker thread,
one chunk at a time and in order, so the event loop stays free and a seed gives the same
records as a single thread would.

Alice's records of a block are dense (3 bytes per pulse) by default. With ``[link]
alice_records = "detected_pulses"`` she keeps only her source's generator state at the block's
first pulse (``physics.RedrawnEmissions``); sifting draws the records of the pulses Bob
announced again from it, chunk by chunk, and keeps those alone: the same pulses, bit for bit,
with no per-pulse array of the block in memory (blocks of 10^9 pulses), for one more draw of
the block's random numbers.

The simulated fibre carries Alice's states (basis, bit) in clear, as a real fibre carries the
photons: a simulated link is for tests, demos and benchmarks, never for keys that matter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import numpy as np
import trio

from qkdnode.config.link import LinkConfig, SimulatedLinkConfig
from qkdnode.errors import BadDeviceData, LinkError, LinkLost, LinkTimeout
from qkdnode.link.fibre import (
    BlockStart,
    FibreDecoder,
    Frame,
    PulseFrame,
    encode_block_start,
    encode_pulse_frame,
)
from qkdnode.link.interface import LinkParameters, LinkState, LinkStatus, Role
from qkdnode.link.physics import U8, AfterpulseCarry, Receiver, RedrawnEmissions, Source
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords

SendOpener = Callable[[], Awaitable[trio.abc.SendStream]]
ReceiveOpener = Callable[[], Awaitable[trio.abc.ReceiveStream]]

_S = TypeVar("_S", bound=trio.abc.AsyncResource)
_RECEIVE_MAX_BYTES = 1 << 20
MAX_BLOCK_PULSES = 1 << 34


# ---- fibre transports ------------------------------------------------------------------------


class _MemoryFibreSend(trio.abc.SendStream):
    def __init__(self, channel: trio.MemorySendChannel[bytes]) -> None:
        self._channel = channel

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._channel.send(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self._channel.aclose()


class _MemoryFibreReceive(trio.abc.ReceiveStream):
    def __init__(self, channel: trio.MemoryReceiveChannel[bytes]) -> None:
        self._channel = channel
        self._pending = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                self._pending = await self._channel.receive()
            except trio.EndOfChannel:
                return b""
        else:
            await trio.lowlevel.checkpoint()
        size = len(self._pending) if max_bytes is None else max_bytes
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    async def aclose(self) -> None:
        await self._channel.aclose()


def memory_fibre(
    max_buffered_frames: int = 8,
) -> tuple[trio.abc.SendStream, trio.abc.ReceiveStream]:
    """An in-process one-way fibre; the sender blocks when ``max_buffered_frames`` are queued."""
    send, receive = trio.open_memory_channel[bytes](max_buffered_frames)
    return _MemoryFibreSend(send), _MemoryFibreReceive(receive)


class TcpFibreListener:
    """Listens on ``host:port`` and accepts exactly one fibre connection (Alice's side).

    With port 0 give a literal address: each address family would get its own port.
    """

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._listeners: list[trio.SocketListener] = []

    async def bind(self) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        if not self._listeners:
            self._listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        port: int = self._listeners[0].socket.getsockname()[1]
        return port

    async def accept(self) -> trio.SocketStream:
        """Wait for the peer on any bound address, then stop listening."""
        await self.bind()
        accepted: list[trio.SocketStream] = []
        try:
            async with trio.open_nursery() as nursery:

                async def accept_one(listener: trio.SocketListener) -> None:
                    stream = await listener.accept()
                    if accepted:  # another address family won the race
                        await stream.aclose()
                        return
                    accepted.append(stream)
                    nursery.cancel_scope.cancel()

                for listener in self._listeners:
                    nursery.start_soon(accept_one, listener)
        finally:
            await self.aclose()
        return accepted[0]

    async def aclose(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            await listener.aclose()


def tcp_fibre_connector(
    host: str, port: int, *, retry_interval_s: float = 0.05
) -> Callable[[], Awaitable[trio.SocketStream]]:
    """An opener that connects to Alice, retrying until the caller's timeout cancels it."""

    async def connect() -> trio.SocketStream:
        while True:
            try:
                return await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(retry_interval_s)

    return connect


# ---- the two ends ----------------------------------------------------------------------------


class _SimulatedEnd:
    """Counters, state and error bookkeeping shared by both ends."""

    _role: Role

    def __init__(self, config: SimulatedLinkConfig, rng: np.random.Generator) -> None:
        self._config = config
        self._parameters = config.nominal_parameters()
        self._rng = rng
        self._state = LinkState.CLOSED
        self._next_pulse_index = 0
        self._blocks = 0
        self._pulses = 0
        self._detections = 0
        self._alarms: list[str] = []
        self._last_error: str | None = None

    @property
    def role(self) -> Role:
        return self._role

    def nominal_parameters(self) -> LinkParameters:
        return self._parameters

    def status(self) -> LinkStatus:
        return LinkStatus(
            role=self._role,
            state=self._state,
            blocks=self._blocks,
            pulses_sent=self._pulses if self._role == "alice" else 0,
            pulses_received=self._pulses if self._role == "bob" else 0,
            detections=self._detections,
            simulated_time_s=self._pulses / self._config.pulse_rate_hz,
            alarms=tuple(self._alarms),
            last_error=self._last_error,
        )

    def _check_request(self, pulse_count: int) -> None:
        if self._state is not LinkState.OPEN:
            raise LinkError(f"link is {self._state.value}, not open")
        if isinstance(pulse_count, bool) or not isinstance(pulse_count, int):
            raise TypeError("pulse_count must be an int")
        if not 1 <= pulse_count <= MAX_BLOCK_PULSES:
            raise ValueError(f"pulse_count must be in [1, {MAX_BLOCK_PULSES}], got {pulse_count}")

    def _fail(self, alarm: str, error: LinkError) -> LinkError:
        self._state = LinkState.FAILED
        self._alarms.append(alarm)
        self._last_error = str(error)
        return error

    async def _open_with_timeout(self, opener: Callable[[], Awaitable[_S]]) -> _S:
        if self._state is LinkState.OPEN:
            raise LinkError("link is already open")
        try:
            with trio.fail_after(self._config.connect_timeout_s):
                return await opener()
        except trio.TooSlowError:
            raise self._fail(
                "timeout",
                LinkTimeout(f"fibre not connected after {self._config.connect_timeout_s} s"),
            ) from None
        except OSError as exc:
            raise self._fail("lost", LinkLost(f"cannot open the fibre: {exc}")) from exc

    async def _close(self, stream: trio.abc.AsyncResource | None) -> None:
        """Close this end's fibre stream (idempotent: ``aclose`` hands it over once)."""
        if self._state is LinkState.OPEN:
            self._state = LinkState.CLOSED
        if stream is not None:
            await stream.aclose()


class SimulatedAliceLink(_SimulatedEnd):
    """Alice's end: a weak-coherent-pulse source writing pulse descriptions to the fibre."""

    _role: Literal["alice"] = "alice"

    def __init__(
        self,
        config: SimulatedLinkConfig,
        *,
        fibre: trio.abc.SendStream | SendOpener,
        rng: np.random.Generator,
    ) -> None:
        super().__init__(config, rng)
        self._fibre = fibre
        self._stream: trio.abc.SendStream | None = None
        self._source = Source(self._parameters)

    async def open(self) -> None:
        fibre = self._fibre
        if isinstance(fibre, trio.abc.SendStream):
            self._stream = fibre
        else:
            self._stream = await self._open_with_timeout(fibre)
        self._state = LinkState.OPEN

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        await self._close(stream)

    async def next_block(self, pulse_count: int) -> EmissionRecords | RedrawnEmissions:
        """Emit the next ``pulse_count`` pulses; returns Alice's records of them: dense, or
        with ``alice_records = "detected_pulses"`` the source's state at the block's first
        pulse, from which sifting draws the records of the pulses Bob detected again."""
        self._check_request(pulse_count)
        assert self._stream is not None
        first = self._next_pulse_index
        redrawn: RedrawnEmissions | None = None
        records: tuple[U8, U8, U8] | None = None
        if self._config.alice_records == "detected_pulses":
            redrawn = RedrawnEmissions(
                self._source, self._rng, first_pulse_index=first, pulse_count=pulse_count
            )
        else:
            records = (
                np.empty(pulse_count, dtype=np.uint8),
                np.empty(pulse_count, dtype=np.uint8),
                np.empty(pulse_count, dtype=np.uint8),
            )
        completed = False
        try:
            await self._send(
                encode_block_start(BlockStart(first_pulse_index=first, pulse_count=pulse_count))
            )
            for offset in range(0, pulse_count, self._config.chunk_pulses):
                chunk = slice(offset, min(offset + self._config.chunk_pulses, pulse_count))
                frame = await trio.to_thread.run_sync(self._emit, first, chunk, records)
                await self._send(frame)
                self._pulses += chunk.stop - chunk.start
            completed = True
        finally:
            if not completed and self._state is LinkState.OPEN:
                # A half-sent block cannot be resumed: the two ends would disagree on indices.
                self._fail("interrupted", LinkError("block interrupted mid-way"))
        self._next_pulse_index = first + pulse_count
        self._blocks += 1
        if redrawn is not None:
            return redrawn
        assert records is not None
        bit, basis, intensity = records
        return EmissionRecords(first_pulse_index=first, bit=bit, basis=basis, intensity=intensity)

    def _emit(self, first: int, chunk: slice, records: tuple[U8, U8, U8] | None) -> bytes:
        """Emit the pulses of ``chunk`` (offsets in the block starting at pulse ``first``):
        Alice's bit, basis and intensity go into ``records`` (if kept per pulse), the fibre
        frame is returned."""
        emission = self._source.emit(chunk.stop - chunk.start, self._rng)
        if records is not None:
            bit, basis, intensity = records
            bit[chunk] = emission.bit
            basis[chunk] = emission.basis
            intensity[chunk] = emission.intensity
        frame = PulseFrame(
            first_pulse_index=first + chunk.start,
            span_transmittance=self._parameters.fibre_transmittance,
            pulses=emission.pulses,
        )
        return encode_pulse_frame(frame)

    async def _send(self, data: bytes) -> None:
        assert self._stream is not None
        timeout_s = self._config.fibre_timeout_s
        try:
            with trio.fail_after(timeout_s):
                await self._stream.send_all(data)
        except trio.TooSlowError:
            raise self._fail(
                "timeout", LinkTimeout(f"fibre did not accept data within {timeout_s} s")
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._fail("lost", LinkLost("fibre connection lost")) from exc


class SimulatedBobLink(_SimulatedEnd):
    """Bob's end: a receiver turning pulse descriptions from the fibre into detections."""

    _role: Literal["bob"] = "bob"

    def __init__(
        self,
        config: SimulatedLinkConfig,
        *,
        fibre: trio.abc.ReceiveStream | ReceiveOpener,
        rng: np.random.Generator,
    ) -> None:
        super().__init__(config, rng)
        self._fibre = fibre
        self._stream: trio.abc.ReceiveStream | None = None
        self._decoder = FibreDecoder()
        self._receiver = Receiver(self._parameters)
        self._carry = AfterpulseCarry()
        self._resync = False

    async def open(self) -> None:
        fibre = self._fibre
        if isinstance(fibre, trio.abc.ReceiveStream):
            self._stream = fibre
        else:
            self._stream = await self._open_with_timeout(fibre)
        self._state = LinkState.OPEN
        self._decoder = FibreDecoder()  # nothing of an earlier connection carries over
        # A new fibre connection follows the sender's pulse numbering (Alice owns it; either
        # end may have restarted); within one connection blocks must follow on exactly.
        self._resync = True

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        await self._close(stream)

    async def next_block(self, pulse_count: int) -> DetectionRecords:
        """Detections of the next ``pulse_count`` pulses, as announced by the fibre."""
        self._check_request(pulse_count)
        first = self._next_pulse_index
        completed = False
        try:
            start = await self._next_frame()
            if not isinstance(start, BlockStart):
                raise self._bad("expected a block start on the fibre")
            if self._resync and start.pulse_count == pulse_count:
                first = self._next_pulse_index = start.first_pulse_index
                self._resync = False
            if start.first_pulse_index != first or start.pulse_count != pulse_count:
                raise self._bad(
                    f"fibre announces block [{start.first_pulse_index}, "
                    f"+{start.pulse_count}) but Bob expects [{first}, +{pulse_count})"
                )
            indices, bases, bits = [], [], []
            expected = first
            end = first + pulse_count
            while expected < end:
                frame = await self._next_frame()
                if not isinstance(frame, PulseFrame):
                    raise self._bad("block start before the previous block ended")
                if frame.first_pulse_index != expected or expected + frame.pulse_count > end:
                    raise self._bad(
                        f"pulse frame at {frame.first_pulse_index} (+{frame.pulse_count}) does "
                        f"not continue the block at {expected}"
                    )
                detections, self._carry = await trio.to_thread.run_sync(
                    self._receiver.detect,
                    frame.pulses,
                    frame.span_transmittance,
                    self._rng,
                    self._carry,
                )
                indices.append(detections.offset + expected)
                bases.append(detections.basis)
                bits.append(detections.bit)
                expected += frame.pulse_count
                self._pulses += frame.pulse_count
            completed = True
        finally:
            if not completed and self._state is LinkState.OPEN:
                self._fail("interrupted", LinkError("block interrupted mid-way"))
        records = DetectionRecords(
            first_pulse_index=first,
            pulse_count=pulse_count,
            pulse_index=np.concatenate(indices).astype(np.int64, copy=False),
            basis=np.concatenate(bases),
            bit=np.concatenate(bits),
        )
        self._next_pulse_index = end
        self._blocks += 1
        self._detections += records.detection_count
        return records

    def _bad(self, message: str) -> LinkError:
        return self._fail("bad_device_data", BadDeviceData(message))

    async def _next_frame(self) -> Frame:
        assert self._stream is not None
        timeout_s = self._config.fibre_timeout_s
        while True:
            try:
                frame = self._decoder.next_frame()
            except BadDeviceData as exc:
                raise self._fail("bad_device_data", exc) from None
            if frame is not None:
                return frame
            try:
                with trio.fail_after(timeout_s):
                    data = await self._stream.receive_some(_RECEIVE_MAX_BYTES)
            except trio.TooSlowError:
                raise self._fail(
                    "timeout", LinkTimeout(f"no pulses on the fibre for {timeout_s} s")
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._fail("lost", LinkLost("fibre connection lost")) from exc
            if not data:
                raise self._fail("lost", LinkLost("fibre closed by the sender"))
            self._decoder.receive_data(data)


def simulated_link_from_config(
    role: Role, config: LinkConfig, rng: np.random.Generator
) -> SimulatedAliceLink | SimulatedBobLink:
    """A TCP-joined end: Alice listens on ``fibre_host:fibre_port``, Bob connects to it.

    Takes a node's ``link`` config as it is; a serial device's config raises ``TypeError``.
    """
    if not isinstance(config, SimulatedLinkConfig):
        raise TypeError(f"not a simulated link's config: {type(config).__name__}")
    if role == "alice":
        listener = TcpFibreListener(config.fibre_host, config.fibre_port)
        return SimulatedAliceLink(config, fibre=listener.accept, rng=rng)
    connector = tcp_fibre_connector(config.fibre_host, config.fibre_port)
    return SimulatedBobLink(config, fibre=connector, rng=rng)
