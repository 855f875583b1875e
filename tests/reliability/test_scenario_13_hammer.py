"""Scenario 13: one consumer hammering ``enc_keys``. Its quota holds (token bucket of
``QUOTA_BURST_KEYS`` keys refilled at ``QUOTA_KEYS_PER_S``, set at Alice by the shared fixture),
and another SAE of the same node is still served meanwhile; its p99 latency is reported.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.reliability.harness import api
from tests.reliability.helpers_proxied import QUOTA_BURST_KEYS, QUOTA_KEYS_PER_S, Proxied

pytestmark = pytest.mark.slow  # starts daemon processes

HAMMER_S = 4.0


def test_a_hammering_sae_is_held_to_its_quota_and_others_are_served(proxied: Proxied) -> None:
    layout = proxied.pair.layout
    granted: list[int] = []
    codes: dict[int, int] = {}
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            status, body = api(layout, "alice", "sae-a", "sae-b/enc_keys", {"number": 1})
            codes[status] = codes.get(status, 0) + 1
            if status == 200:
                granted.append(len(body["keys"]))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    latencies_s = []
    other_codes: dict[int, int] = {}
    try:
        while time.monotonic() - started < HAMMER_S:
            t0 = time.monotonic()
            status, _ = api(layout, "alice", "sae-a2", "sae-b/status")
            latencies_s.append(time.monotonic() - t0)
            other_codes[status] = other_codes.get(status, 0) + 1
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    elapsed_s = time.monotonic() - started
    assert codes.get(429, 0) > 0, codes  # the hammer hit its quota
    assert sum(granted) <= QUOTA_BURST_KEYS + QUOTA_KEYS_PER_S * elapsed_s + 1, (granted, codes)
    assert other_codes == {200: len(latencies_s)}, other_codes
    p99_ms = 1000 * float(np.percentile(latencies_s, 99))
    print(
        f"scenario 13: hammer {sum(codes.values())} requests ({codes}), {sum(granted)} keys "
        f"granted in {elapsed_s:.1f} s; other SAE {len(latencies_s)} requests, p99 {p99_ms:.0f} ms"
    )
    assert p99_ms < 2000
    # the other SAE also gets keys of its own
    status, body = api(layout, "alice", "sae-a2", "sae-b/enc_keys", {"number": 1})
    assert status in (200, 503), (status, body)
