"""The key relay in the daemon: the trio shell of ``qkdnode.relay.RelayMachine`` (docs/relay.md).

One ``RelayService`` per daemon drives the pure machine for every relay through this node. Its
relay task applies the inputs (relay messages from the links, ETSI 014 requests and hand-outs,
the retransmission timer) in batches: all the inputs waiting at a time go through the machine,
each ``SaveRelay`` written at once, in one transaction of the relay store
(``qkdnode.store.relaystore``) committed before any ``SendRelay`` they cause is sent (so the
machine always reads the store as its last effects left it). Messages go out through a queue
per link, sent on that link's authenticated session when one is up and dropped otherwise (the
machine resends what matters on the next timer). The pad fill runs in a task of its own.

Pads: each link's outgoing stream is filled from this node's half of the link's stored keys
(``qkdnode.store.padkeys``), chunk by chunk, each offered to the neighbour (``PadOffer``) and
usable once the neighbour took the same keys (``PadAnswer``). The keys leave the link's store
before the chunk is recorded (sender) or in the transaction that finds them (receiver), so a
crash between the two stores only wastes key, never reuses it.
"""

from __future__ import annotations

import math
import os
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog
import trio

from qkdnode.channel.messages import ControlBody
from qkdnode.config.relay import MAX_RELAY_PREBIND_KEYS, RelaySection
from qkdnode.delivery.api import MSG_KEYS_NOT_FOUND, ApiError
from qkdnode.errors import ProtocolError
from qkdnode.relay.events import (
    AbortRequested,
    Direction,
    Effect,
    Input,
    PeerMessage,
    Position,
    RelayConfig,
    RelayFinished,
    RelayRecord,
    RelayRefused,
    RelayRequested,
    RelayStarted,
    RelayState,
    RetransmitDue,
    SaveRelay,
    SendRelay,
)
from qkdnode.relay.machine import RelayMachine
from qkdnode.relay.messages import (
    MAX_KEY_BITS,
    MIN_KEY_BITS,
    message_from_wire,
    message_to_wire,
)
from qkdnode.relay.padwire import (
    PAD_SCHEMAS,
    PadAnswer,
    PadAnswerOutcome,
    PadOffer,
    pad_from_wire,
    pad_to_wire,
)
from qkdnode.store.deliveries import DeliveryRefused
from qkdnode.store.padkeys import OfferedKeys, take_offered_keys_op, take_pad_keys_op
from qkdnode.store.relaystore import Deposit, PadChunk, RelayStore

from .state import Node

log = structlog.get_logger("qkdnode.relay")

INBOX_ITEMS: Final = 4096  # inputs queued for the relay task; more are dropped (resent later)
OUTBOX_FRAMES: Final = 4096  # messages queued per link
CHUNK_KEYS: Final = 256  # stored keys per pad chunk at most
UNSETTLED_CHUNKS: Final = 2  # chunks offered and not yet answered, per link
BATCH_ITEMS: Final = 256  # inputs applied in one store transaction at most
HANDED_OUT_REMEMBERED: Final = 1024


@dataclass(slots=True)
class _Link:
    node: Node
    own_parity: int
    outbox_in: trio.MemorySendChannel[tuple[str, ControlBody]]
    outbox_out: trio.MemoryReceiveChannel[tuple[str, ControlBody]]


@dataclass(slots=True)
class _Request:
    """An input from a task other than the relay task, with the effects it caused."""

    event: Input
    done: trio.Event = field(default_factory=trio.Event)
    started: list[uuid.UUID] = field(default_factory=list)
    refused: str = ""


@dataclass(slots=True)
class _Take:
    """Hand the relayed keys ``key_ids`` to an SAE in the relay task's next transaction."""

    master_sae: str
    slave_sae: str
    key_ids: Sequence[uuid.UUID]
    done: trio.Event = field(default_factory=trio.Event)
    keys: list[tuple[uuid.UUID, bytes]] = field(default_factory=list)
    refused: DeliveryRefused | None = None


_Pool = tuple[str, str, int]  # (master SAE, slave SAE, key bits)
MAX_POOLS: Final = 256
POOL_BACKOFF_MAX_S: Final = 60.0

# an input for the machine, a request with its answer, or a frame: (peer, kind, body)
_InboxItem = Input | _Request | _Take | tuple[str, str, Mapping[str, object]]


class RelayService:
    """Every relay through this node (module docstring). ``links`` maps each neighbour's node
    name (its peer name here) to that link's ``Node``; ``local_saes`` are the SAEs this node
    serves as a relay's terminal; ``delivery_node`` is the link whose audit trail records
    relayed deliveries (None: the first link's)."""

    def __init__(
        self,
        section: RelaySection,
        *,
        node_name: str,
        store: RelayStore,
        links: Mapping[str, Node],
        local_saes: Sequence[str],
        delivery_node: Node | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.section = section
        self.node_name = node_name
        self.store = store
        self.machine = RelayMachine(
            RelayConfig(
                node=node_name, neighbours=frozenset(links), local_sae_ids=frozenset(local_saes)
            ),
            store=store,
            pads=store,
            random_bytes=random_bytes,
        )
        self._links: dict[str, _Link] = {}
        for name, node in links.items():
            send, receive = trio.open_memory_channel[tuple[str, ControlBody]](OUTBOX_FRAMES)
            parity = 0 if node.config.node.role == "alice" else 1
            self._links[name] = _Link(node, parity, send, receive)
        # relayed deliveries are recorded in the audit trail of the delivery link
        self._delivery_node = delivery_node or next(iter(links.values()))
        self._inbox_in, self._inbox_out = trio.open_memory_channel[_InboxItem](INBOX_ITEMS)
        # pad messages (peer, kind, body), and None for the timer's pass over every link
        self._pad_inbox_in, self._pad_inbox_out = trio.open_memory_channel[
            tuple[str, str, Mapping[str, object]] | None
        ](INBOX_ITEMS)
        # key ID -> set when the relay is decided here (origin) or finished (terminal)
        self._decided: dict[uuid.UUID, trio.Event] = {}
        self._waiting: dict[uuid.UUID, int] = {}  # dec_keys requests waiting per key
        # keys relayed ahead: (master SAE, slave SAE, key bits) -> relays in flight for it
        self._pools: dict[_Pool, set[uuid.UUID]] = {}
        self._ready: dict[_Pool, deque[uuid.UUID]] = {}  # relayed ahead, not picked yet
        self._pool_paused_until: dict[_Pool, float] = {}
        self._pool_backoff_s: dict[_Pool, float] = {}
        self._pool_wanted = trio.Event()
        # keys a request is handing out (picked from the pool, relayed for it, or named by a
        # dec_keys): no other request hands them out meanwhile
        self._claimed: set[uuid.UUID] = set()
        self._pick_lock = trio.Lock()
        # the last keys handed out: a pick read before their hand-out committed skips them
        self._handed_out: set[uuid.UUID] = set()
        self._handed_order: deque[uuid.UUID] = deque()

    def __repr__(self) -> str:
        return f"RelayService(node={self.node_name}, links={sorted(self._links)})"

    # ---- the shell's inputs --------------------------------------------------------------------
    def on_control(self, peer: str, kind: str, body: Mapping[str, object]) -> None:
        """A relay or pad control frame arrived on the link to ``peer`` (authenticated)."""
        inbox = self._pad_inbox_in if kind in PAD_SCHEMAS else self._inbox_in
        try:
            inbox.send_nowait((peer, kind, body))
        except trio.WouldBlock:
            log.warning("relay.inbox_full", peer=peer, kind=kind)

    def serves(self, sae: str) -> bool:
        """``sae`` is an SAE of another node that relays reach."""
        return self.section.route_to_sae(sae) is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: the relay task, one sender per link and the timer."""
        async with trio.open_nursery() as nursery:
            for name, link in self._links.items():
                nursery.start_soon(self._send_loop, name, link)
            nursery.start_soon(self._timer)
            nursery.start_soon(self._pads)
            nursery.start_soon(self._keep_pools)
            task_status.started()
            while True:
                items = [await self._inbox_out.receive()]
                while len(items) < BATCH_ITEMS:
                    try:
                        items.append(self._inbox_out.receive_nowait())
                    except trio.WouldBlock:
                        break
                # applied whole, also when a request that posted an input was cancelled
                with trio.CancelScope(shield=True):
                    await self._handle(items)

    async def _timer(self) -> None:
        while True:
            await self._post(RetransmitDue())
            await self._pad_inbox_in.send(None)  # offer again, cut new chunks
            await trio.sleep(self.section.retransmit_s)

    async def _pads(self) -> None:
        """The pad fill, in a task of its own: its writes to the links' stores never hold up
        the relays (the relay store's own lock orders its writes with the relay task's)."""
        async for item in self._pad_inbox_out:
            with trio.CancelScope(shield=True):
                if item is None:
                    for name in self._links:
                        await self._fill_pad(name, resend=True)
                    continue
                peer, kind, body = item
                if peer not in self._links:
                    continue
                try:
                    pad = pad_from_wire(kind, body)
                except ProtocolError as exc:
                    log.warning("relay.message_refused", peer=peer, kind=kind, error=str(exc)[:200])
                    continue
                if isinstance(pad, PadOffer):
                    await self._pad_offered(peer, pad)
                else:
                    await self._pad_answered(peer, pad)

    async def _post(self, item: Input | _Request | _Take) -> None:
        await self._inbox_in.send(item)

    # ---- the relay task ------------------------------------------------------------------------
    async def _handle(self, items: Sequence[_InboxItem]) -> None:
        """Every machine input and hand-out of ``items`` in one store transaction (group
        commit), then what they send and report."""
        inputs: list[tuple[Input, _Request | None]] = []
        takes: list[_Take] = []
        for item in items:
            if isinstance(item, _Take):
                takes.append(item)
            elif isinstance(item, _Request):
                inputs.append((item.event, item))
            elif isinstance(item, tuple):
                event = self._control(*item)
                if event is not None:
                    inputs.append((event, None))
            else:
                inputs.append((item, None))
        if takes and inputs:  # an SAE waits for these: they do not wait for the relays' work
            await trio.to_thread.run_sync(self._apply_batch, (), takes)
            for take in takes:
                take.done.set()
            takes = []
        if not inputs and not takes:
            return
        outcomes = await trio.to_thread.run_sync(self._apply_batch, inputs, takes)
        for (_, request), effects in zip(inputs, outcomes, strict=True):
            for effect in effects:
                self._report(effect, request)
            if request is not None:
                request.done.set()
        for take in takes:
            take.done.set()

    def _control(self, peer: str, kind: str, body: Mapping[str, object]) -> PeerMessage | None:
        """The machine's input of a relay message from ``peer`` (None: refused)."""
        if peer not in self._links:
            return None
        try:
            return PeerMessage(peer=peer, message=message_from_wire(kind, body))
        except ProtocolError as exc:
            log.warning("relay.message_refused", peer=peer, kind=kind, error=str(exc)[:200])
            return None

    def _apply_batch(
        self, inputs: Sequence[tuple[Input, _Request | None]], takes: Sequence[_Take]
    ) -> list[list[Effect]]:
        """(Worker thread.) Every input through the machine, each ``SaveRelay`` written at once,
        then the hand-outs, all in one transaction committed at the end, so the machine reads
        what the inputs before wrote; nothing is sent, reported or handed out before the
        commit. A refused input has no effect; a refused hand-out changes nothing."""
        outcomes: list[list[Effect]] = []
        with self.store.batch():
            for event, _ in inputs:
                try:
                    effects = self.machine.receive(event)
                except ProtocolError as exc:
                    log.warning("relay.message_refused", error=str(exc)[:200])
                    effects = []
                except RuntimeError as exc:  # a request this node cannot start
                    effects = [RelayRefused(route=(), reason=str(exc)[:200])]
                for effect in effects:
                    if isinstance(effect, SaveRelay):
                        self.store.apply(effect)
                outcomes.append(effects)
            for take in takes:
                self._take_now(take)
        return outcomes

    def _take_now(self, take: _Take) -> None:
        try:
            take.keys = self.store.hand_out(
                take.key_ids, master_sae=take.master_sae, slave_sae=take.slave_sae
            )
        except DeliveryRefused as exc:
            take.refused = exc

    def _report(self, effect: Effect, request: _Request | None) -> None:
        match effect:
            case SaveRelay():
                self._saved(effect)
            case SendRelay(peer=peer, message=message):
                self._queue(peer, message_to_wire(message))
            case RelayStarted(key_id=key_id):
                if request is not None:
                    request.started.append(key_id)
            case RelayRefused(reason=reason):
                if request is not None:
                    request.refused = reason or "refused"
            case RelayFinished(key_id=key_id, committed=committed, position=position):
                if position is Position.ORIGIN:
                    self._pool_relay_finished(key_id, committed)
                log.debug(
                    "relay.finished",
                    key_id=str(key_id),
                    position=position.value,
                    committed=committed,
                    reason=effect.reason[:200],
                )

    def _saved(self, effect: SaveRelay) -> None:
        waiting = self._decided.get(effect.record.key_id)
        if waiting is not None and _decided(effect.record):
            waiting.set()

    def _queue(self, peer: str, wire: tuple[str, ControlBody]) -> None:
        try:
            self._links[peer].outbox_in.send_nowait(wire)
        except trio.WouldBlock:
            log.warning("relay.outbox_full", peer=peer)

    async def _send_loop(self, name: str, link: _Link) -> None:
        async for kind, body in link.outbox_out:
            exchange = link.node.exchange
            if exchange is None:
                continue  # no session: the timer resends what is owed
            try:
                await exchange.send_control(kind, body)
            except Exception as exc:  # the session ended under us: as if lost
                log.debug("relay.send_failed", peer=name, error=f"{type(exc).__name__}")

    # ---- pads ----------------------------------------------------------------------------------
    async def _fill_pad(self, peer: str, *, resend: bool) -> None:
        """Cut a new chunk when the stream's unallocated bits fall below the target; with
        ``resend``, first offer again what the neighbour has not answered."""
        link = self._links[peer]

        def read() -> tuple[list[PadChunk], int, int, int]:
            return (
                self.store.unacked_out_chunks(peer),
                self.store.available_bits(peer, Direction.OUT),
                self.store.next_offset_bits(peer),
                link.node.store.available_count(parity=link.own_parity),
            )

        # the stores are read in a worker thread: a batch or a hand-out may hold them
        unsettled, settled_bits, cursor_bits, link_keys = await trio.to_thread.run_sync(read)
        for chunk in unsettled if resend else ():
            self._queue(peer, pad_to_wire(_offer(chunk.index, chunk.bits, chunk.sources)))
        if len(unsettled) >= UNSETTLED_CHUNKS:
            return
        unused_bits = sum(c.bits for c in unsettled) + settled_bits - cursor_bits
        if unused_bits >= self.section.pad_target_bits:
            return
        key_bits = link.node.config.store.key_size_bits
        # direct delivery keeps at least as many of the link's keys as the pad holds unused
        spare = (link_keys - max(0, unused_bits) // key_bits) // 2
        keys = min(CHUNK_KEYS, math.ceil(self.section.pad_target_bits / key_bits), spare)
        if keys < 1:
            return
        taken = await trio.to_thread.run_sync(
            link.node.store.run, take_pad_keys_op(parity=link.own_parity, max_keys=keys)
        )
        if not taken.key_ids:
            return
        chunk = await trio.to_thread.run_sync(
            self.store.add_out_chunk, peer, taken.material, list(taken.key_ids)
        )
        self._queue(peer, pad_to_wire(_offer(chunk.index, chunk.bits, chunk.sources)))

    async def _pad_offered(self, peer: str, offer: PadOffer) -> None:
        link = self._links[peer]
        sources = [str(key_id) for key_id in offer.key_ids]
        known, next_index = await trio.to_thread.run_sync(
            lambda: (self.store.in_chunk(peer, offer.index), self.store.next_in_index(peer))
        )
        if known is not None:  # a repeated offer: the same answer
            if known.bits != offer.bits or known.sources != tuple(sources):
                log.warning("relay.pad_offer_conflict", peer=peer, index=offer.index)
                return
            outcome = PadAnswerOutcome.TAKEN if known.accepted else PadAnswerOutcome.REFUSED
            self._queue(peer, pad_to_wire(PadAnswer(index=offer.index, outcome=outcome)))
            return
        if offer.index != next_index:
            return  # an earlier chunk is missing: the neighbour offers it first, in order
        result, taken = await trio.to_thread.run_sync(
            link.node.store.run,
            take_offered_keys_op(sources, sender_parity=1 - link.own_parity),
        )
        if result is OfferedKeys.NOT_YET:
            outcome = PadAnswerOutcome.NOT_YET
        else:
            material = None if taken is None else taken.material
            if material is not None and 8 * len(material) != offer.bits:
                material = None  # the keys do not make the announced length: refused
            deposit = await trio.to_thread.run_sync(
                self.store.deposit_in_chunk, peer, offer.index, offer.bits, material, sources
            )
            accepted = material is not None and deposit is not Deposit.GAP
            outcome = PadAnswerOutcome.TAKEN if accepted else PadAnswerOutcome.REFUSED
            if outcome is PadAnswerOutcome.REFUSED:
                log.warning("relay.pad_chunk_refused", peer=peer, index=offer.index)
        self._queue(peer, pad_to_wire(PadAnswer(index=offer.index, outcome=outcome)))

    async def _pad_answered(self, peer: str, answer: PadAnswer) -> None:
        if answer.outcome is PadAnswerOutcome.NOT_YET:
            return
        unsettled = await trio.to_thread.run_sync(self.store.unacked_out_chunks, peer)
        if not any(c.index == answer.index for c in unsettled):
            return  # settled already
        accepted = answer.outcome is PadAnswerOutcome.TAKEN
        await trio.to_thread.run_sync(
            lambda: self.store.settle_out_chunk(peer, answer.index, accepted=accepted)
        )
        await self._fill_pad(peer, resend=False)  # up to the target without waiting

    # ---- keys relayed ahead --------------------------------------------------------------------
    async def _keep_pools(self) -> None:
        """Top up every pool that asked, when its keys ready and in flight fall to three
        quarters of ``prebind_keys``; a pool whose relays abort waits (doubling up to a
        minute)."""
        while True:
            for pool in list(self._pools):
                await self._top_up(pool)
            with trio.move_on_after(self.section.retransmit_s):
                await self._pool_wanted.wait()
            self._pool_wanted = trio.Event()

    async def _top_up(self, pool: _Pool) -> None:
        target = self.section.prebind_keys
        if trio.current_time() < self._pool_paused_until.get(pool, 0.0):
            return
        master, slave, key_bits = pool
        ready = await self._ready_keys(pool)
        in_flight = self._pools[pool]
        missing = target - len(ready) - len(in_flight)
        if missing < max(1, target // 4):
            return
        route = self.route_to(slave)
        requests = [
            _Request(
                RelayRequested(
                    route=route, master_sae_id=master, slave_sae_id=slave, key_bits=key_bits
                )
            )
            for _ in range(missing)
        ]
        for request in requests:
            await self._post(request)
        for request in requests:
            await request.done.wait()
            in_flight.update(request.started)
        if not any(request.started for request in requests):
            self._pause(pool)

    def _pause(self, pool: _Pool) -> None:
        delay_s = min(2 * self._pool_backoff_s.get(pool, 0.5), POOL_BACKOFF_MAX_S)
        self._pool_backoff_s[pool] = delay_s
        self._pool_paused_until[pool] = trio.current_time() + delay_s

    def _pool_relay_finished(self, key_id: uuid.UUID, committed: bool) -> None:
        for pool, in_flight in self._pools.items():
            if key_id in in_flight:
                in_flight.discard(key_id)
                if committed:
                    self._pool_backoff_s.pop(pool, None)
                    ready = self._ready.get(pool)
                    if ready is not None:
                        ready.append(key_id)
                elif not in_flight:
                    self._pause(pool)
                self._pool_wanted.set()
                return

    def _want_pool(self, pool: _Pool) -> None:
        if self.section.prebind_keys and (pool in self._pools or len(self._pools) < MAX_POOLS):
            self._pools.setdefault(pool, set())
            self._pool_wanted.set()

    # ---- ETSI 014 ------------------------------------------------------------------------------
    def stored_key_count(self, master_sae: str, slave_sae: str) -> int:
        return self.store.relayed_key_count(master_sae=master_sae, slave_sae=slave_sae)

    def route_to(self, sae: str) -> tuple[str, ...]:
        route = self.section.route_to_sae(sae)
        if route is None:
            raise ApiError(400, "slave_SAE_ID is not an SAE of a reachable KME")
        return route

    async def enc_keys(
        self, *, master_sae: str, slave_sae: str, number: int, size_bits: int
    ) -> list[tuple[uuid.UUID, bytes]]:
        """``number`` keys shared with ``slave_sae`` at another node: keys relayed ahead for
        the pair first (finished, so deliverable at the other end), fresh relays for the rest;
        handed out once every one is confirmed at both ends. ApiError 503 otherwise (keys that
        were confirmed stay at both ends, for the pair's next request)."""
        route = self.route_to(slave_sae)
        if not MIN_KEY_BITS <= size_bits <= MAX_KEY_BITS:
            raise ApiError(
                400,
                f"relayed keys are {MIN_KEY_BITS}..{MAX_KEY_BITS} bits",
                [{"size": "out of range for a relayed key"}],
            )
        self._want_pool((master_sae, slave_sae, size_bits))
        claims = await self._claim_ready(master_sae, slave_sae, size_bits, number)
        try:
            if not claims:  # too few relayed ahead: relay them all now
                await self._relay_now(route, master_sae, slave_sae, number, size_bits, claims)
            return await self._deliver(claims, "master", master_sae, slave_sae, route)
        except DeliveryRefused:  # not expected: these keys are claimed by this request
            log.error("relay.hand_out_refused", master_sae=master_sae, slave_sae=slave_sae)
            raise ApiError(503, "relayed keys not available; retry later") from None
        finally:
            self._claimed.difference_update(claims)

    async def _ready_keys(self, pool: _Pool) -> deque[uuid.UUID]:
        """The pool's keys relayed ahead and not picked yet, oldest first: read from the store
        once (keys a previous run relayed ahead), then kept as relays finish."""
        async with self._pick_lock:
            ready = self._ready.get(pool)
            if ready is None:
                master, slave, key_bits = pool
                stored = await trio.to_thread.run_sync(
                    lambda: self.store.finished_origin_keys(
                        master_sae=master,
                        slave_sae=slave,
                        key_bits=key_bits,
                        limit=MAX_RELAY_PREBIND_KEYS + len(self._claimed),
                    )
                )
                # a key handed out while that read ran is still in the list: skip it
                ready = deque(
                    k for k in stored if k not in self._claimed and k not in self._handed_out
                )
                self._ready[pool] = ready
            return ready

    async def _claim_ready(
        self, master_sae: str, slave_sae: str, key_bits: int, number: int
    ) -> list[uuid.UUID]:
        """``number`` keys relayed ahead for the pair, claimed for this request, or none."""
        ready = await self._ready_keys((master_sae, slave_sae, key_bits))
        if len(ready) < number:
            return []
        picked = [ready.popleft() for _ in range(number)]
        self._claimed.update(picked)
        return picked

    async def _deliver(
        self,
        key_ids: Sequence[uuid.UUID],
        role: str,
        master_sae: str,
        slave_sae: str,
        route: tuple[str, ...],
    ) -> list[tuple[uuid.UUID, bytes]]:
        """Record the delivery in the audit trail (the delivery link's store) durably, then
        hand the keys out (the relay store, in the relay task's next transaction): no one
        transaction holds both stores, and in this order a crash between the two leaves an
        entry for keys still here (handed out, and recorded, again later), never a hand-out
        without an entry. The keys are claimed by the caller, so no other request hands them
        out meanwhile: DeliveryRefused only when they are not deliverable for the pair."""
        await self._record(key_ids, role, master_sae, slave_sae, route)
        take = _Take(master_sae, slave_sae, key_ids)
        await self._post(take)
        await take.done.wait()
        if take.refused is not None:
            raise take.refused
        self._handed_out.update(key_ids)
        self._handed_order.extend(key_ids)
        while len(self._handed_order) > HANDED_OUT_REMEMBERED:
            self._handed_out.discard(self._handed_order.popleft())
        return take.keys

    async def _relay_now(
        self,
        route: tuple[str, ...],
        master_sae: str,
        slave_sae: str,
        number: int,
        key_bits: int,
        claims: list[uuid.UUID],
    ) -> None:
        """Relay ``number`` keys and wait for the origin's decision (up to the timeout); each
        key is claimed (appended to ``claims``) as its relay starts. ApiError 503 when not all
        are decided commit (the undecided ones given up)."""
        key_ids: list[uuid.UUID] = []
        refused = False
        with trio.move_on_after(self.section.timeout_s) as waited:
            requests = [
                _Request(
                    RelayRequested(
                        route=route,
                        master_sae_id=master_sae,
                        slave_sae_id=slave_sae,
                        key_bits=key_bits,
                    )
                )
                for _ in range(number)
            ]
            for request in requests:  # all in the same batch when the queue allows
                await self._post(request)
            for request in requests:
                await request.done.wait()
                refused = refused or bool(request.refused)
                for key_id in request.started:
                    key_ids.append(key_id)
                    claims.append(key_id)
                    self._claimed.add(key_id)
                    self._decided.setdefault(key_id, trio.Event())
            await self._check_decided(key_ids)
            if not refused:
                for key_id in key_ids:
                    await self._decided[key_id].wait()
        try:
            records = await self._records(key_ids)
            committed = [k for k, r in records.items() if r is not None and r.deliverable]
            if len(committed) < number:
                for key_id in key_ids:  # the origin gives up what it has not decided yet
                    if key_id not in committed:
                        await self._post(AbortRequested(key_id=key_id))
                reason = (
                    "the relay did not complete in time"
                    if waited.cancelled_caught
                    else "the route cannot carry the keys now"
                )
                raise ApiError(503, f"{reason}; retry later")
        finally:
            for key_id in key_ids:
                self._decided.pop(key_id, None)

    async def _records(self, key_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, RelayRecord | None]:
        return await trio.to_thread.run_sync(lambda: {k: self.store.relay(k) for k in key_ids})

    async def _check_decided(self, key_ids: Sequence[uuid.UUID]) -> None:
        """Set the waiters of relays decided before they were registered."""
        for key_id, record in (await self._records(key_ids)).items():
            if record is not None and _decided(record) and key_id in self._decided:
                self._decided[key_id].set()

    async def dec_keys(
        self, *, slave_sae: str, master_sae: str, key_ids: Sequence[uuid.UUID]
    ) -> list[tuple[uuid.UUID, bytes]]:
        """Keys relayed here for ``slave_sae`` by ``master_sae``, once; a key whose relay is
        prepared here waits (up to the relay timeout) for the origin's decision."""
        if len(set(key_ids)) != len(key_ids):
            raise ApiError(400, MSG_KEYS_NOT_FOUND)
        route: tuple[str, ...] = ()
        records = await self._records(key_ids)
        waited = False
        for key_id, record in records.items():
            if (
                record is None
                or record.position is not Position.TERMINAL
                or record.slave_sae_id != slave_sae
                or record.master_sae_id != master_sae
            ):
                raise ApiError(400, MSG_KEYS_NOT_FOUND)
            route = record.route
            if record.state is RelayState.PREPARED:
                waited = True
                # requests for the same key share its event; the last one to wake removes it
                decided = self._decided.setdefault(key_id, trio.Event())
                self._waiting[key_id] = self._waiting.get(key_id, 0) + 1
                try:
                    await self._check_decided([key_id])
                    with trio.move_on_after(self.section.timeout_s):
                        await decided.wait()
                finally:
                    self._waiting[key_id] -= 1
                    if not self._waiting[key_id]:
                        del self._waiting[key_id]
                        self._decided.pop(key_id, None)
        if waited:
            records = await self._records(key_ids)
        if not all(r is not None and r.deliverable and r.key for r in records.values()):
            raise ApiError(400, MSG_KEYS_NOT_FOUND)  # aborted, undecided or handed out already
        if any(key_id in self._claimed for key_id in key_ids):
            raise ApiError(400, MSG_KEYS_NOT_FOUND)  # another request is handing them out
        self._claimed.update(key_ids)
        try:
            return await self._deliver(key_ids, "slave", master_sae, slave_sae, route)
        except DeliveryRefused:
            raise ApiError(400, MSG_KEYS_NOT_FOUND) from None
        finally:
            self._claimed.difference_update(key_ids)

    async def _record(
        self,
        key_ids: Sequence[uuid.UUID],
        role: str,
        master_sae: str,
        slave_sae: str,
        route: tuple[str, ...],
    ) -> None:
        manager = self._delivery_node.manager
        if manager is None:
            return
        await manager.record_delivery(
            {
                "role": role,
                "master_sae": master_sae,
                "slave_sae": slave_sae,
                "key_ids": tuple(str(key_id) for key_id in key_ids),
                "relayed": True,
                "route": "/".join(route),
            }
        )


def _decided(record: RelayRecord) -> bool:
    """The origin decided the relay (it is deliverable there or given up), or it is finished
    here at another position."""
    if record.position is Position.ORIGIN:
        return record.state is not RelayState.PENDING
    return record.state.finished


def _offer(index: int, bits: int, sources: Sequence[str]) -> PadOffer:
    return PadOffer(index=index, bits=bits, key_ids=tuple(uuid.UUID(s) for s in sources))
