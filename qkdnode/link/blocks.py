"""The quantum link as the node sees it: block by block, built from the config.

``open_block_source(config)`` builds the configured backend and runs whatever it needs in the
background (a serial device's reader, Eve's fibre proxy, a replay's reads ahead) in a nursery
of its own, for as long as the ``async with`` lasts. The node takes blocks through the
``BlockSource`` it yields: Alice takes a block and announces its first pulse index in the
channel block; Bob takes the block with that index, or ``None`` when his side does not have
those pulses (the block is then aborted on both sides).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import numpy as np
import structlog
import trio

from qkdnode.config.link import (
    REPLAY_STORE_MARKER,
    ReplayLinkConfig,
    SerialLinkConfig,
    SimulatedLinkConfig,
)
from qkdnode.errors import LinkError
from qkdnode.link.interface import QuantumLink
from qkdnode.postprocess.records import AliceRecords, DetectionRecords

if TYPE_CHECKING:
    from qkdnode.config import EveConfig, NodeConfig
    from qkdnode.link.replay import ReplayBlocks
    from qkdnode.link.serial import SerialLink

log = structlog.get_logger("qkdnode.link")


class BlockSource(Protocol):
    """The link seen block by block."""

    @property
    def link(self) -> QuantumLink: ...

    async def reset(self) -> None:
        """A new session starts."""

    async def alice_block(self) -> AliceRecords: ...

    async def bob_prefetch(self) -> None:
        """Bob, as soon as a block opens (before Alice's announcement arrives)."""

    async def bob_block(self, first_pulse_index: int) -> DetectionRecords | None: ...


class SimulatedBlocks:
    """The simulated link: Alice's source emits a block when asked, over a fibre connection that
    is renewed at every session (so no pulses of a broken session's block can be taken for the
    next one). Bob must read the fibre before Alice's announcement, or her source would wait.

    Bob reads one block per block opened, in order, and keeps what he read by first pulse index
    until Alice announces it: with several blocks open he may read ahead of her announcements.
    """

    def __init__(self, link: QuantumLink, pulse_count: int) -> None:
        self._link = link
        self._pulse_count = pulse_count
        self._open = False
        self._prefetched: dict[int, DetectionRecords] = {}

    @property
    def link(self) -> QuantumLink:
        return self._link

    async def _records(self) -> AliceRecords | DetectionRecords:
        if not self._open:
            await self._link.open()
            self._open = True
            log.info("link.opened", backend="simulated")
        try:
            return await self._link.next_block(self._pulse_count)
        except LinkError as exc:
            log.warning("link.failed", error=str(exc), error_type=type(exc).__name__)
            await self.reset()
            raise

    async def reset(self) -> None:
        self._prefetched.clear()
        if self._open:
            self._open = False
            with trio.CancelScope(shield=True):
                await self._link.aclose()

    async def alice_block(self) -> AliceRecords:
        records = await self._records()
        if isinstance(records, DetectionRecords):
            raise LinkError("the link gave Bob's records to Alice")
        return records

    async def bob_prefetch(self) -> None:
        records = await self._records()
        if not isinstance(records, DetectionRecords):
            raise LinkError("the link gave Alice's records to Bob")
        self._prefetched[records.first_pulse_index] = records

    async def bob_block(self, first_pulse_index: int) -> DetectionRecords | None:
        # Alice announces blocks in pulse order: what lies before this one is never asked for
        for index in [i for i in self._prefetched if i < first_pulse_index]:
            del self._prefetched[index]
        return self._prefetched.pop(first_pulse_index, None)


class SerialBlocks:
    """A serial device: read continuously for the daemon's life (a device must never wait for
    its host), blocks paired by pulse index; the driver reconnects by itself after a gap."""

    def __init__(self, link: SerialLink, pulse_count: int) -> None:
        from qkdnode.link.serial import BlockReader

        self._link = link
        self._reader = BlockReader(link, pulse_count)

    @property
    def link(self) -> QuantumLink:
        return self._link

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._link.open()
        log.info("link.opened", backend="serial", device=str(self._link.identity))
        await self._reader.run(task_status=task_status)

    async def reset(self) -> None:
        """Blocks are paired by pulse index: nothing to forget between sessions."""

    async def alice_block(self) -> AliceRecords:
        records = await self._reader.take()
        if records is None or isinstance(records, DetectionRecords):
            raise LinkError("the device gave Bob's records to Alice")
        return records

    async def bob_prefetch(self) -> None:
        """The reader runs continuously: nothing to start."""

    async def bob_block(self, first_pulse_index: int) -> DetectionRecords | None:
        records = await self._reader.take(first_pulse_index)
        if records is not None and not isinstance(records, DetectionRecords):
            raise LinkError("the device gave Alice's records to Bob")
        return records


@asynccontextmanager
async def open_block_source(config: NodeConfig) -> AsyncIterator[BlockSource]:
    """The configured backend as a ``BlockSource``; its background tasks live in here."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
    pulses = config.postprocess.block_pulses
    source: SimulatedBlocks | SerialBlocks | ReplayBlocks | None = None
    try:
        async with trio.open_nursery() as nursery:
            if isinstance(config.link, SimulatedLinkConfig):
                link = _simulated_link(config, config.link, rng, nursery)
                source = SimulatedBlocks(link, pulses)
            elif isinstance(config.link, ReplayLinkConfig):
                source = await _replay_blocks(config, config.link, nursery)
            else:
                from qkdnode.link.serial import SerialLink

                assert isinstance(config.link, SerialLinkConfig)
                serial = SerialBlocks(SerialLink(config.link, role=config.node.role), pulses)
                source = serial
                await nursery.start(serial.run)
            try:
                yield source
            finally:
                # the background tasks stop before the link closes under them
                nursery.cancel_scope.cancel()
    finally:
        if source is not None:
            with trio.CancelScope(shield=True):
                await source.link.aclose()


async def _replay_blocks(
    config: NodeConfig, link: ReplayLinkConfig, nursery: trio.Nursery
) -> ReplayBlocks:
    """The replayed recording; its store is marked, since its keys are not secret."""
    from qkdnode.link.replay import ReplayBlocks, ReplayLink, open_recording

    manifest = open_recording(link, block_pulses=config.postprocess.block_pulses)
    marker = config.store.directory / REPLAY_STORE_MARKER
    marker.write_text(
        "This store holds keys distilled from a replayed link recording. They are not secret:\n"
        "the recording's files hold both sides' raw bits. qkdnode refuses [delivery] with it.\n"
    )
    log.warning(
        "link.replay_keys_not_secret",
        directory=str(link.directory),
        blocks=len(manifest.blocks),
        loop=link.loop,
        detail="test only: keys from a recording are known to whoever holds its files"
        + (" and repeat with every loop" if link.loop else "")
        + "; no key delivery, and this store must never serve keys",
    )
    replay = ReplayLink(link, manifest, config.node.role)
    await replay.open()
    log.info("link.opened", backend="replay", source=manifest.source, loop=link.loop)
    return ReplayBlocks(replay, config.postprocess.block_pulses, nursery)


def _simulated_link(
    config: NodeConfig, link: SimulatedLinkConfig, rng: np.random.Generator, nursery: trio.Nursery
) -> QuantumLink:
    """The simulated end; with ``[link.eve]`` active, Bob's fibre runs through Eve."""
    from qkdnode.link.simulated import SimulatedBobLink, simulated_link_from_config

    eve = config.eve
    if config.node.role == "bob" and eve is not None and _eve_active(eve):
        return SimulatedBobLink(link, fibre=_eve_opener(config, link, rng, nursery), rng=rng)
    return simulated_link_from_config(config.node.role, link, rng)


def _eve_active(eve: EveConfig) -> bool:
    return eve.intercept_resend_fraction > 0 or eve.photon_number_splitting


def _eve_opener(
    config: NodeConfig, link: SimulatedLinkConfig, rng: np.random.Generator, nursery: trio.Nursery
) -> Callable[[], Awaitable[trio.abc.ReceiveStream]]:
    """Bob's fibre opener with Eve in between: TCP from Alice -> Eve's attack -> Bob."""
    from qkdnode.link.eve import EveAttack, run_eve_proxy
    from qkdnode.link.simulated import memory_fibre, tcp_fibre_connector

    connect = tcp_fibre_connector(link.fibre_host, link.fibre_port)
    eve = config.eve
    assert eve is not None

    async def open_through_eve() -> trio.abc.ReceiveStream:
        upstream = await connect()
        send, receive = memory_fibre()
        attack = EveAttack(eve, link.nominal_parameters(), rng)
        nursery.start_soon(run_eve_proxy, attack, upstream, send)
        log.warning(
            "link.eve_inserted",
            intercept_resend_fraction=eve.intercept_resend_fraction,
            photon_number_splitting=eve.photon_number_splitting,
        )
        return receive

    return open_through_eve
