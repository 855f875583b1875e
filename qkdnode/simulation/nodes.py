"""The simulated nodes, the connections between them and the authentication-key use tracker.

A node's store (``StoreModel``) survives its crashes; everything else (ledger object, planner,
connections, work in progress) is rebuilt from the store at ``restart``. Every read of pool
bits (a handshake ``peek``) and every draw is reported to the ``UseTracker``, which flags a byte
used for two purposes or under two connections' transcripts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from qkdnode.channel.auth import Role
from qkdnode.channel.connection import ChannelConfig, PeerConnection
from qkdnode.channel.ledger import (
    AuthKeyLedger,
    DrawRecord,
    LedgerState,
    ledger_state_from_bytes,
    ledger_state_to_bytes,
)
from qkdnode.coordination.events import Effect
from qkdnode.coordination.machine import Coordinator
from qkdnode.coordination.planner import AuthPlanner
from qkdnode.coordination.wire import make_registry
from qkdnode.simulation.settings import RunReport, SimSettings
from qkdnode.simulation.store_model import StoreModel
from qkdnode.simulation.stub import StubBlock

if TYPE_CHECKING:
    import random

    from qkdnode.channel.auth import PskCredentials


class WorldView(Protocol):
    """What a node uses of the world it lives in."""

    settings: SimSettings
    rng: random.Random
    tracker: UseTracker
    credentials: PskCredentials
    step_count: int
    window_closed: bool


REGISTRY: Final = make_registry()


# ---- network ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Pipe:
    """One direction of one connection: segments in order, then maybe the end of the stream."""

    segments: deque[bytes] = field(default_factory=deque)
    eof: bool = False
    held_until_step: int = 0

    def ready(self, step: int) -> bool:
        return step >= self.held_until_step and (bool(self.segments) or self.eof)


@dataclass(slots=True)
class Endpoint:
    """One node's end of one connection."""

    link_id: int
    node: SimNode
    connection: PeerConnection
    incoming: Pipe
    outgoing: Pipe
    coordinator: Coordinator | None = None
    alive: bool = True
    attempted_key_derived: bool = False
    committed_blocks: int = 0
    end_cause: str = ""


# ---- authentication-key use tracking ------------------------------------------------------


class UseTracker:
    """Which use each authentication-key byte of each node went to: pool bytes and handshake
    keys per ledger epoch (a reset starts both numberings again)."""

    def __init__(self, report: RunReport) -> None:
        self._report = report
        self._uses: dict[tuple[str, int], dict[int, tuple[str, int]]] = {}

    def use(self, node: SimNode, offset_bits: int, nbits: int, kind: str, link_id: int) -> None:
        # handshake keys and pool bytes are numbered anew after a ledger reset
        stream = -1 - node.ledger_epoch if kind == "handshake" else node.ledger_epoch
        uses = self._uses.setdefault((node.name, stream), {})
        key = (kind, link_id)
        for byte in range(offset_bits // 8, (offset_bits + nbits) // 8):
            before = uses.setdefault(byte, key)
            if before != key:
                self._report.auth_bits_reused += 1
                self._report.violations.append(
                    f"auth bits reused: {node.name} byte {byte} used for {before[0]} in "
                    f"connection {before[1]} and for {kind} in connection {link_id}"
                )
                return


class TrackedLedger(AuthKeyLedger):
    """The production ledger, its draws and handshake keys reported to the use tracker."""

    def __init__(self, *, node: SimNode, state: LedgerState | None, settings: SimSettings) -> None:
        super().__init__(
            target_bits=settings.pool_target_bits,
            reserve_bits=settings.pool_reserve_bits,
            state=state,
            observer=node.on_draw,
        )
        self.node = node


# ---- nodes ------------------------------------------------------------------------------------


class SimNode:
    """A node's durable store and its in-memory state (lost at a crash)."""

    def __init__(self, world: WorldView, role: Role) -> None:
        self.world = world
        self.role = role
        self.name = role.value
        self.store = StoreModel()
        self.ledger_epoch = 0
        self.context = -1  # the connection whose frames are being handled
        self.pulses_taken = 0
        self.missing_next = False
        self.restart()

    def restart(self) -> None:
        """Start (again) from the store: everything in memory is lost."""
        settings = self.world.settings
        stored = self.store.load_auth_ledger()
        state = ledger_state_from_bytes(stored) if stored is not None else None
        self.ledger: AuthKeyLedger = TrackedLedger(node=self, state=state, settings=settings)
        self.planner = AuthPlanner(self.role)
        self.endpoints: list[Endpoint] = []
        self.work: deque[tuple[Endpoint, Effect]] = deque()
        self.roles: dict[tuple[int, int], StubBlock] = {}
        self.last_connection: PeerConnection | None = None
        self.halted = False
        self.redial_at_step = self.world.step_count + 1

    def on_draw(self, record: DrawRecord) -> None:
        self.store.save_auth_ledger(ledger_state_to_bytes(self.ledger.state))  # write-ahead
        if record.purpose == "activate":
            self.world.window_closed = True
            return
        if record.purpose == "reset":
            self.ledger_epoch += 1
            return
        if record.purpose == "sync":
            return  # burned, not used
        kind = record.purpose.split()[0]
        self.world.tracker.use(self, record.offset_bits, record.nbits, kind, self.context)

    def new_connection(self) -> PeerConnection:
        connection, _ = self.planner.new_connection(
            last=self.last_connection,
            credentials=self.world.credentials,
            registry=REGISTRY,
            ledger=self.ledger,
            config=ChannelConfig(),
            random_bytes=self.world.rng.randbytes,
            store=self.store,
        )
        self.last_connection = connection
        return connection
