"""Scenario 7: forced aborts (junk frames, QBER pushed over the threshold, an intercept-resend
eavesdropper). Each abort burns a bounded amount of authentication key; 100 aborts stay within
100 times that bound; no key comes out of an aborted block; the reconnect backoff is applied.

The stated bound per abort (key-derived mode): a session killed mid-block costs the block's
keys, ``BLOCK_DRAW_BITS`` = 1,024 pool bits, and its reconnection one handshake key from the
handshake-key stream (no pool bit); a block the pipeline aborts (QBER, Eve) is closed normally
and costs ``BLOCK_DRAW_BITS`` = 1,024 bits.

Eve's intercept-resend attack is written out here from its definition (Bennett and Brassard
1984; Eve measures a fraction of the pulses in a random basis and resends what she saw, which
gives Bob an error rate of 25 % on those pulses in the matching basis).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import trio
import trio.testing

from qkdnode.channel.auth import BLOCK_DRAW_BITS, Role
from qkdnode.channel.connection import BlockAuthenticated
from qkdnode.channel.framing import pack_frame, pack_header
from qkdnode.channel.ledger import (
    HANDSHAKE_SLOT_BYTES,
    HANDSHAKE_SLOTS_PER_DEPOSIT,
    AuthKeyLedger,
)
from qkdnode.errors import ProtocolError
from qkdnode.node import session as session_module
from qkdnode.node.session import SessionConfig, backoff_delays, open_session, run_alice
from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.finitekey import SecurityParameters
from qkdnode.postprocess.pipeline import BlockKey, PipelineParameters, Transcript, run_block
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords
from tests.helpers_blocks import make_block
from tests.reliability.memory import (
    NAMED,
    _body,
    key_derived_wire,
    ledger_pair,
    psk_pair,
)
from tests.reliability.proxy import CODES

ABORTS = 100
SESSION_ABORT_BITS = BLOCK_DRAW_BITS
PARAMS = PipelineParameters(
    cascade_variant=CascadeVariant.SUBBLOCK_REUSE,
    security=SecurityParameters(eps_sec=1e-10, eps_cor=1e-12),
    qber_threshold=0.08,
    sample_bits=1000,
)


def intercept_resend(
    emissions: EmissionRecords,
    detections: DetectionRecords,
    fraction: float,
    rng: np.random.Generator,
) -> DetectionRecords:
    """Bob's detections when Eve measured ``fraction`` of the pulses and resent what she saw."""
    offsets = detections.pulse_index - emissions.first_pulse_index
    alice_basis = emissions.basis[offsets]
    alice_bit = emissions.bit[offsets]
    hit = rng.random(offsets.size) < fraction
    eve_basis = rng.integers(0, 2, offsets.size, dtype=np.uint8)
    eve_bit = np.where(eve_basis == alice_basis, alice_bit, rng.integers(0, 2, offsets.size))
    # Bob measuring Eve's resent state: her bit in her basis, a coin otherwise
    resent = np.where(eve_basis == detections.basis, eve_bit, rng.integers(0, 2, offsets.size))
    bit = np.where(hit, resent, detections.bit).astype(np.uint8)
    return DetectionRecords(
        first_pulse_index=detections.first_pulse_index,
        pulse_count=detections.pulse_count,
        pulse_index=detections.pulse_index,
        basis=detections.basis,
        bit=bit,
    )


def _more_slots(alice: AuthKeyLedger, bob: AuthKeyLedger, *, seed: int) -> None:
    """Both ledgers take the same handshake-key slots, as at a commit (the pool is full)."""
    key = np.random.default_rng(seed).bytes(HANDSHAKE_SLOTS_PER_DEPOSIT * HANDSHAKE_SLOT_BYTES)
    for ledger in (alice, bob):
        # a mark at which the pool needs nothing: the whole key goes to the slots
        mark = max(0, ledger.state.deposited_bits - ledger.state.target_bits)
        ledger.deposit(key, mark_consumed_bits=mark)


def forced_abort(kind: str, seed: int) -> tuple[BlockAborted, BlockAborted, int]:
    """A block the pipeline must abort; returns both outcomes and the messages exchanged."""
    rng = np.random.default_rng(seed)
    qber = 0.15 if kind == "qber" else 0.02
    emissions, detections = make_block(rng, pulse_count=150_000, qber=qber, vacuum_qber=qber)
    if kind == "eve":
        detections = intercept_resend(emissions, detections, 1.0, rng)
    transcript = Transcript()
    alice, bob = run_block(emissions, detections, PARAMS, rng, transcript=transcript)
    assert isinstance(alice, BlockAborted) and isinstance(bob, BlockAborted), (alice, bob)
    return alice, bob, len(transcript.messages)


@pytest.mark.slow  # runs long
def test_100_forced_aborts_burn_at_most_the_stated_bound_and_yield_no_key() -> None:
    rng = np.random.default_rng(7)
    alice, bob, _, _ = ledger_pair(seed=7, target_bits=1 << 18)
    wire = key_derived_wire(alice, bob, seed=70)
    kinds = ("junk", "qber", "eve")
    burned: dict[str, list[int]] = {kind: [] for kind in kinds}
    reasons: set[str] = set()
    for index in range(ABORTS):
        kind = kinds[index % 3]
        before = alice.consumed_bits
        block_id = index + 1
        if kind == "junk":
            wire.put(Role.BOB, wire.alice.open_block(block_id))
            junk = pack_frame(
                pack_header(CODES["data"], wire.bob.recv_seq, block_id),
                rng.bytes(60),
                rng.bytes(32),
            )
            with pytest.raises(NAMED):
                wire.bob.receive_data(junk)
                wire.bob.next_event(now_s=0.0)
            assert not any(isinstance(e, BlockAuthenticated) for e in wire.events[Role.BOB][-1:])
            # the daemon reconnects: a new key-derived session over the same ledgers, which
            # uses one handshake slot on each side and no pool bit
            slot = alice.handshake_first
            wire = key_derived_wire(alice, bob, seed=1000 + index)
            wire_cost = alice.consumed_bits - before
            assert alice.handshake_first == bob.handshake_first > slot
            _more_slots(alice, bob, seed=index)  # the commits that refill it are not simulated
        else:
            a_out, _b_out, messages = forced_abort(kind, seed=100 + index)
            reasons.add(a_out.reason.value)
            # the block's messages cross the channel, then both close it: no key, no deposit
            wire.put(Role.BOB, wire.alice.open_block(block_id))
            for n in range(messages):
                wire.put(Role.BOB, wire.alice.send_data(block_id, "probe", _body(n)))
            wire.put(Role.BOB, wire.alice.close_block(block_id))
            wire.put(Role.ALICE, wire.bob.close_block(block_id))
            wire.drain(Role.ALICE)
            wire.drain(Role.BOB)
            wire_cost = alice.consumed_bits - before
        burned[kind].append(wire_cost)
        assert alice.state == bob.state
    assert max(burned["junk"]) <= SESSION_ABORT_BITS
    assert max(burned["qber"] + burned["eve"]) <= BLOCK_DRAW_BITS
    total = sum(sum(values) for values in burned.values())
    assert total <= ABORTS * SESSION_ABORT_BITS
    assert reasons == {AbortReason.QBER_ABOVE_THRESHOLD.value}
    print(f"scenario 7: {ABORTS} aborts burned {total} auth-key bits (bound {ABORTS * 1280})")


def test_intercept_resend_on_half_the_pulses_aborts_a_block_that_would_give_key() -> None:
    # half the pulses intercepted: about 12 % extra errors on top of 2 %; the same block
    # without Eve gives a key (so the abort is Eve's doing)
    rng = np.random.default_rng(77)
    emissions, detections = make_block(
        rng, pulse_count=1_000_000, qber=0.02, vacuum_qber=0.02, p_key_basis=0.7
    )
    tapped = intercept_resend(emissions, detections, 0.5, rng)
    alice, bob = run_block(emissions, tapped, PARAMS, rng)
    assert isinstance(alice, BlockAborted) and isinstance(bob, BlockAborted)
    clean_alice, clean_bob = run_block(emissions, detections, PARAMS, rng)
    assert isinstance(clean_alice, BlockKey) and isinstance(clean_bob, BlockKey)


def test_backoff_grows_while_dialing_fails() -> None:
    delays = backoff_delays(0.5, 30.0, 0.2, lambda: 1.0)
    values = [next(delays) for _ in range(12)]
    assert values[:4] == pytest.approx([0.6, 1.2, 2.4, 4.8])
    assert values[-1] == pytest.approx(36.0)


async def _gaps_between_sessions(aborts: int) -> list[float]:
    """Alice's ``run_alice`` against an in-memory Bob; every session is aborted right after its
    handshake (as a junk frame does). Returns the seconds between consecutive sessions."""
    config = SessionConfig(backoff_initial_s=0.5, backoff_max_s=30.0, backoff_jitter=0.0)
    starts: list[float] = []

    async def handle(_session: object) -> None:
        starts.append(trio.current_time())
        if len(starts) >= aborts:
            raise _Done
        raise ProtocolError("junk frame", field="tag")

    async with trio.open_nursery() as nursery:

        async def fake_dial(*_args: object, **_kwargs: object) -> trio.abc.Stream:
            alice_end, bob_end = trio.testing.memory_stream_pair()

            async def bob() -> None:
                wire = psk_pair(None, None, seed=len(starts))
                try:
                    async with open_session(bob_end, wire.bob, config) as s:
                        await s.next_event()
                except* Exception:
                    pass

            nursery.start_soon(bob)
            return alice_end

        original = session_module.dial
        session_module.dial = fake_dial  # type: ignore[assignment]
        try:
            with pytest.raises(BaseExceptionGroup) as caught:
                await run_alice(config, lambda: psk_pair(None, None, seed=1).alice, handle)
            assert caught.group_contains(_Done)
        finally:
            session_module.dial = original
        nursery.cancel_scope.cancel()
    return [b - a for a, b in itertools.pairwise(starts)]


class _Done(Exception):
    pass


def test_backoff_grows_while_sessions_keep_aborting() -> None:
    """Sessions that keep aborting right after their handshake are retried with a growing
    backoff, so an attacker cannot make the node burn keys at a fixed rate."""
    gaps = trio.run(_gaps_between_sessions, 6, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(gaps) == 5
    assert gaps[-1] >= 4 * gaps[0], gaps
