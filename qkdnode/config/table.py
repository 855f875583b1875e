"""Strict reading of configuration tables: every key typed, checked and named by its dotted path.

Used by every config section (node, peer, link, post-processing, authentication, store, delivery,
logging): unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the
dotted key and what was expected. The file name is attached where the file is read.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qkdnode.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()
REQUIRED: Any = _MISSING  # as a default: the key must be present


class Table:
    """A view of one TOML table that hands out typed values and remembers what was read."""

    def __init__(self, data: Mapping[str, object], path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, "a table")
        self._data = data
        self._path = path
        self._seen: set[str] = set()

    @property
    def path(self) -> str:
        """The table's dotted path ("" for the file's root)."""
        return self._path

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def has(self, name: str) -> bool:
        return name in self._data

    def _get(self, name: str, default: object) -> object:
        self._seen.add(name)
        if name in self._data:
            return self._data[name]
        if default is _MISSING:
            raise ConfigError(self.key(name), "a value (the key is required)")
        return default

    def string(
        self, name: str, default: str = _MISSING, *, choices: tuple[str, ...] | None = None
    ) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise ConfigError(self.key(name), "a string")
        if choices is not None and value not in choices:
            raise ConfigError(self.key(name), "one of " + ", ".join(repr(c) for c in choices))
        return value

    def optional_string(self, name: str) -> str | None:
        if name not in self._data:
            self._seen.add(name)
            return None
        return self.string(name)

    def boolean(self, name: str, default: bool = _MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), "true or false")
        return value

    def integer(
        self,
        name: str,
        default: int = _MISSING,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), "an integer")
        _check_range(self.key(name), value, minimum, maximum)
        return value

    def number(
        self,
        name: str,
        default: float = _MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
        exclusive_maximum: bool = False,
    ) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.key(name), "a number")
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(self.key(name), "a finite number")
        low_bad = minimum is not None and (
            number <= minimum if exclusive_minimum else number < minimum
        )
        high_bad = maximum is not None and (
            number >= maximum if exclusive_maximum else number > maximum
        )
        if low_bad or high_bad:
            low = "" if minimum is None else ("> " if exclusive_minimum else ">= ") + f"{minimum:g}"
            high = (
                "" if maximum is None else ("< " if exclusive_maximum else "<= ") + f"{maximum:g}"
            )
            raise ConfigError(
                self.key(name), "a number " + " and ".join(x for x in (low, high) if x)
            )
        return number

    def optional_number(
        self, name: str, *, minimum: float | None = None, maximum: float | None = None
    ) -> float | None:
        """A number (in [minimum, maximum] when given), or None when the key is absent."""
        if name not in self._data:
            self._seen.add(name)
            return None
        return self.number(name, minimum=minimum, maximum=maximum)

    def string_list(self, name: str, default: list[str] = _MISSING) -> tuple[str, ...]:
        value = self._get(name, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(self.key(name), "a list of strings")
        return tuple(value)

    def table(self, name: str, *, required: bool = True) -> Table:
        value = self._get(name, _MISSING if required else {})
        if not isinstance(value, Mapping):
            raise ConfigError(self.key(name), "a table")
        return Table(value, self.key(name))

    def table_list(self, name: str) -> list[Table]:
        """An optional array of tables (``[[name]]``), each named ``name[i]``; [] if absent."""
        value = self._get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError(self.key(name), "an array of tables ([[...]])")
        return [Table(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def parsed(
        self, name: str, parse: Callable[[str], T], expected: str, default: T = _MISSING
    ) -> T:
        if name not in self._data and default is not _MISSING:
            self._seen.add(name)
            return default
        text = self.string(name)
        try:
            return parse(text)
        except ValueError:
            raise ConfigError(self.key(name), expected) from None

    def take_rest(self, *, exclude: tuple[str, ...] = ()) -> dict[str, object]:
        """The raw entries not named in ``exclude``, marked as read: for a parser of its own."""
        rest = {k: v for k, v in self._data.items() if k not in exclude and k not in self._seen}
        self._seen.update(rest)
        return rest

    def finish(self) -> None:
        """Refuse keys nobody asked for: they are typos or options of another version."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "no such key (unknown option)")


def _check_range(key: str, value: int, minimum: int | None, maximum: int | None) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        raise ConfigError(key, "an integer " + " and ".join(bounds))


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` for IPv6). Raises ValueError when malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(text)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def address(table: Table, name: str) -> tuple[str, int] | None:
    """An optional ``host:port`` entry."""
    if not table.has(name):
        table.optional_string(name)
        return None
    return table.parsed(name, parse_host_port, "host:port (e.g. 127.0.0.1:7000)")


def resolve_path(text: str, base: Path) -> Path:
    """``~`` expanded; a relative path is relative to ``base`` (the config file's directory)."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def existing_file(key: str, path: Path, *, secret: bool = False) -> Path:
    """``path`` if it exists; with ``secret``, also refuse a file readable by group or others."""
    if not path.exists():
        raise ConfigError(key, f"an existing file ({path} does not exist)")
    if secret:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise ConfigError(
                key,
                f"a private file: {path} has mode {mode:o}, readable by group or others"
                f" (chmod 600 {path})",
            )
    return path
