"""The ``[store]`` section: where the key store lives and the size of one delivered key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qkdnode.config.table import Table, resolve_path
from qkdnode.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSection:
    directory: Path
    key_size_bits: int


def read_store(table: Table, base: Path) -> StoreSection:
    section = StoreSection(
        directory=resolve_path(table.string("directory"), base),
        key_size_bits=table.integer("key_size_bits", 256, minimum=64, maximum=1 << 16),
    )
    if section.key_size_bits % 8:
        raise ConfigError(table.key("key_size_bits"), "a multiple of 8")
    table.finish()
    return section
