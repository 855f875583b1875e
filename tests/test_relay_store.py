"""The durable relay store: the relay simulation run over it (checked against the model at every
read and write), round trips, reopening, refusals that change nothing, refused pad chunks,
deposit idempotence, handing relayed keys out once, no secret in any repr or message, and a
kill -9 in the middle of a loop of writes."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qkdnode.errors import KeyStoreError
from qkdnode.relay.events import (
    Direction,
    PadRange,
    PadSpend,
    Position,
    RelayRecord,
    RelayState,
    SaveRelay,
)
from qkdnode.relay.messages import Forward, payload_bits
from qkdnode.simulation import relay_world
from qkdnode.simulation.relay_store import PadStream, RelayStoreModel
from qkdnode.simulation.relay_world import crash_at_every_boundary, simulate_relay_run
from qkdnode.store.deliveries import DeliveryRefused
from qkdnode.store.relaystore import REFUSED_CHUNK, Deposit, PadChunk, RelayCounts, RelayStore
from qkdnode.store.transaction import StoreOp, Tx

REPO = Path(__file__).resolve().parent.parent

# ---- the simulation over the SQLite store --------------------------------------------------------


class _Differs(AssertionError):
    """The SQLite store and the model disagreed."""


def _same(what: str, durable: object, model: object) -> None:
    if durable != model:
        raise _Differs(f"{what}: store {durable!r} != model {model!r}")


class CheckedRelayStore:
    """The world's store for one node: a ``RelayStore`` answers every read and takes every
    write; a ``RelayStoreModel`` shadows it and every answer and every state after a write is
    compared with the model's (an ``AssertionError`` ends the run)."""

    def __init__(
        self,
        directory: Path,
        name: str,
        neighbours: tuple[str, ...],
        on_deliverable: Callable[[uuid.UUID, bytes], None],
    ) -> None:
        self.durable = RelayStore.open(directory, node_name=name)
        self.model = RelayStoreModel(neighbours, lambda key_id, key: None)
        self.neighbours = neighbours
        self._on_deliverable = on_deliverable
        self.applies = 0

    # views
    def relay(self, key_id: uuid.UUID) -> RelayRecord | None:
        record = self.durable.relay(key_id)
        _same("relay", record, self.model.relay(key_id))
        return record

    def unfinished_relays(self) -> list[RelayRecord]:
        records = self.durable.unfinished_relays()
        _same("unfinished_relays", records, self.model.unfinished_relays())
        return records

    def available_bits(self, peer: str, direction: Direction) -> int:
        bits = self.durable.available_bits(peer, direction)
        _same("available_bits", bits, self.model.available_bits(peer, direction))
        return bits

    def next_offset_bits(self, peer: str) -> int:
        bits = self.durable.next_offset_bits(peer)
        _same("next_offset_bits", bits, self.model.next_offset_bits(peer))
        return bits

    def spent_overlaps(self, span: PadRange) -> bool:
        answer = self.durable.spent_overlaps(span)
        _same("spent_overlaps", answer, self.model.spent_overlaps(span))
        return answer

    def pad(self, span: PadRange) -> bytes:
        try:
            model_pad: bytes | None = self.model.pad(span)
        except KeyStoreError:
            model_pad = None
        try:
            pad = self.durable.pad(span)
        except KeyStoreError:
            _same("pad refused", None, "refused" if model_pad is None else "read")
            raise
        _same("pad", pad, model_pad)
        return pad

    # writes
    def apply(self, effect: SaveRelay) -> None:
        before = self.durable.relay(effect.record.key_id)
        try:
            self.model.apply(effect)
        except KeyStoreError:
            with pytest.raises(KeyStoreError):
                self.durable.apply(effect)
            raise
        self.durable.apply(effect)
        self.applies += 1
        record = effect.record
        if record.deliverable and not (before is not None and before.deliverable):
            self._on_deliverable(record.key_id, record.key)
        _same("record after apply", self.durable.relay(record.key_id), record)
        _same("deliverable", self.durable.deliverable_ids(), self.model.deliverable_ids())
        for spend in effect.spends:
            self._check_stream(spend.range.peer, spend.range.direction)

    def deposit(self, peer: str, direction: Direction, material: bytes) -> None:
        if not material:
            return  # a chunk holds at least one byte
        self.model.deposit(peer, direction, material)
        sources = (f"link-key-{len(material)}",)
        if direction is Direction.OUT:
            chunk = self.durable.add_out_chunk(peer, material, sources)
            self.durable.settle_out_chunk(peer, chunk.index, accepted=True)
        else:
            index = len(self.durable_chunks(peer, direction))
            deposited = self.durable.deposit_in_chunk(
                peer, index, 8 * len(material), material, sources
            )
            assert deposited is Deposit.STORED
        self._check_stream(peer, direction)

    def corrupt(self, peer: str, direction: Direction, byte_index: int) -> None:
        self.model.corrupt(peer, direction, byte_index)

        def flip(tx: Tx) -> None:
            row = tx.execute(
                "SELECT idx, offset_bits, material FROM pad_chunks WHERE peer = ?"
                " AND direction = ? AND offset_bits <= ? AND offset_bits + bits > ?",
                (peer, direction.value, 8 * byte_index, 8 * byte_index),
            ).fetchone()
            material = bytearray(row[2])
            material[byte_index - row[1] // 8] ^= 0x01
            tx.execute(
                "UPDATE pad_chunks SET material = ? WHERE peer = ? AND direction = ? AND idx = ?",
                (bytes(material), peer, direction.value, row[0]),
            )

        self.durable.run(StoreOp(flip))
        self._check_stream(peer, direction)

    def hand_out(self, key_id: uuid.UUID) -> bytes:
        record = self.durable.relay(key_id)
        assert record is not None
        [(handed_id, key)] = self.durable.hand_out(
            [key_id], master_sae=record.master_sae_id, slave_sae=record.slave_sae_id
        )
        _same("handed out", (handed_id, key), (key_id, self.model.hand_out(key_id)))
        _same("record after hand out", self.durable.relay(key_id), self.model.relay(key_id))
        return key

    # the checker's reads
    def deliverable_ids(self) -> list[uuid.UUID]:
        ids = self.durable.deliverable_ids()
        _same("deliverable_ids", ids, self.model.deliverable_ids())
        return ids

    def records(self) -> dict[uuid.UUID, RelayRecord]:
        records = self.durable.records()
        _same("records", records, self.model.records())
        return records

    def stream(self, peer: str, direction: Direction) -> PadStream:
        stream = self._durable_stream(peer, direction)
        model = self.model.stream(peer, direction)
        _same(f"stream {peer} {direction.value}", _stream_state(stream), _stream_state(model))
        return stream

    def durable_chunks(self, peer: str, direction: Direction) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.durable._query(
            "SELECT idx, offset_bits, bits, material FROM pad_chunks"
            " WHERE peer = ? AND direction = ? ORDER BY idx",
            (peer, direction.value),
        )
        return rows

    def _durable_stream(self, peer: str, direction: Direction) -> PadStream:
        material = bytearray()
        for _idx, offset_bits, _bits, held in self.durable_chunks(peer, direction):
            assert offset_bits == 8 * len(material) and held is not None
            material.extend(held)
        spent = [
            (start, end, key_id)
            for start, end, key_id, _why in self.durable.spent_ranges(peer, direction)
            if key_id is not None
        ]
        cursor = self.durable.out_cursor_bits(peer) if direction is Direction.OUT else 0
        return PadStream(material=material, spent=spent, cursor_bits=cursor)

    def _check_stream(self, peer: str, direction: Direction) -> None:
        self.stream(peer, direction)

    def check_all(self) -> None:
        """Everything the model holds, compared (also the stored cursor and counts)."""
        self.records()
        self.deliverable_ids()
        counts = self.durable.counts()
        _same("deliverable count", counts.deliverable_keys, len(self.model.deliverable_ids()))
        for peer in self.neighbours:
            for direction in Direction:
                model = self.model.stream(peer, direction)
                held_bits = 8 * len(model.material)
                spent_held = sum(max(0, min(e, held_bits) - s) for s, e, _ in model.spent)
                _same(
                    f"counts {peer} {direction.value}",
                    (
                        counts.pad_bits_held.get((peer, direction), 0),
                        counts.pad_bits_spent.get((peer, direction), 0),
                    ),
                    (held_bits - spent_held, sum(e - s for s, e, _ in model.spent)),
                )
        _same(
            "relay counts",
            sum(counts.relays.values()),
            len(self.model.records()),
        )
        for peer in self.neighbours:
            for direction in Direction:
                self.stream(peer, direction)
            _same(
                "next offset",
                self.durable.next_offset_bits(peer),
                self.model.next_offset_bits(peer),
            )


def _stream_state(stream: PadStream) -> object:
    return (bytes(stream.material), list(stream.spent), stream.cursor_bits)


@pytest.fixture
def checked_worlds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[CheckedRelayStore]]:
    """Relay worlds whose nodes keep a ``CheckedRelayStore`` (one directory per store)."""
    made: list[CheckedRelayStore] = []

    def factory(
        neighbours: tuple[str, ...], on_deliverable: Callable[[uuid.UUID, bytes], None]
    ) -> CheckedRelayStore:
        name = f"n{len(made)}"
        store = CheckedRelayStore(tmp_path / name, name, neighbours, on_deliverable)
        made.append(store)
        return store

    monkeypatch.setattr(relay_world, "RelayStoreModel", factory)
    yield made
    for store in made:
        store.durable.close()


@pytest.mark.slow
def test_the_relay_simulation_over_the_sqlite_store_agrees_with_the_model(
    checked_worlds: list[CheckedRelayStore],
) -> None:
    reports = [simulate_relay_run(seed) for seed in range(12)]
    assert [v for r in reports for v in r.violations] == []
    assert sum(r.relays_committed for r in reports) > 10
    assert sum(r.relays_aborted for r in reports) > 0
    assert sum(r.crashes for r in reports) > 0 and sum(r.keys_handed_out for r in reports) > 0
    assert sum(s.applies for s in checked_worlds) > 100
    for store in checked_worlds:
        store.check_all()
    # the same, read back from disk after closing
    for store in checked_worlds:
        records = store.durable.records()
        store.durable.close()
        store.durable = RelayStore.open(
            store.durable.path.parent, node_name=store.durable.path.parent.name
        )
        assert store.durable.records() == records
        store.check_all()


@pytest.mark.slow
def test_a_crash_at_every_event_boundary_over_the_sqlite_store(
    checked_worlds: list[CheckedRelayStore],
) -> None:
    reports = crash_at_every_boundary(("A", "R", "C"), abort=True, seed=7)
    assert len(reports) > 20
    assert [v for r in reports for v in r.violations] == []
    assert all(r.relays_aborted == r.relays_started for r in reports)


# ---- synthetic records -----------------------------------------------------------------------


def _key_id(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(bytes=rng.randbytes(16), version=4)


def _origin_pending(
    rng: random.Random, *, peer: str = "R", offset_bits: int = 0, key_bits: int = 128
) -> SaveRelay:
    """An origin's first save: the key, the tag, an allocation to ``peer`` at ``offset_bits``."""
    key_id = _key_id(rng)
    bits = payload_bits(key_bits)
    span = PadRange(peer=peer, direction=Direction.OUT, offset_bits=offset_bits, bits=bits)
    forward = Forward(
        key_id=key_id,
        route=("A", peer, "C"),
        master_sae_id="sae-a",
        slave_sae_id="sae-c",
        key_bits=key_bits,
        pad_offset_bits=offset_bits,
        ciphertext=rng.randbytes(bits // 8),
    )
    record = RelayRecord(
        key_id=key_id,
        route=("A", peer, "C"),
        position=Position.ORIGIN,
        master_sae_id="sae-a",
        slave_sae_id="sae-c",
        key_bits=key_bits,
        state=RelayState.PENDING,
        key=rng.randbytes(key_bits // 8),
        tag=rng.randbytes(16),
        pad_out=span,
        forward_out=forward,
    )
    return SaveRelay(record=record, spends=(PadSpend(range=span, used=True),))


def _terminal_prepared(
    rng: random.Random, *, peer: str = "R", offset_bits: int = 0, key_bits: int = 128
) -> SaveRelay:
    key_id = _key_id(rng)
    span = PadRange(
        peer=peer, direction=Direction.IN, offset_bits=offset_bits, bits=payload_bits(key_bits)
    )
    record = RelayRecord(
        key_id=key_id,
        route=("C", peer, "A"),
        position=Position.TERMINAL,
        master_sae_id="sae-c",
        slave_sae_id="sae-a",
        key_bits=key_bits,
        state=RelayState.PREPARED,
        key=rng.randbytes(key_bits // 8),
        tag=rng.randbytes(16),
        pad_in=span,
        in_digest=rng.randbytes(32),
    )
    return SaveRelay(record=record, spends=(PadSpend(range=span, used=True),))


def _with_state(effect: SaveRelay, state: RelayState, **changes: Any) -> SaveRelay:
    return SaveRelay(record=dataclasses.replace(effect.record, state=state, **changes))


def _open(tmp_path: Path, name: str = "A") -> RelayStore:
    return RelayStore.open(tmp_path / "relay", node_name=name)


def _filled(tmp_path: Path, rng: random.Random, *, out_bytes: int = 512) -> RelayStore:
    """A store with one accepted outgoing chunk to R and one incoming chunk from R."""
    store = _open(tmp_path)
    chunk = store.add_out_chunk("R", rng.randbytes(out_bytes), ("q-1", "q-2"))
    store.settle_out_chunk("R", chunk.index, accepted=True)
    assert store.deposit_in_chunk("R", 0, 8 * out_bytes, rng.randbytes(out_bytes), ("q-3",)) is (
        Deposit.STORED
    )
    return store


def _dump(path: Path) -> object:
    """Every row of every table, read by another connection (what a restart would find)."""
    db = sqlite3.connect(path)
    try:
        tables = [
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return {
            table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
            for table in sorted(tables)
        }
    finally:
        db.close()


def _raw_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


# ---- opening -------------------------------------------------------------------------------------


def test_open_makes_private_files_with_full_sync_and_refuses_another_nodes_store(
    tmp_path: Path,
) -> None:
    store = _open(tmp_path)
    _ = store.add_out_chunk("R", b"\x01" * 8, ())
    assert store.path == tmp_path / "relay" / "relay.db"
    assert stat.S_IMODE(os.stat(tmp_path / "relay").st_mode) == 0o700
    for path in (tmp_path / "relay").iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    store.close()
    with pytest.raises(KeyStoreError, match="belongs to node 'A'"):
        _open(tmp_path, "C")
    _open(tmp_path, "A").close()


# ---- records -------------------------------------------------------------------------------------


def test_every_record_field_round_trips_through_the_file(tmp_path: Path) -> None:
    rng = random.Random(1)
    store = _filled(tmp_path, rng)
    origin = _origin_pending(rng)
    terminal = _terminal_prepared(rng)
    middle_in = PadRange(peer="R", direction=Direction.IN, offset_bits=1024, bits=384)
    aborted = RelayRecord(
        key_id=_key_id(rng),
        route=("X", "A", "R"),
        position=Position.MIDDLE,
        master_sae_id="s" * 128,
        slave_sae_id="sae-r",
        key_bits=128,
        state=RelayState.ABORTED,
        pad_in=middle_in,
        in_digest=rng.randbytes(32),
        reason="the pad bits from R are not here yet",
    )
    for effect in (
        origin,
        terminal,
        SaveRelay(record=aborted, spends=(PadSpend(range=middle_in, used=False),)),
    ):
        store.apply(effect)
        assert store.relay(effect.record.key_id) == effect.record
    store.close()
    store = _open(tmp_path)
    for record in (origin.record, terminal.record, aborted):
        assert store.relay(record.key_id) == record
    assert store.unfinished_relays() == sorted(
        [origin.record, terminal.record], key=lambda r: r.key_id
    )
    assert store.relay(_key_id(rng)) is None
    store.close()


def test_reopening_keeps_records_cursor_spent_ranges_chunks_and_relayed_keys(
    tmp_path: Path,
) -> None:
    rng = random.Random(2)
    store = _filled(tmp_path, rng)
    store.add_out_chunk("R", rng.randbytes(64), ("q-9",))  # unsettled
    first = _origin_pending(rng)
    store.apply(first)
    store.apply(_with_state(first, RelayState.COMMITTING))
    second = _origin_pending(rng, offset_bits=first.record.payload_bits)
    store.apply(second)
    store.apply(_terminal_prepared(rng))
    before = (
        store.records(),
        store.next_offset_bits("R"),
        store.available_bits("R", Direction.OUT),
        store.available_bits("R", Direction.IN),
        store.spent_ranges("R", Direction.OUT),
        store.spent_ranges("R", Direction.IN),
        store.unacked_out_chunks("R"),
        store.counts(),
        store.relayed_key_count(master_sae="sae-a", slave_sae="sae-c"),
        store.pad(PadRange(peer="R", direction=Direction.OUT, offset_bits=768, bits=800)),
    )
    assert before[1] == 768 and before[8] == 1
    store.close()
    store = _open(tmp_path)
    after = (
        store.records(),
        store.next_offset_bits("R"),
        store.available_bits("R", Direction.OUT),
        store.available_bits("R", Direction.IN),
        store.spent_ranges("R", Direction.OUT),
        store.spent_ranges("R", Direction.IN),
        store.unacked_out_chunks("R"),
        store.counts(),
        store.relayed_key_count(master_sae="sae-a", slave_sae="sae-c"),
        store.pad(PadRange(peer="R", direction=Direction.OUT, offset_bits=768, bits=800)),
    )
    assert after == before
    assert store.hand_out([first.record.key_id], master_sae="sae-a", slave_sae="sae-c") == [
        (first.record.key_id, first.record.key)
    ]
    store.close()


def test_counts_report_relays_pad_bits_and_deliverable_keys(tmp_path: Path) -> None:
    rng = random.Random(3)
    store = _filled(tmp_path, rng, out_bytes=256)  # 2048 bits each way
    origin = _origin_pending(rng)
    store.apply(origin)
    store.apply(_with_state(origin, RelayState.COMMITTED))
    store.apply(_terminal_prepared(rng))
    counts = store.counts()
    assert isinstance(counts, RelayCounts)
    assert counts.relays == {
        (Position.ORIGIN, RelayState.COMMITTED): 1,
        (Position.TERMINAL, RelayState.PREPARED): 1,
    }
    assert counts.pad_bits_spent == {("R", Direction.OUT): 384, ("R", Direction.IN): 384}
    assert counts.pad_bits_held == {
        ("R", Direction.OUT): 2048 - 384,
        ("R", Direction.IN): 2048 - 384,
    }
    assert counts.deliverable_keys == 1
    store.close()


# ---- refusals change nothing ---------------------------------------------------------------------


def test_every_refused_write_leaves_the_store_unchanged(tmp_path: Path) -> None:
    rng = random.Random(4)
    store = _filled(tmp_path, rng)
    first = _origin_pending(rng)
    store.apply(first)
    terminal = _terminal_prepared(rng)
    store.apply(terminal)
    snapshot = _dump(store.path)
    overlapping_out = _origin_pending(rng, offset_bits=first.record.payload_bits - 8)
    below_cursor = _origin_pending(rng, offset_bits=0)
    overlapping_in = _terminal_prepared(rng, offset_bits=8)
    in_range = PadRange(peer="R", direction=Direction.IN, offset_bits=1000, bits=384)
    twice_in_one = SaveRelay(
        record=_terminal_prepared(rng, offset_bits=1000).record,
        spends=(PadSpend(range=in_range, used=True), PadSpend(range=in_range, used=False)),
    )
    # a good spend first and a bad one after it: the good one must not be taken either
    good_then_bad = SaveRelay(
        record=overlapping_out.record,
        spends=(
            PadSpend(range=in_range, used=True),
            PadSpend(range=overlapping_out.record.pad_out, used=True),  # type: ignore[arg-type]
        ),
    )
    refusals: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: store.apply(overlapping_out), KeyStoreError, "below the outgoing cursor"),
        (lambda: store.apply(below_cursor), KeyStoreError, "below the outgoing cursor"),
        (lambda: store.apply(overlapping_in), KeyStoreError, "spent twice"),
        (lambda: store.apply(twice_in_one), KeyStoreError, "spent twice"),
        (lambda: store.apply(good_then_bad), KeyStoreError, "below the outgoing cursor"),
        (lambda: store.settle_out_chunk("R", 0, accepted=False), KeyStoreError, "otherwise"),
        (lambda: store.settle_out_chunk("R", 5, accepted=True), KeyStoreError, "no outgoing"),
        (
            lambda: store.deposit_in_chunk("R", 0, 64, b"\x00" * 8, ("q-3",)),
            KeyStoreError,
            "differs",
        ),
        (lambda: store.add_out_chunk("R", b"", ()), KeyStoreError, "whole bytes"),
        (lambda: store.deposit_in_chunk("R", 1, 12, None, ()), KeyStoreError, "whole bytes"),
        (lambda: store.deposit_in_chunk("R", 1, 64, b"\x00" * 7, ()), KeyStoreError, "holds"),
        (
            lambda: store.hand_out([first.record.key_id], master_sae="sae-a", slave_sae="sae-c"),
            DeliveryRefused,
            "not deliverable here",
        ),
    ]
    for call, error, why in refusals:
        with pytest.raises(error, match=why):
            call()
        assert _dump(store.path) == snapshot
    assert not store.failed
    # the store still works: the next allocation at the cursor is taken
    store.apply(_origin_pending(rng, offset_bits=first.record.payload_bits))
    assert _dump(store.path) != snapshot
    store.close()


def test_pad_reads_refuse_spent_or_missing_bits(tmp_path: Path) -> None:
    rng = random.Random(5)
    store = _filled(tmp_path, rng, out_bytes=128)
    first = _origin_pending(rng)
    assert first.record.pad_out is not None
    store.apply(first)
    for span in (
        first.record.pad_out,
        PadRange(peer="R", direction=Direction.OUT, offset_bits=376, bits=64),
        PadRange(peer="R", direction=Direction.OUT, offset_bits=1000, bits=64),  # beyond
        PadRange(peer="R", direction=Direction.OUT, offset_bits=388, bits=64),  # not whole bytes
        PadRange(peer="X", direction=Direction.IN, offset_bits=0, bits=64),  # no such stream
    ):
        with pytest.raises(KeyStoreError):
            store.pad(span)
    assert (
        len(store.pad(PadRange(peer="R", direction=Direction.OUT, offset_bits=384, bits=640))) == 80
    )
    store.close()


# ---- refused chunks ------------------------------------------------------------------------------


def test_a_refused_outgoing_chunk_is_never_allocated_or_read(tmp_path: Path) -> None:
    rng = random.Random(6)
    store = _open(tmp_path)
    sizes_bytes = (96, 64, 96)  # 768, 512, 768 bits
    chunks = [store.add_out_chunk("R", rng.randbytes(n), (f"q-{n}",)) for n in sizes_bytes]
    assert [c.offset_bits for c in chunks] == [0, 768, 1280]
    assert store.unacked_out_chunks("R") == chunks
    assert store.available_bits("R", Direction.OUT) == 0  # nothing settled yet
    store.settle_out_chunk("R", 1, accepted=False)
    store.settle_out_chunk("R", 1, accepted=False)  # again: nothing changes
    assert store.available_bits("R", Direction.OUT) == 0  # chunk 0 still unsettled
    store.settle_out_chunk("R", 0, accepted=True)
    store.settle_out_chunk("R", 2, accepted=True)
    assert store.unacked_out_chunks("R") == []
    assert store.spent_ranges("R", Direction.OUT) == [(768, 1280, None, REFUSED_CHUNK)]
    refused = PadRange(peer="R", direction=Direction.OUT, offset_bits=768, bits=512)
    assert store.spent_overlaps(refused)
    with pytest.raises(KeyStoreError):
        store.pad(PadRange(peer="R", direction=Direction.OUT, offset_bits=768, bits=64))
    # the window stops at the refused chunk: an allocation never spans it
    assert (store.next_offset_bits("R"), store.available_bits("R", Direction.OUT)) == (0, 768)
    first = _origin_pending(rng)  # 0..384
    store.apply(first)
    assert (store.next_offset_bits("R"), store.available_bits("R", Direction.OUT)) == (384, 768)
    with pytest.raises(KeyStoreError, match="spent twice"):
        store.apply(_origin_pending(rng, offset_bits=384, key_bits=256))  # 384..896 spans it
    second = _origin_pending(rng, offset_bits=384)  # 384..768: up to the refused chunk
    store.apply(second)
    # the cursor now begins at the refused chunk: next_offset_bits moves past it
    assert (store.next_offset_bits("R"), store.available_bits("R", Direction.OUT)) == (1280, 2048)
    third = _origin_pending(rng, offset_bits=1280)
    store.apply(third)
    assert store.next_offset_bits("R") == 1664
    assert store.counts().pad_bits_spent[("R", Direction.OUT)] == 3 * 384 + 512
    store.close()
    store = _open(tmp_path)
    assert store.next_offset_bits("R") == 1664
    store.close()


def test_the_cursor_steps_over_a_gap_too_short_for_any_payload_before_a_refused_chunk(
    tmp_path: Path,
) -> None:
    rng = random.Random(7)
    store = _open(tmp_path)
    for n in (56, 64, 96):  # 448 bits, 512 refused, 768
        store.add_out_chunk("R", rng.randbytes(n), ())
    for index, accepted in ((0, True), (1, False), (2, True)):
        store.settle_out_chunk("R", index, accepted=accepted)
    store.apply(_origin_pending(rng))  # 0..384: 64 bits left before the refused chunk
    assert store.next_offset_bits("R") == 960
    held = store.pad(PadRange(peer="R", direction=Direction.OUT, offset_bits=384, bits=64))
    assert any(held)  # still held until the cursor moves over it
    store.apply(_origin_pending(rng, offset_bits=960))
    # the bits stepped over are erased and counted as spent, never allocated
    assert store.spent_overlaps(
        PadRange(peer="R", direction=Direction.OUT, offset_bits=384, bits=64)
    )
    assert store.counts().pad_bits_spent[("R", Direction.OUT)] == 384 + 64 + 512 + 384
    store.close()


def test_a_refused_incoming_chunk_is_spent_and_never_read(tmp_path: Path) -> None:
    rng = random.Random(8)
    store = _open(tmp_path)
    assert store.deposit_in_chunk("R", 0, 512, rng.randbytes(64), ("q-1",)) is Deposit.STORED
    assert store.deposit_in_chunk("R", 1, 512, None, ("q-2",)) is Deposit.STORED
    assert store.deposit_in_chunk("R", 2, 512, rng.randbytes(64), ("q-3",)) is Deposit.STORED
    assert store.available_bits("R", Direction.IN) == 1536
    inside = PadRange(peer="R", direction=Direction.IN, offset_bits=400, bits=384)
    assert store.spent_overlaps(inside)
    with pytest.raises(KeyStoreError):
        store.pad(inside)
    with pytest.raises(KeyStoreError, match="spent twice"):
        store.apply(_terminal_prepared(rng, offset_bits=400))
    store.apply(_terminal_prepared(rng, offset_bits=1024))
    assert store.spent_ranges("R", Direction.IN)[0] == (512, 1024, None, REFUSED_CHUNK)
    # a Forward refused before its bits arrived, then the chunk under it refused too: the
    # spent ranges stay disjoint and the counts exact
    early = _terminal_prepared(rng, offset_bits=1600)
    assert early.record.pad_in is not None
    tombstone = _with_state(early, RelayState.ABORTED, key=b"", tag=b"").record
    store.apply(
        SaveRelay(record=tombstone, spends=(PadSpend(range=early.record.pad_in, used=False),))
    )
    assert store.deposit_in_chunk("R", 3, 512, None, ()) is Deposit.STORED  # 1536..2048
    assert [r[:2] for r in store.spent_ranges("R", Direction.IN)] == [
        (512, 1024),
        (1024, 1408),
        (1600, 1984),
        (1536, 1600),
        (1984, 2048),
    ]
    counts = store.counts()
    assert counts.pad_bits_spent[("R", Direction.IN)] == 512 + 384 + 512
    assert counts.pad_bits_held[("R", Direction.IN)] == 1024 - 384
    store.close()


# ---- deposits and sources ------------------------------------------------------------------------


def test_deposit_is_idempotent_and_refuses_other_contents(tmp_path: Path) -> None:
    rng = random.Random(9)
    store = _open(tmp_path)
    first, second = rng.randbytes(64), rng.randbytes(32)
    assert store.deposit_in_chunk("R", 1, 256, second, ("q-2",)) is Deposit.GAP
    assert store.available_bits("R", Direction.IN) == 0
    assert store.deposit_in_chunk("R", 0, 512, first, ("q-1",)) is Deposit.STORED
    assert store.deposit_in_chunk("R", 1, 256, None, ("q-2",)) is Deposit.STORED
    snapshot = _dump(store.path)
    assert store.deposit_in_chunk("R", 0, 512, first, ("q-1",)) is Deposit.DUPLICATE
    assert store.deposit_in_chunk("R", 1, 256, None, ("q-2",)) is Deposit.DUPLICATE
    assert store.deposit_in_chunk("R", 3, 256, second, ("q-4",)) is Deposit.GAP
    for bits, material, sources in (
        (512, second + second, ("q-1",)),  # other material
        (512, first, ("q-9",)),  # other sources
        (512, None, ("q-1",)),  # refused now, stored before
        (1024, first + first, ("q-1",)),  # other length
    ):
        with pytest.raises(KeyStoreError, match="differs"):
            store.deposit_in_chunk("R", 0, bits, material, sources)
    with pytest.raises(KeyStoreError, match="differs"):
        store.deposit_in_chunk("R", 1, 256, second, ("q-2",))  # stored refused before
    assert _dump(store.path) == snapshot
    # a duplicate after its bits were spent (erased) is still recognised
    store.apply(_terminal_prepared(rng, offset_bits=0, key_bits=64))
    assert not any(store._query("SELECT material FROM pad_chunks WHERE idx = 0")[0][0][:40])
    assert store.deposit_in_chunk("R", 0, 512, first, ("q-1",)) is Deposit.DUPLICATE
    store.close()


def test_bits_spent_before_they_arrive_are_erased_on_arrival(tmp_path: Path) -> None:
    rng = random.Random(10)
    store = _open(tmp_path)
    # a Forward refused before its pad arrived: the range is spent with nothing held yet
    early = _terminal_prepared(rng, offset_bits=128)
    assert early.record.pad_in is not None
    refused = _with_state(early, RelayState.ABORTED, key=b"", tag=b"").record
    store.apply(
        SaveRelay(record=refused, spends=(PadSpend(range=early.record.pad_in, used=False),))
    )
    material = rng.randbytes(128)
    store.deposit_in_chunk("R", 0, 1024, material, ())
    store.close()
    raw = _raw_bytes(tmp_path / "relay")
    assert material[:16] in raw and material[64:] in raw
    assert material[16:64] not in raw  # bits 128..512 erased on arrival
    store = _open(tmp_path)
    assert store.counts().pad_bits_held[("R", Direction.IN)] == 1024 - 384
    store.close()


def test_a_relayed_key_is_handed_out_once_to_its_pair_and_erased(tmp_path: Path) -> None:
    rng = random.Random(11)
    store = _filled(tmp_path, rng)
    origin = _origin_pending(rng, key_bits=256)
    terminal = _terminal_prepared(rng, key_bits=256)
    pending = _origin_pending(rng, offset_bits=origin.record.payload_bits)
    for effect in (origin, terminal, pending):
        store.apply(effect)
    store.apply(_with_state(origin, RelayState.COMMITTING))
    store.apply(_with_state(terminal, RelayState.COMMITTED))
    assert store.relayed_key_count(master_sae="sae-a", slave_sae="sae-c") == 1
    assert store.relayed_key_count(master_sae="sae-c", slave_sae="sae-a") == 1
    assert store.relayed_key_count(master_sae="sae-a", slave_sae="sae-x") == 0
    store._checkpoint()
    keys = (origin.record.key, terminal.record.key)
    raw = _raw_bytes(tmp_path / "relay")
    assert all(key in raw for key in keys)  # the check below can see them
    snapshot = _dump(store.path)
    refusals = {
        "unknown here": [_key_id(rng)],
        "another SAE pair": [origin.record.key_id],
        "not deliverable here": [pending.record.key_id],
        "repeated": [terminal.record.key_id, terminal.record.key_id],
    }
    for why, ids in refusals.items():
        with pytest.raises(DeliveryRefused, match=why):
            store.hand_out(ids, master_sae="sae-c", slave_sae="sae-a")
        assert _dump(store.path) == snapshot
    with pytest.raises(DeliveryRefused, match=str(origin.record.key_id)):
        store.hand_out([origin.record.key_id], master_sae="sae-a", slave_sae="sae-x")
    assert store.hand_out([terminal.record.key_id], master_sae="sae-c", slave_sae="sae-a") == [
        (terminal.record.key_id, terminal.record.key)
    ]
    with pytest.raises(DeliveryRefused, match="already handed out"):
        store.hand_out([terminal.record.key_id], master_sae="sae-c", slave_sae="sae-a")
    assert store.hand_out([origin.record.key_id], master_sae="sae-a", slave_sae="sae-c") == [
        (origin.record.key_id, origin.record.key)
    ]
    handed = store.relay(origin.record.key_id)
    assert handed is not None and handed.key == b""
    # a later save of the record (from the stored one) does not make it deliverable again
    store.apply(_with_state(origin, RelayState.COMMITTED, key=b""))
    assert store.relayed_key_count(master_sae="sae-a", slave_sae="sae-c") == 0
    # gone from the files already (secure_delete, and the WAL folded after each hand out)
    assert not any(key in _raw_bytes(tmp_path / "relay") for key in keys)
    store.close()
    assert not any(key in _raw_bytes(tmp_path / "relay") for key in keys)


def test_an_aborted_relay_leaves_no_key_and_no_pad_on_disk(tmp_path: Path) -> None:
    rng = random.Random(12)
    store = _filled(tmp_path, rng)
    origin = _origin_pending(rng, key_bits=512)
    assert origin.record.pad_out is not None
    pad = store.pad(origin.record.pad_out)
    store.apply(origin)
    assert pad not in _raw_bytes(tmp_path / "relay")  # erased with the allocation, WAL folded
    store._checkpoint()
    assert origin.record.key in _raw_bytes(tmp_path / "relay")  # the check below can see it
    store.apply(_with_state(origin, RelayState.ABORTING, key=b""))
    # gone from the files at once (secure_delete, and the WAL folded after the erasing write)
    raw = _raw_bytes(tmp_path / "relay")
    assert origin.record.key not in raw and pad not in raw
    store.close()
    raw = _raw_bytes(tmp_path / "relay")
    assert origin.record.key not in raw and pad not in raw


# ---- no secret in any repr or message ------------------------------------------------------------


def test_no_key_pad_or_tag_appears_in_reprs_or_error_messages(tmp_path: Path) -> None:
    rng = random.Random(13)
    store = _filled(tmp_path, rng)
    origin = _origin_pending(rng)
    assert origin.record.pad_out is not None
    pad = store.pad(origin.record.pad_out)
    store.apply(origin)
    store.apply(_with_state(origin, RelayState.COMMITTING))
    secrets = [origin.record.key, origin.record.tag, pad]
    texts = [
        repr(store),
        str(store),
        repr(store.relay(origin.record.key_id)),
        repr(store.counts()),
        repr(store.unacked_out_chunks("R")),
        repr(store.add_out_chunk("R", pad, ("q",))),
    ]
    for call in (
        lambda: store.apply(origin),
        lambda: store.pad(origin.record.pad_out),
        lambda: store.hand_out([origin.record.key_id], master_sae="x", slave_sae="y"),
        lambda: store.deposit_in_chunk("R", 0, 64, pad[:8], ()),
    ):
        with pytest.raises(Exception) as caught:
            call()
        texts += [str(caught.value), repr(caught.value)]
    joined = "\n".join(texts)
    for secret in secrets:
        for form in (secret.hex(), repr(secret), secret[:8].hex()):
            assert form not in joined
    chunk = PadChunk(
        peer="R", direction=Direction.OUT, index=0, offset_bits=0, bits=8, accepted=None, sources=()
    )
    assert "material" not in repr(chunk)
    store.close()


# ---- kill -9 in the middle of writes -------------------------------------------------------------

_CRASH_RELAYS = 400


def _crash_effects(seed: int) -> list[SaveRelay]:
    """The child's sequence: relays at consecutive offsets, every other one committed after."""
    rng = random.Random(seed)
    effects: list[SaveRelay] = []
    offset = 0
    for number in range(_CRASH_RELAYS):
        effect = _origin_pending(rng, offset_bits=offset)
        offset += effect.record.payload_bits
        effects.append(effect)
        if number % 2:
            effects.append(_with_state(effect, RelayState.COMMITTING))
    return effects


def _crash_child(directory: str, seed: int) -> None:
    """Apply the sequence, printing the number of each apply that returned (killed meanwhile)."""
    store = RelayStore.open(Path(directory), node_name="A")
    effects = _crash_effects(seed)
    if not store.available_bits("R", Direction.OUT):
        chunk = store.add_out_chunk("R", random.Random(seed).randbytes(_CRASH_RELAYS * 160), ())
        store.settle_out_chunk("R", chunk.index, accepted=True)
    print("ready", flush=True)
    for number, effect in enumerate(effects):
        store.apply(effect)
        print(number, flush=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_kill_in_a_loop_of_applies_keeps_every_returned_one_and_a_prefix(
    tmp_path: Path, seed: int
) -> None:
    directory = tmp_path / "relay"
    effects = _crash_effects(seed)
    kill_after = random.Random(seed).randrange(5, len(effects) // 3)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from tests.test_relay_store import _crash_child;"
            f" _crash_child({str(directory)!r}, {seed})",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    returned = -1
    while returned < kill_after:
        line = child.stdout.readline()
        assert line, "the child ended early"
        returned = int(line)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    store = RelayStore.open(directory, node_name="A")
    # the expected state after the first n applies, for the n that matches
    records = store.records()
    applied = next(
        n
        for n in range(returned + 1, len(effects) + 1)
        if {e.record.key_id for e in effects[:n]} == set(records)
        and all(records[e.record.key_id] == e.record for e in _last_of_each(effects[:n]))
    )
    assert applied >= returned + 1
    last = _last_of_each(effects[:applied])
    assert store.unfinished_relays() == sorted(
        [e.record for e in last if not e.record.state.finished], key=lambda r: r.key_id
    )
    allocated = [e for e in effects[:applied] if e.spends]
    assert store.next_offset_bits("R") == sum(e.record.payload_bits for e in allocated)
    assert [(s, e) for s, e, _k, _r in store.spent_ranges("R", Direction.OUT)] == [
        (e.spends[0].range.offset_bits, e.spends[0].range.end_bits) for e in allocated
    ]
    committing = [e.record.key_id for e in last if e.record.state is RelayState.COMMITTING]
    assert store.deliverable_ids() == sorted(committing)
    store.close()


def _last_of_each(effects: list[SaveRelay]) -> list[SaveRelay]:
    latest = {e.record.key_id: e for e in effects}
    return list(latest.values())
