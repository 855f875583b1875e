"""An in-memory model of a node's relay store: relay records, deliverable keys and pad streams.

Every ``apply`` of a ``SaveRelay`` is one transaction, durable when it returns: a crash between
two of them loses nothing written. It refuses (``KeyStoreError``, nothing changed) what a
crash-safe store must refuse: a pad range that overlaps one already spent (used, refused or
allocated), an allocation below the outgoing cursor, a pad read of spent bits or of bits the
stream does not hold yet. A key becomes deliverable when its record first becomes
``deliverable``; handing it out erases it from the store (the record keeps no key).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from qkdnode.errors import KeyStoreError
from qkdnode.relay.events import Direction, PadRange, RelayRecord, SaveRelay


@dataclass(slots=True)
class PadStream:
    """One direction of one link's pad, as one end holds it."""

    material: bytearray = field(default_factory=bytearray)
    spent: list[tuple[int, int, uuid.UUID]] = field(default_factory=list)  # [start, end) bits
    cursor_bits: int = 0  # outgoing streams: the first bit not yet allocated

    def overlaps(self, start: int, end: int) -> bool:
        return any(start < e and s < end for s, e, _ in self.spent)

    def __repr__(self) -> str:
        return f"PadStream(bits={8 * len(self.material)}, spent={len(self.spent)})"


class RelayStoreModel:
    """The relay store of one simulated node; survives the node's crashes.

    ``on_deliverable(node_key_id, key)`` is told each time a key becomes deliverable (the
    world's checker counts a second time for the same ID as delivered twice)."""

    def __init__(
        self, neighbours: tuple[str, ...], on_deliverable: Callable[[uuid.UUID, bytes], None]
    ) -> None:
        self._records: dict[uuid.UUID, RelayRecord] = {}
        self._unfinished: set[uuid.UUID] = set()
        self._deliverable: dict[uuid.UUID, bytes] = {}
        self._pads = {(peer, d): PadStream() for peer in neighbours for d in Direction}
        self._on_deliverable = on_deliverable

    def __repr__(self) -> str:
        return f"RelayStoreModel(relays={len(self._records)})"

    # ---- the machine's views --------------------------------------------------------------------
    def relay(self, key_id: uuid.UUID) -> RelayRecord | None:
        return self._records.get(key_id)

    def unfinished_relays(self) -> list[RelayRecord]:
        return [self._records[key_id] for key_id in sorted(self._unfinished)]

    def available_bits(self, peer: str, direction: Direction) -> int:
        return 8 * len(self._pads[(peer, direction)].material)

    def next_offset_bits(self, peer: str) -> int:
        return self._pads[(peer, Direction.OUT)].cursor_bits

    def spent_overlaps(self, span: PadRange) -> bool:
        return self._pads[(span.peer, span.direction)].overlaps(span.offset_bits, span.end_bits)

    def pad(self, span: PadRange) -> bytes:
        stream = self._pads[(span.peer, span.direction)]
        if stream.overlaps(span.offset_bits, span.end_bits):
            raise KeyStoreError(f"pad bits of {span.peer} ({span.direction.value}) already spent")
        if span.end_bits > 8 * len(stream.material) or span.offset_bits % 8 or span.bits % 8:
            raise KeyStoreError("pad range not held")
        return bytes(stream.material[span.offset_bits // 8 : span.end_bits // 8])

    # ---- writes (one transaction each) ----------------------------------------------------------
    def apply(self, effect: SaveRelay) -> None:
        record = effect.record
        for spend in effect.spends:  # every check before any change
            span = spend.range
            stream = self._pads[(span.peer, span.direction)]
            if stream.overlaps(span.offset_bits, span.end_bits):
                raise KeyStoreError(
                    f"pad bits {span.offset_bits}..{span.end_bits} of {span.peer} "
                    f"({span.direction.value}) spent twice"
                )
            if span.direction is Direction.OUT and span.offset_bits < stream.cursor_bits:
                raise KeyStoreError("an allocation below the outgoing cursor")
        for spend in effect.spends:
            span = spend.range
            stream = self._pads[(span.peer, span.direction)]
            stream.spent.append((span.offset_bits, span.end_bits, record.key_id))
            end = min(span.end_bits // 8, len(stream.material))
            stream.material[span.offset_bits // 8 : end] = bytes(
                max(0, end - span.offset_bits // 8)
            )  # erased with the transaction that spends them
            if span.direction is Direction.OUT:
                stream.cursor_bits = span.end_bits
        before = self._records.get(record.key_id)
        self._records[record.key_id] = record
        if record.state.finished:
            self._unfinished.discard(record.key_id)
        else:
            self._unfinished.add(record.key_id)
        if record.deliverable and not (before is not None and before.deliverable):
            self._deliverable[record.key_id] = record.key
            self._on_deliverable(record.key_id, record.key)
        elif not record.key:
            self._deliverable.pop(record.key_id, None)

    def deposit(self, peer: str, direction: Direction, material: bytes) -> None:
        """The link's key store handed more pad bits to this stream (appended)."""
        stream = self._pads[(peer, direction)]
        start = len(stream.material)
        stream.material.extend(material)
        for s, e, _ in stream.spent:  # bits spent before they arrived are erased on arrival
            lo, hi = max(s // 8, start), min(e // 8, len(stream.material))
            if lo < hi:
                stream.material[lo:hi] = bytes(hi - lo)

    def corrupt(self, peer: str, direction: Direction, byte_index: int) -> None:
        """Flip one bit of a held pad byte (this end's copy only)."""
        self._pads[(peer, direction)].material[byte_index] ^= 0x01

    def hand_out(self, key_id: uuid.UUID) -> bytes:
        """Give a deliverable key to its SAE: erased here afterwards."""
        key = self._deliverable.pop(key_id)
        record = self._records[key_id]
        self._records[key_id] = dataclasses.replace(record, key=b"")
        return key

    # ---- reads for the checker ------------------------------------------------------------------
    def deliverable_ids(self) -> list[uuid.UUID]:
        return sorted(self._deliverable)

    def records(self) -> dict[uuid.UUID, RelayRecord]:
        return dict(self._records)

    def stream(self, peer: str, direction: Direction) -> PadStream:
        return self._pads[(peer, direction)]
