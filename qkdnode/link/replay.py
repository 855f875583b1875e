"""The replay backend (``[link] backend = "replay"``): blocks read from a recording on disk
(``qkdnode.link.recording``, written by ``qkdnode link record``), so that post-processing,
sifting included, is measured without the simulator's CPU.

Block ``p`` of the sequence (``p = 0, 1, ...`` from the daemon's start) covers the pulses
``[p · N, (p + 1) · N)`` with N the recording's pulses per block, and carries the recording's
block ``p mod B`` (B blocks) when ``loop`` is on, block ``p`` otherwise. Alice takes blocks in
sequence; Bob takes the block with the index Alice announces, so the two sides read the same
recorded block whatever either did before (a restart, a lost session). Both read ahead
``read_ahead_blocks`` blocks in worker threads; memory holds those and the blocks in flight.

The end of the recording without ``loop``: Alice's next block never comes (``link.replay_ended``
is logged once and the status shows the alarm ``recording_ended``); the node keeps serving and
makes no more blocks. With ``loop`` the raw data is reused: right for throughput, and one more
reason why keys from a replay are never secret (a replay node refuses ``[delivery]``, see
``qkdnode.config.link.ReplayLinkConfig``).

A block file that is missing, truncated, corrupt or from another recording raises
``BadDeviceData`` naming the file; the session ends as for any link error and the next one
carries on with the next block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
import trio

from qkdnode.config.link import ReplayLinkConfig
from qkdnode.config.node import Role
from qkdnode.errors import ConfigError, LinkError
from qkdnode.link.interface import LinkParameters, LinkState, LinkStatus
from qkdnode.link.recording import (
    Manifest,
    RecordingError,
    Side,
    detection_records,
    emission_records,
    read_block_file,
    read_manifest,
)
from qkdnode.postprocess.records import DetectedEmissionRecords, DetectionRecords

log = structlog.get_logger("qkdnode.link")

Records = DetectedEmissionRecords | DetectionRecords


def open_recording(config: ReplayLinkConfig, *, block_pulses: int) -> Manifest:
    """The recording's manifest, checked against the node's block size.

    Raises ``ConfigError`` (naming ``link.directory`` or ``postprocess.block_pulses``): the
    node does not start on a recording it cannot replay."""
    try:
        manifest = read_manifest(config.directory)
    except RecordingError as exc:
        raise ConfigError("link.directory", f"a readable recording: {exc}") from None
    if manifest.pulses_per_block != block_pulses:
        raise ConfigError(
            "postprocess.block_pulses",
            f"the recording's pulses per block, {manifest.pulses_per_block} "
            f"({config.directory / 'manifest.json'}), not {block_pulses}",
        )
    return manifest


class ReplayLink:
    """One end of a replayed link: the recording's blocks for one side, read on demand."""

    def __init__(self, config: ReplayLinkConfig, manifest: Manifest, role: Role) -> None:
        self._config = config
        self._manifest = manifest
        self._role: Role = role
        self._side: Side = "alice" if role == "alice" else "bob"
        self._state = LinkState.CLOSED
        self._next_position = 0
        self._blocks = 0
        self._pulses = 0
        self._detections = 0
        self._alarms: list[str] = []
        self._last_error: str | None = None

    @property
    def role(self) -> Role:
        return self._role

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def loop(self) -> bool:
        return self._config.loop

    @property
    def read_ahead_blocks(self) -> int:
        return self._config.read_ahead_blocks

    @property
    def pulses_per_block(self) -> int:
        return self._manifest.pulses_per_block

    async def open(self) -> None:
        self._state = LinkState.OPEN

    async def aclose(self) -> None:
        if self._state is LinkState.OPEN:
            self._state = LinkState.CLOSED

    def nominal_parameters(self) -> LinkParameters:
        return self._manifest.link_parameters

    def status(self) -> LinkStatus:
        return LinkStatus(
            role=self._role,
            state=self._state,
            blocks=self._blocks,
            pulses_sent=self._pulses if self._role == "alice" else 0,
            pulses_received=self._pulses if self._role == "bob" else 0,
            detections=self._detections,
            simulated_time_s=self._pulses / self._manifest.link_parameters.pulse_rate_hz,
            alarms=tuple(self._alarms),
            last_error=self._last_error,
        )

    # ---- positions ---------------------------------------------------------------------------
    def has(self, position: int) -> bool:
        """Whether block ``position`` of the sequence exists (always, with ``loop``)."""
        return position >= 0 and (self._config.loop or position < len(self._manifest.blocks))

    def position_of(self, first_pulse_index: int) -> int | None:
        """The sequence position of the block starting at ``first_pulse_index``, or None."""
        position, rest = divmod(first_pulse_index, self.pulses_per_block)
        return position if rest == 0 and self.has(position) else None

    def records_at(self, position: int) -> Records:
        """This side's records of block ``position`` (blocking file I/O: call from a thread).

        Raises ``BadDeviceData`` naming the file when it does not check out."""
        assert self.has(position)
        number = position % len(self._manifest.blocks)
        offsets, states = read_block_file(
            self._config.directory, self._manifest, number, self._side
        )
        first = position * self.pulses_per_block
        make = emission_records if self._side == "alice" else detection_records
        return make(offsets, states, first, self.pulses_per_block)

    def taken(self, records: Records) -> None:
        """Count a block handed to the node."""
        self._blocks += 1
        self._pulses += records.pulse_count
        self._next_position = records.first_pulse_index // self.pulses_per_block + 1
        if isinstance(records, DetectionRecords):
            self._detections += records.detection_count

    def failed(self, error: LinkError) -> None:
        self._alarms.append("bad_device_data")
        self._last_error = str(error)

    def ended(self) -> None:
        self._state = LinkState.CLOSED
        self._alarms.append("recording_ended")

    async def next_block(self, pulse_count: int) -> Records:
        """The next block in sequence (the ``QuantumLink`` view; the node uses ``ReplayBlocks``).

        Raises ``LinkError`` at the end of a recording played without ``loop``."""
        if self._state is not LinkState.OPEN:
            raise LinkError(f"link is {self._state.value}, not open")
        if pulse_count != self.pulses_per_block:
            raise ValueError(f"the recording has blocks of {self.pulses_per_block} pulses")
        if not self.has(self._next_position):
            raise LinkError(f"the recording ended after {len(self._manifest.blocks)} blocks")
        try:
            records = await trio.to_thread.run_sync(self.records_at, self._next_position)
        except LinkError as exc:
            self._next_position += 1  # the pulses of a bad block are lost, as on a real link
            self.failed(exc)
            raise
        self.taken(records)
        return records


@dataclass(slots=True, eq=False)
class _Read:
    """A block read in a worker thread: its records or its error, once ``done`` is set."""

    done: trio.Event = field(default_factory=trio.Event)
    records: Records | None = None
    error: LinkError | None = None


class ReplayBlocks:
    """The replayed link block by block (a ``qkdnode.link.blocks.BlockSource``); reads ahead
    in worker threads started in ``nursery``."""

    def __init__(self, link: ReplayLink, pulse_count: int, nursery: trio.Nursery) -> None:
        if pulse_count != link.pulses_per_block:
            raise ValueError(f"the recording has blocks of {link.pulses_per_block} pulses")
        self._link = link
        self._nursery = nursery
        self._read_ahead = link.read_ahead_blocks
        self._reads: dict[int, _Read] = {}
        self._next = 0  # Alice: her next position; Bob: the one after the last he took
        self._ended = False

    @property
    def link(self) -> ReplayLink:
        return self._link

    async def reset(self) -> None:
        """A new session: Alice carries on with her sequence; what was read ahead is kept
        (reads are by position, so nothing of a broken session can leak into the next)."""
        if not self._ended:
            await self._link.open()

    async def alice_block(self) -> DetectedEmissionRecords:
        position = self._next
        if not self._link.has(position):
            if not self._ended:
                self._ended = True
                self._link.ended()
                log.warning(
                    "link.replay_ended",
                    blocks=len(self._link.manifest.blocks),
                    detail="the recording ended (loop = false): no more blocks",
                )
            await trio.sleep_forever()
        self._next = position + 1  # a bad block is skipped by the next session
        records = await self._take(position)
        assert isinstance(records, DetectedEmissionRecords)
        return records

    async def bob_prefetch(self) -> None:
        """Start reading the blocks Alice is expected to announce next."""
        self._start_reads(self._next)

    async def bob_block(self, first_pulse_index: int) -> DetectionRecords | None:
        position = self._link.position_of(first_pulse_index)
        if position is None:
            log.warning(
                "link.replay_block_missing",
                first_pulse_index=first_pulse_index,
                detail="not a block start of the recording, or past its end",
            )
            return None
        self._next = position + 1
        records = await self._take(position)
        assert isinstance(records, DetectionRecords)
        return records

    async def _take(self, position: int) -> Records:
        # Alice announces blocks in order: what lies before this one is never asked for
        for stale in [p for p in self._reads if p < position]:
            del self._reads[stale]
        read = self._reads.pop(position, None)
        if read is None:
            read = self._start_read(position)
            self._reads.pop(position)
        self._start_reads(position + 1)
        await read.done.wait()
        if read.error is not None:
            error = read.error
            log.warning("link.failed", error=str(error), error_type=type(error).__name__)
            self._link.failed(error)
            raise error
        assert read.records is not None
        self._link.taken(read.records)
        return read.records

    def _start_reads(self, position: int) -> None:
        for ahead in range(position, position + self._read_ahead):
            if ahead not in self._reads and self._link.has(ahead):
                self._start_read(ahead)

    def _start_read(self, position: int) -> _Read:
        read = self._reads[position] = _Read()
        self._nursery.start_soon(self._read, position, read)
        return read

    async def _read(self, position: int, read: _Read) -> None:
        try:
            read.records = await trio.to_thread.run_sync(self._link.records_at, position)
        except LinkError as exc:
            read.error = exc
        finally:
            read.done.set()
