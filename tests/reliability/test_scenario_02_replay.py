"""Scenario 2: replay. Frames recorded by the MITM proxy are replayed into the same session and
into a new one, on the wire between the two daemons (after scenario 1 the pair runs in
key-derived mode): every replay ends the session with a named error, no block whose frames were
replaced commits on that connection, and both stores agree; a clean block follows.

(In memory, scenario 3 also sends every recorded frame at every other position of a session.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.reliability.harness import NAMED_ERRORS, PEER_HUNG_UP, stores_agree
from tests.reliability.helpers_proxied import Proxied, committed_after_tampering
from tests.reliability.proxy import CODES, Direction, Frame, Rule, Tampering

pytestmark = pytest.mark.slow  # starts daemon processes


def _latest(proxied: Proxied, direction: str, code: int, *, before: int | None = None) -> Frame:
    """The last recorded frame of this kind (on a connection numbered below ``before``)."""
    frames = [
        f
        for f in proxied.proxy.recorded()
        if f.direction == direction and f.code == code and (before is None or f.connection < before)
    ]
    assert frames, (direction, code)
    return frames[-1]


def _same_connection_later(old: Frame) -> Callable[[Frame], bool]:
    return lambda f: f.connection == old.connection and f.index > old.index


def _later_connection(current: int) -> Callable[[Frame], bool]:
    return lambda f: f.connection >= current


def test_replays_into_the_same_and_a_new_session_are_refused(proxied: Proxied) -> None:
    pair = proxied.pair
    proxied.sane(blocks=1)
    failures_before = len(pair.session_failures())
    results = []
    # same session: Bob's last recorded data frame again, in place of a later one of his
    old = _latest(proxied, "b2a", CODES["data"])
    results.append(
        proxied.tamper_once(
            Rule(
                "replay",
                direction="b2a",
                code=CODES["data"],
                payload=old.raw,
                predicate=_same_connection_later(old),
            )
        )
    )
    # same session: Alice's control frame replayed right after itself (a duplicate)
    results.append(proxied.tamper_once(Rule("duplicate", direction="a2b", code=CODES["control"])))
    proxied.sane(blocks=1)
    # a new session: frames of an earlier connection, at the same kind of position
    direction: Direction
    for direction, name in (("a2b", "control"), ("b2a", "control"), ("a2b", "block_open")):
        current = max(f.connection for f in proxied.proxy.recorded())
        old = _latest(proxied, direction, CODES[name], before=current)
        results.append(
            proxied.tamper_once(
                Rule(
                    "replay",
                    direction=direction,
                    code=CODES[name],
                    payload=old.raw,
                    predicate=_later_connection(current),
                )
            )
        )
    # a new session: the old handshake's Hello in place of the new one (a flipped ping ends
    # the current session first, so the replay meets the next handshake)
    current = max(f.connection for f in proxied.proxy.recorded())
    old_hello = _latest(proxied, "a2b", CODES["hello"], before=current + 1)
    results.append(_replay_next_hello(proxied, old_hello, current))
    proxied.sane(blocks=1)
    failures = pair.session_failures()[failures_before:]
    assert all(seconds < 20.0 for _, seconds in results), results
    # each replay made a node fail its session with a named error (never a crash); the other
    # node may only see its peer hang up
    named = [error for _, error in failures if error in NAMED_ERRORS]
    assert len(named) >= len(results), failures
    assert {error for _, error in failures} <= NAMED_ERRORS | PEER_HUNG_UP, failures
    assert stores_agree(pair.store("alice"), pair.store("bob")) == []
    assert committed_after_tampering(proxied, [t for t, _ in results]) == []


def _replay_next_hello(proxied: Proxied, old_hello: Frame, current: int) -> tuple[Tampering, float]:
    """Arm the Hello replay for the next connection, end the current one, wait for the result."""
    hello = Rule(
        "replay",
        direction="a2b",
        code=CODES["hello"],
        payload=old_hello.raw,
        predicate=_later_connection(current + 1),
    )
    proxied.proxy.add(hello, Rule("flip", direction="a2b", code=CODES["ping"], offset=30))
    deadline = time.monotonic() + 45
    try:
        while hello.times:
            proxied.pair.poll()
            assert time.monotonic() < deadline, "the Hello replay never fired"
            time.sleep(0.05)
    finally:
        proxied.proxy.clear()
    tampering = next(t for t in proxied.proxy.tamperings() if t.frame.code == CODES["hello"])
    while True:
        ends = [e for e in proxied.proxy.ends() if e.connection == tampering.frame.connection]
        if ends:
            return tampering, ends[0].at_s - tampering.at_s
        assert time.monotonic() < deadline, "the replayed handshake's connection survived"
        time.sleep(0.05)
