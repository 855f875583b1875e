"""Delivery keys (ETSI GS QKD 014) cut from stored keys: reservation, handing out, release.

Delivery (:mod:`qkdnode.delivery`) hands out *delivery keys*: each has its own UUID and is cut
from one or more stored keys (``KeyPart``: stored key, byte offset, length), so sizes other than
the stored size are served by concatenating or splitting stored keys. The master node reserves
stored keys and records the delivery keys (role ``master``); the peer records the same layout
(role ``slave``). A stored key's material is erased (``secure_delete``) as soon as every delivery
key cut from it has been delivered on this node: each node's copy only serves its own SAE, so it
is never needed after that.

Hybrid delivery keys (``kind = 'hybrid'``, :mod:`qkdnode.delivery.hybrid`) also keep, per key,
the secret derived from the reservation's ML-KEM-768 exchange (``mlkem_secret``): recorded with
the peer's reservation on the slave's node and with the peer's confirmation on the master's, so
a key reserved ahead or not yet fetched survives a restart. It is erased like the material: set
to NULL when the key is handed out, deleted with a released or dead reservation.

Every function here returns a :class:`StoreOp`, run alone (``KeyStore.run``) or in a group
commit (``KeyStore.run_batch``); its arguments are checked when it is made.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from qkdnode.config.delivery import KeyKind
from qkdnode.errors import KeyStoreError, ProtocolError, SecurityError
from qkdnode.store.transaction import StoreOp, Tx

KeyCombiner = Callable[[uuid.UUID, bytes, bytes], bytes]
"""``combine(delivery key ID, QKD bytes, ML-KEM secret)``: the hybrid key handed out."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPart:
    """Bytes ``[offset_bytes, offset_bytes + length_bytes)`` of the stored key ``key_id``."""

    key_id: uuid.UUID
    offset_bytes: int
    length_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryKey:
    """A key handed to an SAE: its own ID and the stored-key parts it is the concatenation of."""

    key_id: uuid.UUID
    size_bits: int
    parts: tuple[KeyPart, ...]


class DeliveryRefused(ProtocolError):
    """Delivery keys unknown here, already delivered, or of another master SAE (HTTP 400)."""


class NotKeyOwner(SecurityError):
    """The caller is not the slave SAE the delivery keys were reserved for (HTTP 401)."""


class ReservationRejected(ProtocolError):
    """The peer's reservation names stored keys this node cannot reserve now.

    ``burned_key_ids`` are stored keys that can never be reserved here again (already reserved or
    delivered, or unknown): the master must erase them instead of offering them again. The other
    keys were only not yet committed here (a commit in flight): the master may retry them later.
    """

    def __init__(self, message: str, *, burned_key_ids: Sequence[uuid.UUID] = ()) -> None:
        super().__init__(message, field="keys")
        self.burned_key_ids = tuple(burned_key_ids)


@dataclass(frozen=True, slots=True, kw_only=True)
class MasterReservation:
    """A delivery key this node reserved as master and has not handed out yet."""

    key_id: uuid.UUID
    master_sae: str
    slave_sae: str
    size_bits: int
    peer_confirmed: bool
    kind: KeyKind = KeyKind.QKD


def reserve_op(
    *,
    parity: int,
    delivery_ids: Sequence[uuid.UUID],
    size_bits: int,
    master_sae: str,
    slave_sae: str,
    keep_available: int = 0,
    kind: KeyKind = KeyKind.QKD,
) -> StoreOp[list[DeliveryKey] | None]:
    """Reserve stored keys for ``len(delivery_ids)`` delivery keys of ``size_bits`` each.

    Takes the oldest available keys at positions of ``parity`` (the partition that lets both
    nodes act as master at once), cuts the delivery keys from their concatenation in order (the
    unused tail of the last stored key is erased when its deliveries are done), marks them
    ``reserved`` for (master, slave) and records the layout. The op's value is None, changing
    nothing, if too few keys are available, or if fewer than ``keep_available`` stored keys of
    the parity would stay available afterwards. Bad arguments raise ValueError at once.
    Hybrid keys (``kind``) get their ML-KEM secrets from :func:`confirm_op`.
    """
    if size_bits <= 0 or size_bits % 8 or not delivery_ids or keep_available < 0:
        raise ValueError(
            "size_bits must be a positive multiple of 8, delivery_ids non-empty and"
            " keep_available >= 0"
        )
    size_bytes = size_bits // 8
    needed_bytes = size_bytes * len(delivery_ids)

    def run(tx: Tx) -> list[DeliveryKey] | None:
        chosen: list[tuple[str, int]] = []
        total = 0
        cursor = tx.execute(
            "SELECT key_id, size_bits FROM keys WHERE state = 'available' AND position % 2 = ?"
            " ORDER BY block_id, position",
            (parity,),
        )
        for key_id, stored_bits in cursor:
            chosen.append((key_id, int(stored_bits) // 8))
            total += int(stored_bits) // 8
            if total >= needed_bytes:
                break
        cursor.close()
        if total < needed_bytes:
            return None
        if (
            keep_available
            and not tx.execute(  # the index counts no further than needed
                "SELECT 1 FROM keys WHERE state = 'available' AND position % 2 = ?"
                " ORDER BY block_id, position LIMIT 1 OFFSET ?",
                (parity, len(chosen) + keep_available - 1),
            ).fetchone()
        ):
            return None
        layout = _cut(chosen, delivery_ids, size_bytes)
        tx.executemany(
            "UPDATE keys SET state = 'reserved', master_sae = ?, slave_sae = ?"
            " WHERE key_id = ? AND state = 'available'",
            [(master_sae, slave_sae, key_id) for key_id, _ in chosen],
        )
        _insert_deliveries(tx, layout, "master", master_sae, slave_sae, kind=kind)
        return layout

    # not durable: if a power cut loses this reservation, its stored keys are available
    # here again but recorded at the peer, which refuses them as used up when they are
    # offered again (they are erased then); the take that hands them out is durable and
    # its WAL sync makes this reservation durable too, before any key leaves the node
    return StoreOp(run, durable=False)


def record_peer_reservation_op(
    keys: Sequence[DeliveryKey],
    *,
    parity: int,
    master_sae: str,
    slave_sae: str,
    mlkem_secrets: Mapping[uuid.UUID, bytes] | None = None,
) -> StoreOp[ReservationRejected | None]:
    """Durably record, on the slave's node, the delivery keys the peer (master) reserved.

    With ``mlkem_secrets`` (one per delivery key) the keys are hybrid and keep their secret.

    Every stored key named must be available here at a position of ``parity`` (the master
    node's partition); parts must lie inside their stored key, not overlap, and add up to the
    delivery key's size. A malformed layout raises ProtocolError (an empty or repeated key list
    at once). Stored keys that are not available give a ReservationRejected as the op's value,
    recording nothing; stored keys recorded here for earlier delivery keys of the master are a
    sign that the master lost those: they are erased, with the rest of their stored keys, in the
    same transaction. Recording the same reservation again is a no-op (a retry after a lost
    acknowledgement; a hybrid key still reserved takes the retry's new secret).
    """
    if not keys:
        raise ProtocolError("no keys in reservation", field="keys")
    delivery_ids = [str(k.key_id) for k in keys]
    if len(set(delivery_ids)) != len(delivery_ids):
        raise ProtocolError("repeated delivery key ID", field="keys")
    kind = KeyKind.QKD if mlkem_secrets is None else KeyKind.HYBRID
    if mlkem_secrets is not None and set(mlkem_secrets) != {k.key_id for k in keys}:
        raise ValueError("one ML-KEM secret per delivery key")
    stored_ids = sorted({str(p.key_id) for k in keys for p in k.parts})

    def run(tx: Tx) -> ReservationRejected | None:
        existing = tx.select_in(
            "SELECT delivery_id, role, master_sae, slave_sae, kind FROM deliveries"
            " WHERE delivery_id IN ({})",
            delivery_ids,
        )
        if existing:
            if (
                len(existing) == len(keys)
                and all(row[1:] == ("slave", master_sae, slave_sae, kind.value) for row in existing)
                and _same_layout(tx, keys)
            ):
                if mlkem_secrets is not None:
                    _store_secrets(tx, "slave", mlkem_secrets)
                return None
            raise ProtocolError("delivery key ID already in use", field="keys")
        rows = {
            row[0]: row[1:]
            for row in tx.select_in(
                "SELECT key_id, position, state, size_bits FROM keys WHERE key_id IN ({})",
                stored_ids,
            )
        }
        ranges: dict[str, list[tuple[int, int]]] = {}
        for key in keys:
            if key.size_bits <= 0 or key.size_bits % 8 or not key.parts:
                raise ProtocolError("bad delivery key size or no parts", field="keys.size_bits")
            if sum(p.length_bytes for p in key.parts) * 8 != key.size_bits:
                raise ProtocolError("parts do not add up to size_bits", field="keys.parts")
            for part in key.parts:
                ranges.setdefault(str(part.key_id), []).append(
                    (part.offset_bytes, part.length_bytes)
                )
        burned: list[uuid.UUID] = []
        transient = 0
        for key_id, spans in ranges.items():
            row = rows.get(key_id)
            if row is None:
                burned.append(uuid.UUID(key_id))
                continue
            position, state, stored_bits = row
            if position % 2 != parity:
                raise ProtocolError("stored key outside the master's partition", field="keys")
            end = 0
            for offset, length in sorted(spans):
                if offset < end or length <= 0 or offset + length > stored_bits // 8:
                    raise ProtocolError(
                        "part outside its stored key or overlapping", field="keys.parts"
                    )
                end = offset + length
            if state == "staged":
                transient += 1
            elif state != "available":
                burned.append(uuid.UUID(key_id))
        if burned or transient:
            _burn_dead_reservations(tx, [str(k) for k in burned])
            return ReservationRejected(
                f"{len(burned)} stored keys used up here, {transient} not committed yet",
                burned_key_ids=burned,
            )
        tx.executemany(
            "UPDATE keys SET state = 'reserved', master_sae = ?, slave_sae = ? WHERE key_id = ?",
            [(master_sae, slave_sae, key_id) for key_id in stored_ids],
        )
        _insert_deliveries(
            tx, keys, "slave", master_sae, slave_sae, kind=kind, mlkem_secrets=mlkem_secrets
        )
        return None

    return StoreOp(run)


def _burn_dead_reservations(tx: Tx, stored_ids: Sequence[str]) -> None:
    """The master offers again stored keys recorded here for its earlier delivery keys: it
    offers only keys it holds available, so it has none of those delivery keys any more
    (released, or lost in a crash before it handed them out) and nobody can ever fetch
    them here. Erase them with all their stored keys instead of keeping them for ever."""
    dead = [
        row[0]
        for row in tx.select_in(
            "SELECT DISTINCT dp.delivery_id FROM delivery_parts dp JOIN deliveries d"
            " USING (delivery_id) WHERE d.role = 'slave' AND d.state = 'reserved'"
            " AND dp.key_id IN ({})",
            stored_ids,
        )
    ]
    if not dead:
        return
    keys_of_dead = [
        row[0]
        for row in tx.select_in(
            "SELECT DISTINCT key_id FROM delivery_parts WHERE delivery_id IN ({})", dead
        )
    ]
    tx.execute_in("DELETE FROM delivery_parts WHERE delivery_id IN ({})", dead)
    tx.execute_in("DELETE FROM deliveries WHERE delivery_id IN ({})", dead)
    tx.burn_stored_keys(keys_of_dead)


def _same_layout(tx: Tx, keys: Sequence[DeliveryKey]) -> bool:
    stored = tx.select_in(
        "SELECT delivery_id, seq, key_id, offset_bytes, length_bytes FROM delivery_parts"
        " WHERE delivery_id IN ({}) ORDER BY delivery_id, seq",
        [str(k.key_id) for k in keys],
    )
    wanted = sorted(
        (str(k.key_id), seq, str(p.key_id), p.offset_bytes, p.length_bytes)
        for k in keys
        for seq, p in enumerate(k.parts)
    )
    return [tuple(row) for row in stored] == wanted


def release_op(
    delivery_ids: Sequence[uuid.UUID], *, burn: Collection[uuid.UUID] = ()
) -> StoreOp[None]:
    """Undo a master-side reservation the peer did not confirm.

    The stored keys become available again, except those in ``burn`` (the peer reports them
    used up): their material is erased and they are never offered again.
    """
    ids = [str(i) for i in delivery_ids]
    burned = {str(i) for i in burn}

    def run(tx: Tx) -> None:
        stored = [
            row[0]
            for row in tx.select_in(
                "SELECT DISTINCT dp.key_id FROM delivery_parts dp JOIN deliveries d"
                " USING (delivery_id) WHERE d.role = 'master' AND d.state = 'reserved'"
                " AND dp.delivery_id IN ({})",
                ids,
            )
        ]
        if tx.select_in(
            "SELECT 1 FROM deliveries WHERE role = 'master' AND state = 'reserved'"
            " AND mlkem_secret IS NOT NULL AND delivery_id IN ({})",
            ids,
        ):
            tx.erased = True  # hybrid secrets deleted below must leave the WAL too
        tx.execute_in(
            "DELETE FROM delivery_parts WHERE delivery_id IN (SELECT delivery_id FROM"
            " deliveries WHERE role = 'master' AND state = 'reserved' AND delivery_id IN ({}))",
            ids,
        )
        tx.execute_in(
            "DELETE FROM deliveries WHERE role = 'master' AND state = 'reserved'"
            " AND delivery_id IN ({})",
            ids,
        )
        # a stored key other delivery keys were cut from stays theirs while any of them is
        # reserved, and is erased if any was handed out (its bytes must not come back)
        left = {
            key_id: states
            for key_id, states in tx.select_in(
                "SELECT dp.key_id, group_concat(DISTINCT d.state) FROM delivery_parts dp"
                " JOIN deliveries d USING (delivery_id) WHERE dp.key_id IN ({})"
                " GROUP BY dp.key_id",
                stored,
            )
        }
        still_reserved = {k for k, states in left.items() if "reserved" in states}
        handed_out = {k for k in left if k not in still_reserved}
        tx.executemany(
            "UPDATE keys SET state = 'available', master_sae = NULL, slave_sae = NULL"
            " WHERE key_id = ? AND state = 'reserved'",
            [(k,) for k in stored if k not in burned and k not in left],
        )
        tx.burn_stored_keys((burned | handed_out) & set(stored) - still_reserved)

    return StoreOp(run)


def confirm_op(
    delivery_ids: Sequence[uuid.UUID], *, mlkem_secrets: Mapping[uuid.UUID, bytes] | None = None
) -> StoreOp[None]:
    """Note that the peer durably recorded these master-side reservations, with the ML-KEM
    secrets of hybrid ones (not durable itself: if a power cut loses the note, they are
    released at the next start and the peer refuses, and so erases, their stored keys when
    they are offered again; the take that hands them out is durable)."""
    ids = [str(i) for i in delivery_ids]

    def run(tx: Tx) -> None:
        tx.execute_in(
            "UPDATE deliveries SET peer_confirmed = 1"
            " WHERE role = 'master' AND state = 'reserved' AND delivery_id IN ({})",
            ids,
        )
        if mlkem_secrets is not None:
            _store_secrets(tx, "master", mlkem_secrets)

    return StoreOp(run, durable=False)


def take_op(
    delivery_ids: Sequence[uuid.UUID],
    *,
    role: str,
    master_sae: str,
    slave_sae: str,
    combine: KeyCombiner | None = None,
) -> StoreOp[list[tuple[uuid.UUID, bytes]]]:
    """Hand out reserved delivery keys exactly once: the op's value is their bytes, in order.

    All or nothing: every ID must be a ``reserved`` delivery key of this node's ``role`` for
    ``master_sae`` (else DeliveryRefused) and ``slave_sae`` (else NotKeyOwner); repeated IDs
    raise DeliveryRefused at once. The keys become ``delivered``; a stored key's material is
    erased once every delivery key cut from it is delivered here. A hybrid key's bytes are
    ``combine(key ID, QKD bytes, its ML-KEM secret)`` and its secret is erased; one without its
    secret, or without ``combine``, raises KeyStoreError and nothing is handed out.
    """
    ids = [str(i) for i in delivery_ids]
    if len(set(ids)) != len(ids):
        raise DeliveryRefused("repeated key ID", field="key_IDs")

    def run(tx: Tx) -> list[tuple[uuid.UUID, bytes]]:
        rows = {
            row[0]: row[1:]
            for row in tx.select_in(
                "SELECT delivery_id, role, state, master_sae, slave_sae, kind, mlkem_secret"
                " FROM deliveries WHERE delivery_id IN ({})",
                ids,
            )
        }
        for key_id in ids:
            row = rows.get(key_id)
            if row is None or row[0] != role or row[1] != "reserved":
                raise DeliveryRefused("one or more keys are not found", field="key_IDs")
        if any(rows[key_id][3] != slave_sae for key_id in ids):
            raise NotKeyOwner("keys were not issued to this slave SAE")
        if any(rows[key_id][2] != master_sae for key_id in ids):
            raise DeliveryRefused("one or more keys are not found", field="key_IDs")
        pieces: dict[str, list[bytes]] = {key_id: [] for key_id in ids}
        touched: set[str] = set()
        for delivery_id, stored_id, offset, length, material in tx.select_in(
            "SELECT dp.delivery_id, dp.key_id, dp.offset_bytes, dp.length_bytes, k.material"
            " FROM delivery_parts dp JOIN keys k USING (key_id)"
            " WHERE dp.delivery_id IN ({}) ORDER BY dp.delivery_id, dp.seq",
            ids,
        ):
            if material is None or len(material) < offset + length:
                raise KeyStoreError("delivery key part without stored material")
            pieces[delivery_id].append(bytes(material[offset : offset + length]))
            touched.add(stored_id)
        hybrid = {key_id: rows[key_id][5] for key_id in ids if rows[key_id][4] == "hybrid"}
        if hybrid and (combine is None or any(s is None for s in hybrid.values())):
            raise KeyStoreError("hybrid delivery key without its ML-KEM secret or combiner")
        tx.execute_in(
            "UPDATE deliveries SET state = 'delivered', mlkem_secret = NULL"
            " WHERE delivery_id IN ({})",
            ids,
        )
        tx.execute_in(
            "UPDATE keys SET state = 'delivered', material = NULL WHERE key_id IN ({})"
            " AND NOT EXISTS (SELECT 1 FROM delivery_parts dp JOIN deliveries d"
            " USING (delivery_id) WHERE dp.key_id = keys.key_id AND d.state = 'reserved')",
            sorted(touched),
        )
        tx.erased = True
        keys = []
        for key_id in ids:
            material = b"".join(pieces[key_id])
            secret = hybrid.get(key_id)
            if secret is not None:
                assert combine is not None  # checked above
                material = combine(uuid.UUID(key_id), material, bytes(secret))
            keys.append((uuid.UUID(key_id), material))
        return keys

    return StoreOp(run)


def _cut(
    stored: Sequence[tuple[str, int]], delivery_ids: Sequence[uuid.UUID], size_bytes: int
) -> list[DeliveryKey]:
    """Cut delivery keys of ``size_bytes`` in order from the concatenation of ``stored`` keys."""
    layout: list[DeliveryKey] = []
    index, offset = 0, 0
    for delivery_id in delivery_ids:
        parts: list[KeyPart] = []
        remaining = size_bytes
        while remaining:
            key_id, stored_bytes = stored[index]
            take = min(remaining, stored_bytes - offset)
            parts.append(KeyPart(key_id=uuid.UUID(key_id), offset_bytes=offset, length_bytes=take))
            remaining -= take
            offset += take
            if offset == stored_bytes:
                index, offset = index + 1, 0
        layout.append(DeliveryKey(key_id=delivery_id, size_bits=8 * size_bytes, parts=tuple(parts)))
    return layout


def _insert_deliveries(
    tx: Tx,
    keys: Sequence[DeliveryKey],
    role: str,
    master_sae: str,
    slave_sae: str,
    *,
    kind: KeyKind,
    mlkem_secrets: Mapping[uuid.UUID, bytes] | None = None,
) -> None:
    secrets = mlkem_secrets or {}
    tx.executemany(
        "INSERT INTO deliveries (delivery_id, role, state, master_sae, slave_sae, size_bits,"
        " kind, mlkem_secret) VALUES (?, ?, 'reserved', ?, ?, ?, ?, ?)",
        [
            (
                str(k.key_id),
                role,
                master_sae,
                slave_sae,
                k.size_bits,
                kind.value,
                secrets.get(k.key_id),
            )
            for k in keys
        ],
    )
    tx.executemany(
        "INSERT INTO delivery_parts (delivery_id, seq, key_id, offset_bytes, length_bytes)"
        " VALUES (?, ?, ?, ?, ?)",
        [
            (str(k.key_id), seq, str(p.key_id), p.offset_bytes, p.length_bytes)
            for k in keys
            for seq, p in enumerate(k.parts)
        ],
    )


def _store_secrets(tx: Tx, role: str, mlkem_secrets: Mapping[uuid.UUID, bytes]) -> None:
    """Set the ML-KEM secrets of hybrid delivery keys of ``role`` still reserved here."""
    tx.executemany(
        "UPDATE deliveries SET mlkem_secret = ? WHERE delivery_id = ? AND role = ?"
        " AND kind = 'hybrid' AND state = 'reserved'",
        [(secret, str(key_id), role) for key_id, secret in mlkem_secrets.items()],
    )
    tx.erased = True  # an overwritten secret must leave the WAL too
