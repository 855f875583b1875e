"""The relay simulation's final invariants, checked once a run is quiet (``relay_world``
describes each counter)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Protocol

from qkdnode.relay.events import Direction, RelayState
from qkdnode.relay.messages import payload_bits
from qkdnode.simulation.relay_settings import RelayRunReport
from qkdnode.simulation.relay_store import RelayStoreModel


class _Node(Protocol):
    @property
    def store(self) -> RelayStoreModel: ...
    @property
    def delivered(self) -> Mapping[uuid.UUID, bytes]: ...


class _Relay(Protocol):
    @property
    def route(self) -> tuple[str, ...]: ...
    @property
    def key_bits(self) -> int: ...


class RelayWorld(Protocol):
    """What the checker reads of a run: its report, nodes, relays started and links."""

    @property
    def report(self) -> RelayRunReport: ...
    @property
    def nodes(self) -> Mapping[str, _Node]: ...
    @property
    def started(self) -> Mapping[uuid.UUID, _Relay]: ...
    @property
    def pipes(self) -> Mapping[tuple[str, str], object]: ...


def check_final(world: RelayWorld) -> None:
    """The invariants after quiet: every relay finished alike everywhere, the same key at both
    ends of a committed one, and the pads accounted (see ``relay_world``)."""
    report = world.report
    records = {name: node.store.records() for name, node in world.nodes.items()}
    for key_id, relay in sorted(world.started.items()):
        route = relay.route
        origin, terminal = world.nodes[route[0]], world.nodes[route[-1]]
        states = {name: records[name].get(key_id) for name in route}
        unfinished = [n for n, r in states.items() if r is not None and not r.state.finished]
        origin_record = states[route[0]]
        if origin_record is None or unfinished:
            report.violate("half_relayed", f"relay {key_id} unfinished at {unfinished}")
            continue
        committed = origin_record.state is RelayState.COMMITTED
        if committed:
            report.relays_committed += 1
        else:
            report.relays_aborted += 1
            if origin_record.reason.startswith("confirmation tag differs"):
                report.tag_mismatch_aborts += 1
        outcomes = {n: r.state for n, r in states.items() if r is not None}
        if committed and any(s is not RelayState.COMMITTED for s in outcomes.values()):
            report.violate("lost", f"relay {key_id} committed at the origin, not at all")
        if not committed and RelayState.COMMITTED in outcomes.values():
            report.violate("lost", f"relay {key_id} aborted at the origin, committed elsewhere")
        if committed and len(outcomes) != len(route):
            report.violate("lost", f"relay {key_id} committed with nodes that never saw it")
        at_origin = origin.delivered.get(key_id)
        at_terminal = terminal.delivered.get(key_id)
        if at_origin != at_terminal:
            report.violate(
                "lost",
                f"relay {key_id}: deliverable at origin {at_origin is not None}, at "
                f"terminal {at_terminal is not None}, equal {at_origin == at_terminal}",
            )
        if not committed:
            held = [n for n, r in states.items() if r is not None and r.key]
            if held:
                report.violate("half_relayed", f"aborted relay {key_id} still held at {held}")
    for name, by_id in records.items():
        stray = [k for k in by_id if k not in world.started]
        if stray:
            report.violate("half_relayed", f"{name} holds relays never started: {stray}")
    _check_pads(world)


def _check_pads(world: RelayWorld) -> None:
    report = world.report
    hops_paid: dict[uuid.UUID, set[tuple[str, str]]] = {}
    for sender, receiver in sorted(world.pipes):
        out = world.nodes[sender].store.stream(receiver, Direction.OUT)
        into = world.nodes[receiver].store.stream(sender, Direction.IN)
        allocated: dict[uuid.UUID, tuple[int, int]] = {}
        for start, end, key_id in out.spent:
            relay = world.started.get(key_id)
            if key_id in allocated:
                report.violate(
                    "pad_misaccounted", f"relay {key_id} allocated twice {sender}->{receiver}"
                )
            allocated[key_id] = (start, end)
            hops_paid.setdefault(key_id, set()).add((sender, receiver))
            if relay is None or end - start != payload_bits(relay.key_bits):
                report.violate(
                    "pad_misaccounted",
                    f"allocation {start}..{end} {sender}->{receiver} is not a relay's payload",
                )
            report.pad_bits_allocated += end - start
            report.hop_allocations += 1
        # the bits the sender actually sent on this hop, from its stored Forwards
        sent_bits = sum(
            8 * len(record.forward_out.ciphertext)
            for record in world.nodes[sender].store.records().values()
            if record.forward_out is not None
            and record.pad_out is not None
            and record.pad_out.peer == receiver
        )
        report.payload_bits_relayed += sent_bits
        if sent_bits != sum(end - start for start, end, _ in out.spent):
            report.violate(
                "pad_misaccounted",
                f"{sender}->{receiver}: {sent_bits} bits sent, "
                f"{sum(e - s for s, e, _ in out.spent)} pad bits allocated",
            )
        for start, end, key_id in into.spent:
            if allocated.get(key_id) != (start, end):
                report.violate(
                    "pad_misaccounted",
                    f"{receiver} took {start}..{end} from {sender} for relay {key_id}, "
                    f"allocated {allocated.get(key_id)}",
                )
    for key_id, relay in world.started.items():
        origin = world.nodes[relay.route[0]].store.relay(key_id)
        hops = set(zip(relay.route, relay.route[1:], strict=False))
        committed = origin is not None and origin.state is RelayState.COMMITTED
        if committed and hops_paid.get(key_id) != hops:
            report.violate(
                "pad_misaccounted",
                f"committed relay {key_id} paid hops {hops_paid.get(key_id)}, not {hops}",
            )
