"""The replay backend: its config, the recording format (round trip against the simulator,
corrupt and mismatched files named), and the block source (sequence, loop, end, errors)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import trio

from qkdnode.config.link import (
    REPLAY_STORE_MARKER,
    ReplayLinkConfig,
    SimulatedLinkConfig,
    read_link,
)
from qkdnode.config.table import Table
from qkdnode.errors import BadDeviceData, ConfigError, LinkError
from qkdnode.link.interface import LinkState, QuantumLink
from qkdnode.link.recorder import record_simulated
from qkdnode.link.recording import (
    MANIFEST,
    RecordingError,
    block_file,
    read_block_file,
    read_manifest,
)
from qkdnode.link.replay import ReplayBlocks, ReplayLink, open_recording
from qkdnode.postprocess.records import DetectedEmissionRecords, DetectionRecords
from tests.helpers_link import run_blocks

# short fibre, efficient detector: many detections in small blocks
LINK = SimulatedLinkConfig(fiber_km=5.0, detector_efficiency=0.5, chunk_pulses=1 << 14)
PULSES = 50_000
SEED = 20261204


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replay") / "rec"
    trio.run(lambda: record_simulated(LINK, blocks=3, pulse_count=PULSES, out=out, seed=SEED))
    return out


@pytest.fixture
def copy(recording: Path, tmp_path: Path) -> Path:
    """A copy of the recording that a test may damage."""
    return Path(shutil.copytree(recording, tmp_path / "rec"))


# ---- config ----------------------------------------------------------------------------------


def test_replay_section_reads_with_defaults_and_relative_directory(tmp_path: Path) -> None:
    backend, config, _eve = read_link(
        Table({"backend": "replay", "directory": "rec"}, "link"), tmp_path
    )
    assert backend == "replay" and isinstance(config, ReplayLinkConfig)
    assert config.directory == tmp_path / "rec"
    assert config.loop is False and config.read_ahead_blocks == 1


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({}, "link.directory", "required"),
        ({"directory": ""}, "link.directory", "non-empty"),
        ({"directory": 5}, "link.directory", "a string"),
        ({"directory": "r", "loop": "yes"}, "link.loop", "true or false"),
        ({"directory": "r", "read_ahead_blocks": 9}, "link.read_ahead_blocks", "<= 8"),
        ({"directory": "r", "read_ahead_blocks": -1}, "link.read_ahead_blocks", ">= 0"),
        ({"directory": "r", "fiber_km": 25.0}, "link.fiber_km", "unknown"),
        ({"directory": "r", "eve": {"intercept_resend_fraction": 0.1}}, "link.eve", "replay"),
    ],
)
def test_bad_replay_settings_name_the_dotted_key(
    data: dict[str, object], key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        read_link(Table({"backend": "replay"} | data, "link"), Path("/etc"))
    assert info.value.key == key
    assert expected in str(info.value), str(info.value)


def test_direct_construction_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"link\.read_ahead_blocks"):
        ReplayLinkConfig(directory=Path("r"), read_ahead_blocks=100)


def _example_config(tmp_path: Path) -> Path:
    """config/alice.toml with the files it names in tmp_path (as tests/test_config.py)."""
    from qkdnode.ops import issuance

    repo = Path(__file__).resolve().parent.parent
    pki = tmp_path / "pki"
    pki.mkdir()
    for ca in ("node-ca", "sae-ca"):
        issuance.init_ca(tmp_path / ca)
        shutil.copy(tmp_path / ca / issuance.CA_CERT, pki / f"{ca}.pem")
        issuance.issue_crl(tmp_path / ca, out=pki / f"{ca}.crl.pem")
    issuance.issue_certificate(tmp_path / "node-ca", "alice", pki / "alice", purpose="node")
    text = (repo / "config" / "alice.toml").read_text()
    text = text.replace("/etc/qkdnode/pki/", f"{tmp_path}/pki/")
    text = text.replace("/var/lib/qkdnode/", f"{tmp_path}/state/")
    path = tmp_path / "alice.toml"
    path.write_text(text)
    return path


def test_replay_refuses_delivery_and_a_replay_store_never_serves_keys(tmp_path: Path) -> None:
    from qkdnode.config import load_config

    path = _example_config(tmp_path)
    text = path.read_text()
    assert 'backend = "simulated"' in text
    load_config(path)  # the example as it is loads
    link = '[link]\nbackend = "replay"\ndirectory = "rec"\n\n'
    replay = re.sub(r"\[link\]\n.*?\n(?=\[postprocess\])", link, text, flags=re.S)
    path.write_text(replay)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "delivery" and "not secret" in str(info.value)
    assert str(path) in str(info.value)
    # without [delivery] it loads
    start = replay.index("[delivery]")
    end = replay.index("\n[", start + 1)
    path.write_text(replay[:start] + replay[end + 1 :])
    config = load_config(path)
    assert config.link_backend == "replay" and config.delivery is None
    # the store such a node filled is refused to any node that delivers keys
    path.write_text(text)
    config = load_config(path)
    config.store.directory.mkdir(parents=True, exist_ok=True)
    (config.store.directory / REPLAY_STORE_MARKER).write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "store.directory" and REPLAY_STORE_MARKER in str(info.value)


# ---- the format ------------------------------------------------------------------------------


async def test_record_then_replay_gives_the_simulators_blocks(recording: Path) -> None:
    expected = await run_blocks(LINK, blocks=3, pulse_count=PULSES, seed=SEED)
    manifest = read_manifest(recording)
    assert manifest.pulses_per_block == PULSES and manifest.simulator_seed == SEED
    assert manifest.link_parameters == LINK.nominal_parameters()
    assert len(manifest.blocks) == 3
    config = ReplayLinkConfig(directory=recording)
    async with trio.open_nursery() as nursery:
        alice = ReplayBlocks(ReplayLink(config, manifest, "alice"), PULSES, nursery)
        bob = ReplayBlocks(ReplayLink(config, manifest, "bob"), PULSES, nursery)
        for emitted, detected in expected:
            assert detected.detection_count > 1000
            replayed_alice = await alice.alice_block()
            await bob.bob_prefetch()
            replayed_bob = await bob.bob_block(replayed_alice.first_pulse_index)
            assert replayed_bob is not None
            assert replayed_alice.first_pulse_index == emitted.first_pulse_index
            for name in ("first_pulse_index", "pulse_count"):
                assert getattr(replayed_bob, name) == getattr(detected, name)
            for name in ("pulse_index", "basis", "bit"):
                assert np.array_equal(getattr(replayed_bob, name), getattr(detected, name))
            # Alice's records of every detected pulse (the others are not recorded)
            at = detected.pulse_index - detected.first_pulse_index
            assert np.array_equal(replayed_alice.offset, at)
            for mine, theirs in zip(
                replayed_alice.records_at(at), emitted.records_at(at), strict=True
            ):
                assert np.array_equal(mine, theirs)
    assert alice.link.status().blocks == bob.link.status().blocks == 3
    assert bob.link.status().detections == sum(d.detection_count for _, d in expected)


def _block(directory: Path, number: int, side: str = "alice") -> Path:
    return directory / block_file("alice" if side == "alice" else "bob", number)


def _rewrite(directory: Path, number: int, side: str, data: bytes) -> None:
    """Replace a block file and make the manifest vouch for it (size and SHA-256)."""
    _block(directory, number, side).write_bytes(data)
    manifest = json.loads((directory / MANIFEST).read_text())
    entry = manifest["blocks"][number][side]
    entry["size_bytes"] = len(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _damage_truncate(directory: Path) -> str:
    path = _block(directory, 1)
    path.write_bytes(path.read_bytes()[:-100])
    return "truncated"


def _damage_flip(directory: Path) -> str:
    path = _block(directory, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "SHA-256 does not match"


def _damage_swap(directory: Path) -> str:
    # another block's file of the same size: the checksum catches it
    data = _block(directory, 0).read_bytes()
    size = _block(directory, 1).stat().st_size
    _block(directory, 1).write_bytes((data + bytes(size))[:size])
    return "SHA-256 does not match"


def _damage_missing(directory: Path) -> str:
    _block(directory, 1).unlink()
    return "cannot read it"


def _damage_not_npz(directory: Path) -> str:
    _rewrite(directory, 1, "alice", b"\x00" * 1000)
    return "not a readable .npz"


def _damage_names(directory: Path) -> str:
    count = read_manifest(directory).blocks[1].detections
    offsets = np.arange(count, dtype=np.uint32)
    _rewrite(directory, 1, "alice", _npz(offset=offsets, bits=np.zeros(count, np.uint8)))
    return "arrays ['bits', 'offset']"


def _damage_dtype(directory: Path) -> str:
    count = read_manifest(directory).blocks[1].detections
    offsets = np.arange(count, dtype=np.int64)
    _rewrite(directory, 1, "alice", _npz(offset=offsets, state=np.zeros(count, np.uint8)))
    return "array 'offset' is int64"


def _damage_order(directory: Path) -> str:
    count = read_manifest(directory).blocks[1].detections
    offsets = np.arange(count, dtype=np.uint32)
    offsets[[5, 6]] = offsets[[6, 5]]
    _rewrite(directory, 1, "alice", _npz(offset=offsets, state=np.zeros(count, np.uint8)))
    return "not strictly increasing"


def _damage_range(directory: Path) -> str:
    count = read_manifest(directory).blocks[1].detections
    offsets = np.arange(count, dtype=np.uint32)
    states = np.zeros(count, np.uint8)
    states[3] = 3 << 2  # intensity class 3 does not exist
    _rewrite(directory, 1, "alice", _npz(offset=offsets, state=states))
    return "out of range"


DAMAGES = [
    _damage_truncate,
    _damage_flip,
    _damage_swap,
    _damage_missing,
    _damage_not_npz,
    _damage_names,
    _damage_dtype,
    _damage_order,
    _damage_range,
]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.removeprefix("_damage_"))
def test_a_damaged_block_file_is_bad_device_data_naming_file_and_fault(
    copy: Path, damage: object
) -> None:
    assert callable(damage)
    expected = damage(copy)
    manifest = read_manifest(copy)
    read_block_file(copy, manifest, 0, "alice")  # the other blocks still read
    with pytest.raises(BadDeviceData) as info:
        read_block_file(copy, manifest, 1, "alice")
    message = str(info.value)
    assert "alice/block-000001.npz" in message and str(copy) in message
    assert expected in message, message


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m.update(version=2), "format version 2"),
        (lambda m: m.update(format="npz"), "'format' is not"),
        (lambda m: m.update(block_count=7), "'block_count'"),
        (lambda m: m["link_parameters"].pop("mu_decoy"), "missing 'mu_decoy'"),
        (lambda m: m["link_parameters"].update(mu_decoy="0.1"), "'mu_decoy' has the wrong type"),
        (lambda m: m["link_parameters"].update(colour=1), "unknown entries ['colour']"),
        (lambda m: m["blocks"][1]["alice"].update(file="../x.npz"), "blocks[1]: alice: file"),
        (lambda m: m["blocks"][2]["bob"].update(sha256="00"), "blocks[2]: bob: 'sha256'"),
        (lambda m: m["blocks"][0].update(detections=-1), "blocks[0]: 'detections'"),
        (lambda m: m.update(pulses_per_block=True), "'pulses_per_block' has the wrong type"),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_entry(
    copy: Path, edit: object, expected: str
) -> None:
    assert callable(edit)
    manifest = json.loads((copy / MANIFEST).read_text())
    edit(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RecordingError) as info:
        read_manifest(copy)
    assert str(copy / MANIFEST) in str(info.value) and expected in str(info.value), info.value


def test_a_missing_or_garbled_manifest_and_a_wrong_block_size_stop_the_start(copy: Path) -> None:
    config = ReplayLinkConfig(directory=copy)
    with pytest.raises(ConfigError) as info:
        open_recording(config, block_pulses=PULSES + 1)
    assert info.value.key == "postprocess.block_pulses" and str(PULSES) in str(info.value)
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match=r"link\.directory.*cannot read it as JSON"):
        open_recording(config, block_pulses=PULSES)
    (copy / MANIFEST).unlink()
    with pytest.raises(ConfigError, match="not a recording directory"):
        open_recording(config, block_pulses=PULSES)


# ---- the block source ------------------------------------------------------------------------


def _pair(
    directory: Path, nursery: trio.Nursery, *, loop: bool = False, read_ahead: int = 1
) -> tuple[ReplayBlocks, ReplayBlocks]:
    config = ReplayLinkConfig(directory=directory, loop=loop, read_ahead_blocks=read_ahead)
    manifest = open_recording(config, block_pulses=PULSES)
    return (
        ReplayBlocks(ReplayLink(config, manifest, "alice"), PULSES, nursery),
        ReplayBlocks(ReplayLink(config, manifest, "bob"), PULSES, nursery),
    )


async def test_loop_repeats_the_recording_at_new_pulse_indices(recording: Path) -> None:
    async with trio.open_nursery() as nursery:
        alice, bob = _pair(recording, nursery, loop=True, read_ahead=2)
        firsts = []
        blocks: list[DetectionRecords] = []
        for _ in range(7):
            records = await alice.alice_block()
            firsts.append(records.first_pulse_index)
            await bob.bob_prefetch()
            detected = await bob.bob_block(records.first_pulse_index)
            assert detected is not None
            blocks.append(detected)
        assert firsts == [i * PULSES for i in range(7)]
        # block 3 is block 0 again, shifted by three blocks of pulses
        assert np.array_equal(blocks[3].pulse_index - 3 * PULSES, blocks[0].pulse_index)
        assert np.array_equal(blocks[6].bit, blocks[0].bit)
        assert not np.array_equal(blocks[1].bit[:100], blocks[0].bit[:100])


async def test_bob_takes_the_block_alice_announces_even_out_of_step(recording: Path) -> None:
    async with trio.open_nursery() as nursery:
        alice, bob = _pair(recording, nursery)
        await alice.alice_block()
        second = await alice.alice_block()
        await bob.bob_prefetch()  # Bob expects block 0 but Alice announces block 1
        detected = await bob.bob_block(second.first_pulse_index)
        assert detected is not None and detected.first_pulse_index == PULSES
        assert await bob.bob_block(PULSES + 7) is None  # not a block start
        assert await bob.bob_block(3 * PULSES) is None  # past the end, no loop


async def test_the_end_of_the_recording_stops_alice_cleanly(recording: Path) -> None:
    async with trio.open_nursery() as nursery:
        alice, _bob = _pair(recording, nursery, read_ahead=0)
        for _ in range(3):
            await alice.alice_block()
        with trio.move_on_after(0.2) as waited:
            await alice.alice_block()
        assert waited.cancelled_caught
        status = alice.link.status()
        assert status.blocks == 3 and "recording_ended" in status.alarms
        assert status.state is LinkState.CLOSED
        await alice.reset()  # a new session does not bring the recording back
        assert alice.link.status().state is LinkState.CLOSED


async def test_a_corrupt_block_is_a_link_error_and_the_next_block_carries_on(copy: Path) -> None:
    _damage_flip(copy)
    async with trio.open_nursery() as nursery:
        alice, _bob = _pair(copy, nursery)
        first = await alice.alice_block()
        assert first.first_pulse_index == 0
        with pytest.raises(BadDeviceData, match=r"alice/block-000001\.npz"):
            await alice.alice_block()
        after = await alice.alice_block()  # the next session goes on with block 2
        assert after.first_pulse_index == 2 * PULSES
        status = alice.link.status()
        assert "bad_device_data" in status.alarms and status.last_error is not None


async def test_replay_link_conforms_to_the_link_interface(recording: Path) -> None:
    config = ReplayLinkConfig(directory=recording)
    link = ReplayLink(config, read_manifest(recording), "bob")
    assert isinstance(link, QuantumLink)
    assert link.nominal_parameters() == LINK.nominal_parameters()
    with pytest.raises(LinkError, match="not open"):
        await link.next_block(PULSES)
    await link.open()
    for number in range(3):
        records = await link.next_block(PULSES)
        assert isinstance(records, DetectionRecords)
        assert records.first_pulse_index == number * PULSES
    assert link.status().pulses_received == 3 * PULSES
    with pytest.raises(LinkError, match="ended after 3 blocks"):
        await link.next_block(PULSES)
    alice = ReplayLink(config, read_manifest(recording), "alice")
    await alice.open()
    assert isinstance(await alice.next_block(PULSES), DetectedEmissionRecords)
    await alice.aclose()
    assert alice.status().state is LinkState.CLOSED and alice.status().pulses_sent == PULSES


def test_the_record_command_refuses_other_backends_and_a_used_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qkdnode.cli import main

    path = _example_config(tmp_path)
    text = path.read_text().replace("block_pulses = 40000000", "block_pulses = 20000", 1)
    path.write_text(text)
    out = tmp_path / "rec"
    assert main(["link", "record", "--config", str(path), "--blocks", "2", "--out", str(out)]) == 0
    assert "recorded 2 blocks of 20000 pulses" in capsys.readouterr().out
    assert read_manifest(out).pulses_per_block == 20000
    assert main(["link", "record", "--config", str(path), "--blocks", "1", "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    link = '[link]\nbackend = "replay"\ndirectory = "rec"\n\n'
    replay = re.sub(r"\[link\]\n.*?\n(?=\[postprocess\])", link, text, flags=re.S)
    start = replay.index("[delivery]")
    path.write_text(replay[:start] + replay[replay.index("\n[", start + 1) + 1 :])
    assert main(["link", "record", "--config", str(path), "--blocks", "1", "--out", "x"]) == 2
    assert "link.backend" in capsys.readouterr().err
