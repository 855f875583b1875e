"""The trio shell around one session's ``Coordinator``: events in, effects applied.

``Exchange.run`` pumps the session's events into the node's coordination machine and applies
the effects it returns, in order: frames are produced by the ``PeerConnection`` and queued on
the session, store writes are made at once (each is one transaction), link and post-processing
work runs in tasks of the session's nursery (post-processing in a worker thread) whose results
come back as inputs. Delivery reservations bypass the machine: they are answered at once,
concurrently (``qkdnode.node.reservations``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import numpy as np
import structlog
import trio

from qkdnode.audit import AuditKind, PeerHead
from qkdnode.channel.auth import Role
from qkdnode.channel.connection import (
    BlockAuthenticated,
    BlockOpened,
    ConnectionLost,
    HandshakeComplete,
    PeerClosed,
    PeerConnection,
    PongReceived,
    PoolExhausted,
    Rotated,
)
from qkdnode.channel.ledger import ledger_state_to_bytes
from qkdnode.channel.messages import Control, ControlBody, Data, SessionMode
from qkdnode.coordination.events import (
    AnnounceRotation,
    BlockDone,
    CloseBlock,
    CommitBlock,
    CoordinatorConfig,
    DropBlock,
    Effect,
    EndSession,
    FeedRole,
    Idle,
    Input,
    LedgerWasReset,
    OpenBlock,
    PeerBlockData,
    PeerMessage,
    PeerOpenedBlock,
    PoolExhaustedStop,
    PrefetchRecords,
    RebootstrapDone,
    RecordsMissing,
    RecordsTaken,
    RetireRequested,
    RoleAdvanced,
    SendControl,
    SendData,
    SessionStarted,
    StageBlock,
    StartRole,
    StopRequested,
    TakeRecords,
)
from qkdnode.coordination.machine import (
    Coordinator,
)
from qkdnode.coordination.security import KeySecurityStatement
from qkdnode.coordination.wire import (
    AuditHead,
    CoordinationMessage,
    Reserve,
    ReserveResult,
    control_from_wire,
    control_to_wire,
    data_from_wire,
    data_to_wire,
)
from qkdnode.errors import QkdError
from qkdnode.node import rebootstrap
from qkdnode.postprocess.block_messages import RECONCILIATION_SEED_BYTES
from qkdnode.postprocess.pipeline import AliceBlock, BlockMessage, BobBlock
from qkdnode.postprocess.records import AliceRecords, DetectionRecords
from qkdnode.relay.padwire import RELAY_CONTROL_KINDS
from qkdnode.store import StagedBlock
from qkdnode.store.blocks import commit_op

if TYPE_CHECKING:
    from qkdnode.node.session import PeerSession
    from qkdnode.node.state import Node

log = structlog.get_logger("qkdnode.node")

# Alice ends a session between blocks at this fraction of the channel's session age limit
RETIRE_AT_FRACTION: Final = 0.9


class SessionEnded(QkdError):
    """The peer closed the session or the stream ended; the session loop reconnects."""


class DaemonMustStop(Exception):
    """A condition after which the daemon must not carry on: a failed store write or fsync.

    Deliberately not a ``QkdError``: the session loops retry ``QkdError``s, never this.
    """


def _fresh_rng() -> np.random.Generator:
    # Alice's public randomness per block (sample positions, seeds, hash keys) comes from OS
    # entropy for every block, so no block's choices can be predicted from an earlier one.
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


class Exchange:
    """Drives one authenticated session for one node (see the module docstring)."""

    def __init__(self, node: Node, session: PeerSession) -> None:
        self.node = node
        self.session = session
        self.connection: PeerConnection = session.connection
        self.machine = Coordinator(
            node.role,
            config=CoordinatorConfig(
                key_size_bits=node.config.store.key_size_bits,
                max_in_flight=node.config.postprocess.blocks_in_flight,
                block_epsilon=node.block_epsilon,
                rotation_pool_bits=node.config.auth.rotation_pool_bits,
            ),
            ledger=node.ledger,
            store=node.store_view,
            planner=node.planner,
            random_bytes=os.urandom,
        )
        # every input of the machine comes through here, in the order it is applied
        self._inputs_in, self._inputs = trio.open_memory_channel[Input](math.inf)
        self._link_jobs_in, self._link_jobs = trio.open_memory_channel[
            TakeRecords | PrefetchRecords
        ](math.inf)
        self._records: dict[int, AliceRecords | DetectionRecords] = {}
        self._roles: dict[int, AliceBlock | BobBlock] = {}
        # each staged block's security statement, reported when the block is done
        self._statements: dict[int, KeySecurityStatement] = {}
        # Alice's Cascade seed for every block of this session, so blocks reuse their
        # permutations (``cascade.permutation``); public, never a secret
        self._reconciliation_seed = os.urandom(RECONCILIATION_SEED_BYTES)
        self.idle = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def send_message(self, message: CoordinationMessage) -> None:
        """Send a coordination message on this session (also used by reservations)."""
        kind, body = control_to_wire(message)
        await self.session.send(lambda c: c.send_control(kind, body))

    async def send_control(self, kind: str, body: ControlBody) -> None:
        """Send a control frame of another protocol on this session (the key relay)."""
        await self.session.send(lambda c: c.send_control(kind, body))

    def request_stop(self) -> None:
        self._inputs_in.send_nowait(StopRequested())

    # ---- the session's tasks ------------------------------------------------------------------
    async def run(self) -> None:
        """Run until the session ends (``SessionEnded``), the node stops, or an error."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pump, nursery)
                nursery.start_soon(self._link_worker)
                if self.node.role is Role.ALICE:
                    nursery.start_soon(self._retire_later)
                if self.node.stop_requested.is_set():
                    self.request_stop()
                self._inputs_in.send_nowait(SessionStarted(mode=self._mode()))
                await self._apply_inputs()
                nursery.cancel_scope.cancel()
        finally:
            self.idle.set()

    def _mode(self) -> SessionMode:
        mode = self.connection.mode
        assert mode is not None, "the session runs only after its handshake"
        return mode

    async def _apply_inputs(self) -> None:
        """Feed the machine; returns when the session is done (Alice stopping)."""
        async for event in self._inputs:
            for effect in self.machine.receive(event):
                if await self._apply(effect):
                    return

    async def _pump(self, nursery: trio.Nursery) -> None:
        """Read the session's events into the machine's input queue."""
        while True:
            try:
                event = await self.session.next_event()
            except trio.EndOfChannel:
                raise SessionEnded("the session's event stream ended") from None
            if isinstance(event, PongReceived | HandshakeComplete):
                continue
            if isinstance(event, PeerClosed):
                raise SessionEnded(f"peer closed the session: {event.reason.value} {event.detail}")
            if isinstance(event, ConnectionLost):
                raise SessionEnded("connection lost")
            if isinstance(event, PoolExhausted):
                self._on_channel_exhausted(event)
                continue
            if isinstance(event, Rotated):
                self.node.reporter.mode_changed(event.mode.value, "rotated")
                self.node.audit.record(
                    AuditKind.ROTATED, peer=self.node.peer_name, mode=event.mode.value
                )
                self._inputs_in.send_nowait(event)
            elif isinstance(event, BlockOpened):
                self._inputs_in.send_nowait(PeerOpenedBlock(block_id=event.block_id))
            elif isinstance(event, BlockAuthenticated):
                self._inputs_in.send_nowait(event)
            elif isinstance(event, Data):
                message = data_from_wire(event)
                self._inputs_in.send_nowait(PeerBlockData(block_id=event.block_id, message=message))
            elif isinstance(event, Control) and event.kind in RELAY_CONTROL_KINDS:
                if self.node.relay is not None:
                    self.node.relay.on_control(self.node.peer_name, event.kind, event.body)
            elif isinstance(event, Control):
                coordination = control_from_wire(event)
                if isinstance(coordination, Reserve):
                    await self.node.reservations.answer_soon(
                        coordination, self.send_message, nursery
                    )
                elif isinstance(coordination, ReserveResult):
                    self.node.reservations.on_result(coordination)
                elif isinstance(coordination, AuditHead):
                    self.node.audit.peer_head_received(
                        PeerHead(seq=coordination.seq, chain_hash=coordination.chain_hash)
                    )
                else:
                    self._inputs_in.send_nowait(PeerMessage(message=coordination))

    def _on_channel_exhausted(self, event: PoolExhausted) -> None:
        # the machine checks the pool before it opens a block; the channel's own refusal is a
        # second line: the same alert, and this session ends
        self._exhausted(event.level_bits, event.needed_bits)
        raise SessionEnded("authentication-key pool exhausted")

    def _exhausted(self, level_bits: int, needed_bits: int) -> None:
        log.error(
            "auth.pool_exhausted",
            pool_level_bits=level_bits,
            needed_bits=needed_bits,
            detail="no block opens; stored keys are still served; re-bootstrap needs an "
            "operator on both nodes (qkdnode auth rebootstrap)",
        )
        self.node.notifier.status("authentication-key pool exhausted: no block opens")
        self.node.metrics.set_pool_exhausted(True)

    async def _retire_later(self) -> None:
        await trio.sleep(RETIRE_AT_FRACTION * self.connection.config.max_session_age_s)
        self._inputs_in.send_nowait(RetireRequested())

    async def _link_worker(self) -> None:
        """Link work in order: the simulated link hands out blocks one after another."""
        blocks = self.node.blocks
        async for job in self._link_jobs:
            if isinstance(job, PrefetchRecords):
                await blocks.bob_prefetch()
                continue
            if job.first_pulse_index is None:
                records: AliceRecords | DetectionRecords | None = await blocks.alice_block()
            else:
                records = await blocks.bob_block(job.first_pulse_index)
            self.node.reporter.records_taken(job.block_id)
            if records is None:
                self._inputs_in.send_nowait(RecordsMissing(block_id=job.block_id))
                continue
            self._records[job.block_id] = records
            self._inputs_in.send_nowait(
                RecordsTaken(
                    block_id=job.block_id,
                    first_pulse_index=records.first_pulse_index,
                    pulse_count=records.pulse_count,
                )
            )

    async def _run_role(self, block_id: int, messages: tuple[BlockMessage, ...]) -> None:
        role = self._roles[block_id]
        self.node.reporter.role_called(block_id)
        reply = await trio.to_thread.run_sync(role.receive, list(messages))
        self.node.reporter.role_returned(block_id, replied=bool(reply))
        self._inputs_in.send_nowait(
            RoleAdvanced(block_id=block_id, messages=tuple(reply), outcome=role.outcome)
        )

    # ---- effects ------------------------------------------------------------------------------
    async def _apply(self, effect: Effect) -> bool:
        """Apply one effect; True when the session is done."""
        node = self.node
        match effect:
            case SendControl(message=message):
                await self.send_message(message)
            case SendData(block_id=block_id, message=data):
                kind, body = data_to_wire(data)
                await self.session.send(_data_frame(block_id, kind, body))
            case OpenBlock(block_id=block_id):
                node.reporter.block_started(block_id)
                await self.session.send(lambda c: c.open_block(block_id))
            case CloseBlock(block_id=block_id):
                await self.session.send(lambda c: c.close_block(block_id))
            case AnnounceRotation():
                await self.session.send(lambda c: c.announce_rotation())
            case TakeRecords() | PrefetchRecords():
                self._link_jobs_in.send_nowait(effect)
            case StartRole(block_id=block_id):
                assert self._nursery is not None
                self._nursery.start_soon(self._start_role, block_id, self._records.pop(block_id))
            case FeedRole(block_id=block_id, messages=messages):
                assert self._nursery is not None
                self._nursery.start_soon(self._run_role, block_id, messages)
            case StageBlock(block_id=block_id, auth=auth):
                statement = node.security_statement(auth.mode)
                # a block's keys (about 1,300 rows for 10^6 sifted bits) written off the event
                # loop; the effects after it wait, as before, and the store serialises its
                # transactions. The commit stays on the loop: its audit entry extends the
                # in-memory chain that other tasks extend too.
                await trio.to_thread.run_sync(
                    node.store.stage_block, self._staged_block(effect, statement)
                )
                self._statements[block_id] = statement
            case CommitBlock(block_id=block_id, ledger_state=state, limbo=limbo):
                # the commit and its audit entry in one transaction
                node.store.run(
                    node.audit.around(
                        commit_op(block_id, auth_ledger_state=ledger_state_to_bytes(state)),
                        AuditKind.BLOCK_COMMITTED,
                        lambda _: {
                            "block_id": block_id,
                            "limbo": limbo,
                            "mode": self._mode().value,
                        },
                    )
                )
                if limbo:
                    log.info("block.limbo_committed", block=block_id)
                await self._send_audit_head()
            case DropBlock(block_id=block_id):
                node.store.drop_block(block_id)
                log.info("block.limbo_dropped", block=block_id)
            case LedgerWasReset(requested_by_peer=by_peer):
                reason = (
                    "requested by the peer after divergence"
                    if by_peer
                    else "ledgers diverged; pool refills from new keys"
                )
                log.warning("auth.ledger_reset", reason=reason)
                node.audit.record(AuditKind.LEDGER_RESET, peer=node.peer_name, reason=reason)
            case BlockDone(block_id=block_id, outcome=outcome, auth=auth, keys=keys):
                self._roles.pop(block_id, None)
                self._records.pop(block_id, None)
                node.reporter.block_done(
                    block_id,
                    outcome,
                    auth,
                    keys=keys,
                    pool_bytes=effect.pool_bytes,
                    statement=self._statements.pop(block_id, None),
                )
            case PoolExhaustedStop(level_bits=level, needed_bits=needed):
                self._exhausted(level, needed)
            case RebootstrapDone():
                rebootstrap.use_up(node.config.store.directory)
                node.audit.record(AuditKind.REBOOTSTRAP_USED, peer=node.peer_name)
            case EndSession(reason=reason):
                raise SessionEnded(reason)
            case Idle():
                self.idle.set()
                return node.role is Role.ALICE
        return False

    async def _send_audit_head(self) -> None:
        """Tell the peer this node's audit head (it keeps the last one: ``qkdnode.audit``)."""
        head = self.node.audit.head()
        if head is not None:
            await self.send_message(AuditHead(seq=head.seq, chain_hash=head.chain_hash))

    async def _start_role(self, block_id: int, records: AliceRecords | DetectionRecords) -> None:
        # off the event loop: Bob's first turn encodes every detection of the block
        self.node.reporter.role_called(block_id)
        role, first = await trio.to_thread.run_sync(self._new_role, records)
        self.node.reporter.role_returned(block_id, replied=bool(first))
        self._roles[block_id] = role
        self._inputs_in.send_nowait(
            RoleAdvanced(block_id=block_id, messages=tuple(first), outcome=role.outcome)
        )

    def _new_role(
        self, records: AliceRecords | DetectionRecords
    ) -> tuple[AliceBlock | BobBlock, list[BlockMessage]]:
        """A block's role and its first turn (Bob's; Alice waits for his)."""
        if not isinstance(records, DetectionRecords):
            alice = AliceBlock(
                records,
                self.node.params,
                _fresh_rng(),
                reconciliation_seed=self._reconciliation_seed,
            )
            return alice, []
        bob = BobBlock(records, self.node.params)
        return bob, bob.start()

    def _staged_block(self, effect: StageBlock, statement: KeySecurityStatement) -> StagedBlock:
        stats = effect.key.statistics
        return StagedBlock(
            block_id=effect.block_id,
            first_pulse_index=effect.first_pulse_index,
            pulse_count=stats.pulse_count,
            consumer_keys=list(zip(effect.key_ids, effect.consumer_keys, strict=True)),
            key_size_bits=self.node.config.store.key_size_bits,
            auth_pool_material=effect.pool_material,
            ledger_mark_bits=effect.auth.ledger_mark_bits,
            stats_json=json.dumps(
                {
                    "qber": stats.qber,
                    "sifted_key_bits": stats.sifted_key_bits,
                    "final_key_bits": stats.final_key_bits,
                    "reconciliation_bits": stats.reconciliation_bits,
                    "verification_bits": stats.verification_bits,
                    "mode": effect.auth.mode.value,
                    "time_s": time.time(),
                    "security": statement.fields(),
                }
            ),
        )


def _data_frame(
    block_id: int, kind: str, body: dict[str, int | float | bool | bytes]
) -> Callable[[PeerConnection], bytes]:
    return lambda connection: connection.send_data(block_id, kind, body)
