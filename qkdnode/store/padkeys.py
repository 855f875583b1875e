"""Stored keys of a link turned into relay pad (docs/relay.md, "Pad streams"; the daemon's side
is ``qkdnode.node.relaying``).

Each end of a link fills its outgoing pad stream to the neighbour from its own half of the
link's stored keys (positions of its delivery ``parity``), so the two ends never take the same
key for their own streams, and delivery as master never takes a key the pad took. The receiving
end takes the very keys the sender named out of its own store (they must be of the sender's
half and ``available`` there) to append them to its incoming stream. Both take their keys in
one transaction that also erases them: the store never offers them again.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from qkdnode.store.transaction import StoreOp, Tx


class OfferedKeys(enum.Enum):
    TAKEN = "taken"  # every key was available here: erased, material returned
    NOT_YET = "not yet"  # some key is not committed here yet (limbo, or not staged)
    REFUSED = "refused"  # some key is not of the sender's half, or already used here


@dataclass(frozen=True, slots=True, kw_only=True)
class PadKeys:
    """Keys taken for a pad chunk: their IDs and their material concatenated in that order."""

    key_ids: tuple[str, ...]
    material: bytes

    def __repr__(self) -> str:
        return f"PadKeys(keys={len(self.key_ids)}, bits={8 * len(self.material)})"


def take_pad_keys_op(*, parity: int, max_keys: int) -> StoreOp[PadKeys]:
    """The oldest ``available`` keys at positions of ``parity`` (at most ``max_keys``), erased
    in the same transaction; none when the half holds none."""
    if parity not in (0, 1) or max_keys < 1:
        raise ValueError("parity must be 0 or 1 and max_keys >= 1")

    def run(tx: Tx) -> PadKeys:
        rows = tx.execute(
            "SELECT key_id, material FROM keys WHERE state = 'available' AND position % 2 = ?"
            " ORDER BY block_id, position LIMIT ?",
            (parity, max_keys),
        ).fetchall()
        key_ids = tuple(str(row[0]) for row in rows)
        tx.burn_stored_keys(key_ids)
        return PadKeys(key_ids=key_ids, material=b"".join(bytes(row[1]) for row in rows))

    return StoreOp(run)


def take_offered_keys_op(
    key_ids: Sequence[str], *, sender_parity: int
) -> StoreOp[tuple[OfferedKeys, PadKeys | None]]:
    """Take the keys the neighbour named for its outgoing stream, in its order: all of them
    (``TAKEN``, erased here) or none (``NOT_YET`` while one is not committed here, ``REFUSED``
    when one is of the other half, used or reserved here)."""

    def run(tx: Tx) -> tuple[OfferedKeys, PadKeys | None]:
        rows = {
            str(row[0]): row[1:]
            for row in tx.select_in(
                "SELECT key_id, state, position, material FROM keys WHERE key_id IN ({})",
                list(key_ids),
            )
        }
        if len(set(key_ids)) != len(key_ids):
            return OfferedKeys.REFUSED, None
        for key_id in key_ids:
            row = rows.get(key_id)
            if row is None or row[0] == "staged":
                return OfferedKeys.NOT_YET, None
        for key_id in key_ids:
            state, position, material = rows[key_id]
            if state != "available" or int(position) % 2 != sender_parity or material is None:
                return OfferedKeys.REFUSED, None
        tx.burn_stored_keys(key_ids)
        material = b"".join(bytes(rows[key_id][2]) for key_id in key_ids)
        return OfferedKeys.TAKEN, PadKeys(key_ids=tuple(key_ids), material=material)

    return StoreOp(run)
