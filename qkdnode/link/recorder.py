"""Recording a link for the replay backend: both ends' blocks saved to a directory
(``qkdnode.link.recording``), one block in memory at a time.

``record_link`` takes any pair of ``QuantumLink`` ends (two device drivers on one host, or the
simulated ends); ``record_simulated`` runs the simulated link's own ends over an in-process
fibre, so a seed gives exactly the blocks the simulator gives with the same Generators.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio

from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.errors import LinkError
from qkdnode.link.interface import QuantumLink
from qkdnode.link.recording import (
    Manifest,
    RecordedBlock,
    block_file,
    pack_block,
    write_block_file,
    write_manifest,
)
from qkdnode.postprocess.records import AliceRecords, DetectionRecords


def simulator_generators(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Alice's and Bob's Generators of a recording made with ``seed``."""
    alice, bob = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(alice), np.random.default_rng(bob)


async def record_link(
    alice: QuantumLink,
    bob: QuantumLink,
    *,
    blocks: int,
    pulse_count: int,
    out: Path,
    source: str,
    simulator_seed: int | None = None,
) -> Manifest:
    """Take ``blocks`` blocks of ``pulse_count`` pulses from both ends and save them in ``out``
    (which must not exist, or be empty). The manifest is written last; the ends are closed.

    Raises ``FileExistsError`` for a non-empty ``out``, ``LinkError`` when an end fails or the
    two ends disagree on a block's pulses."""
    if blocks < 1:
        raise ValueError("record at least one block")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: a recording is never written over another")
    out.mkdir(parents=True, exist_ok=True)
    recorded: list[RecordedBlock] = []
    try:
        await alice.open()
        await bob.open()
        for number in range(blocks):
            emissions, detections = await _both_ends(alice, bob, pulse_count)
            recorded.append(
                await trio.to_thread.run_sync(_save, out, number, emissions, detections)
            )
    finally:
        with trio.CancelScope(shield=True):
            await alice.aclose()
            await bob.aclose()
    manifest = Manifest(
        source=source,
        pulses_per_block=pulse_count,
        link_parameters=alice.nominal_parameters(),
        blocks=tuple(recorded),
        simulator_seed=simulator_seed,
    )
    write_manifest(out, manifest)
    return manifest


async def _both_ends(
    alice: QuantumLink, bob: QuantumLink, pulse_count: int
) -> tuple[AliceRecords, DetectionRecords]:
    taken: dict[str, AliceRecords | DetectionRecords] = {}

    async def take(name: str, end: QuantumLink) -> None:
        taken[name] = await end.next_block(pulse_count)

    async with trio.open_nursery() as nursery:  # Alice's source waits for Bob's receiver
        nursery.start_soon(take, "alice", alice)
        nursery.start_soon(take, "bob", bob)
    emissions, detections = taken["alice"], taken["bob"]
    if isinstance(emissions, DetectionRecords) or not isinstance(detections, DetectionRecords):
        raise LinkError("the ends gave the wrong side's records")
    return emissions, detections


def _save(
    out: Path, number: int, emissions: AliceRecords, detections: DetectionRecords
) -> RecordedBlock:
    try:
        offsets, alice_states, bob_states = pack_block(emissions, detections)
    except ValueError as exc:
        raise LinkError(f"block {number}: {exc}") from None
    return RecordedBlock(
        first_pulse_index=detections.first_pulse_index,
        detections=detections.detection_count,
        alice=write_block_file(out, block_file("alice", number), offsets, alice_states),
        bob=write_block_file(out, block_file("bob", number), offsets, bob_states),
    )


async def record_simulated(
    config: SimulatedLinkConfig, *, blocks: int, pulse_count: int, out: Path, seed: int
) -> Manifest:
    """Record the simulated link (``config``'s physics) with Generators from ``seed``."""
    from qkdnode.link.simulated import SimulatedAliceLink, SimulatedBobLink, memory_fibre

    alice_rng, bob_rng = simulator_generators(seed)
    send, receive = memory_fibre()
    return await record_link(
        SimulatedAliceLink(config, fibre=send, rng=alice_rng),
        SimulatedBobLink(config, fibre=receive, rng=bob_rng),
        blocks=blocks,
        pulse_count=pulse_count,
        out=out,
        source="simulated",
        simulator_seed=seed,
    )
