"""A small in-memory network of relay machines for the machine's unit tests (h11's
``ConnectionPair`` idea): nodes on a chain, their store models, a FIFO queue of messages."""

from __future__ import annotations

import copy
import random
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qkdnode.relay.events import (
    Direction,
    Effect,
    Input,
    PeerMessage,
    RelayConfig,
    RelayRecord,
    RelayState,
    RetransmitDue,
    SaveRelay,
    SendRelay,
)
from qkdnode.relay.machine import RelayMachine
from qkdnode.relay.messages import RelayMessage
from qkdnode.simulation.relay_store import RelayStoreModel

CHAIN = ("A", "R", "C")
SAE = {"A": "sae-a", "R": "sae-r", "C": "sae-c"}


@dataclass
class Wire:
    """One message in flight."""

    source: str
    target: str
    message: RelayMessage


@dataclass
class RelayNet:
    """Machines on a chain, sharing a seeded generator; every effect applied at once."""

    seed: int = 0
    chain: tuple[str, ...] = CHAIN
    pad_bytes: int = 4096
    rng: random.Random = field(init=False)
    stores: dict[str, RelayStoreModel] = field(init=False)
    machines: dict[str, RelayMachine] = field(init=False)
    queue: deque[Wire] = field(init=False, default_factory=deque)
    sent: list[Wire] = field(init=False, default_factory=list)
    effects: dict[str, list[Effect]] = field(init=False)
    calls: list[tuple[str, list[Effect]]] = field(init=False, default_factory=list)
    delivered: dict[str, dict[uuid.UUID, bytes]] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.stores = {}
        self.machines = {}
        self.effects = {name: [] for name in self.chain}
        self.delivered = {name: {} for name in self.chain}
        for index, name in enumerate(self.chain):
            neighbours = tuple(
                self.chain[j] for j in (index - 1, index + 1) if 0 <= j < len(self.chain)
            )
            self.stores[name] = RelayStoreModel(neighbours, self._hook(name))
            self.machines[name] = self.machine(name)
        for a, b in zip(self.chain, self.chain[1:], strict=False):
            for sender, receiver in ((a, b), (b, a)):
                material = self.rng.randbytes(self.pad_bytes)
                self.stores[sender].deposit(receiver, Direction.OUT, material)
                self.stores[receiver].deposit(sender, Direction.IN, material)

    def _hook(self, name: str) -> Callable[[uuid.UUID, bytes], None]:
        def hook(key_id: uuid.UUID, key: bytes) -> None:
            assert key_id not in self.delivered[name], "deliverable twice"
            self.delivered[name][key_id] = key

        return hook

    def config(self, name: str) -> RelayConfig:
        index = self.chain.index(name)
        neighbours = {self.chain[j] for j in (index - 1, index + 1) if 0 <= j < len(self.chain)}
        return RelayConfig(
            node=name, neighbours=frozenset(neighbours), local_sae_ids=frozenset({SAE[name]})
        )

    def machine(self, name: str) -> RelayMachine:
        store = self.stores[name]
        return RelayMachine(
            self.config(name), store=store, pads=store, random_bytes=self.rng.randbytes
        )

    def feed(self, name: str, event: Input) -> list[Effect]:
        effects = self.machines[name].receive(event)
        self.effects[name].extend(effects)
        self.calls.append((name, effects))
        for effect in effects:
            if isinstance(effect, SaveRelay):
                self.stores[name].apply(effect)
            elif isinstance(effect, SendRelay):
                wire = Wire(name, effect.peer, effect.message)
                self.queue.append(wire)
                self.sent.append(wire)
        return effects

    def deliver_one(self) -> Wire:
        wire = self.queue.popleft()
        self.feed(wire.target, PeerMessage(peer=wire.source, message=wire.message))
        return wire

    def run(self, *, retransmit_rounds: int = 3) -> None:
        """Deliver until nothing is in flight; then retransmit and deliver again, a few times."""
        for _ in range(retransmit_rounds + 1):
            while self.queue:
                self.deliver_one()
            if not any(s.unfinished_relays() for s in self.stores.values()):
                return
            for name in self.chain:
                self.feed(name, RetransmitDue())

    def records(self, key_id: uuid.UUID) -> dict[str, RelayRecord | None]:
        return {name: store.relay(key_id) for name, store in self.stores.items()}

    def record(self, name: str, key_id: uuid.UUID) -> RelayRecord:
        record = self.stores[name].relay(key_id)
        assert record is not None, f"{name} holds no record of {key_id}"
        return record

    def states(self, key_id: uuid.UUID) -> dict[str, RelayState]:
        """The state of the relay at each node that holds a record of it."""
        return {n: r.state for n, r in self.records(key_id).items() if r is not None}

    def snapshot(self) -> object:
        """Everything durable, to compare before and after a refused input."""
        return copy.deepcopy(
            {
                name: (
                    store.records(),
                    store.deliverable_ids(),
                    {
                        (peer, d): (
                            bytes(store.stream(peer, d).material),
                            list(store.stream(peer, d).spent),
                            store.stream(peer, d).cursor_bits,
                        )
                        for peer in self.config(name).neighbours
                        for d in Direction
                    },
                )
                for name, store in self.stores.items()
            }
        )

    def fork(self) -> RelayNet:
        twin = copy.deepcopy(self)
        for name in twin.chain:  # the machines must read the twin's stores
            twin.machines[name] = twin.machine(name)
            twin.stores[name]._on_deliverable = twin._hook(name)
        return twin
