"""Scenario 10: an injected write/fsync failure. Bob runs under the fault-injecting launcher
(``python -m tests.reliability.harness run-faulty``: SQLite ``COMMIT`` fails with ``disk I/O
error`` after N commits). The daemon must stop (non-zero exit) within seconds of the error and
do nothing after it: no block staged or committed, no further session. Restarted normally, the
pair carries on and both stores agree.

Two failure points: N = 6 (the store's open, the audit trail's start, its entries for the
start and the session, the first block's stage and the peer's audit head succeed; the failure
comes in the distillation loop, at the first block's commit) and N = 12 (the failure hits the
write-ahead persistence of the authentication-key ledger after the rotation to key-derived
mode, inside the channel session's own tasks). The commits of a fresh Bob, in order: open,
audit start, daemon_started, session_established, stage 1, peer head, commit 1 (with its audit
entry), a ledger save, rotated, six ledger saves, stage 2, ...
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.harness import Pair, faulty_launcher, stores_agree

pytestmark = pytest.mark.slow  # starts daemon processes

STOP_WITHIN_S = 10.0


def _failed(pair: Pair) -> bool:
    return any("disk I/O error" in str(event) for event in pair.events["bob"]) or (
        "disk I/O error" in pair.stderr("bob")
    )


@pytest.mark.parametrize("fail_after", [6, 12])
def test_a_failed_commit_stops_the_daemon_and_nothing_continues(
    tmp_path: Path, fail_after: int
) -> None:
    pair = Pair.create(tmp_path / "pair")
    pair.launcher["bob"] = faulty_launcher(fail_after)
    pair.start_both()
    try:
        pair.wait(_failed, timeout_s=150, what="the injected failure", allow_exit=True)
        failed_s = time.monotonic()
        pair.wait(
            lambda p: p.processes["bob"].poll() is not None,
            timeout_s=STOP_WITHIN_S,
            what="Bob to stop after the injected failure",
            allow_exit=True,
        )
        assert time.monotonic() - failed_s < STOP_WITHIN_S
        assert pair.processes["bob"].returncode not in (0, None)
        pair.poll()
        events = pair.events["bob"]
        failed_at = next(i for i, e in enumerate(events) if "disk I/O error" in str(e))
        after = [str(e.get("event")) for e in events[failed_at + 1 :]]
        continued = {"block.committed", "block.staged", "block.limbo_committed", "auth.mode"}
        assert not continued & set(after), after
        # restarted without the fault: both carry on and agree
        pair.launcher.pop("bob")
        pair.start("bob")
        target = pair.committed("bob") + 1
        pair.wait(
            lambda p: p.committed("bob") >= target, timeout_s=150, what="a block after restart"
        )
    finally:
        pair.stop()
    assert stores_agree(pair.store("alice"), pair.store("bob")) == []
