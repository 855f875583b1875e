"""End to end with the replay backend: `qkdnode link record` records the simulated link of the
demo's config, then two `qkdnode run` daemons replay it (looped) and commit identical keys."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkdnode.config.link import REPLAY_STORE_MARKER
from qkdnode.demo.progress import LogFollower, Progress
from qkdnode.demo.run import compare_stores, prepare_workdir, start_node, stop_nodes

pytestmark = pytest.mark.slow  # records a link and starts daemon processes

REPO = Path(__file__).resolve().parent.parent
BLOCK_PULSES = 40_000_000  # the demo's blocks: key at 25 km from the decoy bound


def _use_replay_backend(config: Path) -> None:
    text = config.read_text()
    link = '[link]\nbackend = "replay"\ndirectory = "rec"\nloop = true\n\n'
    text = re.sub(r"\[link\]\n.*?\n(?=\[postprocess\])", link, text, flags=re.S)
    text = re.sub(r"\[delivery\]\n.*?\n(?=\[metrics\])", "", text, flags=re.S)
    config.write_text(text)


def test_two_daemons_replaying_a_recording_commit_identical_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the daemons run this tree's code
    workdir = tmp_path / "replay"
    workdir.mkdir(mode=0o700)
    layout = prepare_workdir(workdir, distance_km=25.0, block_pulses=BLOCK_PULSES)
    record = ["link", "record", "--config", "alice.toml", "--blocks", "2", "--out", "rec"]
    recorded = subprocess.run(
        [sys.executable, "-m", "qkdnode", *record, "--seed", "17"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert recorded.returncode == 0, recorded.stderr
    assert "recorded 2 blocks of 40000000 pulses" in recorded.stdout
    for node in ("alice", "bob"):
        _use_replay_backend(layout.config(node))
    nodes = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
    try:
        progress, follower = Progress(), LogFollower(layout.log("alice"))
        deadline = time.monotonic() + 180
        while progress.committed < 3:  # the third block is the first block again (loop)
            for event in follower.new_events():
                progress.feed(event)
            for name, process in nodes.items():
                if process.poll() is not None:
                    pytest.fail(
                        f"{name} exited: {(workdir / f'{name}.stderr').read_text()[-2000:]}"
                    )
            if time.monotonic() > deadline:
                pytest.fail(f"timed out: {progress}")
            time.sleep(0.1)
        codes = stop_nodes([nodes["alice"], nodes["bob"]])
    finally:
        stop_nodes(list(nodes.values()))
    assert codes == [0, 0]
    match, compared = compare_stores(layout, exact=True)
    assert match and compared > 0
    for node in ("alice", "bob"):
        assert (layout.store(node) / REPLAY_STORE_MARKER).exists()
        events = [json.loads(line) for line in layout.log(node).read_text().splitlines()]
        warnings = [e for e in events if e.get("event") == "link.replay_keys_not_secret"]
        assert len(warnings) == 1 and warnings[0]["loop"] is True
