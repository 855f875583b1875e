"""End to end with the serial backend: two `qkdnode run` daemons, each driving a device emulator
(`qkdnode device-emulator`) on a real pseudo-terminal; the emulators share a fibre on loopback."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkdnode.demo.progress import LogFollower, Progress
from qkdnode.demo.run import compare_stores, free_port, prepare_workdir, start_node, stop_nodes

pytestmark = pytest.mark.slow  # starts daemon processes

EMULATOR_PARAMS = ("fiber_km=0", "detector_efficiency=0.5", "p_key_basis=0.8")


def _start_emulator(
    workdir: Path, role: str, fibre_port: int, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    params = [item for p in (*EMULATOR_PARAMS, *extra) for item in ("--param", p)]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qkdnode",
            "device-emulator",
            "--role",
            role,
            "--link",
            str(workdir / f"{role}.tty"),
            "--fibre",
            f"127.0.0.1:{fibre_port}",
            *params,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()  # "device-emulator role=... path=..."
    assert line.startswith(f"device-emulator role={role}"), line
    return process


def _use_serial_backend(config: Path, device: Path) -> None:
    text = config.read_text()
    link = (
        "[link]\n"
        'backend = "serial"\n'
        f'device_path = "{device}"\n'
        "read_timeout_s = 5.0\n"
        "reconnect_interval_s = 0.1\n\n"
    )
    text = re.sub(r"\[link\]\n.*?\n(?=\[postprocess\])", link, text, flags=re.S)
    # blocks of 2^21 pulses: the single-photon bound gives key from ~10^5 sifted bits
    text = re.sub(r"block_pulses = \d+", "block_pulses = 2097152", text)
    assert 'security_model = "decoy"\n' in text
    text = text.replace(
        'security_model = "decoy"\n', 'security_model = "single_photon"\nqber_threshold = 0.05\n'
    )
    config.write_text(text)


def test_two_daemons_with_serial_devices_distil_identical_keys(tmp_path: Path) -> None:
    workdir = tmp_path / "serial"
    workdir.mkdir(mode=0o700)
    layout = prepare_workdir(workdir, distance_km=25.0, block_pulses=2_097_152)
    fibre_port = free_port()
    emulators = [_start_emulator(workdir, "alice", fibre_port)]
    emulators.append(_start_emulator(workdir, "bob", fibre_port))
    for node in ("alice", "bob"):
        _use_serial_backend(layout.config(node), workdir / f"{node}.tty")
    nodes = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
    try:
        progress, follower = Progress(), LogFollower(layout.log("alice"))
        deadline = time.monotonic() + 120
        while progress.committed < 3:
            for event in follower.new_events():
                progress.feed(event)
            for name, process in nodes.items():
                if process.poll() is not None:
                    pytest.fail(
                        f"{name} exited: {(workdir / f'{name}.stderr').read_text()[-2000:]}"
                    )
            if time.monotonic() > deadline:
                pytest.fail(f"timed out: {progress}")
            time.sleep(0.1)
        codes = stop_nodes([nodes["alice"], nodes["bob"]])
    finally:
        stop_nodes(list(nodes.values()))
        for emulator in emulators:
            emulator.terminate()
            emulator.communicate(timeout=10)  # reaps it and closes its pipes
    assert codes == [0, 0]
    match, compared = compare_stores(layout, exact=True)
    assert match and compared > 0


def test_a_device_of_two_intensities_is_refused_under_the_two_decoy_model(
    tmp_path: Path,
) -> None:
    # the device's parameters are known once its link opens: the daemon checks them then
    workdir = tmp_path / "serial"
    workdir.mkdir(mode=0o700)
    layout = prepare_workdir(workdir, distance_km=25.0, block_pulses=2_097_152)
    two_intensities = ("p_signal=0.5", "p_decoy=0.5", "p_vacuum=0")
    emulator = _start_emulator(workdir, "alice", free_port(), two_intensities)
    try:
        config = layout.config("alice")
        _use_serial_backend(config, workdir / "alice.tty")
        text = config.read_text()
        config.write_text(
            text.replace('security_model = "single_photon"', 'security_model = "decoy"')
        )
        result = subprocess.run(
            [sys.executable, "-m", "qkdnode", "run", "--config", str(config)],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        emulator.terminate()
        emulator.communicate(timeout=10)
    assert result.returncode == 2, result.stderr
    assert "configuration error: link.p_vacuum (as the serial link reports it)" in result.stderr
    assert 'needs security_model = "one_decoy"' in result.stderr
