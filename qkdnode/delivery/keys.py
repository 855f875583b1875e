"""The key manager: hands out keys of the key store to SAEs, exactly once, in step with the peer.

Partition (both nodes may be master at once): the stored keys of every block are split by their
position in the block. Keys at positions with ``position % 2 == master_parity`` are handed out by
enc_keys at this node; the other half only by the peer's enc_keys (the Alice node uses parity 0,
the Bob node parity 1). The two nodes therefore never reserve the same stored key as master.

enc_keys at the master node, in this order:

1. reserve locally (stored keys ``reserved`` for (master, slave), the delivery keys and their
   layout recorded; committed without an fsync of its own: a power cut that loses it only
   leaves keys the peer will refuse, and erase, when they are offered again);
2. ``await peer_reserve(keys, master_sae, slave_sae)``: the peer durably records the same delivery
   keys (:meth:`KeyManager.record_peer_reservation` there) after checking that every stored key is
   committed and available on its side; from then on the slave can fetch them;
3. take the keys (durable: ``delivered``, material of fully used stored keys erased) and
   answer; the WAL checkpoint that drops the old copies of the erased pages follows at once.

Each store step is one all-or-nothing operation, but concurrent requests share transactions:
every write goes through :class:`~qkdnode.store.groupcommit.GroupCommit` (one COMMIT and at most
one checkpoint for all the operations that were ready together, each in its own SAVEPOINT).

If step 2 fails the local reservation is released and the request answered 503; when the peer
reports stored keys already used on its side (recorded for delivery keys this node lost: a lost
acknowledgement, a crash) those are erased on both nodes instead of being offered again, and the
request tries fresh keys (up to ``RESERVE_ATTEMPTS`` reservations). Erasure happens at delivery
on each side: each node's copy only serves its own SAE, so waiting for the peer would only keep
secrets on disk longer.

Reserving ahead (``prebind_keys``): steps 1 and 2 need not wait for a request. While
:meth:`KeyManager.run` runs, each (master SAE, slave SAE) pair that asked for keys of the standard
size keeps a small pool of delivery keys already reserved here and recorded by the peer for exactly
that pair; a request the pool can serve only does step 3 (one durable transaction, no round trip to
the peer), and the pool is topped up in the background when it falls to half. A pool that runs dry
between two top-ups doubles its size (up to ``POOL_GROWTH`` times ``prebind_keys``), so a busy pair
keeps enough ahead. The guarantee is unchanged: every key handed out was durably recorded by the
peer for that (master, slave) pair first. The peer's acknowledgement is noted in the store, so a
pool outlives a restart; reservations without that note (a request or top-up cut short) are
released at start, and the peer refuses, so this node erases, any of their stored keys it had
already recorded.

Hybrid pairs (``[[delivery.pairs]] kind = "hybrid"``, :mod:`qkdnode.delivery.hybrid`): step 2
also runs one ML-KEM-768 exchange per reservation. The reservation carries this node's ephemeral
encapsulation key, the peer answers with the ciphertext and a key confirmation, and both nodes
keep one secret per delivery key (recorded with the reservation there, with the confirmation
here); step 3 hands out the combination of the QKD bytes and that secret, and erases the secret.
The peer refuses a reservation whose kind is not the one configured there for the pair.
"""

from __future__ import annotations

import math
import os
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Final

import structlog
import trio

from qkdnode.audit import AuditKind
from qkdnode.audit.budget import RecordingBudget
from qkdnode.audit.trail import AuditValue
from qkdnode.config.delivery import KeyKind
from qkdnode.delivery.api import MSG_KEYS_NOT_FOUND, MSG_NOT_SLAVE, ApiError
from qkdnode.delivery.hybrid import (
    HybridAnswer,
    HybridOffer,
    HybridRequest,
    KeyCombiner,
    answer_offer,
    pair_combiner,
)
from qkdnode.errors import ProtocolError, SecurityError
from qkdnode.store.audit import AuditTrail
from qkdnode.store.groupcommit import GroupCommit
from qkdnode.store.keystore import (
    DeliveryKey,
    DeliveryRefused,
    KeyPart,
    KeyStore,
    NotKeyOwner,
    ReservationRejected,
    StoreOp,
)

PeerReserve = Callable[[Sequence[DeliveryKey], str, str], Awaitable[None]]
"""``peer_reserve(keys, master_sae, slave_sae)``: the peer durably records the reservation, or
raises (ReservationRejected carried over from the peer when it refuses stored keys)."""

PeerReserveHybrid = Callable[
    [Sequence[DeliveryKey], str, str, HybridRequest], Awaitable[HybridAnswer | None]
]
"""``peer_reserve_hybrid(keys, master_sae, slave_sae, request)``: as PeerReserve, for a hybrid
pair; the peer's ML-KEM answer, or None if it recorded the keys without one."""

_log = structlog.get_logger(__name__)

MAX_POOLS: Final = 1024  # (master, slave) pairs with keys reserved ahead
POOL_GROWTH: Final = 16  # a busy pair's pool grows up to this many times prebind_keys
REFILL_CHUNK_KEYS: Final = 32  # keys per reservation made ahead
REFILL_BACKOFF_S: Final = 1.0  # after a failed top-up (peer down, key material short)
RELEASE_CHUNK_KEYS: Final = 1024  # reservations released per transaction at start
RESERVE_ATTEMPTS: Final = 3  # reservations per request when the peer reports keys used up
# refused requests recorded one by one per SAE: 20 at once, then 2 per second (the rest counted)
REFUSALS_RECORDED_PER_S: Final = 2.0
REFUSALS_RECORDED_BURST: Final = 20.0


class KeyManager:
    """ETSI 014 key operations of one node over its :class:`KeyStore` (one trio task owns it)."""

    def __init__(
        self,
        store: KeyStore,
        *,
        master_parity: int,
        peer_reserve: PeerReserve,
        peer_timeout_s: float = 5.0,
        local_saes: Collection[str] | None = None,
        peer_saes: Collection[str] | None = None,
        new_key_id: Callable[[], uuid.UUID] = uuid.uuid4,
        group_commit: GroupCommit | None = None,
        prebind_keys: int = 0,
        prebind_size_bits: int = 256,
        pair_kinds: Mapping[tuple[str, str], KeyKind] | None = None,
        kme_id: str = "",
        peer_kme_id: str = "",
        peer_reserve_hybrid: PeerReserveHybrid | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """``prebind_keys``: delivery keys of ``prebind_size_bits`` to keep reserved ahead per
        (master, slave) pair while :meth:`run` runs (module doc); 0 reserves only on request.
        ``pair_kinds``: the (master, slave) pairs that are not plain QKD; hybrid pairs need
        ``kme_id``, ``peer_kme_id`` (bound into their keys) and ``peer_reserve_hybrid``;
        ``random_bytes`` seeds their ML-KEM key pairs."""
        if master_parity not in (0, 1):
            raise ValueError("master_parity must be 0 or 1")
        if prebind_keys < 0 or prebind_size_bits <= 0 or prebind_size_bits % 8:
            raise ValueError("prebind_keys >= 0 and prebind_size_bits a positive multiple of 8")
        self._pair_kinds = dict(pair_kinds or {})
        if KeyKind.HYBRID in self._pair_kinds.values() and (
            not kme_id or not peer_kme_id or peer_reserve_hybrid is None
        ):
            raise ValueError("hybrid pairs need kme_id, peer_kme_id and peer_reserve_hybrid")
        self.kme_id, self.peer_kme_id = kme_id, peer_kme_id
        self._peer_reserve_hybrid = peer_reserve_hybrid
        self._random_bytes = random_bytes
        self._store = store
        self.master_parity = master_parity
        self._peer_reserve = peer_reserve
        self._peer_timeout_s = peer_timeout_s
        self._local_saes = None if local_saes is None else frozenset(local_saes)
        self._peer_saes = None if peer_saes is None else frozenset(peer_saes)
        self._new_key_id = new_key_id
        # every store write of delivery goes through one batcher per store (group commit)
        self._commits = group_commit if group_commit is not None else GroupCommit(store)
        self._prebind_keys = prebind_keys
        self._prebind_size_bits = prebind_size_bits
        # (master, slave) -> delivery key IDs reserved here and recorded by the peer
        self._pools: dict[tuple[str, str], deque[uuid.UUID]] = {}
        # (master, slave) -> the size its pool is topped up to (grows while it runs dry)
        self._pool_targets: dict[tuple[str, str], int] = {}
        self._pool_grown: set[tuple[str, str]] = set()
        self._refill_wanted: trio.MemorySendChannel[tuple[str, str]] | None = None
        self._refill_pending: set[tuple[str, str]] = set()
        self._refill_paused_until: dict[tuple[str, str], float] = {}  # per pair, after failures
        # the node's audit trail: each delivery is recorded (SAE IDs and key IDs, never a key)
        # in the transaction that hands the keys out, each refused request in one of its own
        self.audit: AuditTrail | None = None
        self._refusal_budget = RecordingBudget(
            rate_per_s=REFUSALS_RECORDED_PER_S, burst=REFUSALS_RECORDED_BURST
        )

    def key_kind(self, master_sae: str, slave_sae: str) -> KeyKind:
        """The kind of key the (master, slave) pair gets (plain QKD unless configured)."""
        return self._pair_kinds.get((master_sae, slave_sae), KeyKind.QKD)

    def stored_key_count(self, master_sae: str | None = None, slave_sae: str | None = None) -> int:
        """Keys this node can hand out as master (its half of the partition), counting those
        reserved ahead for the (master, slave) pair if one is given."""
        pool = self._pools.get((master_sae, slave_sae)) if master_sae and slave_sae else None
        return self._store.available_count(parity=self.master_parity) + len(pool or ())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reserve ahead until cancelled (module doc). First restores the pools kept by the
        store and releases the master-side reservations the peer never acknowledged."""
        unconfirmed = []
        for reservation in self._store.master_reservations():
            pair = (reservation.master_sae, reservation.slave_sae)
            if (
                reservation.peer_confirmed
                and self._prebind_keys
                and reservation.size_bits == self._prebind_size_bits
                # a pair whose kind was reconfigured gets keys of its new kind only
                and reservation.kind == self.key_kind(*pair)
                and (pair in self._pools or len(self._pools) < MAX_POOLS)
            ):
                self._pools.setdefault(pair, deque()).append(reservation.key_id)
            else:
                unconfirmed.append(reservation.key_id)
        for start in range(0, len(unconfirmed), RELEASE_CHUNK_KEYS):  # bounded SQL statements
            await self._release(unconfirmed[start : start + RELEASE_CHUNK_KEYS])
        if unconfirmed:
            _log.info("released unacknowledged reservations", keys=len(unconfirmed))
        if not self._prebind_keys:
            task_status.started()
            await trio.sleep_forever()
        send, receive = trio.open_memory_channel[tuple[str, str]](math.inf)
        self._refill_wanted = send
        try:
            task_status.started()
            async for pair in receive:
                try:
                    await self._refill(pair)
                finally:
                    self._refill_pending.discard(pair)
                    self._pool_grown.discard(pair)
        finally:
            self._refill_wanted = None

    def _want_refill(self, pair: tuple[str, str]) -> None:
        pool = self._pools.get(pair)
        if (
            self._refill_wanted is None
            or pair in self._refill_pending
            or (pool is not None and len(pool) > self._pool_target(pair) // 2)
            or (pool is None and len(self._pools) >= MAX_POOLS)
            or trio.current_time() < self._refill_paused_until.get(pair, -math.inf)
        ):
            return
        self._pools.setdefault(pair, deque())
        self._refill_pending.add(pair)
        self._refill_wanted.send_nowait(pair)

    def _pool_target(self, pair: tuple[str, str]) -> int:
        return max(self._pool_targets.get(pair, 0), self._prebind_keys)

    async def _refill(self, pair: tuple[str, str]) -> None:
        """Top the pair's pool up to its target, at most REFILL_CHUNK_KEYS keys per
        reservation (a larger one would hold both stores for longer than a request should
        wait): reserve here, then have the peer record."""
        pool = self._pools[pair]
        # what was missing when the top-up started; keys taken meanwhile wait for the next one
        wanted = self._pool_target(pair) - len(pool)
        while wanted > 0:
            chunk = min(wanted, REFILL_CHUNK_KEYS)
            if not await self._reserve_ahead(pair, pool, chunk):
                return
            wanted -= chunk

    async def _reserve_ahead(
        self, pair: tuple[str, str], pool: deque[uuid.UUID], keys: int
    ) -> bool:
        """One reservation of ``keys`` for the pool; False if it failed (nothing kept)."""
        delivery_ids = [self._new_key_id() for _ in range(keys)]
        try:
            recorded = await self._reserve_and_record(
                *pair,
                delivery_ids,
                self._prebind_size_bits,
                # pools never hold more than the keys left to all others: a busy pair cannot
                # bind what the other pairs would ask for on request
                keep_available=sum(len(p) for p in self._pools.values()) + keys,
            )
        except ReservationRejected:
            return False  # used-up keys erased; the next request asks again
        except SecurityError:  # never swallowed: the daemon stops
            raise
        except Exception as exc:
            self._refill_paused_until[pair] = trio.current_time() + REFILL_BACKOFF_S
            _log.warning("reserving ahead failed", error=type(exc).__name__)
            return False
        if not recorded:  # key material short: requests take what is left on request
            self._refill_paused_until[pair] = trio.current_time() + REFILL_BACKOFF_S
            return False
        await self._commits.run(self._store.confirm_op(delivery_ids))
        pool.extend(delivery_ids)
        return True

    async def _reserve_and_record(
        self,
        master_sae: str,
        slave_sae: str,
        delivery_ids: Sequence[uuid.UUID],
        size_bits: int,
        *,
        keep_available: int = 0,
    ) -> bool:
        """Steps 1 and 2 for these delivery keys. False if key material is short (nothing
        changed); if the peer does not record them, the reservation is released (the stored
        keys it reports used up are erased) and its exception propagates."""
        kind = self.key_kind(master_sae, slave_sae)
        # committed once asked for, even if this task is cancelled meanwhile (see GroupCommit)
        layout = await self._commits.run(
            self._store.reserve_op(
                parity=self.master_parity,
                delivery_ids=delivery_ids,
                size_bits=size_bits,
                master_sae=master_sae,
                slave_sae=slave_sae,
                keep_available=keep_available,
                kind=kind,
            )
        )
        if layout is None:
            return False
        try:
            with trio.fail_after(self._peer_timeout_s):
                if kind is KeyKind.HYBRID:
                    await self._reserve_hybrid(layout, master_sae, slave_sae)
                else:
                    await self._peer_reserve(layout, master_sae, slave_sae)
        except ReservationRejected as exc:
            await self._release(delivery_ids, burn=exc.burned_key_ids)
            raise
        except BaseException:  # cancelled too: never leave keys reserved with nobody to take
            await self._release(delivery_ids)
            raise
        return True

    async def _reserve_hybrid(
        self, layout: Sequence[DeliveryKey], master_sae: str, slave_sae: str
    ) -> None:
        """Step 2 of a hybrid pair: the peer records the keys and answers the ML-KEM offer;
        the per-key secrets are noted here with the peer's confirmation. Raises
        ReservationRejected when the peer's answer is missing or does not confirm."""
        assert self._peer_reserve_hybrid is not None  # checked in __init__
        offer = HybridOffer(self._random_bytes)
        request = HybridRequest(
            mlkem_public=offer.public, master_kme_id=self.kme_id, slave_kme_id=self.peer_kme_id
        )
        answer = await self._peer_reserve_hybrid(layout, master_sae, slave_sae, request)
        if answer is None:
            raise ReservationRejected(
                "the peer node recorded a hybrid reservation without an ML-KEM answer"
            )
        key_ids = [key.key_id for key in layout]
        try:
            secrets = offer.accept(answer, key_ids)
        except ProtocolError as exc:
            raise ReservationRejected(f"hybrid reservation: {exc}") from None
        await self._commits.run(self._store.confirm_op(key_ids, mlkem_secrets=secrets))

    def _combiner(self, master_sae: str, slave_sae: str, role: str) -> KeyCombiner | None:
        """The hybrid combiner of the pair's keys handed out here as ``role`` (the store's
        record of each key, not the configuration, says whether it is hybrid: a pair
        reconfigured meanwhile still gets the kind it reserved). None without KME IDs."""
        if not (self.kme_id and self.peer_kme_id):
            return None  # the store refuses a hybrid key then
        master_kme, slave_kme = (
            (self.kme_id, self.peer_kme_id) if role == "master" else (self.peer_kme_id, self.kme_id)
        )
        return pair_combiner(
            master_sae=master_sae,
            slave_sae=slave_sae,
            master_kme_id=master_kme,
            slave_kme_id=slave_kme,
        )

    async def enc_keys(
        self, *, master_sae: str, slave_sae: str, number: int, size_bits: int
    ) -> list[tuple[uuid.UUID, bytes]]:
        """Reserve here, have the peer record, deliver: the keys for the master SAE.

        Raises ApiError(503) when key material is short or the peer does not confirm.
        """
        with self._commits.request():
            return await self._enc_keys(master_sae, slave_sae, number, size_bits)

    async def _enc_keys(
        self, master_sae: str, slave_sae: str, number: int, size_bits: int
    ) -> list[tuple[uuid.UUID, bytes]]:
        ahead: list[uuid.UUID] = []  # from the pair's pool: reserved and recorded already
        pool: deque[uuid.UUID] | None = None
        if self._prebind_keys and size_bits == self._prebind_size_bits:
            pair = (master_sae, slave_sae)
            pool = self._pools.get(pair)
            if pool is not None and len(pool) >= number:
                ahead = [pool.popleft() for _ in range(number)]
                self._want_refill(pair)
                return await self._take(ahead, master_sae, slave_sae)
            if pool is not None:
                if pair not in self._pool_grown:
                    # requests outran the pool: keep more ahead for this pair (once per top-up)
                    self._pool_grown.add(pair)
                    self._pool_targets[pair] = min(
                        2 * max(self._pool_target(pair), number),
                        POOL_GROWTH * self._prebind_keys,
                    )
                ahead = [pool.popleft() for _ in range(len(pool))]  # the rest on request
            self._want_refill(pair)
        try:
            reserved = await self._reserve_on_request(
                master_sae, slave_sae, number - len(ahead), size_bits
            )
        except BaseException:
            if pool is not None:
                pool.extendleft(reversed(ahead))  # still reserved and recorded: keep them
            raise
        return await self._take(ahead + reserved, master_sae, slave_sae)

    async def _reserve_on_request(
        self, master_sae: str, slave_sae: str, number: int, size_bits: int
    ) -> list[uuid.UUID]:
        """Steps 1 and 2 for ``number`` new delivery keys; their IDs once the peer recorded them.

        When the peer refuses stored keys it has used up (recorded for delivery keys this node
        lost: a lost acknowledgement, a crash), they are erased here and fresh ones are tried,
        up to RESERVE_ATTEMPTS reservations.
        """
        for attempt in range(1, RESERVE_ATTEMPTS + 1):
            delivery_ids = [self._new_key_id() for _ in range(number)]
            try:
                recorded = await self._reserve_and_record(
                    master_sae, slave_sae, delivery_ids, size_bits
                )
            except ReservationRejected as exc:
                _log.warning("peer refused reservation", burned=len(exc.burned_key_ids))
                if exc.burned_key_ids and attempt < RESERVE_ATTEMPTS:
                    continue
                raise ApiError(503, "peer KME could not reserve the keys; retry") from None
            except SecurityError:
                raise
            except Exception as exc:
                _log.warning("peer reservation failed", error=type(exc).__name__)
                raise ApiError(503, "peer KME unreachable") from None
            if not recorded:
                raise ApiError(503, "not enough key material", [{"stored_key_count": 0}])
            return delivery_ids
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _take(
        self, delivery_ids: Sequence[uuid.UUID], master_sae: str, slave_sae: str
    ) -> list[tuple[uuid.UUID, bytes]]:
        op = self._store.take_op(
            delivery_ids,
            role="master",
            master_sae=master_sae,
            slave_sae=slave_sae,
            combine=self._combiner(master_sae, slave_sae, "master"),
        )
        return await self._commits.run(self._audited(op, "master", master_sae, slave_sae))

    def _audited(
        self,
        op: StoreOp[list[tuple[uuid.UUID, bytes]]],
        role: str,
        master_sae: str,
        slave_sae: str,
    ) -> StoreOp[list[tuple[uuid.UUID, bytes]]]:
        if self.audit is None:
            return op

        def describe(keys: list[tuple[uuid.UUID, bytes]]) -> Mapping[str, AuditValue]:
            return {
                "role": role,
                "master_sae": master_sae,
                "slave_sae": slave_sae,
                "key_ids": tuple(str(key_id) for key_id, _ in keys),
            }

        return self.audit.around(op, AuditKind.KEYS_DELIVERED, describe)

    async def record_delivery(self, fields: Mapping[str, AuditValue]) -> None:
        """Record keys handed out elsewhere (relayed keys) in the audit trail, durably, in the
        next shared commit."""
        if self.audit is not None:
            await self._commits.run(self.audit.op(AuditKind.KEYS_DELIVERED, fields))

    async def record_refusal(self, sae: str, fields: Mapping[str, AuditValue]) -> None:
        """Record a refused request of ``sae`` in the audit trail, durably (refusals that
        arrive together share one commit); past the SAE's budget it is counted into its next
        entry instead (``qkdnode.audit.budget``)."""
        await self._record_budgeted(AuditKind.SAE_REQUEST_REFUSED, "sae", sae, fields)

    async def record_certificate_refusal(
        self, client: str, fields: Mapping[str, AuditValue]
    ) -> None:
        """Record a client certificate refused at the TLS endpoint (``client``: its address),
        as :meth:`record_refusal` does, within a budget per address."""
        await self._record_budgeted(AuditKind.SAE_CERTIFICATE_REFUSED, "client", client, fields)

    async def _record_budgeted(
        self, kind: AuditKind, source_field: str, source: str, fields: Mapping[str, AuditValue]
    ) -> None:
        if self.audit is None:
            return
        suppressed = self._refusal_budget.admit(f"{kind.value} {source}", trio.current_time())
        if suppressed is None:
            return
        entry = {source_field: source, **fields}
        if suppressed:
            entry["suppressed_before"] = suppressed
        await self._commits.run(self.audit.op(kind, entry))

    async def _release(
        self, delivery_ids: Sequence[uuid.UUID], *, burn: Collection[uuid.UUID] = ()
    ) -> None:
        with trio.CancelScope(shield=True):  # clean-up, also for a cancelled request
            await self._commits.run(self._store.release_op(delivery_ids, burn=burn))

    async def dec_keys(
        self, *, slave_sae: str, master_sae: str, key_ids: Sequence[uuid.UUID]
    ) -> list[tuple[uuid.UUID, bytes]]:
        """The keys the master SAE got, for its slave SAE, once. ApiError 400/401 otherwise."""
        try:
            with self._commits.request():
                op = self._store.take_op(
                    key_ids,
                    role="slave",
                    master_sae=master_sae,
                    slave_sae=slave_sae,
                    combine=self._combiner(master_sae, slave_sae, "slave"),
                )
                return await self._commits.run(self._audited(op, "slave", master_sae, slave_sae))
        except DeliveryRefused:
            raise ApiError(400, MSG_KEYS_NOT_FOUND) from None
        except NotKeyOwner:
            raise ApiError(401, MSG_NOT_SLAVE) from None

    async def record_peer_reservation(
        self, keys: Sequence[DeliveryKey], master_sae: str, slave_sae: str
    ) -> None:
        """Called on this node when the peer (master) reserved ``keys`` for (master, slave).

        Durable on return (concurrent reservations share one commit). Raises ProtocolError
        (ReservationRejected when stored keys are not available here) and records nothing then;
        delivery keys of the peer that the refusal proves lost are erased here (KeyStore doc).
        A pair configured hybrid here is refused: its keys would differ at the two ends.
        """
        self._check_peer_pair(master_sae, slave_sae, KeyKind.QKD)
        await self._record(keys, master_sae, slave_sae, None)

    async def record_peer_hybrid_reservation(
        self,
        keys: Sequence[DeliveryKey],
        master_sae: str,
        slave_sae: str,
        request: HybridRequest,
    ) -> HybridAnswer:
        """As :meth:`record_peer_reservation`, for a hybrid pair: encapsulate to the peer's
        ML-KEM key, record each key's secret with the reservation, return the answer.

        Raises ProtocolError when the pair is not hybrid here or the KME IDs the peer binds
        are not this node's pair of KME IDs (the two ends would derive different keys).
        """
        self._check_peer_pair(master_sae, slave_sae, KeyKind.HYBRID)
        if (request.master_kme_id, request.slave_kme_id) != (self.peer_kme_id, self.kme_id):
            raise ProtocolError(
                "the peer binds other KME IDs into hybrid keys: its kme_id and peer_kme_id must"
                " be this node's peer_kme_id and kme_id",
                field="hybrid.kme_ids",
            )
        answer, secrets = answer_offer(request, [key.key_id for key in keys])
        await self._record(keys, master_sae, slave_sae, secrets)
        return answer

    def _check_peer_pair(self, master_sae: str, slave_sae: str, kind: KeyKind) -> None:
        if self._local_saes is not None and slave_sae not in self._local_saes:
            raise ProtocolError("slave SAE is not attached to this node", field="slave_sae")
        if self._peer_saes is not None and master_sae not in self._peer_saes:
            raise ProtocolError("master SAE is not attached to the peer node", field="master_sae")
        configured = self.key_kind(master_sae, slave_sae)
        if configured is not kind:
            raise ProtocolError(
                f"the pair is configured kind = {configured.value!r} here but the peer reserved"
                f" {kind.value!r} keys: both nodes' [[delivery.pairs]] must agree",
                field="kind",
            )

    async def _record(
        self,
        keys: Sequence[DeliveryKey],
        master_sae: str,
        slave_sae: str,
        mlkem_secrets: Mapping[uuid.UUID, bytes] | None,
    ) -> None:
        with self._commits.request():
            refused = await self._commits.run(
                self._store.record_peer_reservation_op(
                    keys,
                    parity=1 - self.master_parity,
                    master_sae=master_sae,
                    slave_sae=slave_sae,
                    mlkem_secrets=mlkem_secrets,
                )
            )
        if refused is not None:
            raise refused


# ---- wire form of a reservation (for the node's authenticated channel) -------------------------


def reservation_to_wire(
    keys: Sequence[DeliveryKey], master_sae: str, slave_sae: str
) -> dict[str, object]:
    """A msgpack/JSON-friendly form: UUIDs as 16 bytes, parts as [key_id, offset, length]."""
    return {
        "master_sae": master_sae,
        "slave_sae": slave_sae,
        "keys": [
            {
                "id": key.key_id.bytes,
                "bits": key.size_bits,
                "parts": [[p.key_id.bytes, p.offset_bytes, p.length_bytes] for p in key.parts],
            }
            for key in keys
        ],
    }


def reservation_from_wire(
    message: Mapping[str, object], *, max_keys: int = 1024, max_parts: int = 4096
) -> tuple[list[DeliveryKey], str, str]:
    """Parse :func:`reservation_to_wire` output; raises ProtocolError naming the bad field."""
    master, slave, entries = (
        message.get("master_sae"),
        message.get("slave_sae"),
        message.get("keys"),
    )
    if not isinstance(master, str) or not master:
        raise ProtocolError("expected a non-empty string", field="master_sae")
    if not isinstance(slave, str) or not slave:
        raise ProtocolError("expected a non-empty string", field="slave_sae")
    if not isinstance(entries, list) or not 0 < len(entries) <= max_keys:
        raise ProtocolError(f"expected a list of 1..{max_keys} keys", field="keys")
    keys: list[DeliveryKey] = []
    total_parts = 0
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ProtocolError("expected a map", field="keys[]")
        bits, raw_parts = entry.get("bits"), entry.get("parts")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
            raise ProtocolError("expected a positive integer", field="keys[].bits")
        if not isinstance(raw_parts, list) or not raw_parts:
            raise ProtocolError("expected a non-empty list", field="keys[].parts")
        total_parts += len(raw_parts)
        if total_parts > max_parts:
            raise ProtocolError(f"more than {max_parts} parts", field="keys[].parts")
        parts = []
        for raw in raw_parts:
            if not (isinstance(raw, list | tuple) and len(raw) == 3):
                raise ProtocolError("expected [key_id, offset, length]", field="keys[].parts[]")
            key_id, offset, length = raw
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ProtocolError("expected an integer >= 0", field="keys[].parts[].offset")
            if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
                raise ProtocolError("expected an integer > 0", field="keys[].parts[].length")
            parts.append(
                KeyPart(
                    key_id=_wire_uuid(key_id, "keys[].parts[].key_id"),
                    offset_bytes=offset,
                    length_bytes=length,
                )
            )
        keys.append(
            DeliveryKey(
                key_id=_wire_uuid(entry.get("id"), "keys[].id"), size_bits=bits, parts=tuple(parts)
            )
        )
    return keys, master, slave


def _wire_uuid(value: object, field: str) -> uuid.UUID:
    if not isinstance(value, bytes) or len(value) != 16:
        raise ProtocolError("expected 16 bytes", field=field)
    return uuid.UUID(bytes=value)


# Reservation formats. 1: the map of reservation_to_wire, without a ``version`` field (the form
# older nodes send and read). 2: {"version": 2, "reservation": <format 1>, "hybrid": {...}}, for
# hybrid pairs. A node without hybrid delivery finds no ``master_sae`` at the top of format 2
# and refuses the reservation, recording nothing.
RESERVATION_FORMATS: Final = (1, 2)


def hybrid_reservation_to_wire(
    keys: Sequence[DeliveryKey], master_sae: str, slave_sae: str, request: HybridRequest
) -> dict[str, object]:
    """Format 2: the reservation and the master's ML-KEM-768 encapsulation key and KME IDs."""
    return {
        "version": 2,
        "reservation": reservation_to_wire(keys, master_sae, slave_sae),
        "hybrid": {
            "mlkem_public": request.mlkem_public,
            "master_kme_id": request.master_kme_id,
            "slave_kme_id": request.slave_kme_id,
        },
    }


def reservation_format(message: Mapping[str, object]) -> int:
    """1 or 2 (module comment above); ProtocolError naming ``version`` for any other."""
    version = message.get("version", 1)
    if type(version) is not int or version not in RESERVATION_FORMATS:  # not bool, not 2.0
        raise ProtocolError(
            f"reservation format {str(version)[:16]} is not one this node reads"
            f" {RESERVATION_FORMATS}: upgrade this node",
            field="version",
        )
    return version


def hybrid_reservation_from_wire(
    message: Mapping[str, object],
) -> tuple[list[DeliveryKey], str, str, HybridRequest]:
    """Parse :func:`hybrid_reservation_to_wire` output; ProtocolError naming the bad field."""
    if reservation_format(message) != 2:
        raise ProtocolError("expected reservation format 2", field="version")
    inner, hybrid = message.get("reservation"), message.get("hybrid")
    if not isinstance(inner, Mapping):
        raise ProtocolError("expected a map", field="reservation")
    if not isinstance(hybrid, Mapping):
        raise ProtocolError("expected a map", field="hybrid")
    keys, master_sae, slave_sae = reservation_from_wire(inner)
    public = hybrid.get("mlkem_public")
    kme_ids = hybrid.get("master_kme_id"), hybrid.get("slave_kme_id")
    if not isinstance(public, bytes):
        raise ProtocolError("expected bytes", field="hybrid.mlkem_public")
    if not all(isinstance(kme, str) and 0 < len(kme) <= 4096 for kme in kme_ids):
        raise ProtocolError("expected KME IDs of 1..4096 characters", field="hybrid.kme_ids")
    request = HybridRequest(
        mlkem_public=public, master_kme_id=str(kme_ids[0]), slave_kme_id=str(kme_ids[1])
    )
    return keys, master_sae, slave_sae, request
