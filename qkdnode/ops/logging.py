"""structlog set-up: JSON lines for journald and files, colour for a terminal, secrets redacted.

- Under systemd (``JOURNAL_STREAM`` set) every line is JSON prefixed with its syslog priority
  (``<6>{...}``), which journald turns into the entry's priority.
- In a terminal: structlog's readable, coloured console output.
- Otherwise (pipes, files, the demo): plain JSON lines.

Every event carries ``node`` and ``peer`` (bound at start-up) and, inside a block, ``block``.
A redaction processor replaces the value of any field whose name suggests secret material, and
every ``bytes`` value, so a careless log call cannot print a key. ``reopen()`` reopens the log
file (SIGHUP after logrotate).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import structlog

_SECRET_WORDS: Final = (
    "key",
    "psk",
    "secret",
    "material",
    "pool",
    "password",
    "private",
    "pad",
    "seed",
    "tag",
)
# Field names that contain a secret word but only ever carry public values.
_PUBLIC_FIELDS: Final = frozenset(
    {
        "key_id",
        "key_ids",
        "key_bits",
        "final_key_bits",
        "key_size_bits",
        "secret_bits",
        "secret_bits_total",
        "pool_level_bits",
        "pool_target_bits",
        "pool_bits_spent",
        "sifted_key_bits",
        "keys",
        "keys_available",
    }
)
_PRIORITY: Final = {
    "critical": 2,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
    "notset": 7,
}
LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def redact_secrets(
    _logger: object, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace bytes values, and non-numeric values of secret-named fields, by a placeholder."""
    for name, value in list(event.items()):
        lowered = name.lower()
        if isinstance(value, bytes | bytearray | memoryview):
            event[name] = f"<{len(value)} bytes redacted>"
        elif (
            not _numeric(value)  # counts and sizes are public
            and lowered not in _PUBLIC_FIELDS
            and any(word in lowered for word in _SECRET_WORDS)
        ):
            event[name] = "<redacted>"
    return event


def _numeric(value: object) -> bool:
    if isinstance(value, list | tuple):
        return all(isinstance(item, bool | int | float) for item in value)
    return isinstance(value, bool | int | float)


class _Output:
    """The log destination; a file can be reopened (SIGHUP) without restarting the daemon."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.stream: TextIO = sys.stderr
        self.reopen()

    def reopen(self) -> None:
        if self.path is None:
            self.stream = sys.stderr
            return
        old = self.stream if self.stream is not sys.stderr else None
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self.stream = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        if old is not None:
            old.close()

    def close(self) -> None:
        if self.path is not None:  # only a file we opened is ours to close
            self.stream.close()
            self.stream = sys.stderr

    def write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class _Logger:
    """A structlog logger that writes one rendered line to the current output."""

    def __init__(self, output: _Output) -> None:
        self._output = output

    def msg(self, message: str) -> None:
        self._output.write(message)

    debug = info = warning = warn = error = critical = exception = log = msg


_OUTPUT: _Output | None = None


def _journald_renderer(_logger: object, method: str, event: MutableMapping[str, Any]) -> str:
    priority = _PRIORITY.get(str(event.get("level", method)), 6)
    return f"<{priority}>" + json.dumps(event, default=str, separators=(",", ":"))


def configure_logging(
    *,
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    file: Path | None = None,
    node: str | None = None,
    peer: str | None = None,
) -> None:
    """Set up structlog for this process (idempotent: a second call replaces the first)."""
    global _OUTPUT
    if _OUTPUT is not None:
        _OUTPUT.close()
    _OUTPUT = _Output(file)
    if fmt == "auto":
        if os.environ.get("JOURNAL_STREAM") and file is None:
            fmt = "json"
            renderer: Any = _journald_renderer
        elif file is None and sys.stderr.isatty():
            renderer = structlog.dev.ConsoleRenderer(colors=True)
        else:
            renderer = structlog.processors.JSONRenderer(default=str)
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=file is None and sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(default=str)
    output = _OUTPUT
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=lambda *_args: _Logger(output),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    bound: dict[str, str] = {}
    if node is not None:
        bound["node"] = node
    if peer is not None:
        bound["peer"] = peer
    structlog.contextvars.bind_contextvars(**bound)


def reopen_log_output() -> None:
    """Reopen the log file (after logrotate moved it); no-op when logging to stderr."""
    if _OUTPUT is not None:
        _OUTPUT.reopen()
