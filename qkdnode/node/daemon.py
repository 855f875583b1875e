"""The node daemon: one visible nursery that runs the link, the peer session and the key store.

``run_daemon(config)`` is all of it:

- signals: SIGTERM/SIGINT start a graceful stop (bounded by ``GRACE_PERIOD_S``; the store is left
  consistent because every state change is one transaction), SIGHUP reopens the log file;
- systemd: ``READY=1`` once the peer listener (Bob) is bound or dialing started (Alice) and the
  store is open, ``STATUS=`` after each block, ``WATCHDOG=1`` from a liveness check, ``STOPPING=1``;
- the peer session: Alice dials (reconnecting with capped backoff), Bob listens; each session
  first resolves blocks left in limbo by a crash, then distils block after block.

The distillation of one block (Alice drives, Bob follows):

1. Alice opens the channel block; both take the block's records from the quantum link;
2. the post-processing roles exchange their turns inside the block;
3. both close the block: its transcript is authenticated both ways (Wegman–Carter in
   key-derived mode) before anything is stored;
4. two-phase commit over Control messages: Alice stages (durably) and proposes key IDs, Bob
   stages, then Alice and Bob commit. A block's keys are deliverable on neither side until both
   have staged it. After a crash the peers resolve limbo blocks at the next session start: a
   block committed on either side is committed on both; every other limbo block is dropped on
   both.
5. At commit the authentication-key pool takes its share of the key (``AuthKeyLedger.deposit``);
   the rest becomes consumer keys of ``store.key_size_bits`` each.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

import msgpack
import numpy as np
import structlog
import trio

from qkdnode.channel.auth import (
    BLOCK_DRAW_BITS,
    ROTATION_KEY_BITS,
    Credentials,
    Role,
)
from qkdnode.channel.connection import (
    BlockAuthenticated,
    BlockOpened,
    ChannelConfig,
    ConnectionLost,
    HandshakeComplete,
    PeerClosed,
    PeerConnection,
    PongReceived,
    PoolExhausted,
    Rotated,
)
from qkdnode.channel.ledger import AuthKeyLedger, LedgerState
from qkdnode.channel.messages import Control, Data, SessionMode
from qkdnode.config import NodeConfig
from qkdnode.delivery.keys import KeyManager, reservation_from_wire, reservation_to_wire
from qkdnode.delivery.server import DeliveryApp, serve_delivery
from qkdnode.errors import AuthKeyExhausted, KeyStoreError, LinkError, ProtocolError, QkdError
from qkdnode.link.interface import QuantumLink
from qkdnode.node.kinds import (
    block_message_from_wire,
    block_message_to_wire,
    make_registry,
    pack_ids,
    pack_uuids,
    unpack_ids,
    unpack_uuids,
)
from qkdnode.node.session import (
    PeerSession,
    SessionConfig,
    load_certificate_credentials,
    load_psk_file,
    run_alice,
    serve_bob,
)
from qkdnode.ops.metrics import NodeMetrics, serve_metrics
from qkdnode.ops.systemd import SystemdNotifier, watchdog_interval_s
from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.finitekey import DecoySettings, SecurityParameters
from qkdnode.postprocess.pipeline import (
    AliceBlock,
    BlockAbort,
    BlockKey,
    BlockMessage,
    BlockOutcome,
    BobBlock,
    PipelineParameters,
)
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords
from qkdnode.store import BlockState, KeyStore, StagedBlock
from qkdnode.store.keystore import DeliveryKey, ReservationRejected

log = structlog.get_logger("qkdnode.node")

GRACE_PERIOD_S: Final = 10.0
LINK_RETRY_S: Final = 1.0
RESERVATIONS_IN_FLIGHT: Final = 64  # peer reservations answered at once (Exchange.pump)


class SessionEnded(QkdError):
    """The peer closed the session or the stream ended; the session loop reconnects."""


class DaemonMustStop(Exception):
    """A condition after which the daemon must not carry on: a failed store write or fsync,
    or an exhausted authentication-key pool under ``auth.on_exhausted = "halt"``.

    Deliberately not a ``QkdError``: the session loops retry ``QkdError``s, never this.
    """


# ---- ledger persistence ---------------------------------------------------------------------


def ledger_state_to_bytes(state: LedgerState) -> bytes:
    """Serialise the ledger state for the key store (it holds pool key: store only)."""
    packed: bytes = msgpack.packb(
        {f.name: getattr(state, f.name) for f in fields(state)}, use_bin_type=True
    )
    return packed


def ledger_state_from_bytes(data: bytes) -> LedgerState:
    values = msgpack.unpackb(data, raw=False)
    if not isinstance(values, dict):
        raise KeyStoreError("authentication ledger state is corrupt")
    try:
        return LedgerState(**values)
    except TypeError as exc:
        raise KeyStoreError(f"authentication ledger state is corrupt ({exc})") from None


# ---- block statistics ------------------------------------------------------------------------


@dataclass(slots=True)
class NodeCounters:
    """What the node has done since start (public figures only)."""

    blocks_committed: int = 0
    blocks_aborted: int = 0
    secret_bits: int = 0
    mode: str = "none"


def _pipeline_parameters(config: NodeConfig, link: QuantumLink) -> PipelineParameters:
    pp = config.postprocess
    decoy = None
    if pp.security_model == "decoy":
        nominal = link.nominal_parameters()
        decoy = DecoySettings(
            mu_signal=nominal.mu_signal,
            mu_decoy=nominal.mu_decoy,
            mu_vacuum=nominal.mu_vacuum,
            p_signal=nominal.p_signal,
            p_decoy=nominal.p_decoy,
            p_vacuum=nominal.p_vacuum,
            p_key_basis=nominal.p_key_basis,
        )
    return PipelineParameters(
        cascade_variant=CascadeVariant.from_name(pp.cascade_variant),
        security=SecurityParameters(eps_sec=pp.eps_sec, eps_cor=pp.eps_cor),
        qber_threshold=pp.qber_threshold,
        sample_bits=pp.sample_bits,
        decoy=decoy,
    )


def _fresh_rng() -> np.random.Generator:
    # Alice's public randomness per block (sample positions, seeds, hash keys) comes from OS
    # entropy for every block, so no block's choices can be predicted from an earlier one.
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


def _bits_to_bytes(bits: np.ndarray[Any, np.dtype[np.uint8]]) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


# ---- the node ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Waiting:
    """A reservation request waiting for the peer's answer."""

    done: trio.Event
    error: Exception | None = None


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


class Node:
    """One node's state shared by its tasks: config, store, ledger, link, counters."""

    def __init__(self, config: NodeConfig, store: KeyStore, link: QuantumLink) -> None:
        self.config = config
        self.role = Role.ALICE if config.node.role == "alice" else Role.BOB
        self.store = store
        self.link = link
        self.params = _pipeline_parameters(config, link)
        self.registry = make_registry()
        self.counters = NodeCounters()
        self.notifier = SystemdNotifier()
        self.stopping = False
        self.in_block = False
        self.force_bootstrap = False
        self.ledger_reset_pending = False
        self._last_connection: tuple[PeerConnection, bool] | None = None
        # a failed store write can surface in any task (e.g. a ledger draw while a frame is
        # read): the store reports it here and the daemon stops
        self.store_failed = trio.Event()
        store.on_failure = self.store_failed.set
        self._block_start_s = self._records_s = time.monotonic()
        stored = store.load_auth_ledger()
        state = ledger_state_from_bytes(stored) if stored is not None else None
        self.ledger = AuthKeyLedger(
            target_bits=config.auth.pool_target_bits,
            reserve_bits=config.auth.pool_reserve_bits,
            state=state,
            observer=lambda _draw: self._persist_ledger(),
        )
        self.credentials = self._load_credentials()
        self.metrics = NodeMetrics(
            node=config.node.name,
            peer=config.peer.name,
            role=config.node.role,
            pool_target_bits=config.auth.pool_target_bits,
            pool_reserve_bits=config.auth.pool_reserve_bits,
            saes=(*config.delivery.local_saes, *config.delivery.peer_saes)
            if config.delivery is not None
            else (),
        )
        self.metrics.add_refresher(lambda m: m.set_store_counts(self.store.counts()))
        self.metrics.add_refresher(
            lambda m: m.set_auth_pool(
                level_bits=self.ledger.level_bits, consumed_bits=self.ledger.consumed_bits
            )
        )
        self.metrics.add_refresher(lambda m: m.set_link_status(self.link.status()))
        self.blocks: BlockSource = (
            SerialBlocks(link, config.postprocess.block_pulses)
            if config.link_backend == "serial"
            else SimulatedBlocks(link, config.postprocess.block_pulses)
        )
        self.exchange: Exchange | None = None
        self._reservations: dict[int, _Waiting] = {}
        self._next_request_id = 0
        self.manager: KeyManager | None = None
        if config.delivery is not None:
            self.manager = KeyManager(
                store,
                master_parity=config.delivery.master_parity,
                peer_reserve=self.peer_reserve,
                peer_timeout_s=config.delivery.peer_timeout_s,
                local_saes=config.delivery.local_saes,
                peer_saes=config.delivery.peer_saes,
                prebind_keys=config.delivery.prebind_keys,
                prebind_size_bits=config.delivery.limits.key_size_bits,
            )

    # ---- set-up ---------------------------------------------------------------------------
    def _load_credentials(self) -> Credentials:
        auth = self.config.auth
        if auth.mode == "psk":
            assert auth.psk_file is not None
            return load_psk_file(auth.psk_file)
        assert auth.certificate_file and auth.private_key_file and auth.ca_file
        return load_certificate_credentials(
            certificate_file=str(auth.certificate_file),
            key_file=str(auth.private_key_file),
            ca_file=str(auth.ca_file),
            peer_name=self.config.peer.name,
        )

    def session_config(self) -> SessionConfig:
        peer = self.config.peer
        address = peer.connect if peer.connect is not None else peer.listen
        assert address is not None
        return SessionConfig(
            host=address[0],
            port=address[1],
            connect_timeout_s=peer.connect_timeout_s,
            read_timeout_s=peer.io_timeout_s,
            write_timeout_s=peer.io_timeout_s,
            keepalive_interval_s=min(peer.keepalive_interval_s, peer.io_timeout_s / 2),
            backoff_max_s=peer.reconnect_max_delay_s,
        )

    def make_connection(self) -> PeerConnection:
        """A new connection. If the last one tried key-derived authentication and never got
        through the handshake (the peer's ledger was rolled back, lost or diverged), follow
        ``auth.on_exhausted``: ``rebootstrap`` authenticates the next session with the bootstrap
        credentials, where both sides reset their ledgers; ``halt`` keeps trying and says so
        loudly, for an operator to act."""
        last = self._last_connection
        if last is not None and last[1] and last[0].mode is None:
            if self.config.auth.on_exhausted == "rebootstrap":
                log.error("auth.rebootstrap", reason="key-derived handshake failed")
                self.force_bootstrap = True
                self.ledger_reset_pending = True
            else:
                log.critical(
                    "auth.key_derived_refused",
                    detail="the peer refused key-derived authentication; on_exhausted = halt",
                )
        connection = self._new_connection()
        attempts_key_derived = (
            self.role is Role.ALICE and self.ledger.active and not self.force_bootstrap
        )
        self._last_connection = (connection, attempts_key_derived)
        return connection

    def _new_connection(self) -> PeerConnection:
        return PeerConnection(
            self.role,
            credentials=self.credentials,
            registry=self.registry,
            ledger=self.ledger,
            config=ChannelConfig(
                max_frame_bytes=self.config.peer.max_frame_bytes,
                on_exhausted=self.config.auth.on_exhausted,
            ),
            force_bootstrap=self.force_bootstrap,
        )

    # ---- delivery: reservations with the peer node ----------------------------------------
    async def peer_reserve(
        self, keys: Sequence[DeliveryKey], master_sae: str, slave_sae: str
    ) -> None:
        """Have the peer node durably record that ``keys`` belong to (master, slave)."""
        exchange = self.exchange
        if exchange is None:
            raise SessionEnded("no session with the peer node")
        self._next_request_id += 1
        request_id = self._next_request_id
        done = trio.Event()
        self._reservations[request_id] = _Waiting(done)
        try:
            wire = msgpack.packb(
                reservation_to_wire(keys, master_sae, slave_sae), use_bin_type=True
            )
            await exchange.send_control("reserve", {"request_id": request_id, "reservation": wire})
            await done.wait()
            waiting = self._reservations[request_id]
        finally:
            self._reservations.pop(request_id, None)
        if waiting.error is not None:
            raise waiting.error

    async def on_reserve(self, exchange: Exchange, event: Control) -> None:
        request_id = event.body["request_id"]
        assert isinstance(request_id, int)
        burned: list[uuid.UUID] = []
        try:
            message = msgpack.unpackb(_bytes(event.body["reservation"]), raw=False)
            if not isinstance(message, dict):
                raise ProtocolError("must be a map", field="reservation")
            keys, master_sae, slave_sae = reservation_from_wire(message)
            if self.manager is None:
                raise ProtocolError("key delivery is not configured here", field="reservation")
            await self.manager.record_peer_reservation(keys, master_sae, slave_sae)
            ok, detail = True, ""
        except ReservationRejected as exc:
            ok, detail, burned = False, str(exc), list(exc.burned_key_ids)
        except (ProtocolError, ValueError) as exc:
            ok, detail = False, str(exc)
        if not ok:
            log.warning("delivery.reservation_refused", detail=detail)
        await exchange.send_control(
            "reserve_result",
            {
                "request_id": request_id,
                "ok": ok,
                "detail": detail.encode()[:512],
                "burned_key_ids": pack_uuids(burned),
            },
        )

    def on_reserve_result(self, event: Control) -> None:
        waiting = self._reservations.get(_int(event.body["request_id"]))
        if waiting is None:
            return  # the requester gave up (timeout); its keys were released
        if not event.body["ok"]:
            burned = unpack_uuids(_bytes(event.body["burned_key_ids"]), field="burned_key_ids")
            detail = _bytes(event.body["detail"]).decode("utf-8", "replace")
            waiting.error = ReservationRejected(detail, burned_key_ids=burned)
        waiting.done.set()

    def fail_reservations(self, reason: str) -> None:
        for waiting in self._reservations.values():
            waiting.error = SessionEnded(reason)
            waiting.done.set()

    def _persist_ledger(self) -> None:
        # Write-ahead: a drawn one-time key is durable as spent before it is used.
        self.store.save_auth_ledger(ledger_state_to_bytes(self.ledger.state))

    # ---- the quantum link ----------------------------------------------------------------
    async def reset_link(self) -> None:
        await self.blocks.reset()

    # ---- progress -------------------------------------------------------------------------
    def block_started(self) -> None:
        self._block_start_s = self._records_s = time.monotonic()

    def records_taken(self) -> None:
        self._records_s = time.monotonic()

    def block_done(
        self,
        block_id: int,
        outcome: BlockOutcome,
        auth: BlockAuthenticated,
        *,
        keys: int,
        pool_bytes: int,
    ) -> None:
        now = time.monotonic()
        # the authentication budget of the block: bits drawn from the pool (0 while the session
        # is bootstrap-authenticated), frames tagged, and the accumulated forgery bound
        budget = {
            "auth_mode": auth.mode.value,
            "auth_bits_spent": auth.auth_bits_spent,
            "frames_tagged": auth.frames_sent + auth.frames_received,
            "forgery_bound_total": auth.forgery_bound_total,
            "tags_issued": self.ledger.tags_issued,
        }
        # wall time waiting for the link's records, and the post-processing exchange after it
        link_s = round(self._records_s - self._block_start_s, 3)
        postprocess_s = round(now - self._records_s, 3)
        if isinstance(outcome, BlockAborted):
            self.counters.blocks_aborted += 1
            self.metrics.block_aborted(outcome.reason.value)
            log.info(
                "block.aborted",
                block=block_id,
                reason=outcome.reason.value,
                detail=outcome.detail,
                mode=self.counters.mode,
                link_s=link_s,
                postprocess_s=postprocess_s,
                **budget,
            )
        else:
            stats = outcome.statistics
            secret = keys * self.config.store.key_size_bits
            self.counters.blocks_committed += 1
            self.counters.secret_bits += secret
            efficiency = stats.reconciliation_efficiency
            self.metrics.block_committed(
                qber=stats.qber,
                sifted_bits=stats.sifted_key_bits,
                leak_bits=stats.reconciliation_bits + stats.verification_bits,
                reconciliation_efficiency=efficiency,
                secret_bits=secret,
                pool_level_bits=self.ledger.level_bits,
                mode=self.counters.mode,
            )
            log.info(
                "block.committed",
                block=block_id,
                mode=self.counters.mode,
                pulses=stats.pulse_count,
                detections=stats.detections,
                sifted_bits=stats.sifted_key_bits,
                qber=round(stats.qber, 6),
                test_qber=round(stats.test_qber, 6),
                reconciliation_efficiency=None if math.isnan(efficiency) else round(efficiency, 4),
                leak_bits=stats.reconciliation_bits + stats.verification_bits,
                round_trips=stats.round_trips,
                final_key_bits=stats.final_key_bits,
                secret_bits=secret,
                auth_pool_taken_bits=pool_bytes * 8,
                pool_level_bits=self.ledger.level_bits,
                keys=keys,
                key_counts=list(stats.key_counts),
                test_counts=list(stats.test_counts),
                test_errors=list(stats.test_errors_per_intensity),
                reconciled_bits=stats.reconciled_bits,
                errors_corrected=stats.errors_corrected,
                link_s=link_s,
                postprocess_s=postprocess_s,
                **budget,
            )
        self.notifier.status(
            f"{self.counters.blocks_committed} blocks committed, "
            f"{self.counters.blocks_aborted} aborted, {self.counters.secret_bits} secret bits, "
            f"auth {self.counters.mode}"
        )


# ---- block sources: how each side takes the records of the next block ---------------------------


class BlockSource:
    """The link seen block by block. Alice takes a block and announces its first pulse index in
    the channel block; Bob takes the block with that index, or ``None`` when his side does not
    have those pulses (the block is then aborted on both sides)."""

    async def start(self, nursery: trio.Nursery) -> None:
        """Start background work that lives as long as the daemon."""

    async def reset(self) -> None:
        """A new session starts."""

    async def alice_block(self) -> EmissionRecords:
        raise NotImplementedError

    async def bob_prefetch(self) -> None:
        """Bob, as soon as a block opens (before Alice's announcement arrives)."""

    async def bob_block(self, first_pulse_index: int) -> DetectionRecords | None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release the link."""


class SimulatedBlocks(BlockSource):
    """The simulated link: Alice's source emits a block when asked, over a fibre connection that
    is renewed at every session (so no pulses of a broken session's block can be taken for the
    next one). Bob must read the fibre before Alice's announcement, or her source would wait."""

    def __init__(self, link: QuantumLink, pulse_count: int) -> None:
        self._link = link
        self._pulse_count = pulse_count
        self._open = False
        self._prefetched: DetectionRecords | None = None

    async def _records(self) -> EmissionRecords | DetectionRecords:
        if not self._open:
            await self._link.open()
            self._open = True
            log.info("link.opened", backend="simulated")
        try:
            return await self._link.next_block(self._pulse_count)
        except LinkError as exc:
            log.warning("link.failed", error=str(exc), error_type=type(exc).__name__)
            await self.reset()
            raise

    async def reset(self) -> None:
        self._prefetched = None
        if self._open:
            self._open = False
            with trio.CancelScope(shield=True):
                await self._link.aclose()

    async def alice_block(self) -> EmissionRecords:
        records = await self._records()
        assert isinstance(records, EmissionRecords)
        return records

    async def bob_prefetch(self) -> None:
        records = await self._records()
        assert isinstance(records, DetectionRecords)
        self._prefetched = records

    async def bob_block(self, first_pulse_index: int) -> DetectionRecords | None:
        records, self._prefetched = self._prefetched, None
        if records is None or records.first_pulse_index != first_pulse_index:
            return None
        return records

    async def aclose(self) -> None:
        await self.reset()


class SerialBlocks(BlockSource):
    """A serial device: read continuously for the daemon's life (a device must never wait for
    its host), blocks paired by pulse index; the driver reconnects by itself after a gap."""

    def __init__(self, link: QuantumLink, pulse_count: int) -> None:
        from qkdnode.link.serial import BlockReader, SerialLink

        assert isinstance(link, SerialLink)
        self._link = link
        self._reader = BlockReader(link, pulse_count)

    async def start(self, nursery: trio.Nursery) -> None:
        await self._link.open()
        log.info("link.opened", backend="serial", device=str(self._link.identity))
        await nursery.start(self._reader.run)

    async def alice_block(self) -> EmissionRecords:
        records = await self._reader.take()
        assert isinstance(records, EmissionRecords)
        return records

    async def bob_block(self, first_pulse_index: int) -> DetectionRecords | None:
        records = await self._reader.take(first_pulse_index)
        assert records is None or isinstance(records, DetectionRecords)
        return records

    async def aclose(self) -> None:
        await self._link.aclose()


# ---- the session: turns, sync, commit ----------------------------------------------------------


class Exchange:
    """Drives one authenticated session: events in, frames out, for one node.

    A pump task reads the session's events: delivery reservations are answered at once (a
    consumer must not wait for a block to finish); everything else queues for the distillation
    loop, which reads it through :meth:`next_event`.
    """

    def __init__(self, node: Node, session: PeerSession) -> None:
        self.node = node
        self.session = session
        self.connection = session.connection
        self._queue_in, self._queue = trio.open_memory_channel[object](math.inf)

    async def pump(self, handlers: trio.Nursery | None = None) -> None:
        """Read the session's events. With ``handlers`` (the session's nursery) reservations are
        answered by concurrent tasks there, at most RESERVATIONS_IN_FLIGHT at once, so that the
        peer's concurrent enc_keys share store commits here (group commit); without, in turn."""
        slots = trio.Semaphore(RESERVATIONS_IN_FLIGHT)

        async def answer(event: Control) -> None:
            try:
                await self.node.on_reserve(self, event)
            finally:
                slots.release()

        async with self._queue_in:
            while True:
                try:
                    event = await self.session.next_event()
                except trio.EndOfChannel:
                    raise SessionEnded("the session's event stream ended") from None
                if isinstance(event, Control) and event.kind == "reserve":
                    if handlers is None:
                        await self.node.on_reserve(self, event)
                    else:
                        await slots.acquire()
                        handlers.start_soon(answer, event)
                elif isinstance(event, Control) and event.kind == "reserve_result":
                    self.node.on_reserve_result(event)
                else:
                    await self._queue_in.send(event)

    # ---- events ---------------------------------------------------------------------------
    async def next_event(self, *, return_rotated: bool = False) -> object:
        """The next application event; keepalives are skipped, session ends raise."""
        while True:
            try:
                event = await self._queue.receive()
            except trio.EndOfChannel:  # the pump stopped: the session is over
                raise SessionEnded("the session's event stream ended") from None
            if isinstance(event, PongReceived | HandshakeComplete):
                continue
            if isinstance(event, Rotated):
                self.node.counters.mode = event.mode.value
                self.node.metrics.set_mode(event.mode.value)
                log.info("auth.mode", mode=event.mode.value, reason="rotated")
                if return_rotated:
                    return event
                continue
            if isinstance(event, PeerClosed):
                raise SessionEnded(f"peer closed the session: {event.reason.value} {event.detail}")
            if isinstance(event, ConnectionLost):
                raise SessionEnded("connection lost")
            if isinstance(event, PoolExhausted):
                self._on_exhausted(event)
                continue
            return event

    def _on_exhausted(self, event: PoolExhausted) -> None:
        log.error(
            "auth.pool_exhausted",
            policy=event.policy,
            pool_level_bits=event.level_bits,
            needed_bits=event.needed_bits,
        )
        if event.policy == "halt":
            raise DaemonMustStop("authentication-key pool exhausted and auth.on_exhausted = 'halt'")
        # the next sessions authenticate with the bootstrap credentials until a committed block
        # has refilled the pool; key-derived sessions would only dig into the reserve
        self.node.force_bootstrap = True
        raise SessionEnded("authentication-key pool exhausted: re-bootstrapping the session")

    async def expect_control(self, kind: str) -> Control:
        event = await self.next_event()
        if not isinstance(event, Control) or event.kind != kind:
            raise ProtocolError(f"expected control {kind!r}, got {_describe(event)}", field="kind")
        return event

    async def send_control(self, kind: str, body: dict[str, int | float | bool | bytes]) -> None:
        await self.session.send(lambda c: c.send_control(kind, body))

    # ---- block turns ----------------------------------------------------------------------
    async def send_turn(self, block_id: int, messages: list[BlockMessage]) -> None:
        await self.session.send(
            lambda c: c.send_data(block_id, "turn", {"messages": len(messages)})
        )
        for message in messages:
            kind, body = block_message_to_wire(message)
            await self.session.send(_data_frame(block_id, kind, body))

    async def receive_turn(self, block_id: int) -> list[BlockMessage]:
        header = await self.next_data(block_id)
        if header.kind != "turn":
            raise ProtocolError("a turn must start with its header", field="kind")
        count = header.body["messages"]
        assert isinstance(count, int)
        messages = []
        for _ in range(count):
            data = await self.next_data(block_id)
            messages.append(block_message_from_wire(data.kind, data.body))
        return messages

    async def next_data(self, block_id: int) -> Data:
        event = await self.next_event()
        if not isinstance(event, Data) or event.block_id != block_id:
            raise ProtocolError(
                f"expected data of block {block_id}, got {_describe(event)}", field="block"
            )
        return event

    async def run_role(
        self, block_id: int, role: AliceBlock | BobBlock, first: list[BlockMessage]
    ) -> BlockOutcome:
        """Exchange turns until this side's role has an outcome; CPU work runs in a thread."""
        if first:
            await self.send_turn(block_id, first)
        while role.outcome is None:
            messages = await self.receive_turn(block_id)
            reply = await trio.to_thread.run_sync(role.receive, messages)
            if reply:
                await self.send_turn(block_id, reply)
        return role.outcome

    async def close_block(self, block_id: int) -> BlockAuthenticated:
        await self.session.send(lambda c: c.close_block(block_id))
        while True:
            event = await self.next_event()
            if isinstance(event, BlockAuthenticated) and event.block_id == block_id:
                return event
            raise ProtocolError(
                f"expected the block's authentication, got {_describe(event)}", field="block"
            )

    # ---- limbo reconciliation (session start) --------------------------------------------
    async def sync_as_alice(self) -> int:
        store = self.node.store
        mine = store.staged_block_ids()
        await self.send_control(
            "sync", {"staged": pack_ids(mine), "last_block_id": store.last_block_id() or 0}
        )
        reply = await self.expect_control("sync_reply")
        theirs = unpack_ids(_bytes(reply.body["staged"]), field="staged")
        committed_there = set(unpack_ids(_bytes(reply.body["committed"]), field="committed"))
        committed_here = [
            block_id for block_id in theirs if store.block_state(block_id) is BlockState.COMMITTED
        ]
        await self.send_control("sync_done", {"committed": pack_ids(committed_here)})
        self._resolve(mine, committed_there)
        peer_last = reply.body["last_block_id"]
        assert isinstance(peer_last, int)
        return max(store.last_block_id() or 0, peer_last) + 1

    async def sync_as_bob(self) -> None:
        store = self.node.store
        request = await self.next_event()
        if isinstance(request, Control) and request.kind == "ledger_reset":
            # only in a bootstrap-authenticated session: Alice's key-derived handshake failed
            if self.connection.mode is SessionMode.KEY_DERIVED:
                raise ProtocolError("ledger reset in a key-derived session", field="kind")
            self.node.ledger.reset()
            log.warning("auth.ledger_reset", reason="requested by the peer after divergence")
            await self.send_control("ledger_reset_done", {})
            request = await self.next_event()
        if not isinstance(request, Control) or request.kind != "sync":
            raise ProtocolError(f"expected control 'sync', got {_describe(request)}", field="kind")
        theirs = unpack_ids(_bytes(request.body["staged"]), field="staged")
        mine = store.staged_block_ids()
        committed_here = [
            block_id for block_id in theirs if store.block_state(block_id) is BlockState.COMMITTED
        ]
        await self.send_control(
            "sync_reply",
            {
                "staged": pack_ids(mine),
                "committed": pack_ids(committed_here),
                "last_block_id": store.last_block_id() or 0,
            },
        )
        done = await self.expect_control("sync_done")
        self._resolve(mine, set(unpack_ids(_bytes(done.body["committed"]), field="committed")))

    def _resolve(self, staged_here: list[int], committed_there: set[int]) -> None:
        for block_id in staged_here:  # ascending: deposits happen in block order on both sides
            if block_id in committed_there:
                self._commit_staged(block_id)
                log.info("block.limbo_committed", block=block_id)
            else:
                self.node.store.drop_block(block_id)
                log.info("block.limbo_dropped", block=block_id)

    def _commit_staged(self, block_id: int) -> None:
        node = self.node
        staged = node.store.staged_material(block_id)
        taken = node.ledger.deposit(
            staged.pool_material + staged.consumer_material,
            mark_consumed_bits=staged.ledger_mark_bits,
        )
        if taken != len(staged.pool_material):
            raise ProtocolError(
                f"ledger takes {taken} bytes of limbo block {block_id}, staged with "
                f"{len(staged.pool_material)}",
                field="pool_bytes",
            )
        node.store.commit_block(
            block_id, auth_ledger_state=ledger_state_to_bytes(node.ledger.state)
        )

    # ---- commit of a distilled block -------------------------------------------------------
    def _split(self, key: BlockKey, mark_bits: int) -> tuple[bytes, list[bytes]]:
        """The pool's share and the consumer keys, computed on a copy of the ledger."""
        node = self.node
        key_bytes = _bits_to_bytes(key.key[: key.key.shape[0] - key.key.shape[0] % 8])
        probe = AuthKeyLedger(
            target_bits=node.ledger.state.target_bits,
            reserve_bits=node.ledger.state.reserve_bits,
            state=node.ledger.state,
        )
        taken = probe.deposit(key_bytes, mark_consumed_bits=mark_bits)
        size = node.config.store.key_size_bits // 8
        rest = key_bytes[taken:]
        consumer = [rest[i : i + size] for i in range(0, len(rest) - size + 1, size)]
        return key_bytes[:taken], consumer

    def _stage(
        self,
        block: _Distilled,
        key_ids: list[uuid.UUID],
        pool: bytes,
        consumer: list[bytes],
    ) -> None:
        key, auth = block.key, block.auth
        stats = key.statistics
        self.node.store.stage_block(
            StagedBlock(
                block_id=block.block_id,
                first_pulse_index=block.first_pulse_index,
                pulse_count=stats.pulse_count,
                consumer_keys=list(zip(key_ids, consumer, strict=True)),
                key_size_bits=self.node.config.store.key_size_bits,
                auth_pool_material=pool,
                ledger_mark_bits=auth.ledger_mark_bits,
                stats_json=json.dumps(
                    {
                        "qber": stats.qber,
                        "sifted_key_bits": stats.sifted_key_bits,
                        "final_key_bits": stats.final_key_bits,
                        "reconciliation_bits": stats.reconciliation_bits,
                        "verification_bits": stats.verification_bits,
                        "mode": auth.mode.value,
                        "time_s": time.time(),
                    }
                ),
            )
        )

    def _commit(self, block_id: int, key: BlockKey, auth: BlockAuthenticated, pool: bytes) -> None:
        node = self.node
        key_bytes = _bits_to_bytes(key.key[: key.key.shape[0] - key.key.shape[0] % 8])
        taken = node.ledger.deposit(key_bytes, mark_consumed_bits=auth.ledger_mark_bits)
        if taken != len(pool):
            raise ProtocolError(
                "the pool's share changed between stage and commit", field="pool_bytes"
            )
        node.store.commit_block(
            block_id, auth_ledger_state=ledger_state_to_bytes(node.ledger.state)
        )
        if node.ledger.level_bits >= node.ledger.state.target_bits:
            node.force_bootstrap = False  # the pool is full again: key-derived sessions resume

    async def commit_as_alice(self, block: _Distilled) -> int:
        block_id, key, auth = block.block_id, block.key, block.auth
        pool, consumer = self._split(key, auth.ledger_mark_bits)
        key_ids = [uuid.uuid4() for _ in consumer]
        self._stage(block, key_ids, pool, consumer)
        await self.send_control(
            "stage", {"block_id": block_id, "key_ids": pack_uuids(key_ids), "pool_bytes": len(pool)}
        )
        staged = await self.expect_control("staged")
        if staged.body["block_id"] != block_id:
            raise ProtocolError("staged another block", field="block_id")
        self._commit(block_id, key, auth, pool)
        await self.send_control("commit", {"block_id": block_id})
        committed = await self.expect_control("committed")
        if committed.body["block_id"] != block_id:
            raise ProtocolError("committed another block", field="block_id")
        self.node.block_done(block_id, key, auth, keys=len(consumer), pool_bytes=len(pool))
        return len(consumer)

    async def commit_as_bob(self, block: _Distilled) -> None:
        block_id, key, auth = block.block_id, block.key, block.auth
        stage = await self.expect_control("stage")
        if stage.body["block_id"] != block_id:
            raise ProtocolError("stages another block", field="block_id")
        pool, consumer = self._split(key, auth.ledger_mark_bits)
        key_ids = unpack_uuids(_bytes(stage.body["key_ids"]), field="key_ids")
        if stage.body["pool_bytes"] != len(pool) or len(key_ids) != len(consumer):
            raise ProtocolError("the peer splits the block differently", field="pool_bytes")
        if len(set(key_ids)) != len(key_ids):
            raise ProtocolError("duplicate key IDs", field="key_ids")
        self._stage(block, key_ids, pool, consumer)
        await self.send_control("staged", {"block_id": block_id})
        commit = await self.expect_control("commit")
        if commit.body["block_id"] != block_id:
            raise ProtocolError("commits another block", field="block_id")
        self._commit(block_id, key, auth, pool)
        await self.send_control("committed", {"block_id": block_id})
        self.node.block_done(block_id, key, auth, keys=len(consumer), pool_bytes=len(pool))


def _data_frame(
    block_id: int, kind: str, body: dict[str, int | float | bool | bytes]
) -> Callable[[PeerConnection], bytes]:
    return lambda connection: connection.send_data(block_id, kind, body)


def _open_frame(block_id: int) -> Callable[[PeerConnection], bytes]:
    return lambda connection: connection.open_block(block_id)


@dataclass(frozen=True, slots=True)
class _Distilled:
    """A block both roles finished with a key, its transcript authenticated both ways."""

    block_id: int
    first_pulse_index: int
    key: BlockKey
    auth: BlockAuthenticated


def _leaf_errors(error: BaseException) -> list[str]:
    if isinstance(error, BaseExceptionGroup):
        return [text for inner in error.exceptions for text in _leaf_errors(inner)]
    return [f"{type(error).__name__}: {error}"[:300]]


def _bytes(value: object) -> bytes:
    assert isinstance(value, bytes)
    return value


def _describe(event: object) -> str:
    if isinstance(event, Control | Data):
        return f"{type(event).__name__}({event.kind})"
    return type(event).__name__


# ---- session loops -------------------------------------------------------------------------


async def with_exchange(
    node: Node, session: PeerSession, work: Callable[[Node, Exchange], Awaitable[None]]
) -> None:
    """Run ``work`` with the session's event pump; the exchange serves delivery meanwhile."""
    exchange = Exchange(node, session)
    _note_mode(node, session)
    await node.reset_link()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exchange.pump, nursery)
        node.exchange = exchange
        node.metrics.set_peer_connected(True)
        try:
            await work(node, exchange)
        finally:
            node.metrics.set_peer_connected(False)
            node.exchange = None
            node.fail_reservations("the session with the peer node ended")
        nursery.cancel_scope.cancel()


async def alice_session(node: Node, session: PeerSession) -> None:
    await with_exchange(node, session, _alice_blocks)


async def bob_session(node: Node, session: PeerSession) -> None:
    await with_exchange(node, session, _bob_blocks)


async def _alice_blocks(node: Node, exchange: Exchange) -> None:
    session = exchange.session
    if node.ledger_reset_pending and session.connection.mode is not SessionMode.KEY_DERIVED:
        await exchange.send_control("ledger_reset", {})
        await exchange.expect_control("ledger_reset_done")
        node.ledger.reset()
        node.ledger_reset_pending = False
        log.warning("auth.ledger_reset", reason="ledgers diverged; pool refills from new keys")
    block_id = await exchange.sync_as_alice()
    retire_at_s = trio.current_time() + 0.9 * session.connection.config.max_session_age_s
    while not node.stopping:
        if trio.current_time() >= retire_at_s:
            # between blocks, well before the channel's session age limit: new session keys
            raise SessionEnded("session age limit: opening a new session")
        connection = session.connection
        if (
            connection.mode is not SessionMode.KEY_DERIVED
            and not node.force_bootstrap
            and node.ledger.can_pay(ROTATION_KEY_BITS + 2 * BLOCK_DRAW_BITS)
        ):
            await session.send(lambda c: c.announce_rotation())
            raise_if_not(await exchange.next_event(return_rotated=True), Rotated)
        try:
            await session.send(_open_frame(block_id))
        except AuthKeyExhausted:
            await exchange.next_event()  # surfaces the PoolExhausted policy
            raise
        node.in_block = True
        try:
            node.block_started()
            records = await node.blocks.alice_block()
            node.records_taken()
            await session.send(
                _data_frame(
                    block_id,
                    "block_info",
                    {
                        "first_pulse_index": records.first_pulse_index,
                        "pulse_count": records.pulse_count,
                    },
                )
            )
            role = AliceBlock(records, node.params, _fresh_rng())
            outcome = await exchange.run_role(block_id, role, [])
            auth = await exchange.close_block(block_id)
            if isinstance(outcome, BlockKey):
                await exchange.commit_as_alice(
                    _Distilled(block_id, records.first_pulse_index, outcome, auth)
                )
            else:
                node.block_done(block_id, outcome, auth, keys=0, pool_bytes=0)
        finally:
            node.in_block = False
        block_id += 1


def raise_if_not(event: object, kind: type) -> None:
    if not isinstance(event, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {_describe(event)}", field="type")


async def _bob_blocks(node: Node, exchange: Exchange) -> None:
    await exchange.sync_as_bob()
    while True:
        event = await exchange.next_event()
        if not isinstance(event, BlockOpened):
            raise ProtocolError(f"expected a block to open, got {_describe(event)}", field="type")
        block_id = event.block_id
        node.in_block = True
        try:
            node.block_started()
            await node.blocks.bob_prefetch()
            info = await exchange.next_data(block_id)
            if info.kind != "block_info":
                raise ProtocolError("a block starts with its pulse range", field="kind")
            found = await node.blocks.bob_block(_int(info.body["first_pulse_index"]))
            node.records_taken()
            outcome: BlockOutcome
            if found is None:
                missing = BlockAborted(
                    reason=AbortReason.LINK_DATA_MISSING,
                    detail="this side has no detections for the announced pulse range",
                )
                await exchange.send_turn(
                    block_id, [BlockAbort(reason=missing.reason.value, detail=missing.detail)]
                )
                outcome = missing
            else:
                role = BobBlock(found, node.params)
                outcome = await exchange.run_role(block_id, role, role.start())
            auth = await exchange.close_block(block_id)
            if isinstance(outcome, BlockKey):
                assert found is not None
                await exchange.commit_as_bob(
                    _Distilled(block_id, found.first_pulse_index, outcome, auth)
                )
            else:
                node.block_done(block_id, outcome, auth, keys=0, pool_bytes=0)
        finally:
            node.in_block = False


def _note_mode(node: Node, session: PeerSession) -> None:
    mode = session.connection.mode
    node.counters.mode = mode.value if mode is not None else "none"
    node.metrics.set_mode(node.counters.mode)
    log.info("auth.mode", mode=node.counters.mode, reason="session established")


# ---- the daemon ------------------------------------------------------------------------------


@dataclass(slots=True)
class _NurseryBox:
    """Where tasks started by the link (Eve's proxy) go, filled once the daemon's nursery runs."""

    nursery: trio.Nursery | None = None


def build_link(config: NodeConfig, box: _NurseryBox) -> QuantumLink:
    """The configured backend; with ``[link.eve]`` active, Bob's fibre runs through Eve."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
    if config.link_backend == "simulated":
        from qkdnode.link.simulated import SimulatedBobLink, simulated_link_from_config

        eve = config.eve
        if config.node.role == "bob" and eve is not None and _eve_active(eve):
            return SimulatedBobLink(config.link, fibre=_eve_opener(config, rng, box), rng=rng)
        return simulated_link_from_config(config.node.role, config.link, rng)
    from qkdnode.link.serial import SerialLink

    return SerialLink(config.link, role=config.node.role)


def _eve_active(eve: Any) -> bool:
    return bool(eve.intercept_resend_fraction > 0 or eve.photon_number_splitting)


def _eve_opener(
    config: NodeConfig, rng: np.random.Generator, box: _NurseryBox
) -> Callable[[], Any]:
    """Bob's fibre opener with Eve in between: TCP from Alice -> Eve's attack -> Bob."""
    from qkdnode.link.eve import EveAttack, run_eve_proxy
    from qkdnode.link.simulated import memory_fibre, tcp_fibre_connector

    connect = tcp_fibre_connector(config.link.fibre_host, config.link.fibre_port)

    async def open_through_eve() -> trio.abc.ReceiveStream:
        upstream = await connect()
        send, receive = memory_fibre()
        attack = EveAttack(config.eve, config.link.nominal_parameters(), rng)
        assert box.nursery is not None
        box.nursery.start_soon(run_eve_proxy, attack, upstream, send)
        log.warning(
            "link.eve_inserted",
            intercept_resend_fraction=config.eve.intercept_resend_fraction,
            photon_number_splitting=config.eve.photon_number_splitting,
        )
        return receive

    return open_through_eve


async def _watch_signals(
    node: Node,
    cancel: trio.CancelScope,
    on_reopen: Callable[[], None],
    early_stops: Sequence[int],
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        # checked once the receiver exists, so no stop request falls between the two
        if early_stops:
            await _stop_gracefully(node, cancel, early_stops[0])
            return
        async for signum in signals:
            if signum == signal.SIGHUP:
                on_reopen()
                log.info("daemon.log_reopened")
                continue
            await _stop_gracefully(node, cancel, signum)
            return


async def _stop_gracefully(node: Node, cancel: trio.CancelScope, signum: int) -> None:
    log.info("daemon.stopping", signal=signal.Signals(signum).name)
    node.stopping = True
    node.notifier.stopping()
    # let the block in flight finish (its commit is the consistent point), within bounds
    with trio.move_on_after(GRACE_PERIOD_S):
        while node.in_block:
            await trio.sleep(0.05)
    cancel.cancel()


async def _stop_on_store_failure(node: Node) -> None:
    await node.store_failed.wait()
    log.critical("store.failed", detail="a key store write or read failed; stopping")
    raise DaemonMustStop("key store failure: the daemon stops and does not carry on")


async def _watchdog(node: Node) -> None:
    interval_s = watchdog_interval_s()
    if interval_s is None:
        return
    while True:
        # liveness: the trio loop runs and the store answers
        node.store.counts()
        node.notifier.watchdog()
        await trio.sleep(interval_s)


async def run_daemon(
    config: NodeConfig,
    *,
    on_reopen: Callable[[], None] = lambda: None,
    early_stops: Sequence[int] = (),
) -> int:
    """Run one node until SIGTERM/SIGINT (exit 0) or a fatal error (raises).

    ``early_stops``: stop signals noted before the event loop ran (``qkdnode.cli``); if any,
    the node stops gracefully as soon as it has started.
    """
    store = KeyStore.open(config.store.directory, node_name=config.node.name)
    box = _NurseryBox()
    link = build_link(config, box)
    node = Node(config, store, link)
    session_config = node.session_config()
    log.info(
        "daemon.starting",
        role=config.node.role,
        auth=config.auth.mode,
        link=config.link_backend,
        pool_level_bits=node.ledger.level_bits,
        keys_available=store.counts().available,
    )
    try:
        async with trio.open_nursery() as nursery:
            box.nursery = nursery
            with trio.CancelScope() as serving:
                nursery.start_soon(_watch_signals, node, serving, on_reopen, early_stops)
                nursery.start_soon(_watchdog, node)
                nursery.start_soon(_stop_on_store_failure, node)
                await node.blocks.start(nursery)
                if node.role is Role.ALICE:
                    nursery.start_soon(_run_alice, node, session_config)
                else:
                    await nursery.start(_run_bob, node, session_config)
                if config.delivery is not None and node.manager is not None:
                    await nursery.start(node.manager.run)
                    app = DeliveryApp.from_config(config.delivery, node.manager)
                    app.observer = node.metrics.delivery_request
                    address, unix_path = await nursery.start(serve_delivery, config.delivery, app)
                    log.info(
                        "delivery.listening",
                        url=f"https://{address[0]}:{address[1]}/api/v1/keys/",
                        unix_socket=str(unix_path) if unix_path else None,
                    )
                if config.metrics_listen is not None:
                    host, port = await nursery.start(
                        serve_metrics, node.metrics, *config.metrics_listen
                    )
                    log.info("metrics.listening", url=f"http://{host}:{port}/metrics")
                node.notifier.ready(f"{config.node.name}: serving ({config.node.role})")
                log.info("daemon.ready")
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()
    except BaseException as exc:
        # say why before the clean-up below: a signal may end the process during it
        log.critical("daemon.failed", errors=_leaf_errors(exc))
        raise
    finally:
        with trio.CancelScope(shield=True):
            await node.blocks.aclose()
        store.close()
        log.info("daemon.stopped", blocks_committed=node.counters.blocks_committed)
    return 0


async def _guarded(session: Callable[[], Any]) -> None:
    """Run one session's work; store failures and a halted pool end the daemon, not the session."""
    try:
        await session()
    except KeyStoreError as exc:
        raise DaemonMustStop(f"key store failure: {exc}") from exc
    except LinkError:
        await trio.sleep(LINK_RETRY_S)  # the link was closed; the next session reopens it
        raise


async def _run_alice(node: Node, session_config: SessionConfig) -> None:
    """Alice dials and distils until the daemon stops (SIGTERM), then closes the session."""
    await run_alice(
        session_config,
        node.make_connection,
        lambda s: _guarded(lambda: alice_session(node, s)),
    )


async def _run_bob(
    node: Node,
    session_config: SessionConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handle(session: PeerSession) -> None:
        await _guarded(lambda: bob_session(node, session))

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_bob, session_config, node.make_connection, handle)
        task_status.started()
