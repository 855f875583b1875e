"""The serial backend end to end through real ptys: two drivers, two device emulators, one fibre.

Two daemons on serial devices are tested in ``tests/test_node_serial_e2e.py``; here the drivers
alone: both deliver blocks with the same pulse ranges, and
``qkdnode.postprocess.pipeline.run_block`` on them gives identical keys.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import trio

from qkdnode.config.link import SerialLinkConfig, SimulatedLinkConfig
from qkdnode.config.table import Table
from qkdnode.demo.run import free_port
from qkdnode.errors import BadDeviceData, ConfigError, LinkLost, LinkTimeout
from qkdnode.link import LinkState, QuantumLink
from qkdnode.link.emulator import DeviceEmulator
from qkdnode.link.interface import LinkStatus
from qkdnode.link.serial import BlockReader, SerialLink, open_tty
from qkdnode.link.serialproto import (
    Ack,
    AlarmCode,
    Command,
    Configure,
    DeviceError,
    DeviceStatus,
    FrameDecoder,
    Message,
    MessageType,
    Parameters,
    Received,
    encode_frame,
)
from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.finitekey import SecurityParameters
from qkdnode.postprocess.pipeline import BlockKey, PipelineParameters, run_block
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords

# Bright and short: ~17 % of pulses give a detection, QBER ~ misalignment (0.5 %).
PHYSICS = SimulatedLinkConfig(fiber_km=0.0, detector_efficiency=0.5, p_key_basis=0.8)
# The single-photon bound of Tomamichel et al. (2012), as in tests/test_pipeline.py: it gives a
# key from blocks small enough for a fast test (the decoy bound needs ~10x more pulses).
PIPELINE = PipelineParameters(
    cascade_variant=CascadeVariant.SUBBLOCK_REUSE,
    security=SecurityParameters(eps_sec=1e-10, eps_cor=1e-12),
    qber_threshold=0.05,
    sample_bits=2000,
)
BLOCK = 1 << 18
Pair = tuple[EmissionRecords, DetectionRecords]


@dataclass
class Rig:
    alice_device: DeviceEmulator
    bob_device: DeviceEmulator
    alice: SerialLink
    bob: SerialLink
    losses: list[tuple[str, LinkStatus]] = field(default_factory=list)
    timeouts: list[str] = field(default_factory=list)
    skipped: int = 0


def fibre_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


def link_config(path: str, **overrides: float) -> SerialLinkConfig:
    settings: dict[str, float] = {"read_timeout_s": 3.0, "reconnect_interval_s": 0.02}
    settings.update(overrides)
    return SerialLinkConfig(device_path=path, **settings)  # type: ignore[arg-type]


@asynccontextmanager
async def rig(tmp_path: Path, seed: int, **overrides: float) -> AsyncIterator[Rig]:
    """Two emulators joined by an in-process fibre, each on its own pty (behind a symlink)."""
    seeds = np.random.SeedSequence(seed).spawn(4)
    alice_fibre, bob_fibre = fibre_pair()
    alice_device = DeviceEmulator(
        "alice",
        PHYSICS,
        rng=np.random.default_rng(seeds[0]),
        fault_rng=np.random.default_rng(seeds[2]),
        link_path=str(tmp_path / "alice-tty"),
    )
    bob_device = DeviceEmulator(
        "bob",
        PHYSICS,
        rng=np.random.default_rng(seeds[1]),
        fault_rng=np.random.default_rng(seeds[3]),
        link_path=str(tmp_path / "bob-tty"),
    )
    async with alice_fibre, bob_fibre, trio.open_nursery() as nursery:
        alice_path = await nursery.start(alice_device.run, alice_fibre)
        bob_path = await nursery.start(bob_device.run, bob_fibre)
        alice = SerialLink(link_config(alice_path, **overrides), "alice")
        bob = SerialLink(link_config(bob_path, **overrides), "bob")
        await alice.open()
        await bob.open()
        try:
            yield Rig(alice_device, bob_device, alice, bob)
        finally:
            await alice.aclose()
            await bob.aclose()
            alice_device.close()
            bob_device.close()


async def aligned_pairs(rig: Rig, count: int, pulse_count: int = BLOCK) -> list[Pair]:
    """What a daemon does: a ``BlockReader`` per end reads its link continuously; Alice takes
    her oldest block, Bob takes the block with the same first pulse index (or reports that his
    side lost it, and both move on)."""
    pairs: list[Pair] = []
    alice = BlockReader(rig.alice, pulse_count)
    bob = BlockReader(rig.bob, pulse_count)
    async with trio.open_nursery() as nursery:
        await nursery.start(alice.run)
        await nursery.start(bob.run)
        while len(pairs) < count:
            a = await alice.take()
            assert isinstance(a, EmissionRecords)
            b = await bob.take(a.first_pulse_index)
            if b is None:
                rig.skipped += 1
                continue
            assert isinstance(b, DetectionRecords)
            pairs.append((a, b))
        nursery.cancel_scope.cancel()
    for reader in (alice, bob):
        for error, status in reader.errors:
            if isinstance(error, LinkLost):
                rig.losses.append((status.role, status))
            else:
                rig.timeouts.append(status.role)
    return pairs


def sifted_qber(alice: EmissionRecords, bob: DetectionRecords) -> float:
    offset = bob.pulse_index - alice.first_pulse_index
    same = alice.basis[offset] == bob.basis
    return float(np.mean(alice.bit[offset][same] != bob.bit[same]))


def longest_silence(bob: DetectionRecords) -> int:
    """Longest run of pulses without a detection inside the block (a gap would show here)."""
    edges = np.concatenate(
        ([bob.first_pulse_index - 1], bob.pulse_index, [bob.first_pulse_index + bob.pulse_count])
    )
    return int(np.max(np.diff(edges)) - 1)


def assert_clean(pair: Pair) -> None:
    alice, bob = pair
    assert alice.first_pulse_index == bob.first_pulse_index
    assert alice.first_pulse_index % alice.pulse_count == 0
    assert alice.pulse_count == bob.pulse_count
    assert sifted_qber(alice, bob) < 0.02  # misaligned by even one pulse it would be ~1/2
    # With 17 % detections per pulse, 300 silent pulses have probability ~1e-24: a block
    # that spans a gap in either record stream would fail here.
    assert longest_silence(bob) < 300


def assert_identical_keys(pair: Pair, seed: int) -> int:
    alice_outcome, bob_outcome = run_block(*pair, PIPELINE, np.random.default_rng(seed))
    assert isinstance(alice_outcome, BlockKey), alice_outcome
    assert isinstance(bob_outcome, BlockKey), bob_outcome
    assert alice_outcome.key.shape[0] > 1000
    assert np.array_equal(alice_outcome.key, bob_outcome.key)
    return int(alice_outcome.key.shape[0])


# ---- acceptance ------------------------------------------------------------------------------


async def test_two_drivers_two_emulators_distil_identical_keys(tmp_path: Path) -> None:
    async with rig(tmp_path, seed=1) as r:
        assert isinstance(r.alice, QuantumLink) and isinstance(r.bob, QuantumLink)
        assert r.alice.nominal_parameters() == PHYSICS.nominal_parameters()
        assert r.bob.nominal_parameters() == PHYSICS.nominal_parameters()
        identity = r.bob.identity
        assert identity is not None and identity.role == "bob"
        pairs = await aligned_pairs(r, 3, pulse_count=1 << 19)
        for pair in pairs:
            assert_clean(pair)
        starts = [a.first_pulse_index for a, _ in pairs]
        assert starts == sorted(set(starts))
        assert_identical_keys(pairs[-1], seed=11)
        for link in (r.alice, r.bob):
            status = link.status()
            assert status.state is LinkState.OPEN
            assert status.alarms == ()
            assert link.counters().crc_errors == 0
        bob_status = r.bob.status()
        assert bob_status.detections >= sum(b.detection_count for _, b in pairs)
        assert r.alice.status().pulses_sent >= 3 << 19


async def test_a_slow_consumer_never_stalls_the_devices(tmp_path: Path) -> None:
    # Post-processing takes time between blocks; the readers keep the devices flowing and drop
    # their oldest blocks instead, and the ends still pair blocks by first pulse index.
    async with rig(tmp_path, seed=8, read_timeout_s=0.5) as r:
        alice = BlockReader(r.alice, BLOCK, keep_blocks=2)
        bob = BlockReader(r.bob, BLOCK, keep_blocks=2)
        pairs: list[Pair] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(alice.run)
            await nursery.start(bob.run)
            while len(pairs) < 3:
                a = await alice.take()
                b = await bob.take(a.first_pulse_index) if a is not None else None
                if isinstance(a, EmissionRecords) and isinstance(b, DetectionRecords):
                    pairs.append((a, b))
                await trio.sleep(0.6)  # longer than the read timeout
            nursery.cancel_scope.cancel()
        for pair in pairs:
            assert_clean(pair)
        assert alice.dropped_blocks + bob.dropped_blocks > 0
        assert not alice.errors and not bob.errors  # no timeout, no loss while we slept


@pytest.mark.parametrize("dropped", ["alice", "bob"])
async def test_emulator_line_dropped_and_back_resumes_without_mixing_blocks(
    tmp_path: Path, dropped: str
) -> None:
    async with rig(tmp_path, seed=2) as r:
        before = await aligned_pairs(r, 2)
        device = r.alice_device if dropped == "alice" else r.bob_device
        link = r.alice if dropped == "alice" else r.bob
        gap_start = device.next_pulse_index
        device.drop_line(0.3)
        after = await aligned_pairs(r, 3)
        gap_end = device.next_pulse_index
        # The driver reported the loss, with the daemon still running and the status showing it.
        assert [role for role, _ in r.losses] == [dropped]
        lost_status = r.losses[0][1]
        assert lost_status.state is LinkState.FAILED
        assert "lost" in lost_status.alarms
        assert lost_status.last_error is not None and "lost" in lost_status.last_error
        assert link.status().state is LinkState.OPEN
        counters = link.counters()
        assert counters.reconnects == 1
        assert counters.gaps >= 1
        for pair in before + after:
            assert_clean(pair)
        last_before = before[-1][0].first_pulse_index + BLOCK
        assert last_before <= gap_start + 4 * BLOCK
        assert after[0][0].first_pulse_index >= last_before
        assert_identical_keys(after[-1], seed=12)
        assert gap_end > gap_start


async def test_noise_and_crc_errors_are_dropped_and_counted_with_no_wrong_key(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, seed=3) as r:
        for device in (r.alice_device, r.bob_device):
            device.inject_noise(0.02)
            device.corrupt_crc(0.02)
        pairs = await aligned_pairs(r, 4)
        for pair in pairs:
            assert_clean(pair)
        for link, device in ((r.alice, r.alice_device), (r.bob, r.bob_device)):
            counters = link.counters()
            dropped = counters.crc_errors + counters.framing_errors + counters.malformed_frames
            assert dropped > 0
            assert device.frames_corrupted > 0 and device.noise_bursts > 0
            assert counters.lost_frames > 0
            assert link.status().state is LinkState.OPEN
        # Lost frames leave gaps; their blocks are discarded (on one side or the other).
        total = sum(link.counters().discarded_blocks for link in (r.alice, r.bob))
        assert total > 0
        assert_identical_keys(pairs[-1], seed=13)


# ---- identification --------------------------------------------------------------------------


@asynccontextmanager
async def single_device(tmp_path: Path, role: str = "bob", **kwargs: object) -> AsyncIterator[str]:
    alice_fibre, bob_fibre = fibre_pair()
    device = DeviceEmulator(
        role,  # type: ignore[arg-type]
        PHYSICS,
        rng=np.random.default_rng(5),
        link_path=str(tmp_path / "tty"),
        **kwargs,  # type: ignore[arg-type]
    )
    async with alice_fibre, bob_fibre, trio.open_nursery() as nursery:
        path = await nursery.start(device.run, bob_fibre if role == "bob" else alice_fibre)
        yield path
        device.close()


async def test_wrong_protocol_version_is_a_clear_error_at_open(tmp_path: Path) -> None:
    async with single_device(tmp_path, protocol_version=2, firmware="fw-9") as path:
        link = SerialLink(link_config(path), "bob")
        with pytest.raises(BadDeviceData, match="protocol version 2") as info:
            await link.open()
        assert "fw-9" in str(info.value) and path in str(info.value)
        assert link.status().state is LinkState.FAILED
        assert "bad_device_data" in link.status().alarms


async def test_unknown_device_model_is_a_clear_error_at_open(tmp_path: Path) -> None:
    async with single_device(tmp_path, model="acme-qkd-3000") as path:
        link = SerialLink(link_config(path), "bob")
        with pytest.raises(BadDeviceData, match=r"unknown device.*'acme-qkd-3000'"):
            await link.open()


async def test_device_of_the_other_role_is_refused(tmp_path: Path) -> None:
    async with single_device(tmp_path, role="alice") as path:
        link = SerialLink(link_config(path), "bob")
        with pytest.raises(BadDeviceData, match="alice device"):
            await link.open()


async def test_missing_or_silent_device(tmp_path: Path) -> None:
    with pytest.raises(LinkLost, match="cannot open"):
        await SerialLink(link_config(str(tmp_path / "nothing")), "alice").open()
    master, slave = os.openpty()  # a tty on which nobody answers
    try:
        link = SerialLink(link_config(os.ttyname(slave), read_timeout_s=0.2), "alice")
        with pytest.raises(LinkTimeout, match="no reply to IDENTIFY"):
            await link.open()
        assert "timeout" in link.status().alarms
    finally:
        os.close(master)
        os.close(slave)


async def _ask(
    stream: trio.lowlevel.FdStream, decoder: FrameDecoder, message: Message, seq: int
) -> Message:
    await stream.send_all(encode_frame(message, seq))
    with trio.fail_after(5):
        while True:
            while (event := decoder.next_event()) is not None:
                if isinstance(event, Received) and getattr(event.message, "ack_seq", None) == seq:
                    return event.message
            decoder.receive_data(await stream.receive_some(4096))


async def test_emulator_configure_status_and_errors(tmp_path: Path) -> None:
    async with single_device(tmp_path) as path:
        stream = trio.lowlevel.FdStream(open_tty(path, 3_000_000))
        decoder = FrameDecoder()
        async with stream:
            settings = (0.6, 0.2, 0.001, 0.5, 0.3, 0.2, 0.7, 2e9)
            reply = await _ask(stream, decoder, Configure(values=settings), 1)
            assert isinstance(reply, Parameters)
            assert reply.values[:8] == settings
            assert reply.as_dict()["fiber_km"] == PHYSICS.fiber_km
            # mu_signal must exceed mu_decoy + mu_vacuum (Lim et al. 2014): refused, named.
            bad = await _ask(stream, decoder, Configure(values=(0.1, *settings[1:])), 2)
            assert isinstance(bad, DeviceError) and "mu_signal" in bad.text
            assert isinstance(await _ask(stream, decoder, Command(kind=MessageType.START), 3), Ack)
            busy = await _ask(stream, decoder, Configure(values=settings), 4)
            assert isinstance(busy, DeviceError) and busy.code == 3  # wrong_state
            status = await _ask(stream, decoder, Command(kind=MessageType.GET_STATUS), 5)
            assert isinstance(status, DeviceStatus) and status.running
            alien = await _ask(stream, decoder, Ack(ack_seq=0, command=1), 6)
            assert isinstance(alien, DeviceError) and alien.code == 1  # unknown_command


# ---- faults ----------------------------------------------------------------------------------


async def test_alarms_are_surfaced_in_status(tmp_path: Path) -> None:
    async with rig(tmp_path, seed=4) as r:
        r.bob_device.raise_alarm(AlarmCode.DETECTOR_TEMPERATURE, value=-20.0)
        r.alice_device.raise_alarm(AlarmCode.LASER_POWER, value=0.1)
        with trio.fail_after(10):
            while not (r.bob.active_alarms() and r.alice.active_alarms()):
                await aligned_pairs(r, 1)
        assert "detector_temperature" in r.bob.status().alarms
        assert r.bob.active_alarms() == {"detector_temperature"}
        assert r.alice.active_alarms() == {"laser_power"}
        r.bob_device.raise_alarm(AlarmCode.DETECTOR_TEMPERATURE, active=False)
        with trio.fail_after(10):
            while r.bob.active_alarms():
                await aligned_pairs(r, 1)
        assert "detector_temperature" in r.bob.status().alarms  # the history stays
        assert r.bob.status().state is LinkState.OPEN


async def test_stalled_device_times_out_then_resumes(tmp_path: Path) -> None:
    async with rig(tmp_path, seed=6, read_timeout_s=0.3) as r:
        await aligned_pairs(r, 1)
        r.bob_device.stall(0.8)

        async def keep_alice_reading() -> None:
            while True:
                with contextlib.suppress(LinkTimeout):  # Alice waits for Bob's stalled device
                    await r.alice.next_block(BLOCK)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alice_reading)
            with pytest.raises(LinkTimeout, match="no data"):
                for _ in range(3):  # what the pty still holds may finish a block or two
                    await r.bob.next_block(BLOCK)
            nursery.cancel_scope.cancel()
        assert "timeout" in r.bob.status().alarms
        pairs = await aligned_pairs(r, 2)
        # The rest of the stall may time out either end: Bob's device stops taking pulses from
        # the fibre while it stalls, so Alice's device waits too.
        for pair in pairs:
            assert_clean(pair)
        assert r.bob.status().state is LinkState.OPEN


# ---- configuration ---------------------------------------------------------------------------


def test_config_from_table() -> None:
    table = Table({"backend": "serial", "device_path": "/dev/ttyACM0", "baud_rate": 115200}, "link")
    assert table.string("backend") == "serial"
    config = SerialLinkConfig.from_table(table)
    assert config == SerialLinkConfig(device_path="/dev/ttyACM0", baud_rate=115200)
    bad: list[tuple[dict[str, object], str]] = [
        ({"device_path": "/dev/x", "baud_rate": 1234}, "link.baud_rate"),
        ({"device_path": "/dev/x", "read_timeout_s": 0}, "link.read_timeout_s"),
        ({"device_path": "/dev/x", "reconnect_interval_s": -1.0}, "link.reconnect_interval_s"),
        (
            {"device_path": "/dev/x", "expected_protocol_version": 0},
            "link.expected_protocol_version",
        ),
        ({"device_path": ""}, "link.device_path"),
        ({}, "link.device_path"),
        ({"device_path": "/dev/x", "baud": 9600}, "link.baud"),
    ]
    for data, key in bad:
        with pytest.raises(ConfigError) as info:
            SerialLinkConfig.from_table(Table(data, "link"))
        assert info.value.key == key, data


# ---- the emulator as a process ---------------------------------------------------------------


@pytest.mark.slow  # runs long
async def test_emulator_processes_over_tcp_fibre(tmp_path: Path) -> None:
    port = free_port()
    processes: dict[str, trio.Process] = {}

    async def start(role: str) -> str:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "qkdnode.link.emulator",
                "--role",
                role,
                "--link",
                str(tmp_path / role),
                "--fibre",
                f"127.0.0.1:{port}",
                "--seed",
                "7" if role == "alice" else "8",
                "--param",
                "fiber_km=0",
                "--param",
                "detector_efficiency=0.5",
                "--param",
                "p_key_basis=0.8",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        processes[role] = process
        assert process.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        assert line.startswith(f"device-emulator role={role} path=".encode())
        return str(tmp_path / role)

    try:
        alice_path = await start("alice")
        bob_path = await start("bob")
        r = Rig(
            alice_device=None,  # type: ignore[arg-type]
            bob_device=None,  # type: ignore[arg-type]
            alice=SerialLink(link_config(alice_path), "alice"),
            bob=SerialLink(link_config(bob_path), "bob"),
        )
        await r.alice.open()
        await r.bob.open()
        first = await aligned_pairs(r, 1)
        stdin = processes["bob"].stdin
        assert stdin is not None
        await stdin.send_all(b"drop 0.2\n")
        second = await aligned_pairs(r, 1)
        assert [role for role, _ in r.losses] == ["bob"]
        for pair in first + second:
            assert_clean(pair)
        assert second[0][0].first_pulse_index > first[0][0].first_pulse_index
        await r.alice.aclose()
        await r.bob.aclose()
    finally:
        for process in processes.values():
            process.terminate()
            await process.wait()
