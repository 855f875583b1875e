"""Log output: JSON lines with node/peer context, journald priorities, secrets redacted."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from qkdnode.ops.logging import configure_logging, reopen_log_output


@pytest.fixture(autouse=True)
def _back_to_stderr() -> Iterator[None]:
    yield
    configure_logging(fmt="json")  # closes the test's log file


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_json_file_lines_carry_context_and_redact_secrets(tmp_path: Path) -> None:
    log_file = tmp_path / "node.log"
    configure_logging(level="debug", fmt="json", file=log_file, node="alice", peer="bob")
    key = bytes(range(32))
    log = structlog.get_logger("test")
    log.info(
        "block.committed",
        block=7,
        secret_bits=256,
        key_counts=[1, 2, 3],
        key_material=key.hex(),
        psk=key,
        seed_hex="00ff",
    )
    log.debug("debug.detail", auth_key=key.hex())
    events = _lines(log_file)
    assert [e["event"] for e in events] == ["block.committed", "debug.detail"]
    first = events[0]
    assert first["node"] == "alice" and first["peer"] == "bob" and first["block"] == 7
    assert first["secret_bits"] == 256 and first["key_counts"] == [1, 2, 3]
    text = log_file.read_text()
    assert key.hex() not in text and "00ff" not in text
    assert first["psk"] == "<32 bytes redacted>" and first["key_material"] == "<redacted>"


def test_sighup_reopen_moves_to_a_new_file(tmp_path: Path) -> None:
    log_file = tmp_path / "node.log"
    configure_logging(fmt="json", file=log_file, node="bob")
    log = structlog.get_logger("test")
    log.info("before")
    os.rename(log_file, tmp_path / "node.log.1")  # logrotate
    reopen_log_output()
    log.info("after")
    assert [e["event"] for e in _lines(tmp_path / "node.log.1")] == ["before"]
    assert [e["event"] for e in _lines(log_file)] == ["after"]


def test_journald_lines_start_with_the_syslog_priority(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    configure_logging(fmt="auto", node="alice")
    log = structlog.get_logger("test")
    log.warning("pool.low", pool_level_bits=10)
    log.error("store.failed")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("<4>{") and lines[1].startswith("<3>{")
    assert json.loads(lines[0][3:])["event"] == "pool.low"
