"""Scenario 9 (short): kill -9 of either daemon at random points, 5 kill points, with keys
delivered through the ETSI 014 API between kills. After every restart: both stores agree,
no committed key lost or changed, no key delivered twice, no delivered key ID offered again.
``scripts/soak --kills N`` runs the long version (>= 200 kill points) with the same checks.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.reliability.harness import DeliveryAudit, Pair, stores_agree

pytestmark = pytest.mark.slow  # starts daemon processes

KILLS = 5


def test_kill_9_at_random_points_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    rng = random.Random(9)
    pair = Pair.create(tmp_path / "pair")
    audit = DeliveryAudit()
    changed = 0
    pair.start_both()
    try:
        pair.wait(lambda p: p.committed("alice") >= 1, timeout_s=150, what="first commit")
        for _ in range(KILLS):
            audit.deliver(pair)
            before = pair.store("alice").deliverable()
            time.sleep(rng.uniform(0.0, 2.0))
            node = rng.choice(["alice", "bob"])
            pair.kill9(node)
            pair.start(node)
            after = pair.store("alice").deliverable()
            changed += sum(1 for k, m in before.items() if after.get(k) not in (None, m))
        pair.wait(lambda p: p.master_keys("alice") >= 2, timeout_s=150, what="keys to deliver")
        delivered = audit.deliver(pair)
    finally:
        codes = pair.stop()
    alice, bob = pair.store("alice"), pair.store("bob")
    assert stores_agree(alice, bob) == []
    assert changed == 0
    assert audit.duplicates == 0 and audit.mismatches == 0
    assert audit.reused(alice, bob) == 0
    assert delivered > 0 and len(audit.issued) >= 2, audit.refusals
    assert codes == {"alice": 0, "bob": 0}  # a SIGTERM just after a restart too
