"""The trio shell around ``PeerConnection``: dial/listen, timeouts, keepalive, bounded buffers.

The pure connection never blocks; this module owns every await. Shape (h11's trio example):
timeouts wrap the protocol calls, never live inside them.

- ``PeerSession`` drives one connection over one stream. A writer task sends queued frames in
  batches (one ``send_all`` per batch: many small Cascade frames per syscall); a receiver task
  reads the stream and a dispatcher feeds what it read to the connection and puts the
  connection's events on a bounded channel; a keepalive task pings when the link is idle.
  Frames are produced by calling a method of the connection only when there is room in the
  send queue (``await session.send(lambda c: c.send_data(...))``), so frame order always equals
  sequence-number order and the queue stays bounded. An event that a send produces (the block
  closed last by this side is authenticated at once) wakes the dispatcher: it is delivered
  without waiting for the peer's next bytes.
- ``dial`` (Alice) retries with capped exponential backoff and jitter; ``serve`` (Bob) accepts.
- Files (certificates, keys, PSK) are read here, never in the pure core: ``load_psk_file``
  refuses a PSK readable by group or others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from qkdnode.channel.auth import CertificateCredentials, PskCredentials, Role
from qkdnode.channel.connection import (
    ConnectionLost,
    ConnectionState,
    Event,
    HandshakeComplete,
    NeedData,
    PeerClosed,
    PeerConnection,
    Rotated,
)
from qkdnode.channel.messages import CloseReason
from qkdnode.channel.revocation import parse_revocation_lists
from qkdnode.errors import (
    AuthenticationFailed,
    AuthKeyExhausted,
    CertificateRejected,
    ConfigError,
    ProtocolError,
    QkdError,
)
from qkdnode.node.loopsteps import unauthenticated_connection

log = structlog.get_logger("qkdnode.channel")

# Bob serves at most this many connections that have not completed their handshake
MAX_UNAUTHENTICATED_CONNECTIONS = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """Timeouts, buffers and backoff of the classical-channel shell (all times in seconds)."""

    host: str = "127.0.0.1"
    port: int = 0
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 15.0
    read_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    keepalive_interval_s: float = 10.0
    send_queue_frames: int = 256
    event_queue_events: int = 256
    receive_chunk_bytes: int = 1 << 16
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    backoff_jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.keepalive_interval_s >= self.read_timeout_s:
            raise ConfigError("channel.keepalive_interval_s", "less than read_timeout_s")
        if not 0 <= self.backoff_jitter < 1:
            raise ConfigError("channel.backoff_jitter", "a fraction in [0, 1)")
        if self.send_queue_frames < 1 or self.event_queue_events < 1:
            raise ConfigError("channel.send_queue_frames", "at least 1")


def backoff_delays(
    initial_s: float, max_s: float, jitter: float, uniform: Callable[[], float]
) -> Iterator[float]:
    """Capped exponential backoff with multiplicative jitter: initial * 2^n, capped, * (1 ± j)."""
    attempt = 0
    while True:
        base = min(max_s, initial_s * math.pow(2.0, min(attempt, 64)))
        yield base * (1.0 + jitter * (2.0 * uniform() - 1.0))
        attempt += 1


def close_reason_for(error: BaseException) -> CloseReason:
    if isinstance(error, CertificateRejected):
        return CloseReason.CERTIFICATE_REJECTED
    if isinstance(error, AuthenticationFailed):
        return CloseReason.AUTHENTICATION_FAILED
    if isinstance(error, AuthKeyExhausted):
        return CloseReason.AUTH_KEY_EXHAUSTED
    if isinstance(error, ProtocolError) and error.field == "ledger_deposit_digest":
        return CloseReason.LEDGER_MISMATCH
    if isinstance(error, trio.TooSlowError | TimeoutError):
        return CloseReason.TIMEOUT
    return CloseReason.PROTOCOL_ERROR


class PeerSession:
    """One authenticated session over one stream. Use via ``open_session``."""

    def __init__(
        self, stream: trio.abc.Stream, connection: PeerConnection, config: SessionConfig
    ) -> None:
        self.connection = connection
        self.config = config
        self._stream = stream
        self._queue: deque[bytes] = deque()
        self._queue_changed = trio.Event()
        self._room = trio.Event()
        self._events_in, self._events_out = trio.open_memory_channel[Event](
            config.event_queue_events
        )
        # bytes read from the stream, or None: events are queued in the connection. Unbuffered:
        # the receiver reads at most one chunk ahead of the dispatcher.
        self._incoming_in, self._incoming_out = trio.open_memory_channel[bytes | bytearray | None](
            0
        )
        self._last_receive_s = trio.current_time()
        self._last_send_s = trio.current_time()
        self._writing = False
        self._drained = trio.Event()
        self.handshake: HandshakeComplete | None = None

    def __repr__(self) -> str:
        return f"PeerSession({self.connection!r})"

    # ---- API ------------------------------------------------------------------------------
    async def send(self, produce: Callable[[PeerConnection], bytes]) -> None:
        """Wait for room in the send queue, then produce a frame with the connection and queue it.

        ``produce`` runs synchronously right before queueing, so frames are queued in sequence
        order even with several sending tasks.
        """
        while len(self._queue) >= self.config.send_queue_frames:
            # one event for every waiter: a new one only once the last was set
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
        self._enqueue(produce(self.connection))
        if self.connection.has_pending_events:
            self._wake_dispatcher()

    async def next_event(self) -> Event:
        """The next event from the peer (raises what the reader raised once the session ends)."""
        return await self._events_out.receive()

    async def events(self) -> AsyncIterator[Event]:
        async for event in self._events_out:
            yield event

    async def flush(self) -> None:
        """Wait until every queued frame has been written to the stream."""
        while self._queue or self._writing:
            self._drained = trio.Event()
            await self._drained.wait()

    # ---- tasks ----------------------------------------------------------------------------
    def _enqueue(self, frame: bytes) -> None:
        if frame:
            self._queue.append(frame)
            self._queue_changed.set()

    async def _writer(self) -> None:
        while True:
            if not self._queue:
                self._queue_changed = trio.Event()
                await self._queue_changed.wait()
            batch = b"".join(self._queue)
            self._queue.clear()
            self._room.set()
            self._writing = True
            with trio.fail_after(self.config.write_timeout_s):
                await self._stream.send_all(batch)
            self._writing = False
            self._last_send_s = trio.current_time()
            if not self._queue:
                self._drained.set()

    def _wake_dispatcher(self) -> None:
        # refused when the dispatcher is not waiting: it is then inside its loop and fetches
        # every queued event before it waits again (or it has ended with the session)
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            self._incoming_in.send_nowait(None)

    async def _receiver(self) -> None:
        """Read the stream and hand each chunk to the dispatcher (``b""``: the stream ended)."""
        while True:
            with trio.fail_after(self.config.read_timeout_s):
                data = await self._stream.receive_some(self.config.receive_chunk_bytes)
            self._last_receive_s = trio.current_time()
            await self._incoming_in.send(data)
            if not data:
                return

    async def _dispatcher(self) -> None:
        """Feed received bytes to the connection and deliver its events, in order."""
        conn = self.connection
        while True:
            data = await self._incoming_out.receive()
            if data is not None:
                conn.receive_data(data)
            while True:
                event = conn.next_event(now_s=_wall_clock_s())
                reply = conn.data_to_send()
                self._enqueue(reply)
                if isinstance(event, NeedData):
                    break
                _log_event(conn, event)
                await self._events_in.send(event)
                if isinstance(event, PeerClosed | ConnectionLost):
                    await self._events_in.aclose()
                    return

    async def _keepalive(self) -> None:
        nonce = 0
        while True:
            await trio.sleep(self.config.keepalive_interval_s / 2)
            idle_s = trio.current_time() - max(self._last_send_s, self._last_receive_s)
            if (
                idle_s >= self.config.keepalive_interval_s
                and self.connection.state is ConnectionState.ESTABLISHED
            ):
                nonce += 1
                await self.send(_pinger(nonce))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                nursery.start_soon(self._receiver)
                task_status.started()
                await self._dispatcher()
                nursery.cancel_scope.cancel()
        except* (QkdError, trio.TooSlowError, trio.BrokenResourceError) as group:
            error = group.exceptions[0]
            await self._abort(error)
            log.warning(
                "channel.session_failed",
                role=self.connection.role.value,
                error=type(error).__name__,
                detail=str(error),
            )
            raise
        finally:
            await self._events_in.aclose()

    async def _abort(self, error: BaseException) -> None:
        """Best effort: tell the peer why, then close the stream."""
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            try:
                # after a write cut short by cancellation the stream is mid-frame: say nothing
                if not self._writing:
                    frame = self.connection.close(close_reason_for(error), type(error).__name__)
                    await self._stream.send_all(frame)
            except (QkdError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            await self._stream.aclose()


# What ends one session (its stream, its peer, its protocol) but not the node: the loops log it
# and dial or listen again. Anything else is a bug and ends the daemon.
_SESSION_ENDINGS = (
    QkdError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)


def _describe_errors(group: BaseExceptionGroup[BaseException]) -> list[str]:
    """The leaf errors of a group as 'Type: message' (messages never carry secrets)."""
    leaves: list[str] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(f"{type(error).__name__}: {error}"[:300])

    walk(group)
    return leaves


def _wall_clock_s() -> float:
    return time.time()


def _pinger(nonce: int) -> Callable[[PeerConnection], bytes]:
    return lambda connection: connection.ping(nonce)


def _log_event(conn: PeerConnection, event: Event) -> None:
    if isinstance(event, HandshakeComplete):
        log.info(
            "channel.session_established",
            role=conn.role.value,
            mode=event.mode.value,
            session_id=event.session_id.hex(),
        )
    elif isinstance(event, Rotated):
        log.info("channel.rotated", role=conn.role.value, mode=event.mode.value)
    elif isinstance(event, PeerClosed):
        log.info("channel.peer_closed", reason=event.reason.value, detail=event.detail)


@asynccontextmanager
async def open_session(
    stream: trio.abc.Stream, connection: PeerConnection, config: SessionConfig
) -> AsyncIterator[PeerSession]:
    """Run a session over ``stream``; Alice's side sends the Hello. Waits for the handshake.

    On exit the session is closed (a Close frame, then the stream). Errors of the session
    (``ProtocolError``, ``AuthenticationFailed``, timeouts...) propagate from the context.
    """
    session = PeerSession(stream, connection, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        if connection.role is Role.ALICE:
            await session.send(lambda c: c.start_handshake())
        with trio.fail_after(config.handshake_timeout_s):
            try:
                first = await session.next_event()
            except trio.EndOfChannel:
                # the reader refused the first frames and ended the session
                raise ProtocolError("session ended before the handshake", field="stream") from None
        if not isinstance(first, HandshakeComplete):
            raise ProtocolError(f"session ended before the handshake ({type(first).__name__})")
        session.handshake = first
        try:
            yield session
            if connection.state is ConnectionState.ESTABLISHED:
                await session.send(lambda c: c.close(CloseReason.NORMAL))
                await session.flush()
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def dial(
    host: str,
    port: int,
    config: SessionConfig,
    *,
    uniform: Callable[[], float] = random.random,
) -> trio.SocketStream:
    """Alice: connect, retrying with capped exponential backoff and jitter."""
    delays = backoff_delays(
        config.backoff_initial_s, config.backoff_max_s, config.backoff_jitter, uniform
    )
    attempt = 0
    while True:
        attempt += 1
        try:
            with trio.fail_after(config.connect_timeout_s):
                stream = await trio.open_tcp_stream(host, port)
            stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            return stream
        except (OSError, trio.TooSlowError) as exc:
            delay_s = next(delays)
            log.info(
                "channel.dial_retry", attempt=attempt, delay_s=round(delay_s, 3), error=str(exc)
            )
            await trio.sleep(delay_s)


async def run_alice(
    config: SessionConfig,
    make_connection: Callable[[], PeerConnection],
    handle: Callable[[PeerSession], Awaitable[None]],
    *,
    uniform: Callable[[], float] = random.random,
    on_failure: Callable[[BaseExceptionGroup[BaseException]], None] = lambda _: None,
) -> None:
    """Alice's loop: dial, run a session with ``handle``, on failure back off and redial.

    ``SecurityError``s are logged and retried like link failures (the peer or an attacker may
    be at fault); ``handle`` returning normally ends the loop. ``on_failure`` sees the errors
    of every session that ended with one (the audit trail records the security failures).
    """
    delays = backoff_delays(
        config.backoff_initial_s, config.backoff_max_s, config.backoff_jitter, uniform
    )
    while True:
        stream = await dial(config.host, config.port, config, uniform=uniform)
        started_s = trio.current_time()
        try:
            async with open_session(stream, make_connection(), config) as session:
                await handle(session)
            return
        except* _SESSION_ENDINGS as group:
            log.warning("channel.session_retry", errors=_describe_errors(group))
            on_failure(group)
        if trio.current_time() - started_s >= config.backoff_max_s:
            # a session that lived longer than the longest backoff was healthy: retry fast;
            # sessions that keep failing early (each costs handshake key) back off further
            delays = backoff_delays(
                config.backoff_initial_s, config.backoff_max_s, config.backoff_jitter, uniform
            )
        await trio.sleep(next(delays))


async def serve_bob(
    config: SessionConfig,
    make_connection: Callable[[], PeerConnection],
    handle: Callable[[PeerSession], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    on_failure: Callable[[BaseExceptionGroup[BaseException]], None] = lambda _: None,
) -> None:
    """Bob: listen and run one session per accepted connection (errors end that session only;
    ``on_failure`` sees them, as in ``run_alice``)."""

    handshakes = trio.Semaphore(MAX_UNAUTHENTICATED_CONNECTIONS)

    async def on_stream(stream: trio.SocketStream) -> None:
        mark = unauthenticated_connection()
        # small frames each turn: never held back for coalescing (as on Alice's side)
        stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        if handshakes.value == 0:
            # every handshake slot is taken by connections not yet authenticated: refuse
            log.warning("channel.connection_refused", reason="too many unauthenticated")
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        handshakes.acquire_nowait()
        held = True

        def authenticated() -> None:
            nonlocal held
            mark.authenticated()
            if held:
                held = False
                handshakes.release()

        try:
            async with open_session(stream, make_connection(), config) as session:
                authenticated()
                await handle(session)
        except* _SESSION_ENDINGS as group:
            log.warning("channel.session_ended", errors=_describe_errors(group))
            on_failure(group)
        finally:
            authenticated()

    await trio.serve_tcp(on_stream, config.port, host=config.host, task_status=task_status)


# ---- files (shell only) ---------------------------------------------------------------------


def load_psk_file(path: str | os.PathLike[str]) -> PskCredentials:
    """Read a PSK file; ``ConfigError`` if it is readable by group or others, or too short."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError("channel.psk_file", f"a readable file ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            "channel.psk_file",
            "permissions 0600 or stricter (no group/other access)",
            file=str(path),
        )
    data = path.read_bytes().strip()
    try:
        psk = bytes.fromhex(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        psk = data
    try:
        return PskCredentials(psk=psk)
    except ValueError:
        raise ConfigError("channel.psk_file", "at least 32 bytes of key", file=str(path)) from None


def load_certificate_credentials(
    *,
    certificate_file: str,
    key_file: str,
    ca_file: str,
    peer_name: str,
    crl_file: str | None = None,
    now_s: float | None = None,
) -> CertificateCredentials:
    """Load a PEM chain (leaf first), its private key (Ed25519 or ML-DSA-65), the CA and, with
    ``crl_file``, the CRLs the peer's chain is checked against (current at ``now_s``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

    chain = tuple(x509.load_pem_x509_certificates(Path(certificate_file).read_bytes()))
    anchor = x509.load_pem_x509_certificate(Path(ca_file).read_bytes())
    key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey):
        raise ConfigError("channel.key_file", "an Ed25519 or ML-DSA-65 private key", file=key_file)
    credentials = CertificateCredentials(
        certificate_chain=chain, private_key=key, trust_anchor=anchor, peer_name=peer_name
    )
    if crl_file is None:
        return credentials
    return with_revocation_lists(
        credentials, crl_file, now_s=time.time() if now_s is None else now_s
    )


def with_revocation_lists(
    credentials: CertificateCredentials, crl_file: str, *, now_s: float
) -> CertificateCredentials:
    """``credentials`` checking the peer against the CRLs of ``crl_file`` (read now);
    ``ConfigError`` naming ``auth.crl_file`` if they do not load."""
    try:
        data = Path(crl_file).read_bytes()
    except OSError as exc:
        raise ConfigError(
            "auth.crl_file", f"a readable file ({crl_file}: {exc.strerror})"
        ) from None
    lists = parse_revocation_lists(
        data,
        ca_certificates=(credentials.trust_anchor,),
        now_s=now_s,
        source=crl_file,
        key="auth.crl_file",
    )
    return dataclasses.replace(credentials, revocation=lists)
