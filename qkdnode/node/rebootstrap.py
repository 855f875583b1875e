"""The operator's re-bootstrap permit: the only way back to bootstrap authentication.

``qkdnode auth rebootstrap --config FILE`` writes a permit into the node's store directory
(durably: written, fsynced, renamed, directory fsynced), valid for one bootstrap session within
``valid_s`` seconds. While a valid permit exists the node's next connection is
bootstrap-authenticated (Alice sends, Bob accepts, a bootstrap Hello) and both nodes reset
their authentication-key ledgers in that session; the daemon then deletes the permit. Both
nodes need one: a node without a permit refuses bootstrap Hellos and ledger resets once its
bootstrap window has closed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Final

import structlog

log = structlog.get_logger("qkdnode.node")

PERMIT_FILE: Final = "rebootstrap-permit.json"
DEFAULT_VALID_S: Final = 3600.0


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def grant(store_directory: Path, *, now_s: float, valid_s: float = DEFAULT_VALID_S) -> Path:
    """Write a permit for one re-bootstrap before ``now_s + valid_s``; returns its path."""
    if not valid_s > 0:
        raise ValueError("valid_s must be positive")
    store_directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = store_directory / PERMIT_FILE
    temporary = path.with_suffix(".tmp")
    body = json.dumps({"granted_at_s": now_s, "expires_at_s": now_s + valid_s}).encode()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_directory(store_directory)
    log.warning("auth.rebootstrap_granted", expires_at_s=now_s + valid_s, permit=str(path))
    return path


def in_force(store_directory: Path, *, now_s: float) -> bool:
    """Whether a valid, unexpired permit exists (a malformed one counts as none)."""
    path = store_directory / PERMIT_FILE
    try:
        values = json.loads(path.read_bytes())
        expires_at_s = float(values["expires_at_s"])
        granted_at_s = float(values["granted_at_s"])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        log.error("auth.rebootstrap_permit_unreadable", permit=str(path))
        return False
    return granted_at_s <= now_s < expires_at_s


def use_up(store_directory: Path) -> None:
    """The re-bootstrap happened: delete the permit, durably."""
    path = store_directory / PERMIT_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_directory(store_directory)
    log.warning("auth.rebootstrap_used", permit=str(path))
