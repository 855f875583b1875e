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
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Final

import structlog
import trio

from qkdnode.audit import AuditKind
from qkdnode.audit.budget import RecordingBudget
from qkdnode.audit.trail import AuditValue
from qkdnode.delivery.api import MSG_KEYS_NOT_FOUND, MSG_NOT_SLAVE, ApiError
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
    ) -> None:
        """``prebind_keys``: delivery keys of ``prebind_size_bits`` to keep reserved ahead per
        (master, slave) pair while :meth:`run` runs (module doc); 0 reserves only on request."""
        if master_parity not in (0, 1):
            raise ValueError("master_parity must be 0 or 1")
        if prebind_keys < 0 or prebind_size_bits <= 0 or prebind_size_bits % 8:
            raise ValueError("prebind_keys >= 0 and prebind_size_bits a positive multiple of 8")
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
        # committed once asked for, even if this task is cancelled meanwhile (see GroupCommit)
        layout = await self._commits.run(
            self._store.reserve_op(
                parity=self.master_parity,
                delivery_ids=delivery_ids,
                size_bits=size_bits,
                master_sae=master_sae,
                slave_sae=slave_sae,
                keep_available=keep_available,
            )
        )
        if layout is None:
            return False
        try:
            with trio.fail_after(self._peer_timeout_s):
                await self._peer_reserve(layout, master_sae, slave_sae)
        except ReservationRejected as exc:
            await self._release(delivery_ids, burn=exc.burned_key_ids)
            raise
        except BaseException:  # cancelled too: never leave keys reserved with nobody to take
            await self._release(delivery_ids)
            raise
        return True

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
            delivery_ids, role="master", master_sae=master_sae, slave_sae=slave_sae
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
                    key_ids, role="slave", master_sae=master_sae, slave_sae=slave_sae
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
        """
        if self._local_saes is not None and slave_sae not in self._local_saes:
            raise ProtocolError("slave SAE is not attached to this node", field="slave_sae")
        if self._peer_saes is not None and master_sae not in self._peer_saes:
            raise ProtocolError("master SAE is not attached to the peer node", field="master_sae")
        with self._commits.request():
            refused = await self._commits.run(
                self._store.record_peer_reservation_op(
                    keys, parity=1 - self.master_parity, master_sae=master_sae, slave_sae=slave_sae
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
