"""End to end with the replay backend: `qkdnode link record` records the simulated link of the
demo's config, then two `qkdnode run` daemons replay it and commit identical keys; a corrupt
block file ends a session, not a daemon, and the end of a recording stops blocks cleanly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qkdnode.config.link import REPLAY_STORE_MARKER
from qkdnode.demo.progress import LogFollower, Progress
from qkdnode.demo.run import DemoLayout, compare_stores, prepare_workdir, start_node, stop_nodes
from qkdnode.link.recording import block_file

pytestmark = pytest.mark.slow  # records a link and starts daemon processes

REPO = Path(__file__).resolve().parent.parent
BLOCK_PULSES = 40_000_000  # the demo's blocks: key at 25 km from the decoy bound


def _recorded_pair(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    blocks: int,
    loop: bool,
    decoys: int = 2,
    block_pulses: int = BLOCK_PULSES,
) -> DemoLayout:
    """A demo work directory whose two configs replay a fresh recording of ``blocks`` blocks."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the daemons run this tree's code
    workdir = tmp_path / "replay"
    workdir.mkdir(mode=0o700)
    layout = prepare_workdir(workdir, distance_km=25.0, block_pulses=block_pulses, decoys=decoys)
    record = ["link", "record", "--config", "alice.toml", "--blocks", str(blocks), "--out", "rec"]
    recorded = subprocess.run(
        [sys.executable, "-m", "qkdnode", *record, "--seed", "17"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert recorded.returncode == 0, recorded.stderr
    assert f"recorded {blocks} blocks of {block_pulses} pulses" in recorded.stdout
    link = f'[link]\nbackend = "replay"\ndirectory = "rec"\nloop = {str(loop).lower()}\n\n'
    for node in ("alice", "bob"):
        config = layout.config(node)
        text = re.sub(r"\[link\]\n.*?\n(?=\[postprocess\])", link, config.read_text(), flags=re.S)
        config.write_text(re.sub(r"\[delivery\]\n.*?\n(?=\[metrics\])", "", text, flags=re.S))
    return layout


def _run_until(layout: DemoLayout, done: Any, timeout_s: float = 180) -> list[int | None]:
    """Run both daemons until ``done(progress, alice_events)``; their exit codes after SIGTERM."""
    nodes = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
    try:
        progress, follower = Progress(), LogFollower(layout.log("alice"))
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while not done(progress, events):
            for event in follower.new_events():
                progress.feed(event)
                events.append(event)
            for name, process in nodes.items():
                if process.poll() is not None:
                    stderr = (layout.workdir / f"{name}.stderr").read_text()[-2000:]
                    pytest.fail(f"{name} exited: {stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out: {progress}")
            time.sleep(0.1)
        return stop_nodes([nodes["alice"], nodes["bob"]])
    finally:
        stop_nodes(list(nodes.values()))


def _events(layout: DemoLayout, node: str, name: str) -> list[dict[str, Any]]:
    lines = layout.log(node).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == name]


def test_two_daemons_replaying_a_recording_commit_identical_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = _recorded_pair(tmp_path, monkeypatch, blocks=2, loop=True)
    # the third block is the first block again (loop)
    codes = _run_until(layout, lambda progress, _events: progress.committed >= 3)
    assert codes == [0, 0]
    match, compared = compare_stores(layout, exact=True)
    assert match and compared > 0
    for node in ("alice", "bob"):
        assert (layout.store(node) / REPLAY_STORE_MARKER).exists()
        warnings = _events(layout, node, "link.replay_keys_not_secret")
        assert len(warnings) == 1 and warnings[0]["loop"] is True


def test_a_corrupt_block_ends_a_session_and_the_recordings_end_stops_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = _recorded_pair(tmp_path, monkeypatch, blocks=3, loop=False)
    damaged = layout.workdir / "rec" / block_file("bob", 1)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(bytes(data))

    def ended(progress: Progress, events: list[dict[str, Any]]) -> bool:
        return progress.committed >= 2 and any(
            e.get("event") == "link.replay_ended" for e in events
        )

    codes = _run_until(layout, ended)
    assert codes == [0, 0]  # both daemons lived through the bad block and stop when asked
    failures = _events(layout, "bob", "link.failed")
    assert failures and "bob/block-000001.npz" in failures[0]["error"]
    assert "SHA-256" in failures[0]["error"]
    # blocks 0 and 2 were distilled, block 1 was lost with its session
    committed = _events(layout, "alice", "block.committed")
    assert len(committed) == 2
    match, compared = compare_stores(layout, exact=True)
    assert match and compared > 0


def test_a_recording_of_two_intensities_is_refused_under_the_two_decoy_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the recording's parameters are known once its link opens: the check is made then
    layout = _recorded_pair(
        tmp_path, monkeypatch, blocks=1, loop=False, decoys=1, block_pulses=1 << 20
    )
    config = layout.config("alice")
    text = config.read_text()
    assert 'security_model = "one_decoy"' in text
    config.write_text(text.replace('security_model = "one_decoy"', 'security_model = "decoy"'))
    result = subprocess.run(
        [sys.executable, "-m", "qkdnode", "run", "--config", str(config)],
        cwd=layout.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    assert result.returncode == 2, result.stderr
    assert "configuration error: link.p_vacuum (as the replay link reports it)" in result.stderr
    assert 'needs security_model = "one_decoy"' in result.stderr
