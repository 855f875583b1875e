"""One simulated relay run: three nodes on a chain, the network, faults, and the invariants.

Nodes A, R and C each run the production ``RelayMachine`` over a ``RelayStoreModel`` (relay
records, deliverable keys, pad streams), which survives crashes; the machine is rebuilt from it
at every restart and told ``RetransmitDue``. Links A–R and R–C each carry two pad streams, one
per direction, filled at both ends from the same material but at different steps
(``pad_lag``), so a receiver may not yet hold the bits a sender allocated.

A run has three phases: a clean warm-up, a fault phase, and a quiet phase without faults or new
requests that lasts until every relay is finished at every node and nothing is in flight. At
every step the scheduler may inject a fault, then does one ready thing: deliver the next
message of one direction (every message goes through ``encode_message`` / ``decode_message``),
fire a node's retransmission timer, restart a crashed node, request a relay at a node, hand a
deliverable key out to its SAE, give up a relay whose origin's deadline passed, or fill a pad
stream. Faults: drop, duplicate, reorder or delay a message; crash a node (down for some steps,
messages to it lost), also between the effects of one input (``crash_mid_effects``: after a
store write, before the send that follows it); delay a pad deposit at one end; flip a pad bit at
one end (the two ends then decrypt different keys: the confirmation must abort the relay).

Invariants (``RelayRunReport`` counters; ``relay_invariants`` checks the final ones):

- ``delivered_twice``: a key ID becomes deliverable twice at a node;
- ``lost``: a key deliverable at one end of a relay and not at the other, or with other bytes;
  a relay committed at one node and aborted at another;
- ``half_relayed``: after quiet, a relay not finished at some node, or an aborted relay whose
  key is still held; or no quiet within ``quiet_steps_max``;
- ``pad_reused``: a pad range spent twice at one end (the store refuses it) or read after use;
- ``pad_misaccounted``: a hop's allocation for a relay that is not exactly its payload, two
  allocations of one relay on one hop, or a receiver that used another range than the
  sender allocated for that relay;
- ``protocol_errors``: a node refused a message (none is forged here, so that is a bug).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qkdnode.errors import KeyStoreError, ProtocolError
from qkdnode.relay.events import (
    AbortRequested,
    Direction,
    Effect,
    Input,
    PeerMessage,
    Position,
    RelayConfig,
    RelayFinished,
    RelayRefused,
    RelayRequested,
    RelayStarted,
    RetransmitDue,
    SaveRelay,
    SendRelay,
)
from qkdnode.relay.machine import RelayMachine
from qkdnode.relay.messages import decode_message, encode_message
from qkdnode.simulation.relay_invariants import check_final
from qkdnode.simulation.relay_settings import (
    LINKS,
    NODES,
    ROUTES,
    SAE_OF,
    RelayRunReport,
    RelaySimSettings,
)
from qkdnode.simulation.relay_store import RelayStoreModel

MachineFactory = Callable[..., RelayMachine]


class _Crashed(Exception):
    """The node applying effects crashed (the rest of its effects are lost)."""


@dataclass(slots=True)
class _Envelope:
    data: bytes
    ready_step: int


@dataclass(slots=True)
class _Started:
    key_id: uuid.UUID
    route: tuple[str, ...]
    key_bits: int
    abort_at_step: int


@dataclass(slots=True)
class RelayNode:
    """A node's durable store and its machine (``None`` while the node is down)."""

    name: str
    store: RelayStoreModel
    config: RelayConfig
    machine: RelayMachine | None = None
    down_until_step: int = 0
    retransmit_at_step: int = 0
    delivered: dict[uuid.UUID, bytes] = field(default_factory=dict, repr=False)  # ever deliverable


def _neighbours(name: str) -> tuple[str, ...]:
    return tuple(sorted({b for a, b in LINKS if a == name} | {a for a, b in LINKS if b == name}))


class RelayWorld:
    """The three nodes, the network and the invariants of one run."""

    def __init__(
        self, seed: int, settings: RelaySimSettings, machine_factory: MachineFactory
    ) -> None:
        self.seed = seed
        self.settings = settings
        self.rng = random.Random(seed)
        self.report = RelayRunReport(seed=seed)
        self.step_count = 0
        self.faults_on = False
        self.requests_on = True
        self._factory = machine_factory
        self._crash_pending: tuple[int, str] | None = None  # armed by a scripted run
        self.pipes: dict[tuple[str, str], deque[_Envelope]] = {}
        for a, b in LINKS:
            self.pipes[(a, b)] = deque()
            self.pipes[(b, a)] = deque()
        self.material: dict[tuple[str, str], bytearray] = {p: bytearray() for p in self.pipes}
        self.pending_deposits: list[tuple[int, str, str, Direction]] = []
        self.started: dict[uuid.UUID, _Started] = {}
        self.nodes: dict[str, RelayNode] = {}
        for name in NODES:
            neighbours = _neighbours(name)
            node = RelayNode(
                name=name,
                store=RelayStoreModel(neighbours, self._deliverable_hook(name)),
                config=RelayConfig(
                    node=name,
                    neighbours=frozenset(neighbours),
                    local_sae_ids=frozenset({SAE_OF[name]}),
                ),
            )
            self.nodes[name] = node
        for pipe in self.pipes:
            self._produce(pipe, settings.pad_initial_bits // 8, lag_steps_max=0)
        for node in self.nodes.values():
            self._start(node)

    def note(self, text: str) -> None:
        self.report.trace.append(f"{self.step_count}: {text}")

    def _deliverable_hook(self, name: str) -> Callable[[uuid.UUID, bytes], None]:
        def hook(key_id: uuid.UUID, key: bytes) -> None:
            node = self.nodes[name]
            if key_id in node.delivered:
                self.report.violate(
                    "delivered_twice", f"key {key_id} became deliverable twice at {name}"
                )
            node.delivered[key_id] = key

        return hook

    # ---- nodes ----------------------------------------------------------------------------------
    def _start(self, node: RelayNode) -> None:
        node.machine = self._factory(
            node.config, store=node.store, pads=node.store, random_bytes=self.rng.randbytes
        )
        node.retransmit_at_step = self.step_count + self._interval()
        self.feed(node, RetransmitDue())

    def _interval(self) -> int:
        interval = self.settings.retransmit_interval_steps
        return self.rng.randint(interval // 2, interval * 3 // 2)

    def crash(self, node: RelayNode) -> None:
        if node.machine is None:
            return
        node.machine = None
        node.down_until_step = self.step_count + self.rng.randint(1, self.settings.down_steps_max)
        self.report.crashes += 1
        self.note(f"crash {node.name} until {node.down_until_step}")

    def feed(self, node: RelayNode, event: Input) -> None:
        machine = node.machine
        assert machine is not None
        try:
            effects = machine.receive(event)
        except ProtocolError as exc:
            self.report.violate("protocol_errors", f"{node.name} refused {event!r}: {exc}")
            return
        self._event()
        with contextlib.suppress(_Crashed):
            self._apply(node, effects)

    def _event(self) -> None:
        """One event happened (a message handled, an effect applied): the scripted crash?"""
        self.report.events += 1
        if self._crash_pending is not None and self.report.events >= self._crash_pending[0]:
            name = self._crash_pending[1]
            self._crash_pending = None
            self.note(f"scripted crash of {name} after event {self.report.events}")
            self.crash(self.nodes[name])

    def _apply(self, node: RelayNode, effects: Sequence[Effect]) -> None:
        mid_crash_at = -1
        if (
            self.faults_on
            and "crash_mid_effects" in self.settings.faults
            and len(effects) > 1
            and self.rng.random() < self.settings.fault_probability
        ):
            mid_crash_at = self.rng.randrange(1, len(effects))
        for index, effect in enumerate(effects):
            if index == mid_crash_at:
                self.report.faults_injected += 1
                self.report.crashes_between_effects += 1
                self.note(f"fault crash_mid_effects {node.name} before {type(effect).__name__}")
                self.crash(node)
            if node.machine is None:
                raise _Crashed
            self._apply_one(node, effect)
            self._event()

    def _apply_one(self, node: RelayNode, effect: Effect) -> None:
        match effect:
            case SaveRelay():
                try:
                    node.store.apply(effect)
                except KeyStoreError as exc:
                    self.report.violate("pad_reused", f"{node.name}'s store refused: {exc}")
                    raise _Crashed from None  # the node stops, as on a failed transaction
                self.note(f"save {node.name} {effect.record!r}")
                record = effect.record
                if record.position is Position.ORIGIN and record.key_id not in self.started:
                    self.report.relays_started += 1
                    self.started[record.key_id] = _Started(
                        key_id=record.key_id,
                        route=record.route,
                        key_bits=record.key_bits,
                        abort_at_step=self.step_count
                        + self.rng.randint(
                            self.settings.abort_after_steps_min,
                            self.settings.abort_after_steps_max,
                        ),
                    )
            case SendRelay(peer=peer, message=message):
                pipe = self.pipes[(node.name, peer)]
                pipe.append(_Envelope(encode_message(message), self.step_count))
                self.note(f"send {node.name}->{peer} {message!r}")
            case RelayStarted():
                pass  # counted from the store: a crash may come between the write and this
            case RelayRefused(reason=reason):
                self.report.refused_at_request += 1
                self.note(f"refused at {node.name}: {reason}")
            case RelayFinished():
                pass  # outcomes are counted from the stores at the end

    # ---- actions --------------------------------------------------------------------------------
    def deliver(self, pipe: tuple[str, str]) -> None:
        envelope = self.pipes[pipe].popleft()
        node = self.nodes[pipe[1]]
        if node.machine is None:
            self.note(f"lost {pipe[0]}->{pipe[1]} (down)")
            return
        message = decode_message(envelope.data)
        self.report.messages_delivered += 1
        self.note(f"deliver {pipe[0]}->{pipe[1]} {message!r}")
        self.feed(node, PeerMessage(peer=pipe[0], message=message))

    def request(self, node: RelayNode) -> None:
        routes: list[tuple[str, ...]] = [r for r in ROUTES if r[0] == node.name]
        if self.settings.scripted:
            routes = [self.settings.scripted_route]
        route = self.rng.choice(routes)
        request = RelayRequested(
            route=route,
            master_sae_id=SAE_OF[route[0]],
            slave_sae_id=SAE_OF[route[-1]],
            key_bits=self.rng.choice(self.settings.key_bits_choices),
        )
        self.report.requests += 1
        self.feed(node, request)

    def hand_out(self, node: RelayNode) -> None:
        ids = node.store.deliverable_ids()
        if ids:
            node.store.hand_out(self.rng.choice(ids))
            self.report.keys_handed_out += 1

    def _produce(self, pipe: tuple[str, str], nbytes: int, *, lag_steps_max: int) -> None:
        """The link of ``pipe`` made ``nbytes`` more pad for that direction: both ends get it,
        each at its own step."""
        self.material[pipe].extend(self.rng.randbytes(nbytes))
        sender, receiver = pipe
        for node, peer, direction in (
            (sender, receiver, Direction.OUT),
            (receiver, sender, Direction.IN),
        ):
            due = self.step_count + self.rng.randint(0, lag_steps_max)
            self.pending_deposits.append((due, node, peer, direction))
        self._deposit_due()

    def _produce_now(self, pipe: tuple[str, str]) -> None:
        self._produce(pipe, self.settings.pad_deposit_bits // 8, lag_steps_max=8)

    def _deposit_due(self) -> None:
        keep = []
        for due, name, peer, direction in self.pending_deposits:
            if due > self.step_count:
                keep.append((due, name, peer, direction))
                continue
            store = self.nodes[name].store
            pipe = (name, peer) if direction is Direction.OUT else (peer, name)
            held = len(store.stream(peer, direction).material)
            store.deposit(peer, direction, bytes(self.material[pipe][held:]))
        self.pending_deposits = keep

    # ---- faults ---------------------------------------------------------------------------------
    def inject_fault(self) -> None:
        fault = self.rng.choice(self.settings.faults)
        busy = [p for p, q in self.pipes.items() if q]
        injected = True
        if fault in ("drop", "duplicate", "reorder", "delay") and not busy:
            injected = False
        elif fault == "drop":
            self.pipes[self.rng.choice(busy)].popleft()
        elif fault == "duplicate":
            pipe = self.pipes[self.rng.choice(busy)]
            pipe.insert(self.rng.randrange(len(pipe) + 1), _Envelope(pipe[0].data, 0))
        elif fault == "reorder":
            pipe = self.pipes[self.rng.choice(busy)]
            if len(pipe) > 1:
                pipe[0], pipe[1] = pipe[1], pipe[0]
            else:
                injected = False
        elif fault == "delay":
            pipe = self.pipes[self.rng.choice(busy)]
            pipe[0].ready_step = self.step_count + self.rng.randint(1, 50)
        elif fault == "crash":
            self.crash(self.nodes[self.rng.choice(NODES)])
        elif fault == "pad_lag":
            direction = self.rng.choice(sorted(self.pipes))
            self._produce(direction, self.settings.pad_deposit_bits // 8, lag_steps_max=60)
        elif fault == "pad_corrupt":
            injected = self._corrupt_pad()
        else:
            injected = False  # crash_mid_effects is drawn while effects are applied
        if injected:
            self.report.faults_injected += 1
            self.note(f"fault {fault}")

    def _corrupt_pad(self) -> bool:
        name = self.rng.choice(NODES)
        store = self.nodes[name].store
        peer = self.rng.choice(_neighbours(name))
        stream = store.stream(peer, Direction.IN)
        first = max((e for _, e, _ in stream.spent), default=0) // 8
        if first >= len(stream.material):
            return False
        store.corrupt(peer, Direction.IN, self.rng.randrange(first, len(stream.material)))
        return True

    # ---- the scheduler --------------------------------------------------------------------------
    def step(self) -> None:
        self.step_count += 1
        settings = self.settings
        self._deposit_due()
        if self.faults_on and self.rng.random() < settings.fault_probability:
            self.inject_fault()
        actions: list[Callable[[], None]] = []
        for pipe, queue in self.pipes.items():
            if queue and queue[0].ready_step <= self.step_count:
                actions.append(lambda pipe=pipe: self.deliver(pipe))  # type: ignore[misc]
        for node in self.nodes.values():
            if node.machine is None:
                if self.step_count >= node.down_until_step:
                    actions.append(lambda node=node: self._restart(node))  # type: ignore[misc]
                continue
            if self.step_count >= node.retransmit_at_step:
                actions.append(lambda node=node: self._retransmit(node))  # type: ignore[misc]
            if node.store.deliverable_ids() and self.rng.random() < settings.handout_probability:
                actions.append(lambda node=node: self.hand_out(node))  # type: ignore[misc]
        if self.requests_on and self.rng.random() < settings.request_probability:
            node = self.nodes[self.rng.choice(NODES)]
            if node.machine is not None:
                actions.append(lambda node=node: self.request(node))  # type: ignore[misc]
        for relay in self.started.values():
            origin = self.nodes[relay.route[0]]
            if relay.abort_at_step == self.step_count and origin.machine is not None:
                key_id = relay.key_id
                actions.append(
                    lambda origin=origin, key_id=key_id: self.feed(  # type: ignore[misc]
                        origin, AbortRequested(key_id=key_id)
                    )
                )
        if self.rng.random() < settings.pad_deposit_probability:
            pipe = self.rng.choice(sorted(self.pipes))
            actions.append(lambda pipe=pipe: self._produce_now(pipe))  # type: ignore[misc]
        if actions:
            self.rng.choice(actions)()

    def _restart(self, node: RelayNode) -> None:
        self.note(f"restart {node.name}")
        self._start(node)

    def _retransmit(self, node: RelayNode) -> None:
        node.retransmit_at_step = self.step_count + self._interval()
        self.feed(node, RetransmitDue())

    def quiet(self) -> bool:
        """Nothing in flight, every node up, every relay finished everywhere."""
        if any(self.pipes.values()) or self.pending_deposits:
            return False
        for node in self.nodes.values():
            if node.machine is None or node.store.unfinished_relays():
                return False
        return True


def crash_at_every_boundary(
    route: tuple[str, ...] = ("A", "R", "C"),
    *,
    abort: bool = False,
    seed: int = 0,
    machine_factory: MachineFactory = RelayMachine,
    quiet_steps_max: int | None = None,
) -> list[RelayRunReport]:
    """One scripted relay along ``route`` (committed, or with ``abort`` aborted by its
    confirmation), crashed at every event boundary of a clean run in turn: after each input a
    node handles and after each effect it applies (so also between a store write and the send
    that follows it), once for each node on the route. One report per (event, node)."""
    settings = RelaySimSettings(
        scripted=True,
        scripted_route=route,
        scripted_corrupt_pad=abort,
    )
    if quiet_steps_max is not None:
        settings = dataclasses.replace(settings, quiet_steps_max=quiet_steps_max)
    clean = simulate_relay_run(seed, settings, machine_factory=machine_factory)
    reports = [clean]
    for event in range(1, clean.events + 1):
        for node in route:
            crashing = dataclasses.replace(settings, crash_at_event=(event, node))
            reports.append(simulate_relay_run(seed, crashing, machine_factory=machine_factory))
    return reports


def simulate_relay_run(
    seed: int,
    settings: RelaySimSettings | None = None,
    *,
    trace: bool = False,
    machine_factory: MachineFactory = RelayMachine,
) -> RelayRunReport:
    """Run one seed through warm-up, faults and the quiet phase; report what broke."""
    settings = settings if settings is not None else RelaySimSettings()
    started = time.perf_counter()
    world = RelayWorld(seed, settings, machine_factory)
    rng = world.rng
    if settings.scripted:
        world.requests_on = False
        world.report.events = 0  # boundaries are counted from the request on
        world._crash_pending = settings.crash_at_event
        route = settings.scripted_route
        if settings.scripted_corrupt_pad:
            world.nodes[route[-1]].store.corrupt(route[-2], Direction.IN, 0)
        world.request(world.nodes[route[0]])
        for relay in world.started.values():
            relay.abort_at_step = -1  # no deadline
    else:
        for _ in range(rng.randint(0, settings.warmup_steps_max)):
            world.step()
        world.faults_on = True
        for _ in range(rng.randint(1, settings.fault_steps_max)):
            world.step()
        world.faults_on = False
        world.requests_on = False
    quiet_from = world.step_count
    while not world.quiet():
        if world.step_count - quiet_from > settings.quiet_steps_max:
            unfinished = {
                n.name: [str(r.key_id) for r in n.store.unfinished_relays()]
                for n in world.nodes.values()
            }
            world.report.violate(
                "half_relayed",
                f"no quiet within {settings.quiet_steps_max} steps; unfinished: {unfinished}",
            )
            break
        world.step()
    check_final(world)
    report = world.report
    report.steps = world.step_count
    report.seconds = time.perf_counter() - started
    if not trace:
        report.trace = []
    return report
