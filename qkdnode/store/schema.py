"""The key store's SQLite schema and its migrations.

``SCHEMA_VERSION`` history: 2 added ``deliveries`` and ``delivery_parts``; 3 added
``deliveries.peer_confirmed``; 4 added the audit trail (``audit_log``, ``audit_state``,
``audit_peer_head``); 5 added ``deliveries.kind`` and ``deliveries.mlkem_secret`` (hybrid
delivery keys). Older stores are migrated in place when opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from qkdnode.errors import KeyStoreError
from qkdnode.store.transaction import Tx

SCHEMA_VERSION: Final = 5
DATABASE_NAME: Final = "keys.db"

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS blocks (
    block_id          INTEGER PRIMARY KEY,
    state             TEXT NOT NULL CHECK (state IN ('staged', 'committed', 'dropped')),
    first_pulse_index INTEGER NOT NULL,
    pulse_count       INTEGER NOT NULL,
    secret_bits       INTEGER NOT NULL,
    auth_pool_bits    INTEGER NOT NULL,
    ledger_mark_bits  INTEGER NOT NULL DEFAULT 0,
    stats             TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS keys (
    key_id     TEXT PRIMARY KEY,
    block_id   INTEGER NOT NULL REFERENCES blocks (block_id),
    position   INTEGER NOT NULL,
    size_bits  INTEGER NOT NULL,
    material   BLOB,
    state      TEXT NOT NULL
               CHECK (state IN ('staged', 'available', 'reserved', 'delivered')),
    master_sae TEXT,
    slave_sae  TEXT,
    UNIQUE (block_id, position)
) STRICT;
-- delivery takes the oldest available key of one parity (the master's partition): without the
-- parity in the index that scan steps over every available key of the other partition first
DROP INDEX IF EXISTS keys_by_state;
CREATE INDEX IF NOT EXISTS keys_by_state_parity ON keys (state, position % 2, block_id, position);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    role        TEXT NOT NULL CHECK (role IN ('master', 'slave')),
    state       TEXT NOT NULL CHECK (state IN ('reserved', 'delivered')),
    master_sae  TEXT NOT NULL,
    slave_sae   TEXT NOT NULL,
    size_bits   INTEGER NOT NULL,
    -- master side: the peer acknowledged its durable record (a reservation made ahead of
    -- requests survives a restart only then)
    peer_confirmed INTEGER NOT NULL DEFAULT 0 CHECK (peer_confirmed IN (0, 1)),
    kind        TEXT NOT NULL DEFAULT 'qkd' CHECK (kind IN ('qkd', 'hybrid')),
    -- hybrid keys: the key's own ML-KEM secret (qkdnode.delivery.hybrid) while it is reserved,
    -- NULL for QKD keys, before the master has it, and once the key is handed out
    mlkem_secret BLOB
) STRICT;
CREATE TABLE IF NOT EXISTS delivery_parts (
    delivery_id  TEXT NOT NULL REFERENCES deliveries (delivery_id),
    seq          INTEGER NOT NULL,
    key_id       TEXT NOT NULL REFERENCES keys (key_id),
    offset_bytes INTEGER NOT NULL,
    length_bytes INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, seq)
) STRICT;
CREATE INDEX IF NOT EXISTS parts_by_key ON delivery_parts (key_id);
CREATE TABLE IF NOT EXISTS auth_pool (
    block_id INTEGER PRIMARY KEY REFERENCES blocks (block_id),
    material BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS auth_ledger (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    state     BLOB NOT NULL
) STRICT;
-- the tamper-evident audit trail (qkdnode.audit): append-only entries, the writer's state
-- (its evolving key is overwritten at every entry) and the head of the PEER's trail as last
-- received over the authenticated channel
CREATE TABLE IF NOT EXISTS audit_log (
    seq        INTEGER PRIMARY KEY,
    body       BLOB NOT NULL,
    tag        BLOB NOT NULL,
    chain_hash BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS audit_state (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    next_seq  INTEGER NOT NULL,
    key       BLOB NOT NULL,
    head      BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS audit_peer_head (
    singleton     INTEGER PRIMARY KEY CHECK (singleton = 1),
    seq           INTEGER NOT NULL,
    chain_hash    BLOB NOT NULL,
    received_at_s REAL NOT NULL
) STRICT;
"""


def install_schema(tx: Tx, path: Path, node_name: str) -> None:
    """Create the tables of a new store, or migrate and check an existing one.

    Raises KeyStoreError for an unknown schema version or another node's store.
    """
    tx.executescript_in_tx(SCHEMA)
    rows = dict(tx.execute("SELECT name, value FROM meta").fetchall())
    if not rows:
        tx.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?), (?, ?)",
            ("schema_version", str(SCHEMA_VERSION), "node_name", node_name),
        )
    else:
        if rows.get("schema_version") == "2":  # in place: one column more
            tx.execute(
                "ALTER TABLE deliveries ADD COLUMN peer_confirmed INTEGER NOT NULL"
                " DEFAULT 0 CHECK (peer_confirmed IN (0, 1))"
            )
            rows["schema_version"] = "3"
        if rows.get("schema_version") == "3":  # in place: the audit tables (created above)
            rows["schema_version"] = "4"
        if rows.get("schema_version") == "4":  # in place: two columns more
            columns = {row[1] for row in tx.execute("PRAGMA table_info(deliveries)")}
            if "kind" not in columns:
                tx.execute(
                    "ALTER TABLE deliveries ADD COLUMN kind TEXT NOT NULL DEFAULT 'qkd'"
                    " CHECK (kind IN ('qkd', 'hybrid'))"
                )
            if "mlkem_secret" not in columns:
                tx.execute("ALTER TABLE deliveries ADD COLUMN mlkem_secret BLOB")
            tx.execute(
                "UPDATE meta SET value = ? WHERE name = 'schema_version'",
                (str(SCHEMA_VERSION),),
            )
            rows["schema_version"] = str(SCHEMA_VERSION)
        if rows.get("schema_version") != str(SCHEMA_VERSION):
            raise KeyStoreError(
                f"key store {path}: schema version {rows.get('schema_version')!r},"
                f" this qkdnode reads {SCHEMA_VERSION}"
            )
        if rows.get("node_name") != node_name:
            raise KeyStoreError(
                f"key store {path} belongs to node {rows.get('node_name')!r},"
                f" not {node_name!r}: point store.directory at this node's own store"
            )
