"""The crash-safe relay store: relay records, pad streams and relayed keys (``relay.db``).

SQLite in WAL mode, ``synchronous=FULL``, ``secure_delete=ON``, files private to the owner, the
transaction machinery of :mod:`qkdnode.store.transaction` (any SQLite error poisons the store and
raises :class:`~qkdnode.errors.KeyStoreError`). It is the durable form of
:class:`~qkdnode.simulation.relay_store.RelayStoreModel`: every ``apply`` of a ``SaveRelay`` is one
durable transaction that checks everything before it changes anything, and refuses (nothing
changed) a pad range that overlaps one already spent or an allocation below the outgoing cursor.

Pad streams: each (peer, direction) is a sequence of chunks with consecutive indexes from 0, each
covering bits ``[offset_bits, offset_bits + bits)`` (whole bytes) and cut from the link's QKD
keys (``sources``, opaque IDs of the link store). Outgoing chunks are offered to the peer and
settled (accepted or refused); incoming chunks are deposited in order. A refused chunk holds no
material: its whole range is spent, so nothing is ever allocated or read there. Spent bits
(used, refused, allocated, or skipped by the cursor) are zeroed in the transaction that spends
them, and the WAL is folded after it.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from qkdnode.errors import KeyStoreError, ProtocolError
from qkdnode.relay.events import (
    Direction,
    PadRange,
    Position,
    RelayRecord,
    RelayState,
    SaveRelay,
)
from qkdnode.relay.messages import (
    MIN_KEY_BITS,
    Forward,
    decode_message,
    encode_message,
    payload_bits,
)
from qkdnode.store.deliveries import DeliveryRefused
from qkdnode.store.transaction import Database, Tx, connect_private, restrict_files

T = TypeVar("T")

RELAY_SCHEMA_VERSION: Final = 1
RELAY_DATABASE_NAME: Final = "relay.db"
REFUSED_CHUNK: Final = "refused chunk"
SKIPPED_BY_CURSOR: Final = "skipped by the cursor"
# the smallest payload a relay can allocate: a gap before a refused chunk shorter than this can
# never be used, so the outgoing cursor steps over it with the refused chunk
_MIN_PAYLOAD_BITS: Final = payload_bits(MIN_KEY_BITS)

RELAY_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS relays (
    key_id        TEXT PRIMARY KEY,
    route         TEXT NOT NULL,
    position      TEXT NOT NULL CHECK (position IN ('origin', 'middle', 'terminal')),
    master_sae    TEXT NOT NULL,
    slave_sae     TEXT NOT NULL,
    key_bits      INTEGER NOT NULL,
    state         TEXT NOT NULL,
    finished      INTEGER NOT NULL CHECK (finished IN (0, 1)),
    key           BLOB NOT NULL,
    tag           BLOB NOT NULL,
    pad_in_peer   TEXT,
    pad_in_dir    TEXT,
    pad_in_offset_bits INTEGER,
    pad_in_bits   INTEGER,
    in_digest     BLOB NOT NULL,
    pad_out_peer  TEXT,
    pad_out_dir   TEXT,
    pad_out_offset_bits INTEGER,
    pad_out_bits  INTEGER,
    forward_out   BLOB,
    reason        TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS relays_unfinished ON relays (finished, key_id);
-- keys made deliverable here and not handed out yet
CREATE TABLE IF NOT EXISTS relayed_keys (
    key_id     TEXT PRIMARY KEY,
    master_sae TEXT NOT NULL,
    slave_sae  TEXT NOT NULL,
    key        BLOB NOT NULL,
    route      TEXT NOT NULL,
    position   TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS pad_chunks (
    peer        TEXT NOT NULL,
    direction   TEXT NOT NULL CHECK (direction IN ('out', 'in')),
    idx         INTEGER NOT NULL,
    offset_bits INTEGER NOT NULL,
    bits        INTEGER NOT NULL,
    -- NULL: unsettled (outgoing only), 1: accepted or stored, 0: refused (no material)
    accepted    INTEGER CHECK (accepted IN (0, 1)),
    material    BLOB,
    -- SHA-256 of the material as it arrived (incoming duplicates are recognised by it)
    digest      BLOB,
    sources     TEXT NOT NULL,
    PRIMARY KEY (peer, direction, idx)
) STRICT;
CREATE INDEX IF NOT EXISTS chunks_by_offset ON pad_chunks (peer, direction, offset_bits);
CREATE TABLE IF NOT EXISTS spent_ranges (
    peer       TEXT NOT NULL,
    direction  TEXT NOT NULL CHECK (direction IN ('out', 'in')),
    start_bits INTEGER NOT NULL,
    end_bits   INTEGER NOT NULL,
    key_id     TEXT,
    reason     TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS spent_by_stream ON spent_ranges (peer, direction, start_bits);
CREATE TABLE IF NOT EXISTS out_cursors (
    peer        TEXT PRIMARY KEY,
    cursor_bits INTEGER NOT NULL
) STRICT;
"""


class Deposit(enum.Enum):
    """What ``deposit_in_chunk`` did."""

    STORED = "stored"  # the next chunk, stored
    DUPLICATE = "duplicate"  # a chunk stored before with the same contents: nothing changed
    GAP = "gap"  # a later chunk than the next one: nothing stored


@dataclass(frozen=True, slots=True, kw_only=True)
class PadChunk:
    """One chunk of a pad stream (no material here). ``accepted``: outgoing None until settled;
    True accepted (incoming: stored with material), False refused (no material, all spent)."""

    peer: str
    direction: Direction
    index: int
    offset_bits: int
    bits: int
    accepted: bool | None
    sources: tuple[str, ...]

    @property
    def end_bits(self) -> int:
        return self.offset_bits + self.bits


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayCounts:
    """Relays per (position, state); per stream (peer, direction) the unspent bits held and the
    bits spent; relayed keys deliverable and not handed out yet."""

    relays: Mapping[tuple[Position, RelayState], int]
    pad_bits_held: Mapping[tuple[str, Direction], int]
    pad_bits_spent: Mapping[tuple[str, Direction], int]
    deliverable_keys: int


# ---- reading rows (shared by reads and transactions) -------------------------------------------


_RECORD_COLUMNS: Final = (
    "key_id, route, position, master_sae, slave_sae, key_bits, state, key, tag,"
    " pad_in_peer, pad_in_dir, pad_in_offset_bits, pad_in_bits, in_digest,"
    " pad_out_peer, pad_out_dir, pad_out_offset_bits, pad_out_bits, forward_out, reason"
)


def _range_columns(span: PadRange | None) -> tuple[object, ...]:
    if span is None:
        return (None, None, None, None)
    return (span.peer, span.direction.value, span.offset_bits, span.bits)


def _range_from(peer: Any, direction: Any, offset_bits: Any, bits: Any) -> PadRange | None:
    if peer is None:
        return None
    return PadRange(
        peer=peer, direction=Direction(direction), offset_bits=offset_bits, bits=int(bits)
    )


def _record_row(record: RelayRecord) -> tuple[object, ...]:
    forward = None if record.forward_out is None else encode_message(record.forward_out)
    return (
        str(record.key_id),
        json.dumps(list(record.route)),
        record.position.value,
        record.master_sae_id,
        record.slave_sae_id,
        record.key_bits,
        record.state.value,
        record.key,
        record.tag,
        *_range_columns(record.pad_in),
        record.in_digest,
        *_range_columns(record.pad_out),
        forward,
        record.reason,
        int(record.state.finished),
    )


def _record_from(row: Sequence[Any]) -> RelayRecord:
    forward: Forward | None = None
    if row[18] is not None:
        try:
            message = decode_message(bytes(row[18]))
        except ProtocolError as exc:
            raise KeyStoreError(f"relay {row[0]}: stored Forward unreadable ({exc})") from None
        if not isinstance(message, Forward):
            raise KeyStoreError(f"relay {row[0]}: stored Forward is a {type(message).__name__}")
        forward = message
    return RelayRecord(
        key_id=uuid.UUID(row[0]),
        route=tuple(json.loads(row[1])),
        position=Position(row[2]),
        master_sae_id=row[3],
        slave_sae_id=row[4],
        key_bits=int(row[5]),
        state=RelayState(row[6]),
        key=bytes(row[7]),
        tag=bytes(row[8]),
        pad_in=_range_from(row[9], row[10], row[11], row[12]),
        in_digest=bytes(row[13]),
        pad_out=_range_from(row[14], row[15], row[16], row[17]),
        forward_out=forward,
        reason=row[19],
    )


def _load_record(tx: Tx, key_id: uuid.UUID) -> RelayRecord | None:
    row = tx.execute(
        f"SELECT {_RECORD_COLUMNS} FROM relays WHERE key_id = ?", (str(key_id),)
    ).fetchone()
    return None if row is None else _record_from(row)


def _chunk_from(peer: str, direction: Direction, row: Sequence[Any]) -> PadChunk:
    index, offset_bits, bits, accepted, sources = row
    return PadChunk(
        peer=peer,
        direction=direction,
        index=int(index),
        offset_bits=int(offset_bits),
        bits=int(bits),
        accepted=None if accepted is None else bool(accepted),
        sources=tuple(json.loads(sources)),
    )


def _chunk_count(tx: Tx, peer: str, direction: Direction) -> int:
    """The number of chunks of the stream, which is the next chunk's index (from 0)."""
    row = tx.execute(
        "SELECT COUNT(*) FROM pad_chunks WHERE peer = ? AND direction = ?",
        (peer, direction.value),
    ).fetchone()
    return int(row[0])


def _stream_end_bits(tx: Tx, peer: str, direction: Direction) -> int:
    """The end of the last chunk of the stream (0 when it has none)."""
    row = tx.execute(
        "SELECT MAX(offset_bits + bits) FROM pad_chunks WHERE peer = ? AND direction = ?",
        (peer, direction.value),
    ).fetchone()
    return 0 if row[0] is None else int(row[0])


def _settled_end_bits(tx: Tx, peer: str, direction: Direction) -> int:
    """The end of the longest prefix of settled chunks (all of an incoming stream)."""
    row = tx.execute(
        "SELECT MIN(offset_bits) FROM pad_chunks WHERE peer = ? AND direction = ?"
        " AND accepted IS NULL",
        (peer, direction.value),
    ).fetchone()
    return _stream_end_bits(tx, peer, direction) if row[0] is None else int(row[0])


def _stored_cursor_bits(tx: Tx, peer: str) -> int:
    row = tx.execute("SELECT cursor_bits FROM out_cursors WHERE peer = ?", (peer,)).fetchone()
    return 0 if row is None else int(row[0])


def _out_window(tx: Tx, peer: str) -> tuple[int, int]:
    """(the first bit to allocate, the end of what may be allocated from it) on the outgoing
    stream to ``peer``. The cursor steps over refused chunks that begin at it (and over a gap
    before one too short for any payload); the window ends at the next refused chunk, so an
    allocation never overlaps one."""
    settled_end = _settled_end_bits(tx, peer, Direction.OUT)
    cursor = _stored_cursor_bits(tx, peer)
    refused = tx.execute(
        "SELECT offset_bits, offset_bits + bits FROM pad_chunks WHERE peer = ?"
        " AND direction = 'out' AND accepted = 0 AND offset_bits + bits > ? AND offset_bits < ?"
        " ORDER BY idx",
        (peer, cursor, settled_end),
    ).fetchall()
    for start, end in refused:
        if start - cursor < _MIN_PAYLOAD_BITS:
            cursor = max(cursor, end)
            continue
        return cursor, start
    return cursor, max(cursor, settled_end)


def _available_bits(tx: Tx, peer: str, direction: Direction) -> int:
    if direction is Direction.OUT:
        return _out_window(tx, peer)[1]
    return _settled_end_bits(tx, peer, direction)


def _overlaps(tx: Tx, span: PadRange) -> bool:
    # the spent ranges of a stream never overlap each other: only the last one that begins
    # before the span's end can reach into it
    row = tx.execute(
        "SELECT end_bits FROM spent_ranges WHERE peer = ? AND direction = ? AND start_bits < ?"
        " ORDER BY start_bits DESC LIMIT 1",
        (span.peer, span.direction.value, span.end_bits),
    ).fetchone()
    return row is not None and int(row[0]) > span.offset_bits


def _material_rows(tx: Tx, peer: str, direction: Direction, start: int, end: int) -> list[Any]:
    """Chunks of the stream overlapping bits [start, end): (idx, offset_bits, bits, material)."""
    return tx.execute(
        "SELECT idx, offset_bits, bits, material FROM pad_chunks"
        " WHERE peer = ? AND direction = ? AND offset_bits < ? AND offset_bits + bits > ?"
        " ORDER BY idx",
        (peer, direction.value, end, start),
    ).fetchall()


def _erase(tx: Tx, peer: str, direction: Direction, start_bits: int, end_bits: int) -> None:
    """Zero the held bytes of bits [start_bits, end_bits) of the stream (whole bytes, as the
    model: a span's first byte to the byte holding its end)."""
    lo_byte, hi_byte = start_bits // 8, end_bits // 8
    for idx, offset_bits, _bits, material in _material_rows(
        tx, peer, direction, 8 * lo_byte, 8 * hi_byte
    ):
        if material is None:
            continue
        held = bytearray(material)
        first = offset_bits // 8
        lo, hi = max(lo_byte - first, 0), min(hi_byte - first, len(held))
        if lo < hi and any(held[lo:hi]):
            held[lo:hi] = bytes(hi - lo)
            tx.execute(
                "UPDATE pad_chunks SET material = ? WHERE peer = ? AND direction = ? AND idx = ?",
                (bytes(held), peer, direction.value, idx),
            )
            tx.erased = True


def _spend(
    tx: Tx, span: PadRange, key_id: uuid.UUID | None, reason: str, *, erase: bool = True
) -> None:
    tx.execute(
        "INSERT INTO spent_ranges (peer, direction, start_bits, end_bits, key_id, reason)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            span.peer,
            span.direction.value,
            span.offset_bits,
            span.end_bits,
            None if key_id is None else str(key_id),
            reason,
        ),
    )
    if erase:
        _erase(tx, span.peer, span.direction, span.offset_bits, span.end_bits)


def _spent_rows(tx: Tx, peer: str, direction: Direction) -> list[Any]:
    return tx.execute(
        "SELECT start_bits, end_bits, key_id, reason FROM spent_ranges"
        " WHERE peer = ? AND direction = ? ORDER BY rowid",
        (peer, direction.value),
    ).fetchall()


def _insert_chunk(
    tx: Tx,
    peer: str,
    direction: Direction,
    index: int,
    offset_bits: int,
    bits: int,
    accepted: bool | None,
    material: bytes | None,
    sources: Sequence[str],
) -> PadChunk:
    digest = None if material is None else hashlib.sha256(material).digest()
    tx.execute(
        "INSERT INTO pad_chunks (peer, direction, idx, offset_bits, bits, accepted, material,"
        " digest, sources) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            peer,
            direction.value,
            index,
            offset_bits,
            bits,
            None if accepted is None else int(accepted),
            material,
            digest,
            json.dumps(list(sources)),
        ),
    )
    span = PadRange(peer=peer, direction=direction, offset_bits=offset_bits, bits=bits)
    if material is None:
        _spend_unspent(tx, span, REFUSED_CHUNK)
    else:
        # bits spent before they arrived are erased on arrival
        for start, end in tx.execute(
            "SELECT start_bits, end_bits FROM spent_ranges WHERE peer = ? AND direction = ?"
            " AND start_bits < ? AND end_bits > ?",
            (peer, direction.value, span.end_bits, span.offset_bits),
        ).fetchall():
            _erase(tx, peer, direction, start, end)
    return PadChunk(
        peer=peer,
        direction=direction,
        index=index,
        offset_bits=offset_bits,
        bits=bits,
        accepted=accepted,
        sources=tuple(sources),
    )


def _check_chunk_args(peer: str, bits: int, material: bytes | None, sources: Sequence[str]) -> None:
    if not peer:
        raise KeyStoreError("a pad chunk names its peer")
    if bits <= 0 or bits % 8:
        raise KeyStoreError(f"a pad chunk holds a positive number of whole bytes, not {bits} bits")
    if material is not None and 8 * len(material) != bits:
        raise KeyStoreError(f"a pad chunk of {bits} bits holds {8 * len(material)} bits")
    if isinstance(sources, str) or not all(isinstance(s, str) for s in sources):
        raise KeyStoreError("pad chunk sources are a sequence of strings")


def _install(tx: Tx, path: Path, node_name: str) -> None:
    tx.executescript_in_tx(RELAY_SCHEMA)
    rows = dict(tx.execute("SELECT name, value FROM meta").fetchall())
    if not rows:
        tx.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?), (?, ?)",
            ("schema_version", str(RELAY_SCHEMA_VERSION), "node_name", node_name),
        )
        return
    if rows.get("schema_version") != str(RELAY_SCHEMA_VERSION):
        raise KeyStoreError(
            f"relay store {path}: schema version {rows.get('schema_version')!r},"
            f" this qkdnode reads {RELAY_SCHEMA_VERSION}"
        )
    if rows.get("node_name") != node_name:
        raise KeyStoreError(
            f"relay store {path} belongs to node {rows.get('node_name')!r},"
            f" not {node_name!r}: point store.directory at this node's own store"
        )


class RelayStore(Database):
    """A node's relay store. Open with :meth:`open`; one daemon task owns it.

    It is the machine's ``RelayStoreView`` and ``PadView``; its writes (``apply``, the pad
    chunk operations, ``hand_out``) each commit one durable transaction before returning and,
    when they refuse (``KeyStoreError``, or ``DeliveryRefused`` for ``hand_out``), change
    nothing. Inside :meth:`batch` the writes share one transaction instead (group commit)."""

    # the open transaction of :meth:`batch`, which the writes join
    _batch_tx: Tx | None = None

    def __repr__(self) -> str:
        return f"RelayStore(path={self.path})"

    # ---- life cycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, *, node_name: str) -> RelayStore:
        """Open (creating if needed) ``directory/relay.db``; the directory is created 0700 and
        the files 0600. Raises KeyStoreError for another node's store or an unknown schema."""
        try:
            connection, path = connect_private(directory, RELAY_DATABASE_NAME)
            store = cls(connection, path)
            try:
                store._configure(node_name)
            except BaseException:
                store.close()
                raise
        except sqlite3.Error as exc:
            raise KeyStoreError(f"cannot open relay store in {directory}: {exc}") from exc
        restrict_files(path)
        return store

    def _configure(self, node_name: str) -> None:
        self._durable_wal("relay store")
        with self._transaction() as tx:
            _install(tx, self.path, node_name)

    def _read(self, body: Callable[[Tx], T]) -> T:
        """Run the reads of ``body`` under the lock; an SQLite error poisons the store."""
        with self._lock:
            try:
                return body(Tx(self._conn))
            except sqlite3.Error as exc:
                self._fail()
                raise KeyStoreError(f"relay store read failed ({exc}); stop the daemon") from exc

    def _write(self, body: Callable[[Tx], T]) -> T:
        """``body`` in one durable transaction (the WAL folded after it if it erased); inside
        :meth:`batch`, in a savepoint of the batch's transaction instead."""
        with self._lock:  # a batch holds it until it ends: then only its own thread sees it
            tx = self._batch_tx
            if tx is None:
                with self._transaction() as tx:
                    return body(tx)
            tx.execute("SAVEPOINT relay_write")
            try:
                value = body(tx)
            except sqlite3.Error:
                raise  # the batch's transaction rolls back and the store stops
            except BaseException:
                tx.execute("ROLLBACK TO relay_write")
                tx.execute("RELEASE relay_write")
                raise
            tx.execute("RELEASE relay_write")
            return value

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Every write of the block joins one transaction, committed durably when it ends (one
        fsync for all; rolled back whole if the block raises). Reads inside see the writes;
        other threads wait until it ends. A write that raises is undone alone."""
        with self._transaction() as tx:
            self._batch_tx = tx
            try:
                yield
            finally:
                self._batch_tx = None

    # ---- RelayStoreView ---------------------------------------------------------------------

    def relay(self, key_id: uuid.UUID) -> RelayRecord | None:
        return self._read(lambda tx: _load_record(tx, key_id))

    def unfinished_relays(self) -> list[RelayRecord]:
        """The records not finished yet, by key ID."""
        rows = self._query(f"SELECT {_RECORD_COLUMNS} FROM relays WHERE finished = 0")
        return sorted((_record_from(row) for row in rows), key=lambda r: r.key_id)

    def records(self) -> dict[uuid.UUID, RelayRecord]:
        """Every stored record (finished ones are tombstones)."""
        rows = self._query(f"SELECT {_RECORD_COLUMNS} FROM relays")
        return {record.key_id: record for record in map(_record_from, rows)}

    # ---- PadView ----------------------------------------------------------------------------

    def available_bits(self, peer: str, direction: Direction) -> int:
        """Incoming: the end of the deposited chunks. Outgoing: the end of the settled prefix of
        chunks, but no further than the next refused chunk after the cursor (an allocation never
        overlaps a refused chunk)."""
        return self._read(lambda tx: _available_bits(tx, peer, direction))

    def next_offset_bits(self, peer: str) -> int:
        """The outgoing cursor, moved past refused chunks that begin at it (and past a gap before
        one that is shorter than the smallest payload)."""
        return self._read(lambda tx: _out_window(tx, peer)[0])

    def spent_overlaps(self, span: PadRange) -> bool:
        return self._read(lambda tx: _overlaps(tx, span))

    def pad(self, span: PadRange) -> bytes:
        """The unspent pad bits of ``span`` (whole bytes, held and settled); KeyStoreError if any
        of them is spent or not held."""
        return self._read(lambda tx: self._pad(tx, span))

    @staticmethod
    def _pad(tx: Tx, span: PadRange) -> bytes:
        if _overlaps(tx, span):
            raise KeyStoreError(f"pad bits of {span.peer} ({span.direction.value}) already spent")
        if (
            span.offset_bits % 8
            or span.bits % 8
            or span.bits <= 0
            or span.offset_bits < 0
            or span.end_bits > _available_bits(tx, span.peer, span.direction)
        ):
            raise KeyStoreError("pad range not held")
        parts = []
        for _idx, offset_bits, bits, material in _material_rows(
            tx, span.peer, span.direction, span.offset_bits, span.end_bits
        ):
            if material is None:
                raise KeyStoreError("pad range not held")
            lo = max(span.offset_bits - offset_bits, 0) // 8
            hi = (min(span.end_bits, offset_bits + bits) - offset_bits) // 8
            parts.append(bytes(material)[lo:hi])
        pad = b"".join(parts)
        if 8 * len(pad) != span.bits:
            raise KeyStoreError("pad range not held")
        return pad

    # ---- writes -----------------------------------------------------------------------------

    def apply(self, effect: SaveRelay) -> None:
        """One durable transaction: take the spends (erasing their bits), write the record, and
        make its key deliverable when it first becomes deliverable (erase it when the record no
        longer holds it). KeyStoreError, nothing changed, for a range that overlaps one already
        spent or an allocation below the outgoing cursor."""
        self._write(lambda tx: self._apply(tx, effect))

    @staticmethod
    def _apply(tx: Tx, effect: SaveRelay) -> None:
        record = effect.record
        spans = [spend.range for spend in effect.spends]
        for number, span in enumerate(spans):  # every check before any change
            if span.bits <= 0 or span.offset_bits < 0:
                raise KeyStoreError("an empty or negative pad range")
            if span.direction is Direction.OUT and span.offset_bits < _stored_cursor_bits(
                tx, span.peer
            ):
                raise KeyStoreError("an allocation below the outgoing cursor")
            if _overlaps(tx, span) or any(
                other.peer == span.peer
                and other.direction is span.direction
                and other.offset_bits < span.end_bits
                and span.offset_bits < other.end_bits
                for other in spans[:number]
            ):
                raise KeyStoreError(
                    f"pad bits {span.offset_bits}..{span.end_bits} of {span.peer} "
                    f"({span.direction.value}) spent twice"
                )
        for spend in effect.spends:
            span = spend.range
            if span.direction is Direction.OUT:
                cursor = _stored_cursor_bits(tx, span.peer)
                if span.offset_bits > cursor:  # bits the cursor stepped over: never allocated
                    skipped = PadRange(
                        peer=span.peer,
                        direction=Direction.OUT,
                        offset_bits=cursor,
                        bits=span.offset_bits - cursor,
                    )
                    _erase(tx, span.peer, Direction.OUT, cursor, span.offset_bits)
                    _spend_unspent(tx, skipped, SKIPPED_BY_CURSOR)
                tx.execute(
                    "INSERT INTO out_cursors (peer, cursor_bits) VALUES (?, ?)"
                    " ON CONFLICT (peer) DO UPDATE SET cursor_bits = excluded.cursor_bits",
                    (span.peer, span.end_bits),
                )
            if span.direction is Direction.OUT:
                why = "allocated"
            else:
                why = "used" if spend.used else "refused unread"
            _spend(tx, span, record.key_id, why)
        before = _load_record(tx, record.key_id)
        tx.execute(
            f"INSERT OR REPLACE INTO relays ({_RECORD_COLUMNS}, finished)"
            f" VALUES ({','.join('?' * 21)})",
            _record_row(record),
        )
        if record.deliverable and not (before is not None and before.deliverable):
            tx.execute(
                "INSERT OR REPLACE INTO relayed_keys"
                " (key_id, master_sae, slave_sae, key, route, position) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    str(record.key_id),
                    record.master_sae_id,
                    record.slave_sae_id,
                    record.key,
                    json.dumps(list(record.route)),
                    record.position.value,
                ),
            )
        elif not record.key:
            gone = tx.execute(
                "DELETE FROM relayed_keys WHERE key_id = ?", (str(record.key_id),)
            ).rowcount
            if gone:
                tx.erased = True
        if before is not None and before.key and not record.key:
            tx.erased = True  # the record's old key bytes were overwritten

    # ---- pad chunks -------------------------------------------------------------------------

    def add_out_chunk(self, peer: str, material: bytes, sources: Sequence[str]) -> PadChunk:
        """Append a chunk to the outgoing stream to ``peer`` (unsettled until the peer answers)."""
        _check_chunk_args(peer, 8 * len(material), material, sources)

        def body(tx: Tx) -> PadChunk:
            return _insert_chunk(
                tx,
                peer,
                Direction.OUT,
                _chunk_count(tx, peer, Direction.OUT),
                _stream_end_bits(tx, peer, Direction.OUT),
                8 * len(material),
                None,
                material,
                sources,
            )

        return self._write(body)

    def unacked_out_chunks(self, peer: str) -> list[PadChunk]:
        """The outgoing chunks to ``peer`` not settled yet, by index."""
        rows = self._query(
            "SELECT idx, offset_bits, bits, accepted, sources FROM pad_chunks"
            " WHERE peer = ? AND direction = 'out' AND accepted IS NULL ORDER BY idx",
            (peer,),
        )
        return [_chunk_from(peer, Direction.OUT, row) for row in rows]

    def settle_out_chunk(self, peer: str, index: int, *, accepted: bool) -> None:
        """The peer accepted or refused outgoing chunk ``index``. A refused chunk's material is
        erased and its range spent. Settling again the same way changes nothing; the other way,
        or an unknown chunk: KeyStoreError."""

        def body(tx: Tx) -> None:
            row = tx.execute(
                "SELECT offset_bits, bits, accepted FROM pad_chunks"
                " WHERE peer = ? AND direction = 'out' AND idx = ?",
                (peer, index),
            ).fetchone()
            if row is None:
                raise KeyStoreError(f"no outgoing pad chunk {index} to {peer}")
            offset_bits, bits, settled = row
            if settled is not None:
                if bool(settled) != accepted:
                    raise KeyStoreError(f"outgoing pad chunk {index} to {peer} settled otherwise")
                return
            tx.execute(
                "UPDATE pad_chunks SET accepted = ?, material = CASE WHEN ? THEN material END"
                " WHERE peer = ? AND direction = 'out' AND idx = ?",
                (int(accepted), int(accepted), peer, index),
            )
            if not accepted:
                span = PadRange(
                    peer=peer, direction=Direction.OUT, offset_bits=offset_bits, bits=bits
                )
                _spend_unspent(tx, span, REFUSED_CHUNK)
                tx.erased = True

        self._write(body)

    def deposit_in_chunk(
        self, peer: str, index: int, bits: int, material: bytes | None, sources: Sequence[str]
    ) -> Deposit:
        """Store incoming chunk ``index`` from ``peer`` (``material`` None: refused here, its
        range spent). The next index: STORED. An earlier one with the same bits, sources and
        material (or both refused): DUPLICATE, nothing changed; with other contents:
        KeyStoreError. A later one: GAP, nothing stored."""
        _check_chunk_args(peer, bits, material, sources)
        digest = None if material is None else hashlib.sha256(material).digest()

        def body(tx: Tx) -> Deposit:
            count = _chunk_count(tx, peer, Direction.IN)
            if index > count:
                return Deposit.GAP
            if index < 0:
                raise KeyStoreError(f"incoming pad chunk index {index} is negative")
            if index < count:
                stored_bits, stored_digest, stored_sources = tx.execute(
                    "SELECT bits, digest, sources FROM pad_chunks"
                    " WHERE peer = ? AND direction = 'in' AND idx = ?",
                    (peer, index),
                ).fetchone()
                same_digest = (stored_digest is None and digest is None) or (
                    stored_digest is not None
                    and digest is not None
                    and bytes(stored_digest) == digest
                )
                if (
                    stored_bits == bits
                    and tuple(json.loads(stored_sources)) == tuple(sources)
                    and same_digest
                ):
                    return Deposit.DUPLICATE
                raise KeyStoreError(
                    f"incoming pad chunk {index} from {peer} differs from the one stored"
                )
            _insert_chunk(
                tx,
                peer,
                Direction.IN,
                index,
                _stream_end_bits(tx, peer, Direction.IN),
                bits,
                material is not None,
                material,
                sources,
            )
            return Deposit.STORED

        return self._write(body)

    def in_chunk(self, peer: str, index: int) -> PadChunk | None:
        """Incoming chunk ``index`` from ``peer``, or None when not deposited yet."""
        rows = self._query(
            "SELECT idx, offset_bits, bits, accepted, sources FROM pad_chunks"
            " WHERE peer = ? AND direction = 'in' AND idx = ?",
            (peer, index),
        )
        return _chunk_from(peer, Direction.IN, rows[0]) if rows else None

    def next_in_index(self, peer: str) -> int:
        """The index of the next incoming chunk from ``peer`` to deposit."""
        return self._read(lambda tx: _chunk_count(tx, peer, Direction.IN))

    # ---- relayed keys -----------------------------------------------------------------------

    def hand_out(
        self, key_ids: Sequence[uuid.UUID], *, master_sae: str, slave_sae: str
    ) -> list[tuple[uuid.UUID, bytes]]:
        """Hand relayed keys to the SAE pair, in the order asked, and erase them here; one
        transaction. DeliveryRefused (nothing changed) if any is not deliverable here for exactly
        that pair, or was handed out already."""

        def body(tx: Tx) -> list[tuple[uuid.UUID, bytes]]:
            if len(set(key_ids)) != len(key_ids):
                raise DeliveryRefused("repeated key ID", field="key_IDs")
            found: list[tuple[uuid.UUID, bytes]] = []
            for key_id in key_ids:
                row = tx.execute(
                    "SELECT master_sae, slave_sae, key FROM relayed_keys WHERE key_id = ?",
                    (str(key_id),),
                ).fetchone()
                if row is None:
                    record = _load_record(tx, key_id)
                    if record is None:
                        why = "unknown here"
                    elif record.deliverable:
                        why = "already handed out"
                    else:
                        why = f"not deliverable here ({record.state.value})"
                    raise DeliveryRefused(f"relayed key {key_id}: {why}", field="key_IDs")
                if (row[0], row[1]) != (master_sae, slave_sae):
                    raise DeliveryRefused(
                        f"relayed key {key_id}: relayed for another SAE pair", field="key_IDs"
                    )
                found.append((key_id, bytes(row[2])))
            for key_id, _key in found:
                tx.execute("DELETE FROM relayed_keys WHERE key_id = ?", (str(key_id),))
                tx.execute("UPDATE relays SET key = x'' WHERE key_id = ?", (str(key_id),))
            tx.erased = bool(found)
            return found

        return self._write(body)

    def relayed_key_count(self, *, master_sae: str, slave_sae: str) -> int:
        """Relayed keys deliverable here for the SAE pair and not handed out yet."""
        rows = self._query(
            "SELECT COUNT(*) FROM relayed_keys WHERE master_sae = ? AND slave_sae = ?",
            (master_sae, slave_sae),
        )
        return int(rows[0][0])

    def finished_origin_keys(
        self, *, master_sae: str, slave_sae: str, key_bits: int, limit: int
    ) -> list[uuid.UUID]:
        """Up to ``limit`` keys this node relayed as the origin for the SAE pair, of
        ``key_bits``, whose relay is finished committed (so deliverable at the terminal too)
        and not handed out here yet, oldest relay first."""
        rows = self._query(
            "SELECT k.key_id FROM relayed_keys AS k JOIN relays AS r ON r.key_id = k.key_id"
            " WHERE k.master_sae = ? AND k.slave_sae = ? AND r.position = 'origin'"
            " AND r.state = 'committed' AND r.key_bits = ? ORDER BY r.rowid LIMIT ?",
            (master_sae, slave_sae, key_bits, limit),
        )
        return [uuid.UUID(row[0]) for row in rows]

    def deliverable_ids(self) -> list[uuid.UUID]:
        """The key IDs of the relayed keys not handed out yet, sorted."""
        rows = self._query("SELECT key_id FROM relayed_keys")
        return sorted(uuid.UUID(row[0]) for row in rows)

    # ---- counts and checks ------------------------------------------------------------------

    def counts(self) -> RelayCounts:
        def body(tx: Tx) -> RelayCounts:
            relays = {
                (Position(position), RelayState(state)): int(count)
                for position, state, count in tx.execute(
                    "SELECT position, state, COUNT(*) FROM relays GROUP BY position, state"
                )
            }
            held: dict[tuple[str, Direction], int] = {}
            spent: dict[tuple[str, Direction], int] = {}
            streams = tx.execute(
                "SELECT DISTINCT peer, direction FROM pad_chunks UNION"
                " SELECT DISTINCT peer, direction FROM spent_ranges"
            ).fetchall()
            for peer, value in streams:
                key = (peer, Direction(value))
                spent[key] = int(
                    tx.execute(
                        "SELECT TOTAL(end_bits - start_bits) FROM spent_ranges"
                        " WHERE peer = ? AND direction = ?",
                        (peer, value),
                    ).fetchone()[0]
                )
                material_bits = tx.execute(
                    "SELECT TOTAL(bits) FROM pad_chunks"
                    " WHERE peer = ? AND direction = ? AND accepted IS NOT 0",
                    (peer, value),
                ).fetchone()[0]
                spent_material_bits = tx.execute(
                    "SELECT TOTAL(MAX(0, MIN(s.end_bits, c.offset_bits + c.bits)"
                    " - MAX(s.start_bits, c.offset_bits)))"
                    " FROM spent_ranges AS s JOIN pad_chunks AS c"
                    " ON c.peer = s.peer AND c.direction = s.direction AND c.accepted IS NOT 0"
                    " AND c.offset_bits < s.end_bits AND c.offset_bits + c.bits > s.start_bits"
                    " WHERE s.peer = ? AND s.direction = ?",
                    (peer, value),
                ).fetchone()[0]
                held[key] = int(material_bits) - int(spent_material_bits)
            deliverable = int(tx.execute("SELECT COUNT(*) FROM relayed_keys").fetchone()[0])
            return RelayCounts(
                relays=relays,
                pad_bits_held=held,
                pad_bits_spent=spent,
                deliverable_keys=deliverable,
            )

        return self._read(body)

    def spent_ranges(
        self, peer: str, direction: Direction
    ) -> list[tuple[int, int, uuid.UUID | None, str]]:
        """The spent ranges of a stream in the order they were spent: (start, end, key ID or
        None for a refused chunk or skipped bits, why)."""
        rows = self._read(lambda tx: _spent_rows(tx, peer, direction))
        return [
            (int(s), int(e), None if k is None else uuid.UUID(k), str(r)) for s, e, k, r in rows
        ]

    def out_cursor_bits(self, peer: str) -> int:
        """The outgoing cursor as stored (the end of the last allocation)."""
        return self._read(lambda tx: _stored_cursor_bits(tx, peer))


def _spend_unspent(tx: Tx, span: PadRange, reason: str) -> None:
    """Count the bits of ``span`` not spent yet as spent, without a relay (spent ranges stay
    disjoint)."""
    start = span.offset_bits
    taken = tx.execute(
        "SELECT start_bits, end_bits FROM spent_ranges WHERE peer = ? AND direction = ?"
        " AND start_bits < ? AND end_bits > ? ORDER BY start_bits",
        (span.peer, span.direction.value, span.end_bits, span.offset_bits),
    ).fetchall()
    for s, e in [*taken, (span.end_bits, span.end_bits)]:
        if s > start:
            tx.execute(
                "INSERT INTO spent_ranges (peer, direction, start_bits, end_bits, key_id, reason)"
                " VALUES (?, ?, ?, ?, NULL, ?)",
                (span.peer, span.direction.value, start, min(s, span.end_bits), reason),
            )
        start = max(start, e)
        if start >= span.end_bits:
            break


__all__ = [
    "REFUSED_CHUNK",
    "RELAY_DATABASE_NAME",
    "RELAY_SCHEMA_VERSION",
    "Deposit",
    "PadChunk",
    "RelayCounts",
    "RelayStore",
]
