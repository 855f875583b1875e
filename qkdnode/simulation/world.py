"""One simulated run: two nodes, the network, faults, and the invariants checked at every step.

A run has three phases: a clean warm-up (the link bootstraps, commits and usually rotates), a
fault phase, and a quiet phase in which no fault is injected and a block must commit within
three of Alice's connection attempts (liveness). At every step the scheduler picks one ready
action (deliver the next segment of one direction of one connection, finish one piece of a
node's local work, dial); in the fault phase it may first inject a fault: drop, duplicate,
reorder, delay, forge or replay a segment, cut a connection, crash and restart a node, let
Bob's link miss a block, or open an attacker's connection to Bob with a forged key-derived
Hello. When nothing is ready although connections are open, every open connection times out
(the shell's read timeout).

Invariants, checked as the state changes:

- downgrade: after the first commit on either node, no session completes its handshake in a
  bootstrap mode and no ledger is reset (no operator action is simulated; the first simulated
  block fills the pool, so it closes the bootstrap window);
- auth bits reused: no authentication-key bit of a node is used under two purposes or two
  transcripts (handshake keys included), across crashes;
- store disagreement: no block committed on one node and dropped on the other; a block
  committed on both holds the same key IDs and keys;
- liveness: once faults stop, a block commits within three of Alice's connection attempts.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from qkdnode.channel.auth import PskCredentials, Role
from qkdnode.channel.connection import (
    NEED_DATA,
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
from qkdnode.channel.ledger import (
    AuthKeyLedger,
    LedgerState,
    ledger_state_to_bytes,
)
from qkdnode.channel.messages import CloseReason, Control, Data, SessionMode
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
    RecordsMissing,
    RecordsTaken,
    RoleAdvanced,
    SendControl,
    SendData,
    SessionStarted,
    StageBlock,
    StartRole,
    TakeRecords,
)
from qkdnode.coordination.machine import (
    Coordinator,
)
from qkdnode.coordination.wire import (
    control_from_wire,
    control_to_wire,
    data_from_wire,
    data_to_wire,
)
from qkdnode.errors import KeyStoreError, QkdError
from qkdnode.postprocess.pipeline import BlockKey
from qkdnode.simulation.nodes import REGISTRY, Endpoint, Pipe, SimNode, UseTracker
from qkdnode.simulation.settings import RunReport, SimSettings
from qkdnode.simulation.stub import StubBlock

PULSES_PER_BLOCK: Final = 1_000_000


class _SessionOver(Exception):
    """An endpoint's session ends (the reason is in the message)."""


# ---- the world -----------------------------------------------------------------------------------


class World:
    """Both nodes, their connections and the invariants of one run."""

    def __init__(self, seed: int, settings: SimSettings) -> None:
        self.seed = seed
        self.settings = settings
        self.rng = random.Random(seed)
        self.report = RunReport(seed=seed)
        self.tracker = UseTracker(self.report)
        self.credentials = PskCredentials(psk=self.rng.randbytes(32))
        self.step_count = 0
        self.first_commit_seen = False
        # set when either node's ledger becomes active (durably): rotation closed the window
        self.window_closed = False
        self.quiet_since_step: int | None = None
        self.quiet_attempts = 0
        self.quiet_committed = False
        self.recorded: deque[bytes] = deque(maxlen=64)
        self.next_link_id = 0
        self.alice = SimNode(self, Role.ALICE)
        self.bob = SimNode(self, Role.BOB)
        self.alice_endpoint: Endpoint | None = None
        # how Alice's last key-derived attempt that never completed its handshake ended
        self.last_refused_attempt = ""

    def note(self, text: str) -> None:
        self.report.trace.append(f"{self.step_count}: {text}")

    # ---- connections ----------------------------------------------------------------------------
    def dial(self) -> None:
        alice, bob = self.alice, self.bob
        link_id = self.next_link_id
        self.next_link_id += 1
        a2b, b2a = Pipe(), Pipe()
        alice_conn = alice.new_connection()
        bob_conn = bob.new_connection()
        ours = Endpoint(link_id, alice, alice_conn, incoming=b2a, outgoing=a2b)
        theirs = Endpoint(link_id, bob, bob_conn, incoming=a2b, outgoing=b2a)
        alice.endpoints.append(ours)
        bob.endpoints.append(theirs)
        self.alice_endpoint = ours
        if self.quiet_since_step is not None:
            self.quiet_attempts += 1
        alice.context = link_id
        hello = alice_conn.start_handshake()
        ours.attempted_key_derived = alice.planner.last_attempt_key_derived
        self._send(ours, hello)
        self.note(f"dial {link_id} key_derived={ours.attempted_key_derived}")

    def attacker_hello(self) -> None:
        """A stranger's key-derived Hello to Bob, claiming a ledger offset ahead of his."""
        bob = self.bob
        public = bob.ledger.state
        if not public.active:
            return
        # up to one byte past what Bob holds: past every deposit it is refused before any
        # handshake key is used
        ahead_bits = 8 * self.rng.randrange(0, max(0, bob.ledger.level_bits) // 8 + 2)
        fake_pool = self.rng.randbytes(4096)
        fake = AuthKeyLedger(
            target_bits=public.target_bits,
            reserve_bits=0,
            state=LedgerState(
                pool=fake_pool,
                consumed_bits=public.consumed_bits + ahead_bits,
                deposited_bits=public.consumed_bits + ahead_bits + 8 * len(fake_pool),
                target_bits=public.target_bits,
                reserve_bits=0,
                tags_issued=public.tags_issued,
                forgery_bound=public.forgery_bound,
                deposit_digest=public.deposit_digest,
                active=True,
            ),
        )
        stranger = PeerConnection(
            Role.ALICE,
            credentials=PskCredentials(psk=self.rng.randbytes(32)),
            registry=REGISTRY,
            ledger=fake,
            random_bytes=self.rng.randbytes,
        )
        link_id = self.next_link_id
        self.next_link_id += 1
        incoming = Pipe(segments=deque([stranger.start_handshake()]), eof=True)
        endpoint = Endpoint(link_id, bob, bob.new_connection(), incoming=incoming, outgoing=Pipe())
        bob.endpoints.append(endpoint)
        self.note(f"attacker hello {link_id} ahead_bits={ahead_bits}")

    def _send(self, endpoint: Endpoint, frame: bytes) -> None:
        if frame and endpoint.alive:
            endpoint.outgoing.segments.append(frame)
            self.recorded.append(frame)

    def end(self, endpoint: Endpoint, cause: str, *, tell_peer: bool) -> None:
        """The endpoint's session ends: a Close if it can say why, then the end of its stream."""
        if not endpoint.alive:
            return
        node = endpoint.node
        node.context = endpoint.link_id
        if tell_peer:
            with contextlib.suppress(QkdError):
                self._send(endpoint, endpoint.connection.close(CloseReason.PROTOCOL_ERROR))
        endpoint.alive = False
        endpoint.end_cause = cause
        endpoint.outgoing.eof = True
        endpoint.coordinator = None
        if endpoint in node.endpoints:
            node.endpoints.remove(endpoint)
        node.work = deque(item for item in node.work if item[0] is not endpoint)
        if endpoint.attempted_key_derived:
            self.last_refused_attempt = "" if endpoint.connection.mode is not None else cause
        if endpoint is self.alice_endpoint:
            self.alice_endpoint = None
            node.redial_at_step = self.step_count + self.rng.randint(1, 6)
        self.note(f"end {node.name} {endpoint.link_id}: {cause}")

    def crash(self, node: SimNode) -> None:
        for endpoint in list(node.endpoints):
            self.end(endpoint, "crash", tell_peer=False)
        node.restart()
        self.note(f"crash {node.name}")

    # ---- delivery -------------------------------------------------------------------------------
    def deliver(self, endpoint: Endpoint) -> None:
        pipe = endpoint.incoming
        segment = pipe.segments.popleft() if pipe.segments else b""
        if not segment:
            pipe.eof = False
        connection = endpoint.connection
        endpoint.node.context = endpoint.link_id
        try:
            connection.receive_data(segment)
            while endpoint.alive:
                event = connection.next_event(now_s=self.step_count * 0.01)
                self._send(endpoint, connection.data_to_send())
                if event is NEED_DATA:
                    break
                self._on_event(endpoint, event)
        except (QkdError, _SessionOver, KeyStoreError) as exc:
            cause = f"{type(exc).__name__}: {exc}"
            closed = isinstance(exc, _SessionOver) and str(exc).startswith("peer closed")
            self.end(endpoint, cause, tell_peer=not closed and not isinstance(exc, KeyStoreError))

    def _on_event(self, endpoint: Endpoint, event: object) -> None:
        if isinstance(event, PongReceived):
            return
        if isinstance(event, PeerClosed):
            raise _SessionOver(f"peer closed: {event.reason.value}")
        if isinstance(event, ConnectionLost):
            raise _SessionOver("connection lost")
        if isinstance(event, PoolExhausted):
            raise _SessionOver("pool exhausted")
        if isinstance(event, HandshakeComplete):
            self._on_handshake(endpoint, event.mode)
            return
        if isinstance(event, Rotated):
            self.note(f"rotated {endpoint.node.name} {endpoint.link_id}")
        if isinstance(event, Rotated | BlockAuthenticated):
            self.feed(endpoint, event)
        elif isinstance(event, BlockOpened):
            self.feed(endpoint, PeerOpenedBlock(block_id=event.block_id))
        elif isinstance(event, Data):
            message = data_from_wire(event)
            self.feed(endpoint, PeerBlockData(block_id=event.block_id, message=message))
        elif isinstance(event, Control):
            self.feed(endpoint, PeerMessage(message=control_from_wire(event)))

    def _on_handshake(self, endpoint: Endpoint, mode: SessionMode) -> None:
        node = endpoint.node
        if mode is not SessionMode.KEY_DERIVED and self.first_commit_seen:
            previous = self.last_refused_attempt
            self.report.downgrades += 1
            self.report.violations.append(
                f"downgrade: {node.name} completed a {mode.value} handshake after the first "
                f"commit (the last key-derived attempt ended: {previous or 'n/a'})"
            )
        if node is self.alice:
            self.report.sessions += 1
        # one session at a time, as in the daemon: a newer one ends the sessions before it
        for other in list(node.endpoints):
            if other is not endpoint and other.coordinator is not None:
                self.end(other, "superseded by a newer session", tell_peer=True)
        endpoint.coordinator = Coordinator(
            node.role,
            config=CoordinatorConfig(
                key_size_bits=self.settings.key_size_bits,
                max_in_flight=self.settings.in_flight,
            ),
            ledger=node.ledger,
            store=node.store,
            planner=node.planner,
            random_bytes=self.rng.randbytes,
        )
        self.note(f"handshake {node.name} {endpoint.link_id} {mode.value}")
        self.feed(endpoint, SessionStarted(mode=mode))

    # ---- the coordination machine and its effects ------------------------------------------
    def feed(self, endpoint: Endpoint, event: Input) -> None:
        coordinator = endpoint.coordinator
        if coordinator is None:
            raise _SessionOver("no session")
        node = endpoint.node
        node.context = endpoint.link_id
        for effect in coordinator.receive(event):
            self._apply(endpoint, effect)

    def _apply(self, endpoint: Endpoint, effect: Effect) -> None:
        node, connection = endpoint.node, endpoint.connection
        match effect:
            case SendControl(message=message):
                kind, body = control_to_wire(message)
                self._send(endpoint, connection.send_control(kind, body))
            case SendData(block_id=block_id, message=data):
                kind, body = data_to_wire(data)
                self._send(endpoint, connection.send_data(block_id, kind, body))
            case OpenBlock(block_id=block_id):
                self._send(endpoint, connection.open_block(block_id))
            case CloseBlock(block_id=block_id):
                self._send(endpoint, connection.close_block(block_id))
            case AnnounceRotation():
                self._send(endpoint, connection.announce_rotation())
            case TakeRecords() | PrefetchRecords() | StartRole() | FeedRole():
                node.work.append((endpoint, effect))
            case StageBlock():
                node.store.stage_block(
                    effect.block_id,
                    key_ids=effect.key_ids,
                    consumer_keys=effect.consumer_keys,
                    pool_material=effect.pool_material,
                    ledger_mark_bits=effect.auth.ledger_mark_bits,
                )
            case CommitBlock(block_id=block_id, ledger_state=state, limbo=limbo):
                node.store.commit_block(block_id, auth_ledger_state=ledger_state_to_bytes(state))
                self.first_commit_seen = True
                self._check_block(block_id)
                self.note(f"{'limbo ' if limbo else ''}commit {block_id} on {node.name}")
            case DropBlock(block_id=block_id):
                node.store.drop_block(block_id)
                self._check_block(block_id)
            case LedgerWasReset():
                if self.first_commit_seen:
                    self.report.downgrades += 1
                    self.report.violations.append(
                        f"downgrade: {node.name}'s ledger reset after the first commit"
                    )
            case BlockDone(outcome=outcome):
                if isinstance(outcome, BlockKey) and node is self.alice:
                    endpoint.committed_blocks += 1
                    if endpoint.committed_blocks == 1:
                        self.report.committing_sessions += 1
                    if self.quiet_since_step is not None:
                        self.quiet_committed = True
            case PoolExhaustedStop():
                self.note(f"{node.name}: pool exhausted, no block opens")
            case EndSession(reason=reason):
                raise _SessionOver(reason)
            case Idle():
                pass

    def run_work(self, node: SimNode) -> None:
        endpoint, effect = node.work.popleft()
        if not endpoint.alive:
            return
        key = (endpoint.link_id, getattr(effect, "block_id", -1))
        result: Input | None = None
        match effect:
            case TakeRecords(block_id=block_id, first_pulse_index=None):
                first = node.pulses_taken
                node.pulses_taken += PULSES_PER_BLOCK
                result = RecordsTaken(
                    block_id=block_id, first_pulse_index=first, pulse_count=PULSES_PER_BLOCK
                )
                node.roles[key] = self._stub(node, first)
            case TakeRecords(block_id=block_id, first_pulse_index=int(first)):
                if node.missing_next:
                    node.missing_next = False
                    result = RecordsMissing(block_id=block_id)
                else:
                    result = RecordsTaken(
                        block_id=block_id, first_pulse_index=first, pulse_count=PULSES_PER_BLOCK
                    )
                    node.roles[key] = self._stub(node, first)
            case StartRole(block_id=block_id):
                role = node.roles[key]
                result = RoleAdvanced(block_id=block_id, messages=tuple(role.start()), outcome=None)
            case FeedRole(block_id=block_id, messages=messages):
                role = node.roles[key]
                reply = role.receive(list(messages))
                result = RoleAdvanced(
                    block_id=block_id, messages=tuple(reply), outcome=role.outcome
                )
        if result is None:
            return
        try:
            self.feed(endpoint, result)
        except (QkdError, _SessionOver, KeyStoreError) as exc:
            self.end(endpoint, f"{type(exc).__name__}: {exc}", tell_peer=True)

    def _stub(self, node: SimNode, first_pulse_index: int) -> StubBlock:
        return StubBlock(
            node.role,
            seed=self.seed,
            first_pulse_index=first_pulse_index,
            key_bits=self.settings.key_bits,
            abort_probability=self.settings.abort_probability,
        )

    # ---- invariants -----------------------------------------------------------------------------
    def _check_block(self, block_id: int) -> None:
        a, b = self.alice.store, self.bob.store
        states = {a.block_state(block_id), b.block_state(block_id)}
        if states == {"committed", "dropped"}:
            self.report.store_disagreements += 1
            self.report.violations.append(f"store disagreement: block {block_id} committed/dropped")
        elif states == {"committed"} and a.committed_keys(block_id) != b.committed_keys(block_id):
            self.report.store_disagreements += 1
            self.report.violations.append(f"store disagreement: block {block_id} keys differ")

    # ---- faults ---------------------------------------------------------------------------------
    def inject_fault(self) -> None:
        fault = self.rng.choice(self.settings.faults)
        endpoints = [e for e in (*self.alice.endpoints, *self.bob.endpoints) if e.alive]
        pipes = [e.incoming for e in endpoints if e.incoming.segments]
        injected = True
        if fault in ("drop", "duplicate", "reorder", "delay", "forge", "replay") and not pipes:
            injected = False
        elif fault == "drop":
            self.rng.choice(pipes).segments.popleft()
        elif fault == "duplicate":
            pipe = self.rng.choice(pipes)
            pipe.segments.insert(1, pipe.segments[0])
        elif fault == "reorder":
            pipe = self.rng.choice(pipes)
            if len(pipe.segments) > 1:
                pipe.segments[0], pipe.segments[1] = pipe.segments[1], pipe.segments[0]
            else:
                injected = False
        elif fault == "delay":
            self.rng.choice(pipes).held_until_step = self.step_count + self.rng.randint(1, 20)
        elif fault == "forge":
            pipe = self.rng.choice(pipes)
            segment = bytearray(pipe.segments[0])
            segment[self.rng.randrange(len(segment))] ^= 1 << self.rng.randrange(8)
            pipe.segments[0] = bytes(segment)
        elif fault == "replay":
            if self.recorded:
                self.rng.choice(pipes).segments.appendleft(self.rng.choice(self.recorded))
            else:
                injected = False
        elif fault == "cut":
            if self.alice_endpoint is None:
                injected = False
            else:
                link_id = self.alice_endpoint.link_id
                for endpoint in endpoints:
                    if endpoint.link_id == link_id:
                        endpoint.incoming.segments.clear()
                        endpoint.incoming.eof = True
                        endpoint.outgoing.segments.clear()
        elif fault == "crash_alice":
            self.crash(self.alice)
        elif fault == "crash_bob":
            self.crash(self.bob)
        elif fault == "records_missing":
            self.bob.missing_next = True
        elif fault == "attacker_hello":
            injected = self.bob.ledger.active
            self.attacker_hello()
        if injected:
            self.report.faults_injected += 1
            self.note(f"fault {fault}")

    # ---- the scheduler --------------------------------------------------------------------------
    def step(self, *, faults: bool) -> None:
        self.step_count += 1
        if faults and self.rng.random() < self.settings.fault_probability:
            self.inject_fault()
        actions: list[Callable[[], None]] = []
        for node in (self.alice, self.bob):
            for endpoint in node.endpoints:
                if endpoint.alive and endpoint.incoming.ready(self.step_count):
                    actions.append(functools.partial(self.deliver, endpoint))
            if node.work:
                actions.append(functools.partial(self.run_work, node))
        alice = self.alice
        if (
            self.alice_endpoint is None
            and not alice.halted
            and self.step_count >= alice.redial_at_step
        ):
            actions.append(self.dial)
        if actions:
            self.rng.choice(actions)()
            return
        held = [
            e
            for n in (self.alice, self.bob)
            for e in n.endpoints
            if e.alive and (e.incoming.segments or e.incoming.eof)
        ]
        if held:
            return  # a delayed direction: wait for it
        # nothing can move although connections are open: the read timeout ends them
        for node in (self.alice, self.bob):
            for endpoint in list(node.endpoints):
                self.end(endpoint, "timeout", tell_peer=True)
        if self.alice_endpoint is None:
            alice.redial_at_step = min(alice.redial_at_step, self.step_count + 1)


def simulate_run(
    seed: int, settings: SimSettings | None = None, *, trace: bool = False
) -> RunReport:
    """Run one seed through warm-up, faults and the quiet phase; report what broke."""
    settings = settings if settings is not None else SimSettings()
    started = time.perf_counter()
    world = World(seed, settings)
    rng = world.rng
    for _ in range(rng.randint(0, settings.warmup_steps_max)):
        world.step(faults=False)
    for _ in range(rng.randint(1, settings.fault_steps_max)):
        world.step(faults=True)
    world.quiet_since_step = world.step_count
    world.quiet_attempts = 0
    while not world.quiet_committed:
        if (
            world.alice.halted
            or world.quiet_attempts > settings.liveness_attempts
            or world.step_count - world.quiet_since_step > settings.quiet_steps_max
        ):
            world.report.liveness_failures += 1
            world.report.violations.append(
                f"liveness: no commit within {world.quiet_attempts} connection attempts and "
                f"{world.step_count - world.quiet_since_step} steps after the faults stopped"
            )
            break
        world.step(faults=False)
    report = world.report
    report.steps = world.step_count
    report.seconds = time.perf_counter() - started
    if not trace:
        report.trace = []
    return report
