"""A man-in-the-middle proxy on the classical channel (trio), frame-aware.

Alice connects to the proxy, the proxy connects to Bob. Each direction is cut into frames with
the channel's length prefix (``qkdnode.channel.framing``: ``u32 length | type u8 | seq u64 |
block u64 | payload | tag``) and every frame passes through the rules: the first armed rule that
matches a frame acts on it (flip a byte, drop, duplicate, hold back behind the next frame,
truncate and cut the stream, delay, replace by a recorded frame, inject junk, or forward it and
reset the TCP connection on both sides). Rules fire a set number of times. The proxy keeps a
journal of what it did and of every connection's end, so a test can check that each tampering
ended the session.

``ProxyThread`` runs the proxy in a background thread (the daemons are processes; the tests are
plain synchronous code that sleeps and polls).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import msgpack
import trio

from qkdnode.channel.framing import HEADER_BYTES, LENGTH_BYTES

Direction = Literal["a2b", "b2a"]
Action = Literal[
    "flip",
    "drop",
    "duplicate",
    "reorder",
    "truncate",
    "delay",
    "replay",
    "inject",
    "reset",
    "pass",
]

# frame type codes (qkdnode.channel.messages)
CODES = {
    "hello": 1,
    "hello_reply": 2,
    "finish": 3,
    "data": 10,
    "block_open": 11,
    "block_close": 12,
    "control": 13,
    "rotation_announce": 20,
    "rotation_ack": 21,
    "ping": 30,
    "pong": 31,
    "close": 40,
}
NAMES = {code: name for name, code in CODES.items()}
_HEADER = struct.Struct(">BQQ")
_LINGER_0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
RESET_GRACE_S = 0.05  # after the last frame of a reset: the peer reads it, nothing else passes


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame seen by the proxy (bytes include the length prefix)."""

    connection: int
    direction: Direction
    index: int  # position of the frame in its direction on its connection
    code: int
    seq: int
    block: int
    raw: bytes

    @property
    def name(self) -> str:
        return NAMES.get(self.code, f"code{self.code}")

    def control(self) -> tuple[str, dict[str, object]] | None:
        """(kind, body) of a tagged Control frame (payloads are authenticated, not secret)."""
        if self.code != CODES["control"]:
            return None
        try:
            value = msgpack.unpackb(self.raw[LENGTH_BYTES + HEADER_BYTES : -32], raw=False)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        return str(value.get("kind")), dict(value.get("body") or {})


@dataclass(slots=True)
class Rule:
    """Act on frames that match; ``times`` is how often the rule may still fire."""

    action: Action
    direction: Direction | None = None
    code: int | None = None
    connection: int | None = None  # only on this connection number
    min_index: int = 0
    offset: int = 0  # byte to flip (negative: from the end); bytes kept by truncate
    xor: int = 0x01
    delay_s: float = 0.0
    payload: bytes = b""  # replay / inject: the bytes sent instead of (replay) or before
    times: int = 1
    predicate: Callable[[Frame], bool] | None = None

    def matches(self, frame: Frame) -> bool:
        return (
            self.times > 0
            and (self.direction is None or frame.direction == self.direction)
            and (self.code is None or frame.code == self.code)
            and (self.connection is None or frame.connection == self.connection)
            and frame.index >= self.min_index
            and (self.predicate is None or self.predicate(frame))
        )


@dataclass(frozen=True, slots=True)
class Tampering:
    """What the proxy did to one frame, and when (monotonic seconds)."""

    frame: Frame
    action: Action
    offset: int
    at_s: float


@dataclass(frozen=True, slots=True)
class ConnectionEnd:
    connection: int
    at_s: float
    frames: dict[str, int]


@dataclass(slots=True)
class Journal:
    tamperings: list[Tampering] = field(default_factory=list)
    ends: list[ConnectionEnd] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)  # bounded recording for replays
    connections: int = 0
    record_limit: int = 50_000


class MitmProxy:
    """Listens on 127.0.0.1 (port 0 = any), forwards to ``upstream_port`` frame by frame."""

    def __init__(self, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream_port = upstream_port
        self.host = host
        self.port = 0
        self.rules: list[Rule] = []
        self.journal = Journal()
        self.lock = threading.Lock()
        self.open_connections = 0
        # connections whose sockets are closed with RST (SO_LINGER 0) rather than FIN
        self._resetting: set[int] = set()

    # ---- control (thread-safe) -------------------------------------------------------------
    def add(self, *rules: Rule) -> None:
        with self.lock:
            self.rules.extend(rules)

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def armed(self) -> int:
        with self.lock:
            return sum(rule.times for rule in self.rules)

    def tamperings(self) -> list[Tampering]:
        with self.lock:
            return list(self.journal.tamperings)

    def ends(self) -> list[ConnectionEnd]:
        with self.lock:
            return list(self.journal.ends)

    def recorded(self) -> list[Frame]:
        with self.lock:
            return list(self.journal.frames)

    # ---- serving ---------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        with self.lock:
            self.journal.connections += 1
            number = self.journal.connections
            self.open_connections += 1
        counts: dict[str, int] = {"a2b": 0, "b2a": 0}
        try:
            upstream = await trio.open_tcp_stream(self.host, self.upstream_port)
        except OSError:
            await downstream.aclose()
            with self.lock:
                self.open_connections -= 1
            return
        try:
            async with trio.open_nursery() as nursery:
                cancel = nursery.cancel_scope
                nursery.start_soon(self._pump, number, "a2b", downstream, upstream, counts, cancel)
                nursery.start_soon(self._pump, number, "b2a", upstream, downstream, counts, cancel)
        finally:
            with self.lock:
                reset = number in self._resetting
                self._resetting.discard(number)
            if reset:
                for stream in (downstream, upstream):
                    with contextlib.suppress(OSError):
                        stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, _LINGER_0)
            with trio.CancelScope(shield=True):
                await downstream.aclose()
                await upstream.aclose()
            with self.lock:
                self.open_connections -= 1
                self.journal.ends.append(ConnectionEnd(number, time.monotonic(), dict(counts)))

    async def _pump(
        self,
        number: int,
        direction: Direction,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        counts: dict[str, int],
        cancel: trio.CancelScope,
    ) -> None:
        buffer = bytearray()
        held: bytes | None = None
        try:
            while True:
                data = await source.receive_some(1 << 16)
                if not data:
                    break
                buffer += data
                while len(buffer) >= LENGTH_BYTES + HEADER_BYTES:
                    (length,) = struct.unpack_from(">I", buffer, 0)
                    if length < HEADER_BYTES or length > (1 << 27):
                        # not a frame boundary any more (an earlier flip): forward raw bytes
                        await sink.send_all(bytes(buffer))
                        buffer.clear()
                        break
                    end = LENGTH_BYTES + length
                    if len(buffer) < end:
                        break
                    raw = bytes(buffer[:end])
                    del buffer[:end]
                    code, seq, block = _HEADER.unpack_from(raw, LENGTH_BYTES)
                    frame = Frame(number, direction, counts[direction], code, seq, block, raw)
                    counts[direction] += 1
                    with self.lock:
                        frozen = number in self._resetting
                    if frozen:
                        continue  # the other direction is resetting: nothing more passes
                    out, held, stop, delay_s = self._apply(frame, held)
                    if stop == "reset":
                        with self.lock:
                            self._resetting.add(number)
                    if delay_s and stop != "reset":
                        await trio.sleep(delay_s)  # the peer sees a stall in this direction
                    if out:
                        await sink.send_all(out)
                    if stop == "reset":
                        # let the peer read the frame before the RST reaches it
                        await trio.sleep(delay_s)
                    if stop:
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            cancel.cancel()

    def _apply(
        self, frame: Frame, held: bytes | None
    ) -> tuple[bytes, bytes | None, bool | Literal["reset"], float]:
        """(bytes to send now, frame held back for a reorder, cut the connection (``"reset"``:
        with RST on both sockets), delay)."""
        with self.lock:
            keep = frame.code != CODES["data"] or frame.index < 50
            if keep and len(self.journal.frames) < self.journal.record_limit:
                self.journal.frames.append(frame)
            rule = next((r for r in self.rules if r.matches(frame)), None)
            if rule is not None:
                rule.times -= 1
                self.journal.tamperings.append(
                    Tampering(frame, rule.action, rule.offset, time.monotonic())
                )
        raw = frame.raw
        prefix = held or b""
        if rule is None or rule.action == "pass":
            return prefix + raw, None, False, 0.0
        action = rule.action
        if action == "flip":
            position = rule.offset % len(raw)
            flipped = bytearray(raw)
            flipped[position] ^= rule.xor or 0x01
            return prefix + bytes(flipped), None, False, 0.0
        if action == "drop":
            return prefix, None, False, 0.0
        if action == "duplicate":
            return prefix + raw + raw, None, False, 0.0
        if action == "reorder":
            return prefix, raw, False, 0.0  # sent after the next frame
        if action == "truncate":
            return prefix + raw[: max(0, min(rule.offset, len(raw) - 1))], None, True, 0.0
        if action == "reset":
            # the frame reaches its peer, then both TCP connections are reset: the boundary
            # just after this frame
            return prefix + raw, None, "reset", rule.delay_s or RESET_GRACE_S
        if action == "delay":
            return prefix + raw, None, False, rule.delay_s
        if action == "replay":
            return prefix + rule.payload, None, False, 0.0
        if action == "inject":
            return prefix + rule.payload + raw, None, False, 0.0
        raise AssertionError(action)


class ProxyThread:
    """Run a ``MitmProxy`` on its own trio loop in a daemon thread; ``stop()`` ends it."""

    def __init__(self, upstream_port: int) -> None:
        self.proxy = MitmProxy(upstream_port)
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._cancel = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.proxy.serve)
                    self._started.set()

        trio.run(main)

    def start(self) -> int:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("proxy did not start")
        return self.proxy.port

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None:
            cancel = self._cancel
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(cancel.cancel, trio_token=self._token)
        self._thread.join(timeout=10)
