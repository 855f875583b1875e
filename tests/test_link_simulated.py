"""The simulated link end to end: gains and QBER against the analytic model, block agreement,
failures (garbage, wrong boundaries, timeouts, lost fibre), two processes over loopback TCP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from qkdnode.config.link import EveConfig, SimulatedLinkConfig
from qkdnode.errors import BadDeviceData, LinkError, LinkLost, LinkTimeout
from qkdnode.link import LinkState, QuantumLink
from qkdnode.link.blocks import SimulatedBlocks
from qkdnode.link.eve import EveAttack
from qkdnode.link.fibre import BlockStart, PulseFrame, encode_block_start, encode_pulse_frame
from qkdnode.link.physics import Receiver, Source
from qkdnode.link.simulated import (
    SimulatedAliceLink,
    SimulatedBobLink,
    TcpFibreListener,
    memory_fibre,
    simulated_link_from_config,
    tcp_fibre_connector,
)
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords
from tests.helpers_link import count_by_class, run_blocks

# Bright enough that every class has hundreds of detections at 100 km in 2^22 pulses.
ACCEPTANCE = dict(
    detector_efficiency=0.5,
    insertion_loss_db=1.0,
    dark_count_probability_per_gate=1e-4,
    misalignment_error=0.02,
    mu_signal=0.8,
    mu_decoy=0.3,
    mu_vacuum=0.05,
    p_signal=0.5,
    p_decoy=0.3,
    p_vacuum=0.2,
    p_key_basis=0.6,
    chunk_pulses=1 << 17,
)


@pytest.mark.parametrize("fiber_km", [0.0, 25.0, 50.0, 100.0])
async def test_gain_and_qber_per_intensity_match_the_channel_model(fiber_km: float) -> None:
    config = SimulatedLinkConfig(fiber_km=fiber_km, **ACCEPTANCE)  # type: ignore[arg-type]
    pairs = await run_blocks(config, blocks=2, pulse_count=1 << 21, seed=int(fiber_km) + 1)
    counts = count_by_class(pairs)
    # Lo, Ma, Chen, PRL 94, 230504 (2005); Ma et al., PRA 72, 012326 (2005), eqs. 2-4:
    # η = η_Bob · 10^(−αL/10), Q_μ = Y0 + 1 − e^(−ημ), E_μ Q_μ = e0 Y0 + e_det (1 − e^(−ημ)).
    eta_bob = 10 ** (-1.0 / 10) * 0.5
    eta = eta_bob * 10 ** (-0.2 * fiber_km / 10)
    y0 = 2 * 1e-4
    for cls, mu in enumerate((0.8, 0.3, 0.05)):
        c = counts[cls]
        gain = y0 + 1 - math.exp(-eta * mu)
        error_gain = 0.5 * y0 + 0.02 * (1 - math.exp(-eta * mu))
        qber = error_gain / gain
        observed_gain = c.detections / c.pulses
        sigma_gain = math.sqrt(gain * (1 - gain) / c.pulses)
        assert abs(observed_gain - gain) <= 4 * sigma_gain, (cls, observed_gain, gain)
        assert c.sifted > 100, (cls, c.sifted)
        observed_qber = c.errors / c.sifted
        sigma_qber = math.sqrt(qber * (1 - qber) / c.sifted)
        assert abs(observed_qber - qber) <= 4 * sigma_qber, (cls, observed_qber, qber)
    # Sifting keeps the fraction of both-Z plus both-X choices.
    sifted = sum(c.sifted for c in counts) / sum(c.detections for c in counts)
    n = sum(c.detections for c in counts)
    expected = 0.6**2 + 0.4**2
    assert abs(sifted - expected) <= 4 * math.sqrt(expected * (1 - expected) / n)


async def test_blocks_agree_by_pulse_index_and_status_counts() -> None:
    config = SimulatedLinkConfig(fiber_km=10.0, chunk_pulses=30_000)
    pairs = await run_blocks(config, blocks=3, pulse_count=100_000, seed=7)
    assert [a.first_pulse_index for a, _ in pairs] == [0, 100_000, 200_000]
    for alice, bob in pairs:
        assert bob.first_pulse_index == alice.first_pulse_index
        assert bob.pulse_count == alice.pulse_count == 100_000
        offset = bob.pulse_index - alice.first_pulse_index
        same = alice.basis[offset] == bob.basis
        qber = float(np.mean(alice.bit[offset][same] != bob.bit[same]))
        assert qber < 0.03  # aligned indices; off by one pulse it would be 1/2


async def test_status_and_protocol_conformance() -> None:
    config = SimulatedLinkConfig(fiber_km=0.0, pulse_rate_hz=1e6)
    send, receive = memory_fibre()
    alice = SimulatedAliceLink(config, fibre=send, rng=np.random.default_rng(1))
    bob = SimulatedBobLink(config, fibre=receive, rng=np.random.default_rng(2))
    assert isinstance(alice, QuantumLink) and isinstance(bob, QuantumLink)
    assert (alice.role, bob.role) == ("alice", "bob")
    assert alice.status().state is LinkState.CLOSED
    with pytest.raises(LinkError):
        await alice.next_block(10)
    await alice.open()
    await bob.open()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alice.next_block, 50_000)
        records = await bob.next_block(50_000)
    a, b = alice.status(), bob.status()
    assert a.state is LinkState.OPEN and a.blocks == 1 and a.pulses_sent == 50_000
    assert b.pulses_received == 50_000 and b.detections == records.detection_count > 0
    assert b.simulated_time_s == pytest.approx(0.05)
    assert a.alarms == () and a.last_error is None
    params = alice.nominal_parameters()
    assert params.mu_signal == config.mu_signal
    assert params.channel_transmittance == pytest.approx(config.detector_efficiency)
    with pytest.raises(ValueError, match="pulse_count"):
        await alice.next_block(0)
    await alice.aclose()
    await alice.aclose()  # idempotent
    await bob.aclose()
    assert alice.status().state is LinkState.CLOSED


async def _bob_after_raw_bytes(data: bytes, pulse_count: int = 1000) -> SimulatedBobLink:
    send, receive = memory_fibre()
    bob = SimulatedBobLink(SimulatedLinkConfig(), fibre=receive, rng=np.random.default_rng(0))
    await bob.open()
    await send.send_all(data)
    await send.aclose()
    return bob


async def test_garbage_on_the_fibre_is_bad_device_data() -> None:
    garbage = np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    bob = await _bob_after_raw_bytes(garbage)
    with pytest.raises(BadDeviceData):
        await bob.next_block(1000)
    status = bob.status()
    assert status.state is LinkState.FAILED and "bad_device_data" in status.alarms
    with pytest.raises(LinkError):
        await bob.next_block(1000)


def _pulses(first: int, count: int) -> bytes:
    return encode_pulse_frame(
        PulseFrame(
            first_pulse_index=first,
            span_transmittance=0.5,
            pulses=np.zeros(count, dtype=np.uint8),
        )
    )


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (encode_block_start(BlockStart(first_pulse_index=0, pulse_count=999)), "announces"),
        (_pulses(0, 1000), "expected a block start"),
        (
            encode_block_start(BlockStart(first_pulse_index=0, pulse_count=1000)) + _pulses(1, 999),
            "does not continue",
        ),
        (
            encode_block_start(BlockStart(first_pulse_index=0, pulse_count=1000))
            + _pulses(0, 1001),
            "does not continue",
        ),
        (
            encode_block_start(BlockStart(first_pulse_index=0, pulse_count=1000))
            + _pulses(0, 500)
            + encode_block_start(BlockStart(first_pulse_index=500, pulse_count=500)),
            "block start before",
        ),
    ],
)
async def test_block_boundaries_that_disagree_are_bad_device_data(
    stream: bytes, reason: str
) -> None:
    bob = await _bob_after_raw_bytes(stream)
    with pytest.raises(BadDeviceData, match=reason):
        await bob.next_block(1000)


async def test_a_new_fibre_connection_follows_the_senders_numbering_then_must_continue() -> None:
    # after a restart of either end, Bob adopts Alice's pulse index once per connection...
    bob = await _bob_after_raw_bytes(
        encode_block_start(BlockStart(first_pulse_index=5000, pulse_count=1000))
        + _pulses(5000, 1000)
        + encode_block_start(BlockStart(first_pulse_index=7000, pulse_count=1000))
    )
    first = await bob.next_block(1000)
    assert first.first_pulse_index == 5000
    # ...and within the connection the next block must start where the last one ended
    with pytest.raises(BadDeviceData, match="announces"):
        await bob.next_block(1000)


async def test_closed_fibre_is_link_lost() -> None:
    bob = await _bob_after_raw_bytes(
        encode_block_start(BlockStart(first_pulse_index=0, pulse_count=1000))
    )
    with pytest.raises(LinkLost):
        await bob.next_block(1000)
    assert "lost" in bob.status().alarms


async def test_alice_sees_a_closed_receiver_as_link_lost() -> None:
    send, receive = memory_fibre()
    alice = SimulatedAliceLink(SimulatedLinkConfig(), fibre=send, rng=np.random.default_rng(0))
    await alice.open()
    await receive.aclose()
    with pytest.raises(LinkLost):
        await alice.next_block(1000)
    assert alice.status().state is LinkState.FAILED


async def test_silent_fibre_times_out(autojump_clock: trio.testing.MockClock) -> None:
    send, receive = memory_fibre()
    config = SimulatedLinkConfig(fibre_timeout_s=5.0)
    bob = SimulatedBobLink(config, fibre=receive, rng=np.random.default_rng(0))
    await bob.open()
    start = trio.current_time()
    with pytest.raises(LinkTimeout):
        await bob.next_block(1000)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert "timeout" in bob.status().alarms
    await send.aclose()


async def test_stalled_receiver_times_alice_out(autojump_clock: trio.testing.MockClock) -> None:
    send, _receive = memory_fibre(max_buffered_frames=1)
    config = SimulatedLinkConfig(fibre_timeout_s=3.0, chunk_pulses=1000)
    alice = SimulatedAliceLink(config, fibre=send, rng=np.random.default_rng(0))
    await alice.open()
    with pytest.raises(LinkTimeout):
        await alice.next_block(10_000)
    assert alice.status().state is LinkState.FAILED


async def test_connect_timeout_is_link_timeout() -> None:
    listener = TcpFibreListener("127.0.0.1", 0)
    port = await listener.bind()
    await listener.aclose()  # nobody listens on this port any more
    config = SimulatedLinkConfig(connect_timeout_s=0.3)
    bob = SimulatedBobLink(
        config, fibre=tcp_fibre_connector("127.0.0.1", port), rng=np.random.default_rng(0)
    )
    with pytest.raises(LinkTimeout):
        await bob.open()
    assert bob.status().state is LinkState.FAILED


_BOB_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import trio
    from qkdnode.config.link import SimulatedLinkConfig
    from qkdnode.link.simulated import SimulatedBobLink, tcp_fibre_connector

    async def main(port, blocks, pulses):
        config = SimulatedLinkConfig(fiber_km=5.0, chunk_pulses=20_000)
        bob = SimulatedBobLink(
            config, fibre=tcp_fibre_connector("127.0.0.1", port), rng=np.random.default_rng(2)
        )
        await bob.open()
        out = []
        for _ in range(blocks):
            r = await bob.next_block(pulses)
            out.append({"first": r.first_pulse_index, "count": r.pulse_count,
                        "index": r.pulse_index.tolist(), "basis": r.basis.tolist(),
                        "bit": r.bit.tolist()})
        await bob.aclose()
        json.dump(out, sys.stdout)

    trio.run(main, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    """
)


async def test_alice_and_bob_in_two_processes_over_loopback_tcp() -> None:
    blocks, pulses = 3, 60_000
    listener = TcpFibreListener("127.0.0.1", 0)
    port = await listener.bind()
    config = SimulatedLinkConfig(fiber_km=5.0, chunk_pulses=20_000, connect_timeout_s=30.0)
    alice = SimulatedAliceLink(config, fibre=listener.accept, rng=np.random.default_rng(1))
    command = [sys.executable, "-c", _BOB_PROCESS, str(port), str(blocks), str(pulses)]
    emitted: list[EmissionRecords] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            process: list[subprocess.CompletedProcess[bytes]] = []

            async def bob_process() -> None:
                process.append(await trio.run_process(command, capture_stdout=True))

            nursery.start_soon(bob_process)
            await alice.open()
            for _ in range(blocks):
                records = await alice.next_block(pulses)
                assert isinstance(records, EmissionRecords)  # dense records by default
                emitted.append(records)
            await alice.aclose()
    received = json.loads(process[0].stdout)
    assert [b["first"] for b in received] == [a.first_pulse_index for a in emitted]
    assert [b["first"] for b in received] == [0, pulses, 2 * pulses]
    for alice_block, bob_json in zip(emitted, received, strict=True):
        bob_block = DetectionRecords(
            first_pulse_index=bob_json["first"],
            pulse_count=bob_json["count"],
            pulse_index=np.array(bob_json["index"], dtype=np.int64),
            basis=np.array(bob_json["basis"], dtype=np.uint8),
            bit=np.array(bob_json["bit"], dtype=np.uint8),
        )
        assert bob_block.detection_count > 500
        offset = bob_block.pulse_index - alice_block.first_pulse_index
        same = alice_block.basis[offset] == bob_block.basis
        qber = float(np.mean(alice_block.bit[offset][same] != bob_block.bit[same]))
        assert qber < 0.03  # the two processes talk about the same pulses


async def test_ends_built_from_config_meet_over_tcp() -> None:
    probe = TcpFibreListener("127.0.0.1", 0)
    port = await probe.bind()
    await probe.aclose()
    config = SimulatedLinkConfig.from_mapping(
        {"fibre_host": "127.0.0.1", "fibre_port": port, "fiber_km": 0.0, "connect_timeout_s": 10}
    )
    alice = simulated_link_from_config("alice", config, np.random.default_rng(1))
    bob = simulated_link_from_config("bob", config, np.random.default_rng(2))
    assert (alice.role, bob.role) == ("alice", "bob")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alice.open)
        await bob.open()
    sent: list[EmissionRecords | DetectionRecords] = []
    async with trio.open_nursery() as nursery:

        async def emit() -> None:
            records = await alice.next_block(20_000)
            assert isinstance(records, EmissionRecords)  # dense records by default
            sent.append(records)

        nursery.start_soon(emit)
        received = await bob.next_block(20_000)
    assert isinstance(received, DetectionRecords) and isinstance(sent[0], EmissionRecords)
    assert received.first_pulse_index == sent[0].first_pulse_index == 0
    assert received.detection_count > 100
    await alice.aclose()
    await bob.aclose()


async def test_the_links_physics_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # emission, detection and Eve's attack each run in a worker thread, never on trio's
    trio_thread = threading.get_ident()
    threads: dict[str, set[int]] = {"emit": set(), "detect": set(), "attack": set()}
    for owner, name, label in (
        (Source, "emit", "emit"),
        (Receiver, "detect", "detect"),
        (EveAttack, "apply", "attack"),
    ):
        original = getattr(owner, name)

        def traced(self: object, *args: Any, _f: Any = original, _l: str = label) -> Any:
            threads[_l].add(threading.get_ident())
            return _f(self, *args)

        monkeypatch.setattr(owner, name, traced)
    config = SimulatedLinkConfig(fiber_km=10.0, chunk_pulses=20_000)
    eve = EveConfig(intercept_resend_fraction=0.1)
    pairs = await run_blocks(config, blocks=2, pulse_count=50_000, seed=3, eve=eve)
    assert len(pairs) == 2
    assert all(threads.values()), threads
    assert all(trio_thread not in seen for seen in threads.values())


async def test_a_seed_gives_the_same_records_block_after_block() -> None:
    config = SimulatedLinkConfig(fiber_km=25.0, chunk_pulses=7_000)
    first = await run_blocks(config, blocks=2, pulse_count=30_000, seed=11)
    again = await run_blocks(config, blocks=2, pulse_count=30_000, seed=11)
    for (alice, bob), (alice2, bob2) in zip(first, again, strict=True):
        for name in ("bit", "basis", "intensity"):
            assert np.array_equal(getattr(alice, name), getattr(alice2, name))
        for name in ("pulse_index", "basis", "bit"):
            assert np.array_equal(getattr(bob, name), getattr(bob2, name))


async def test_bob_keeps_blocks_read_ahead_until_alice_announces_them() -> None:
    # two blocks open at once: Bob reads both from the fibre before Alice's first announcement
    config = SimulatedLinkConfig(fiber_km=10.0, chunk_pulses=10_000)
    send, receive = memory_fibre()
    alice = SimulatedBlocks(
        SimulatedAliceLink(config, fibre=send, rng=np.random.default_rng(1)), 30_000
    )
    bob = SimulatedBlocks(
        SimulatedBobLink(config, fibre=receive, rng=np.random.default_rng(2)), 30_000
    )
    sent: list[EmissionRecords] = []

    async def emit(blocks: int) -> None:
        for _ in range(blocks):
            records = await alice.alice_block()
            assert isinstance(records, EmissionRecords)  # dense records by default
            sent.append(records)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(emit, 4)
        for _ in range(4):
            await bob.bob_prefetch()
    first, second, third, fourth = (records.first_pulse_index for records in sent)
    taken = await bob.bob_block(first)
    assert taken is not None and taken.first_pulse_index == first
    assert await bob.bob_block(first) is None  # taken once
    # the second block was aborted on Alice's side: asking for the third forgets it
    taken = await bob.bob_block(third)
    assert taken is not None and taken.first_pulse_index == third
    assert await bob.bob_block(second) is None
    assert await bob.bob_block(fourth) is not None
    assert await bob.bob_block(fourth + 30_000) is None  # never read
    await alice.reset()
    await bob.reset()
