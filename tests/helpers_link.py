"""Link test helpers: both ends over an in-process fibre, and detection counts by class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trio

from qkdnode.config.link import EveConfig, SimulatedLinkConfig
from qkdnode.link.eve import EveAttack, run_eve_proxy
from qkdnode.link.simulated import SimulatedAliceLink, SimulatedBobLink, memory_fibre
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords


async def run_blocks(
    config: SimulatedLinkConfig,
    *,
    blocks: int,
    pulse_count: int,
    seed: int,
    eve: EveConfig | None = None,
) -> list[tuple[EmissionRecords, DetectionRecords]]:
    """Both ends (and optionally Eve as a proxy) over memory fibres; records of each block."""
    seeds = np.random.SeedSequence(seed).spawn(3)
    alice_out, fibre_in = memory_fibre()
    bob_in = fibre_in
    results: list[tuple[EmissionRecords, DetectionRecords]] = []
    async with trio.open_nursery() as nursery:
        if eve is not None:
            eve_out, bob_in = memory_fibre()
            attack = EveAttack(eve, config.nominal_parameters(), np.random.default_rng(seeds[2]))
            nursery.start_soon(run_eve_proxy, attack, fibre_in, eve_out)
        alice = SimulatedAliceLink(config, fibre=alice_out, rng=np.random.default_rng(seeds[0]))
        bob = SimulatedBobLink(config, fibre=bob_in, rng=np.random.default_rng(seeds[1]))
        await alice.open()
        await bob.open()
        for _ in range(blocks):
            sent: list[EmissionRecords] = []

            async def emit(sent: list[EmissionRecords] = sent) -> None:
                records = await alice.next_block(pulse_count)
                assert isinstance(records, EmissionRecords)  # dense records by default
                sent.append(records)

            async with trio.open_nursery() as block:
                block.start_soon(emit)
                received = await bob.next_block(pulse_count)
            results.append((sent[0], received))
        await alice.aclose()
        await bob.aclose()
    return results


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassCounts:
    """Counts of one intensity class: pulses, detections, sifted detections, sifted errors."""

    pulses: int
    detections: int
    sifted: int
    errors: int
    key_sifted: int  # both in the key basis (Z)
    key_errors: int
    test_sifted: int  # both in the test basis (X)
    test_errors: int


def count_by_class(
    pairs: list[tuple[EmissionRecords, DetectionRecords]],
) -> list[ClassCounts]:
    totals = np.zeros((3, 8), dtype=np.int64)
    for alice, bob in pairs:
        assert alice.first_pulse_index == bob.first_pulse_index
        offset = bob.pulse_index - alice.first_pulse_index
        intensity = alice.intensity[offset]
        sifted = alice.basis[offset] == bob.basis
        error = sifted & (alice.bit[offset] != bob.bit)
        key = sifted & (bob.basis == 0)
        test = sifted & (bob.basis == 1)
        for cls in range(3):
            mine = intensity == cls
            totals[cls] += [
                np.count_nonzero(alice.intensity == cls),
                np.count_nonzero(mine),
                np.count_nonzero(mine & sifted),
                np.count_nonzero(mine & error),
                np.count_nonzero(mine & key),
                np.count_nonzero(mine & key & error),
                np.count_nonzero(mine & test),
                np.count_nonzero(mine & test & error),
            ]
    return [
        ClassCounts(
            pulses=int(row[0]),
            detections=int(row[1]),
            sifted=int(row[2]),
            errors=int(row[3]),
            key_sifted=int(row[4]),
            key_errors=int(row[5]),
            test_sifted=int(row[6]),
            test_errors=int(row[7]),
        )
        for row in totals
    ]
