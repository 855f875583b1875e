"""The key relay's trio shell (``qkdnode.node.relaying.RelayService``) in one process: three
services A, R, C on a chain over real relay stores and real link key stores (each link's two
ends hold the same committed blocks), their links' sessions replaced by fakes that carry each
control frame through the node's registry and Control encoding to the neighbour's service.

Real time (the service works in worker threads, which an autojump clock would jump over), with
a short retransmission period; conditions are awaited, never timed."""

from __future__ import annotations

import dataclasses
import random
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar, cast

import pytest
import trio

from qkdnode.audit import AuditKind
from qkdnode.audit.trail import AuditEntry, AuditValue
from qkdnode.channel.messages import Control, decode_payload, encode_payload
from qkdnode.config.relay import RelaySection, RemoteNode
from qkdnode.coordination.wire import make_registry
from qkdnode.delivery.api import ApiError
from qkdnode.node.relaying import RelayService
from qkdnode.node.state import Node
from qkdnode.relay.events import Direction, PadRange, Position, RelayRecord, RelayState
from qkdnode.relay.padwire import RELAY_CONTROL_KINDS
from qkdnode.store import KeyStore, StagedBlock
from qkdnode.store.audit import AuditTrail, read_trail
from qkdnode.store.relaystore import RelayStore
from tests.helpers_store import random_blocks

T = TypeVar("T")
REGISTRY = make_registry()
CHAIN = ("A", "R", "C")
LINKS = (("A", "R"), ("R", "C"))  # the left node of each link is its Alice
SAE = {"A": "sae-a", "C": "sae-c"}
KEY_BITS = 256
PAD_TARGET_BITS = 4096
RETRANSMIT_S = 0.05
WAIT_LIMIT_S = 10.0  # a safety net only: every wait is for a condition


@dataclass
class FakeSession:
    """A link's authenticated session as the service uses it: each control frame is checked
    by the node's registry, encoded and decoded as a Control frame and handed to the
    neighbour's service as coming from ``sender``."""

    sender: str
    target: RelayService | None = None
    kinds: list[str] = field(default_factory=list)
    # frames of these kinds are held back (in order) until ``flush``
    hold_kinds: frozenset[str] = frozenset()
    held: list[Control] = field(default_factory=list)

    async def send_control(self, kind: str, body: Mapping[str, int | float | bool | bytes]) -> None:
        assert kind in RELAY_CONTROL_KINDS
        REGISTRY.check(kind, body)
        payload = encode_payload(Control(kind=kind, body=body), REGISTRY)
        frame = decode_payload(Control, payload, REGISTRY)
        assert isinstance(frame, Control)
        self.kinds.append(kind)
        if kind in self.hold_kinds:
            self.held.append(frame)
            return
        self._deliver(frame)

    def _deliver(self, frame: Control) -> None:
        assert self.target is not None
        self.target.on_control(self.sender, frame.kind, frame.body)

    def flush(self) -> None:
        """Stop holding frames back and deliver those held."""
        self.hold_kinds = frozenset()
        held, self.held = self.held, []
        for frame in held:
            self._deliver(frame)


@dataclass
class FakeManager:
    """The key manager's part the service uses: relayed deliveries into the audit trail."""

    audit: AuditTrail

    async def record_delivery(self, fields: Mapping[str, AuditValue]) -> None:
        self.audit.record(AuditKind.KEYS_DELIVERED, **fields)


@dataclass
class FakeLink:
    """What the service reads of a link's ``Node``."""

    config: SimpleNamespace
    store: KeyStore
    audit: AuditTrail
    directory: Path
    session: FakeSession
    exchange: FakeSession | None = None

    @property
    def manager(self) -> FakeManager:
        return FakeManager(self.audit)


@dataclass
class Chain:
    services: dict[str, RelayService]
    relay_stores: dict[str, RelayStore]
    # (this node, peer) -> this node's end of the link
    links: dict[tuple[str, str], FakeLink]
    blocks: dict[tuple[str, str], list[StagedBlock]]

    def link(self, node: str, peer: str) -> FakeLink:
        return self.links[(node, peer)]

    def cut(self, left: str, right: str) -> None:
        """The session of the link goes away at both ends."""
        self.links[(left, right)].exchange = None
        self.links[(right, left)].exchange = None

    def restore(self, left: str, right: str) -> None:
        for a, b in ((left, right), (right, left)):
            self.links[(a, b)].exchange = self.links[(a, b)].session


def section_for(
    node: str, *, timeout_s: float, prebind_keys: int, pad_target_bits: int
) -> RelaySection:
    remotes = {}
    if node == "A":
        remotes = {"C": RemoteNode(node="C", route=("A", "R", "C"), saes=(SAE["C"],))}
    elif node == "C":
        remotes = {"A": RemoteNode(node="A", route=("C", "R", "A"), saes=(SAE["A"],))}
    return RelaySection(
        pad_target_bits=pad_target_bits,
        timeout_s=timeout_s,
        retransmit_s=RETRANSMIT_S,
        prebind_keys=prebind_keys,
        remotes=remotes,
    )


@asynccontextmanager
async def running_chain(
    tmp_path: Path,
    *,
    seed: int,
    keys_per_block: int = 40,
    blocks: int = 3,
    timeout_s: float = 5.0,
    prebind_keys: int = 0,
    pad_target_bits: int = PAD_TARGET_BITS,
    uncommitted: tuple[str, str] | None = None,
) -> AsyncIterator[Chain]:
    """The chain running; ``uncommitted``: the end (node, peer) of a link whose store holds
    the link's blocks staged only (not committed yet there)."""
    links: dict[tuple[str, str], FakeLink] = {}
    staged: dict[tuple[str, str], list[StagedBlock]] = {}
    key_stores: list[KeyStore] = []
    for number, (left, right) in enumerate(LINKS):
        link_blocks = random_blocks(
            seed * 10 + number, count=blocks, keys_per_block=keys_per_block, key_bytes=32
        )
        staged[(left, right)] = link_blocks
        for node, peer, role in ((left, right, "alice"), (right, left, "bob")):
            directory = tmp_path / f"link-{left}{right}-{node}"
            store = KeyStore.open(directory, node_name=node)
            key_stores.append(store)
            for block in link_blocks:
                store.stage_block(block)
                if (node, peer) != uncommitted:
                    store.commit_block(block.block_id)
            config = SimpleNamespace(
                node=SimpleNamespace(name=node, role=role),
                store=SimpleNamespace(key_size_bits=KEY_BITS),
            )
            session = FakeSession(sender=node)
            links[(node, peer)] = FakeLink(
                config=config,
                store=store,
                audit=AuditTrail.start(store, node_name=node),
                directory=directory,
                session=session,
                exchange=session,
            )
    relay_stores = {
        name: RelayStore.open(tmp_path / f"relay-{name}", node_name=name) for name in CHAIN
    }
    services: dict[str, RelayService] = {}
    for name in CHAIN:
        neighbours = {peer: link for (node, peer), link in links.items() if node == name}
        services[name] = RelayService(
            section_for(
                name,
                timeout_s=timeout_s,
                prebind_keys=prebind_keys,
                pad_target_bits=pad_target_bits,
            ),
            node_name=name,
            store=relay_stores[name],
            links={peer: cast(Node, link) for peer, link in neighbours.items()},
            local_saes=(SAE[name],) if name in SAE else (),
            random_bytes=random.Random(f"{seed}-{name}").randbytes,
        )
    for (_, peer), link in links.items():
        link.session.target = services[peer]
    chain = Chain(services, relay_stores, links, staged)
    try:
        async with trio.open_nursery() as nursery:
            for service in services.values():
                await nursery.start(service.run)
            yield chain
            nursery.cancel_scope.cancel()
    finally:
        for relay_store in relay_stores.values():
            relay_store.close()
        for key_store in key_stores:
            key_store.close()


async def read(function: Callable[[], T]) -> T:
    """Read the stores in a worker thread, as the service does (a batch may hold them)."""
    return await trio.to_thread.run_sync(function)


async def eventually(check: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(WAIT_LIMIT_S):
        while not await read(check):
            await trio.sleep(0.01)
        return
    raise AssertionError(f"never happened: {what}")


def unused_out_bits(store: RelayStore, peer: str) -> int:
    unsettled = sum(chunk.bits for chunk in store.unacked_out_chunks(peer))
    return unsettled + store.available_bits(peer, Direction.OUT) - store.next_offset_bits(peer)


def pads_filled_between(chain: Chain, sender: str, receiver: str) -> bool:
    store = chain.relay_stores[sender]
    settled = store.available_bits(receiver, Direction.OUT)
    return (
        not store.unacked_out_chunks(receiver)
        and unused_out_bits(store, receiver) >= PAD_TARGET_BITS
        and chain.relay_stores[receiver].available_bits(sender, Direction.IN) == settled
    )


def pads_filled(chain: Chain, target_bits: int) -> Callable[[], bool]:
    def check() -> bool:
        for node, peer in chain.links:
            store = chain.relay_stores[node]
            if store.unacked_out_chunks(peer) or unused_out_bits(store, peer) < target_bits:
                return False
            if chain.relay_stores[peer].available_bits(node, Direction.IN) != store.available_bits(
                peer, Direction.OUT
            ):
                return False
        return True

    return check


def span(peer: str, direction: Direction, bits: int) -> PadRange:
    return PadRange(peer=peer, direction=direction, offset_bits=0, bits=bits)


def no_unfinished(chain: Chain) -> Callable[[], bool]:
    return lambda: not any(store.unfinished_relays() for store in chain.relay_stores.values())


def half(blocks: list[StagedBlock], parity: int) -> list[bytes]:
    return [
        material
        for block in blocks
        for position, (_, material) in enumerate(block.consumer_keys)
        if position % 2 == parity
    ]


def delivered_entries(link: FakeLink) -> list[AuditEntry]:
    entries = [record.entry() for record in read_trail(link.directory).records]
    return [e for e in entries if e.kind == AuditKind.KEYS_DELIVERED.value]


def logged_ids(entry: AuditEntry) -> list[str]:
    ids = entry.fields["key_ids"]
    assert isinstance(ids, tuple)
    return list(ids)


def link_ends() -> list[tuple[str, str, int]]:
    """(sender, receiver, the sender's parity on the link) of each pad stream."""
    return [end for left, right in LINKS for end in ((left, right, 0), (right, left, 1))]


async def test_pads_fill_both_directions_of_both_links_to_the_target_with_the_same_bits(
    tmp_path: Path,
) -> None:
    async with running_chain(tmp_path, seed=1) as chain:
        await eventually(pads_filled(chain, PAD_TARGET_BITS), "pads filled to the target")
        chunk_keys = -(-PAD_TARGET_BITS // KEY_BITS)
        for sender, receiver, parity in link_ends():
            out = chain.relay_stores[sender]
            incoming = chain.relay_stores[receiver]
            assert out.available_bits(receiver, Direction.OUT) == PAD_TARGET_BITS
            assert incoming.available_bits(sender, Direction.IN) == PAD_TARGET_BITS
            sent = await read(partial(out.pad, span(receiver, Direction.OUT, PAD_TARGET_BITS)))
            got = await read(partial(incoming.pad, span(sender, Direction.IN, PAD_TARGET_BITS)))
            assert sent == got  # both ends hold the same pad bits
            left, right = (sender, receiver) if (sender, receiver) in LINKS else (receiver, sender)
            # the sender's oldest keys of its half of the link, in order
            expected = b"".join(half(chain.blocks[(left, right)], parity)[:chunk_keys])
            assert sent == expected
        # a few more timer periods: the pads are full, nothing more is taken
        await trio.sleep(6 * RETRANSMIT_S)
        for sender, receiver, parity in link_ends():
            per_parity = 3 * 40 // 2
            for end in (chain.link(sender, receiver), chain.link(receiver, sender)):
                count = await read(partial(end.store.available_count, parity=parity))
                assert count == per_parity - chunk_keys
            assert chain.relay_stores[sender].available_bits(receiver, Direction.OUT) == (
                PAD_TARGET_BITS
            )


async def test_scarce_link_keys_the_pad_takes_at_most_half_of_what_delivery_keeps(
    tmp_path: Path,
) -> None:
    # 5 keys of each half per link: the first chunk takes (5 - 0) // 2 = 2, then
    # (3 - 2) // 2 = 0 more: delivery keeps 3 >= the 2 unused in the pad
    async with running_chain(tmp_path, seed=2, keys_per_block=10, blocks=1) as chain:
        await eventually(
            lambda: all(
                chain.relay_stores[node].available_bits(peer, Direction.OUT) > 0
                for node, peer in chain.links
            ),
            "a first chunk on every stream",
        )
        await trio.sleep(6 * RETRANSMIT_S)
        for sender, receiver, parity in link_ends():
            out = chain.relay_stores[sender]
            unused = await read(partial(unused_out_bits, out, receiver))
            assert unused == 2 * KEY_BITS
            for end in (chain.link(sender, receiver), chain.link(receiver, sender)):
                left = await read(partial(end.store.available_count, parity=parity))
                assert left == 3
                assert left >= unused // KEY_BITS


async def test_a_pad_offer_waits_until_the_receiver_has_committed_the_keys(
    tmp_path: Path,
) -> None:
    async with running_chain(tmp_path, seed=7, uncommitted=("C", "R")) as chain:
        r, c = chain.relay_stores["R"], chain.relay_stores["C"]
        # R offers its oldest keys; C holds them staged only: not yet, offered again later
        await eventually(lambda: bool(r.unacked_out_chunks("C")), "R offered a chunk to C")
        await eventually(
            lambda: pads_filled_between(chain, "A", "R") and pads_filled_between(chain, "R", "A"),
            "the other link filled meanwhile",
        )
        await trio.sleep(6 * RETRANSMIT_S)
        assert await read(partial(r.available_bits, "C", Direction.OUT)) == 0
        assert await read(partial(c.available_bits, "R", Direction.IN)) == 0
        # C has no keys of its own half to offer either
        assert await read(partial(c.available_bits, "R", Direction.OUT)) == 0
        assert await read(partial(c.unacked_out_chunks, "R")) == []
        end = chain.link("C", "R")
        assert await read(partial(end.store.available_count, parity=0)) == 0
        for block in chain.blocks[("R", "C")]:
            await read(partial(end.store.commit_block, block.block_id))
        await eventually(pads_filled(chain, PAD_TARGET_BITS), "every pad filled once committed")
        sent = await read(partial(r.pad, span("C", Direction.OUT, PAD_TARGET_BITS)))
        assert sent == await read(partial(c.pad, span("R", Direction.IN, PAD_TARGET_BITS)))


@pytest.mark.parametrize(("origin", "terminal"), [("A", "C"), ("C", "A")])
async def test_enc_keys_at_one_end_dec_keys_at_the_other_same_keys_once(
    tmp_path: Path, origin: str, terminal: str
) -> None:
    async with running_chain(tmp_path, seed=3) as chain:
        await eventually(pads_filled(chain, PAD_TARGET_BITS), "pads filled")
        master, slave = SAE[origin], SAE[terminal]
        keys = await chain.services[origin].enc_keys(
            master_sae=master, slave_sae=slave, number=3, size_bits=KEY_BITS
        )
        assert len(keys) == 3
        assert len({key_id for key_id, _ in keys}) == 3
        assert all(len(key) == KEY_BITS // 8 for _, key in keys)
        assert len({key for _, key in keys}) == 3
        ids = [key_id for key_id, _ in keys]
        asked = ids[::-1]
        got = await chain.services[terminal].dec_keys(
            slave_sae=slave, master_sae=master, key_ids=asked
        )
        assert [key_id for key_id, _ in got] == asked
        assert dict(got) == dict(keys)
        with pytest.raises(ApiError) as again:
            await chain.services[terminal].dec_keys(
                slave_sae=slave, master_sae=master, key_ids=ids[:1]
            )
        assert again.value.status == 400
        # the relays are finished everywhere; the middle node never holds a deliverable key
        await eventually(no_unfinished(chain), "every relay finished")
        for name in CHAIN:
            store = chain.relay_stores[name]
            assert await read(store.deliverable_ids) == []
            for key_id in ids:
                record = await read(partial(store.relay, key_id))
                assert record is not None
                assert record.state is RelayState.COMMITTED
                assert record.route == (origin, "R", terminal)
        # the audit trail of each end's link records the delivery as relayed, with its route
        origin_entries = delivered_entries(chain.link(origin, "R"))
        terminal_entries = delivered_entries(chain.link(terminal, "R"))
        assert [e.fields["role"] for e in origin_entries] == ["master"]
        assert [e.fields["role"] for e in terminal_entries] == ["slave"]
        for entry, order in ((origin_entries[0], ids), (terminal_entries[0], asked)):
            assert entry.fields["relayed"] is True
            assert entry.fields["route"] == f"{origin}/R/{terminal}"
            assert entry.fields["master_sae"] == master
            assert entry.fields["slave_sae"] == slave
            assert logged_ids(entry) == [str(k) for k in order]
        assert delivered_entries(chain.link("R", origin)) == []
        assert delivered_entries(chain.link("R", terminal)) == []


async def race_two_dec_keys(
    chain: Chain,
) -> tuple[list[tuple[uuid.UUID, bytes]], list[list[tuple[uuid.UUID, bytes]] | ApiError]]:
    """Relay keys A -> C, then two dec_keys at C for them at once: the keys and the two
    answers."""
    await eventually(pads_filled(chain, PAD_TARGET_BITS), "pads filled")
    keys = await chain.services["A"].enc_keys(
        master_sae="sae-a", slave_sae="sae-c", number=2, size_bits=KEY_BITS
    )
    ids = [key_id for key_id, _ in keys]
    await eventually(no_unfinished(chain), "the relays finished (deliverable at C)")
    answers: list[list[tuple[uuid.UUID, bytes]] | ApiError] = []

    async def dec() -> None:
        try:
            answers.append(
                await chain.services["C"].dec_keys(
                    slave_sae="sae-c", master_sae="sae-a", key_ids=ids
                )
            )
        except ApiError as exc:
            answers.append(exc)

    with trio.fail_after(WAIT_LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dec)
            nursery.start_soon(dec)
    return keys, answers


async def test_two_racing_dec_keys_hand_the_keys_out_once(tmp_path: Path) -> None:
    async with running_chain(tmp_path, seed=8) as chain:
        keys, answers = await race_two_dec_keys(chain)
        served = [a for a in answers if not isinstance(a, ApiError)]
        refused = [a for a in answers if isinstance(a, ApiError)]
        assert served == [keys]
        assert [e.status for e in refused] == [400]


async def test_a_refused_racing_dec_keys_leaves_no_delivery_in_the_audit_trail(
    tmp_path: Path,
) -> None:
    async with running_chain(tmp_path, seed=9) as chain:
        keys, answers = await race_two_dec_keys(chain)
        assert sum(isinstance(a, ApiError) for a in answers) == 1
        entries = delivered_entries(chain.link("C", "R"))
        assert [logged_ids(e) for e in entries] == [[str(k) for k, _ in keys]]


@dataclass
class RelayReadGate:
    """Wraps a relay store's ``relay``: counts the reads of ``key_id`` (``seen``); once
    ``armed``, the second read of it waits (in its worker thread) until ``release`` is set."""

    store: RelayStore
    key_id: uuid.UUID
    armed: bool = False
    seen: int = 0
    reads: int = 0
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.real = self.store.relay

    def relay(self, key_id: uuid.UUID) -> RelayRecord | None:
        if key_id == self.key_id:
            self.seen += 1
        if self.armed and key_id == self.key_id:
            self.reads += 1
            if self.reads == 2:
                self.entered.set()
                self.release.wait(WAIT_LIMIT_S)
        return self.real(key_id)


async def test_two_dec_keys_for_a_key_still_prepared_at_the_terminal_do_not_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_chain(tmp_path, seed=10) as chain:
        await eventually(pads_filled(chain, PAD_TARGET_BITS), "pads filled")
        to_c = chain.link("R", "C").session
        to_c.hold_kinds = frozenset({"relay_decide"})  # C stays prepared
        keys = await chain.services["A"].enc_keys(
            master_sae="sae-a", slave_sae="sae-c", number=1, size_bits=KEY_BITS
        )
        key_id = keys[0][0]
        c = chain.services["C"]
        gate = RelayReadGate(chain.relay_stores["C"], key_id)
        monkeypatch.setattr(chain.relay_stores["C"], "relay", gate.relay)
        answers: list[list[tuple[uuid.UUID, bytes]] | ApiError] = []
        crashed: list[KeyError] = []

        async def dec() -> None:
            try:
                answers.append(
                    await c.dec_keys(slave_sae="sae-c", master_sae="sae-a", key_ids=[key_id])
                )
            except ApiError as exc:
                answers.append(exc)
            except KeyError as exc:
                crashed.append(exc)

        with trio.fail_after(WAIT_LIMIT_S):
            async with trio.open_nursery() as nursery:
                # the first request read the record twice (its check, then _check_decided)
                # and waits for the decision
                nursery.start_soon(dec)
                while key_id not in c._decided or gate.seen < 2:
                    await trio.sleep(0.01)
                await trio.sleep(0)
                gate.armed = True
                nursery.start_soon(dec)  # the second one is held inside _check_decided
                await trio.to_thread.run_sync(gate.entered.wait)
                to_c.flush()  # the decision reaches C: the first request is served
                while not answers:
                    await trio.sleep(0.01)
                gate.release.set()
        assert crashed == []  # the KeyError described in the xfail reason
        assert sorted(isinstance(a, ApiError) for a in answers) == [False, True]
        assert keys in answers


async def test_a_wrong_sae_pair_cannot_take_relayed_keys(tmp_path: Path) -> None:
    async with running_chain(tmp_path, seed=4) as chain:
        await eventually(pads_filled(chain, PAD_TARGET_BITS), "pads filled")
        keys = await chain.services["A"].enc_keys(
            master_sae="sae-a", slave_sae="sae-c", number=1, size_bits=KEY_BITS
        )
        ids = [key_id for key_id, _ in keys]
        for slave, master in (("sae-x", "sae-a"), ("sae-c", "sae-x")):
            with pytest.raises(ApiError) as refused:
                await chain.services["C"].dec_keys(slave_sae=slave, master_sae=master, key_ids=ids)
            assert refused.value.status == 400
        with pytest.raises(ApiError) as unknown:
            await chain.services["A"].enc_keys(
                master_sae="sae-a", slave_sae="sae-nowhere", number=1, size_bits=KEY_BITS
            )
        assert unknown.value.status == 400
        got = await chain.services["C"].dec_keys(slave_sae="sae-c", master_sae="sae-a", key_ids=ids)
        assert got == keys


async def test_keys_relayed_ahead_serve_the_next_request(tmp_path: Path) -> None:
    async with running_chain(tmp_path, seed=5, prebind_keys=4) as chain:
        await eventually(pads_filled(chain, PAD_TARGET_BITS), "pads filled")
        a = chain.services["A"]
        first = await a.enc_keys(master_sae="sae-a", slave_sae="sae-c", number=1, size_bits=256)

        def ready() -> list[uuid.UUID]:
            return chain.relay_stores["A"].finished_origin_keys(
                master_sae="sae-a", slave_sae="sae-c", key_bits=256, limit=100
            )

        # the pair asked: keys are relayed ahead (at least half of prebind_keys stay ready)
        await eventually(lambda: len(ready()) >= 2 and no_unfinished(chain)(), "keys ahead")
        ahead = await read(ready)
        assert not {key_id for key_id, _ in first} & set(ahead)
        keys = await a.enc_keys(master_sae="sae-a", slave_sae="sae-c", number=2, size_bits=256)
        assert [key_id for key_id, _ in keys] == ahead[:2]  # the oldest relayed ahead
        got = await chain.services["C"].dec_keys(
            slave_sae="sae-c", master_sae="sae-a", key_ids=[key_id for key_id, _ in keys]
        )
        assert got == keys


async def test_with_the_terminal_unreachable_a_request_gets_503_and_nothing_stays_half_relayed(
    tmp_path: Path,
) -> None:
    timeout_s = 0.3
    async with running_chain(tmp_path, seed=6, timeout_s=timeout_s) as chain:
        await eventually(pads_filled(chain, PAD_TARGET_BITS), "pads filled")
        chain.cut("R", "C")
        with trio.fail_after(WAIT_LIMIT_S), pytest.raises(ApiError) as refused:
            await chain.services["A"].enc_keys(
                master_sae="sae-a", slave_sae="sae-c", number=1, size_bits=KEY_BITS
            )
        assert refused.value.status == 503
        given_up = list(await read(chain.relay_stores["A"].records))
        assert len(given_up) == 1
        chain.restore("R", "C")
        await eventually(no_unfinished(chain), "every relay finished once C is back")
        for name in CHAIN:
            store = chain.relay_stores[name]
            record = await read(partial(store.relay, given_up[0]))
            if record is not None:
                assert record.state is RelayState.ABORTED
            assert await read(store.deliverable_ids) == []
        origin = await read(partial(chain.relay_stores["A"].relay, given_up[0]))
        assert origin is not None
        assert origin.position is Position.ORIGIN
        assert origin.state is RelayState.ABORTED
        with pytest.raises(ApiError) as gone:
            await chain.services["C"].dec_keys(
                slave_sae="sae-c", master_sae="sae-a", key_ids=given_up
            )
        assert gone.value.status == 400
        # and the route carries keys again (a longer wait: no timing is under test here)
        for service in chain.services.values():
            service.section = dataclasses.replace(service.section, timeout_s=WAIT_LIMIT_S)
        keys = await chain.services["A"].enc_keys(
            master_sae="sae-a", slave_sae="sae-c", number=1, size_bits=KEY_BITS
        )
        got = await chain.services["C"].dec_keys(
            slave_sae="sae-c", master_sae="sae-a", key_ids=[keys[0][0]]
        )
        assert got == keys
