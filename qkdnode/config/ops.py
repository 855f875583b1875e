"""The ``[logging]`` and ``[metrics]`` sections: where the node reports what it does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qkdnode.config.table import Table, address, resolve_path

LogFormat = Literal["auto", "json", "console"]
_LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSection:
    level: str
    format: LogFormat
    file: Path | None


def read_logging(table: Table, base: Path) -> LoggingSection:
    log_file = table.optional_string("file")
    level = table.string("level", "info", choices=("debug", "info", "warning", "error"))
    fmt = table.string("format", "auto", choices=_LOG_FORMATS)
    section = LoggingSection(
        level=level,
        format=next(f for f in _LOG_FORMATS if f == fmt),
        file=None if log_file is None else resolve_path(log_file, base),
    )
    table.finish()
    return section


def read_metrics_listen(table: Table) -> tuple[str, int] | None:
    """The ``host:port`` of the Prometheus endpoint, or None for none."""
    listen = address(table, "listen")
    table.finish()
    return listen
