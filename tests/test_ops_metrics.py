"""NodeMetrics: counters move with the daemon's calls; the HTTP listener serves them; no secrets."""

from __future__ import annotations

import http.client
import json
import math
import urllib.request

import numpy as np
import pytest
import trio

from qkdnode.channel.messages import SessionMode
from qkdnode.link.interface import LinkState, LinkStatus
from qkdnode.ops.metrics import NodeMetrics, respond, serve_metrics
from qkdnode.postprocess.events import AbortReason
from qkdnode.store.keystore import StoreCounts
from tests.helpers_metrics import FakeClock, commit, make_metrics, samples, value


def link_status(state: LinkState, alarms: tuple[str, ...]) -> LinkStatus:
    return LinkStatus(
        role="bob",
        state=state,
        blocks=1,
        pulses_sent=0,
        pulses_received=10,
        detections=1,
        simulated_time_s=0.1,
        alarms=alarms,
        last_error=None,
    )


def test_block_counters_move_with_commits_and_aborts() -> None:
    metrics = make_metrics()
    assert value(metrics, "qkdnode_blocks_total", outcome="committed") == 0
    assert math.isnan(value(metrics, "qkdnode_qber_ratio"))
    commit(metrics)
    commit(metrics, qber=0.03, sifted_bits=100_000, secret_bits=20_000, leak_bits=9_000)
    metrics.block_aborted(AbortReason.QBER_ABOVE_THRESHOLD)
    metrics.block_aborted("verification_failed")
    metrics.block_aborted("verification_failed")
    assert value(metrics, "qkdnode_blocks_total", outcome="committed") == 2
    assert value(metrics, "qkdnode_blocks_total", outcome="aborted") == 3
    assert value(metrics, "qkdnode_blocks_aborted_total", reason="verification_failed") == 2
    assert value(metrics, "qkdnode_blocks_aborted_total", reason="qber_above_threshold") == 1
    assert value(metrics, "qkdnode_blocks_aborted_total", reason="empty_block") == 0
    assert value(metrics, "qkdnode_sifted_bits_total") == 300_000
    assert value(metrics, "qkdnode_secret_bits_total") == 70_000
    assert value(metrics, "qkdnode_leaked_bits_total") == 21_000
    assert value(metrics, "qkdnode_qber_ratio") == pytest.approx(0.03)
    assert value(metrics, "qkdnode_reconciliation_efficiency_ratio") == pytest.approx(1.08)
    assert value(metrics, "qkdnode_auth_pool_level_bits") == 32768
    assert value(metrics, "qkdnode_last_commit_timestamp_seconds") == pytest.approx(1.7e9 + 1000)
    summary = metrics.summary()
    assert summary["blocks_committed"] == 2 and summary["blocks_aborted"] == 3
    assert summary["abort_reasons"] == {"qber_above_threshold": 1, "verification_failed": 2}


def test_auth_mode_is_one_hot() -> None:
    metrics = make_metrics()
    assert value(metrics, "qkdnode_auth_mode", mode="none") == 1
    metrics.set_mode(SessionMode.CERTIFICATE)
    metrics.set_mode("key_derived")
    modes = {
        m: value(metrics, "qkdnode_auth_mode", mode=m)
        for m in ("none", "certificate", "psk", "key_derived")
    }
    assert modes == {"none": 0, "certificate": 0, "psk": 0, "key_derived": 1}
    with pytest.raises(ValueError, match="mode must be one of"):
        metrics.set_mode("plaintext")


def test_key_rate_is_bits_in_window_over_window() -> None:
    clock = FakeClock()
    metrics = make_metrics(clock)
    clock.now += 10
    commit(metrics, secret_bits=1000)
    # window (100 s) longer than the uptime (10 s): divide by the uptime
    assert value(metrics, "qkdnode_secret_key_rate_bits_per_second") == pytest.approx(100.0)
    clock.now += 90
    commit(metrics, secret_bits=3000)
    assert value(metrics, "qkdnode_secret_key_rate_bits_per_second") == pytest.approx(40.0)
    clock.now += 50  # the first commit (at 10 s) has left the window [50, 150]
    assert value(metrics, "qkdnode_secret_key_rate_bits_per_second") == pytest.approx(30.0)
    clock.now += 200
    assert value(metrics, "qkdnode_secret_key_rate_bits_per_second") == 0.0


def test_pool_store_peer_and_delivery_gauges() -> None:
    metrics = make_metrics()
    metrics.set_auth_pool(level_bits=8192, consumed_bits=5000)
    metrics.set_auth_pool(level_bits=7168, consumed_bits=6024)
    assert value(metrics, "qkdnode_auth_pool_level_bits") == 7168
    assert value(metrics, "qkdnode_auth_pool_spent_bits_total") == 6024
    assert value(metrics, "qkdnode_auth_pool_reserve_bits") == 4096
    metrics.set_store_counts(StoreCounts(staged=1, available=40, reserved=3, delivered=7))
    assert value(metrics, "qkdnode_store_keys", state="available") == 40
    assert value(metrics, "qkdnode_store_keys", state="delivered") == 7
    metrics.set_peer_connected(True)
    assert value(metrics, "qkdnode_peer_connected") == 1
    metrics.set_peer_connected(False)
    assert value(metrics, "qkdnode_peer_connected") == 0
    metrics.delivery_request("sae-a", 200)
    metrics.delivery_request("sae-a", 200)
    metrics.delivery_request("intruder", 401)
    assert value(metrics, "qkdnode_delivery_requests_total", sae="sae-a", status="200") == 2
    assert value(metrics, "qkdnode_delivery_requests_total", sae="unknown", status="401") == 1
    with pytest.raises(ValueError, match="HTTP status"):
        metrics.delivery_request("sae-a", 42)


def test_link_alarms_are_counted_once_and_link_up_follows_state() -> None:
    metrics = make_metrics()
    metrics.set_link_status(link_status(LinkState.OPEN, ()))
    assert value(metrics, "qkdnode_link_up") == 1
    metrics.set_link_status(link_status(LinkState.OPEN, ("timeout",)))
    metrics.set_link_status(link_status(LinkState.OPEN, ("timeout",)))  # same list: nothing new
    metrics.set_link_status(link_status(LinkState.FAILED, ("timeout", "lost")))
    assert value(metrics, "qkdnode_link_up") == 0
    metrics.set_link_status(link_status(LinkState.OPEN, ("timeout",)))  # reopened: a new list
    assert value(metrics, "qkdnode_link_alarms_total", alarm="timeout") == 2
    assert value(metrics, "qkdnode_link_alarms_total", alarm="lost") == 1
    metrics.set_link_status(link_status(LinkState.OPEN, ("timeout", "no good\nname")))
    assert value(metrics, "qkdnode_link_alarms_total", alarm="other") == 1


def test_refreshers_run_before_each_scrape_and_a_failing_one_is_skipped() -> None:
    metrics = make_metrics()
    counts = [StoreCounts(staged=0, available=5, reserved=0, delivered=0)]

    def broken(_m: NodeMetrics) -> None:
        raise RuntimeError("store gone")

    metrics.add_refresher(broken)
    metrics.add_refresher(lambda m: m.set_store_counts(counts[0]))
    assert value(metrics, "qkdnode_store_keys", state="available") == 5
    counts[0] = StoreCounts(staged=0, available=9, reserved=1, delivered=0)
    assert value(metrics, "qkdnode_store_keys", state="available") == 9
    assert metrics.summary()["keys"] == {"staged": 0, "available": 9, "reserved": 1, "delivered": 0}


def test_bad_input_raises_clear_errors() -> None:
    metrics = make_metrics()
    with pytest.raises(TypeError, match="secret_bits must be an int"):
        commit(metrics, secret_bits=b"\x01\x02")
    with pytest.raises(ValueError, match="sifted_bits must not be negative"):
        commit(metrics, sifted_bits=-1)
    with pytest.raises(ValueError, match="reason must be one of"):
        metrics.block_aborted("made_up")
    assert value(metrics, "qkdnode_blocks_total", outcome="committed") == 0


def test_health_summary_flags_peer_pool_and_stale_blocks() -> None:
    clock = FakeClock()
    metrics = make_metrics(clock)
    metrics.set_peer_connected(True)
    assert metrics.summary()["healthy"] is True
    commit(metrics, pool_level_bits=1024)  # below the 4096-bit reserve
    summary = metrics.summary()
    assert summary["healthy"] is False
    assert summary["problems"] == ["authentication pool below reserve (1024 < 4096 bits)"]
    commit(metrics, pool_level_bits=32768)
    clock.now += 601
    metrics.set_peer_connected(False)
    problems = metrics.summary()["problems"]
    assert problems[0] == "peer not connected"
    assert problems[1].startswith("no block committed for 601 s")


def test_no_secret_reaches_the_exposition_or_the_summary() -> None:
    secret = np.random.default_rng(20240917).bytes(32)
    hex_secret = secret.hex()
    assert any(c.isdigit() for c in hex_secret[:16]) and any(c.isalpha() for c in hex_secret[:16])
    metrics = make_metrics()
    # key-like values pushed through every entry point that takes text or numbers
    metrics.delivery_request(hex_secret, 200)
    metrics.delivery_request(hex_secret[:16], 200)
    metrics.set_link_status(link_status(LinkState.OPEN, (hex_secret, hex_secret[:20])))
    for bad in (secret, hex_secret):
        with pytest.raises((TypeError, ValueError)) as info:
            metrics.block_aborted(bad)  # type: ignore[arg-type]
        assert hex_secret not in str(info.value) and repr(secret) not in str(info.value)
        with pytest.raises((TypeError, ValueError)) as info:
            metrics.set_mode(bad)  # type: ignore[arg-type]
        assert hex_secret not in str(info.value)
        with pytest.raises(TypeError):
            commit(metrics, secret_bits=bad)
    exposition = metrics.exposition().decode()
    summary = json.dumps(metrics.summary())
    for text in (exposition, summary, repr(metrics)):
        assert hex_secret not in text
        assert hex_secret[:16] not in text
        assert secret.hex()[:20] not in text
    assert 'alarm="other"' in exposition  # both hex "alarms" were counted, under "other"
    assert metrics.summary()["link_alarms"] == ["other", "other"]


def _get(port: int, method: str, path: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()


async def test_http_listener_serves_metrics_and_status_on_a_real_socket() -> None:
    metrics = make_metrics()
    metrics.set_peer_connected(True)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        assert host == "127.0.0.1" and port > 0
        status, content_type, body = await trio.to_thread.run_sync(_get, port, "GET", "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert b'qkdnode_blocks_total{outcome="committed"} 0.0' in body
        commit(metrics)
        commit(metrics)
        _, _, body = await trio.to_thread.run_sync(_get, port, "GET", "/metrics")
        assert b'qkdnode_blocks_total{outcome="committed"} 2.0' in body
        assert b"qkdnode_secret_bits_total 100000.0" in body
        status, content_type, body = await trio.to_thread.run_sync(_get, port, "GET", "/status")
        assert (status, content_type) == (200, "application/json")
        summary = json.loads(body)
        assert summary["blocks_committed"] == 2 and summary["healthy"] is True
        metrics.set_peer_connected(False)
        status, _, body = await trio.to_thread.run_sync(_get, port, "GET", "/status")
        assert status == 503 and json.loads(body)["problems"] == ["peer not connected"]
        assert (await trio.to_thread.run_sync(_get, port, "GET", "/nope"))[0] == 404
        assert (await trio.to_thread.run_sync(_get, port, "POST", "/metrics"))[0] == 405
        # garbage instead of HTTP: the connection is closed, the listener carries on
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"\x00\x01 not http\r\n\r\n")
        assert await stream.receive_some(100) == b""
        await stream.aclose()
        assert (await trio.to_thread.run_sync(_get, port, "GET", "/metrics"))[0] == 200
        nursery.cancel_scope.cancel()


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    metrics = make_metrics()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)

        def two_requests() -> list[int]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                codes = []
                for path in ("/metrics", "/status"):
                    connection.request("GET", path)
                    response = connection.getresponse()
                    response.read()
                    codes.append(response.status)
                return codes
            finally:
                connection.close()

        assert await trio.to_thread.run_sync(two_requests) == [200, 503]
        nursery.cancel_scope.cancel()


async def test_a_client_that_asks_to_close_still_gets_its_answer() -> None:
    # urllib and Prometheus-style scrapers send "Connection: close" (regression: no response)
    metrics = make_metrics()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)

        def fetch() -> bytes:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                body: bytes = response.read()
                return body

        assert b"qkdnode_blocks_total" in await trio.to_thread.run_sync(fetch)
        nursery.cancel_scope.cancel()


def test_routing_without_io() -> None:
    metrics = make_metrics()
    assert respond(metrics, "GET", "/metrics?x=1")[0] == 200
    assert respond(metrics, "HEAD", "/status")[0] == 503  # peer not connected
    assert respond(metrics, "DELETE", "/status")[0] == 405


def test_alert_rules_use_only_metrics_the_node_exports() -> None:
    import re
    from pathlib import Path

    rules = (Path(__file__).resolve().parent.parent / "docs" / "alerts.yml").read_text()
    used = set(re.findall(r"\bqkdnode_[a-z_]+", rules))
    metrics = make_metrics()
    metrics.set_link_status(link_status(LinkState.OPEN, ("timeout",)))  # alarms appear when raised
    exported = {name for name, _ in samples(metrics)}
    assert used and used <= exported, sorted(used - exported)


def test_event_loop_lag_is_the_largest_probe_delay_of_the_last_minute() -> None:
    clock = FakeClock()
    metrics = make_metrics(clock)
    assert value(metrics, "qkdnode_event_loop_lag_seconds") == 0.0
    metrics.event_loop_lag(0.004)
    clock.now += 10
    metrics.event_loop_lag(0.250)  # the loop was blocked for a quarter second
    clock.now += 10
    metrics.event_loop_lag(-0.001)  # a timer cannot fire early: counted as 0
    assert value(metrics, "qkdnode_event_loop_lag_seconds") == pytest.approx(0.250)
    assert metrics.summary()["event_loop_lag_max_s"] == pytest.approx(0.250)
    clock.now += 55  # the blocked probe is over a minute old now
    assert value(metrics, "qkdnode_event_loop_lag_seconds") == 0.0
