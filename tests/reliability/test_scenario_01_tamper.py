"""Scenario 1: a man-in-the-middle flips one byte of frames of every type, in every mode.

Two parts. In memory (``PeerConnection`` pairs, certificate, PSK and key-derived modes): for every
frame type of a full session, one byte is flipped at >= 10 offsets spread over the frame; each
tampered frame must raise a named error and leave sequence numbers, open blocks and the ledger
unchanged. On the wire (two daemons behind the MITM proxy): one flipped byte per session in
handshake, block and control frames of both directions, first in certificate mode, then
key-derived; a clean block before and after; both stores agree and no block whose frames were
tampered is committed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.harness import NAMED_ERRORS, PEER_HUNG_UP, Pair, stores_agree
from tests.reliability.helpers_proxied import Proxied, committed_after_tampering
from tests.reliability.memory import FRAME_OFFSETS, tamper_session_frames
from tests.reliability.proxy import CODES, Direction, ProxyThread, Rule

OFFSETS_PER_FRAME = int(os.environ.get("QKDNODE_SOAK_OFFSETS", "20"))


@pytest.mark.parametrize("mode", ["ed25519", "mldsa65", "psk", "key_derived"])
@pytest.mark.slow  # runs long
def test_in_memory_every_frame_type_flipped_at_10_offsets_is_rejected(mode: str) -> None:
    report = tamper_session_frames(mode, offsets_per_frame=OFFSETS_PER_FRAME)
    assert report.tampered >= 10 * len(report.types)
    assert report.rejected == report.tampered, report.failures[:5]
    assert report.state_changed == 0
    # every frame type the session produces was attacked
    assert {"hello", "hello_reply", "finish", "block_open", "data", "block_close"} <= set(
        report.types
    ), report.types
    assert len(FRAME_OFFSETS(100, 10)) == 10


@pytest.mark.slow
def test_daemons_behind_proxy_reject_flipped_frames(proxied: Proxied) -> None:
    pair = proxied.pair
    proxied.sane(blocks=2)  # clean session; rotation to key-derived follows
    pair.wait(lambda p: "key_derived" in p.progress["alice"].modes_seen, what="rotation")
    keyed: list[tuple[Direction, str, int]] = [
        ("a2b", "block_open", 25),
        ("a2b", "data", 21),
        ("b2a", "data", -3),
        ("a2b", "block_close", 40),
        ("b2a", "block_close", 2),
        ("b2a", "control", 22),
        ("a2b", "control", 5),
        ("a2b", "ping", 30),
    ]
    # Bob's next data frame held for a second: Alice's session then idles long enough for the
    # keepalive ping the last rule flips (a pair distilling without pause sends no ping)
    stall = Rule("delay", direction="b2a", code=CODES["data"], delay_s=1.0)
    results = [
        proxied.tamper_once(
            Rule("flip", direction=direction, code=CODES[name], offset=offset),
            stall=stall if name == "ping" else None,
        )
        for direction, name, offset in keyed
    ]
    proxied.sane(blocks=1)
    failures = pair.session_failures()
    assert all(seconds < 8.0 for _, seconds in results), results
    # each tampering made a node fail its session with a named error (never a crash); the
    # other node may only see its peer hang up
    named = [error for _, error in failures if error in NAMED_ERRORS]
    assert len(named) >= len(results), failures
    assert {error for _, error in failures} <= NAMED_ERRORS | PEER_HUNG_UP, failures
    alice, bob = pair.store("alice"), pair.store("bob")
    assert stores_agree(alice, bob) == []
    assert committed_after_tampering(proxied, [t for t, _ in results]) == []


@pytest.mark.slow
def test_daemon_survives_a_flipped_handshake_frame(tmp_path: Path) -> None:
    pair = Pair.create(tmp_path / "pair")
    thread = ProxyThread(pair.layout.peer_port)
    pair.route_alice_to(thread.start())
    pair.start_both()
    shared = Proxied(pair, thread)
    try:
        handshake: list[tuple[Direction, str, int]] = [
            ("a2b", "hello", 40),
            ("b2a", "hello_reply", 60),
        ]
        for direction, name, offset in handshake:
            shared.tamper_once(Rule("flip", direction=direction, code=CODES[name], offset=offset))
        shared.sane(blocks=1)
    finally:
        pair.stop()
        thread.stop()
