"""Recordings of a quantum link on disk: what ``qkdnode link record`` writes and the replay
backend reads (synchronous file I/O, no trio).

A recording is a directory::

    manifest.json              format, version, pulses per block, the link parameters the
                               finite-key bound needs, and per block its detection count and
                               the size and SHA-256 of each side's file
    alice/block-000000.npz     Alice's records of the detected pulses
    bob/block-000000.npz       Bob's detections

Each block file is an uncompressed ``.npz`` holding two arrays of one entry per detection, in
pulse order: ``offset`` (uint32, the pulse's offset in its block, strictly increasing) and
``state`` (uint8): Bob's ``bit | basis << 1``; Alice's ``bit | basis << 1 | intensity << 2``
for the same pulses (basis 0 = Z, the key basis; intensity 0 signal, 1 decoy, 2 vacuum, as in
``qkdnode.postprocess.records``). Alice's records of undetected pulses are not kept: sifting
only looks at the pulses Bob announces.

Reading is one block at a time and checks everything: the manifest's schema and ranges
(``RecordingError``, raised when the recording is opened), each block file's size and SHA-256
against the manifest, its arrays' names, dtypes, lengths and ranges (``BadDeviceData`` naming
the file and what is wrong, a link error the node handles). The recording holds both sides' raw
bits, so keys distilled from it are not secret.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from qkdnode.config.link import LinkParameters
from qkdnode.errors import BadDeviceData, QkdError
from qkdnode.postprocess.records import AliceRecords, DetectedEmissionRecords, DetectionRecords

FORMAT: Final = "qkdnode-link-recording"
VERSION: Final = 1
MANIFEST: Final = "manifest.json"
MAX_MANIFEST_BYTES: Final = 64 << 20
MAX_PULSES_PER_BLOCK: Final = 1 << 32  # offsets are uint32
ARRAYS: Final = ("offset", "state")
# the states a side's ``state`` byte may take (bit, basis and, for Alice, intensity class)
STATE_LIMIT: Final = {"alice": 3 << 2, "bob": 1 << 2}

Side = Literal["alice", "bob"]
U8 = NDArray[np.uint8]
U32 = NDArray[np.uint32]


class RecordingError(QkdError):
    """A recording's directory or manifest is missing or malformed (checked when opened)."""


def block_file(side: Side, number: int) -> str:
    """The path of a block's file relative to the recording directory."""
    return f"{side}/block-{number:06d}.npz"


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockFile:
    """One side's file of one block as the manifest lists it."""

    file: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedBlock:
    """One block as the manifest lists it."""

    first_pulse_index: int
    detections: int
    alice: BlockFile
    bob: BlockFile

    def side(self, side: Side) -> BlockFile:
        return self.alice if side == "alice" else self.bob


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What a recording holds; ``source`` says where the raw data came from (``"simulated"``)."""

    source: str
    pulses_per_block: int
    link_parameters: LinkParameters
    blocks: tuple[RecordedBlock, ...]
    simulator_seed: int | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "source": self.source,
                "simulator_seed": self.simulator_seed,
                "pulses_per_block": self.pulses_per_block,
                "block_count": len(self.blocks),
                "link_parameters": asdict(self.link_parameters),
                "blocks": [
                    {
                        "first_pulse_index": block.first_pulse_index,
                        "detections": block.detections,
                        "alice": asdict(block.alice),
                        "bob": asdict(block.bob),
                    }
                    for block in self.blocks
                ],
            },
            indent=1,
        )


# ---- writing ---------------------------------------------------------------------------------


def pack_block(emissions: AliceRecords, detections: DetectionRecords) -> tuple[U32, U8, U8]:
    """(offsets, Alice's states, Bob's states) of one block, both sides' records in hand.

    Raises ``ValueError`` if the two sides' records cover different pulses."""
    if (emissions.first_pulse_index, emissions.pulse_count) != (
        detections.first_pulse_index,
        detections.pulse_count,
    ):
        raise ValueError(
            f"Alice's block [{emissions.first_pulse_index}, +{emissions.pulse_count}) is not "
            f"Bob's [{detections.first_pulse_index}, +{detections.pulse_count})"
        )
    if detections.pulse_count > MAX_PULSES_PER_BLOCK:
        raise ValueError(f"blocks of more than {MAX_PULSES_PER_BLOCK} pulses cannot be recorded")
    offsets = detections.pulse_index - detections.first_pulse_index
    bit, basis, intensity = emissions.records_at(offsets)
    alice = (bit | (basis << 1) | (intensity << 2)).astype(np.uint8)
    bob = (detections.bit | (detections.basis << 1)).astype(np.uint8)
    return offsets.astype(np.uint32), alice, bob


def write_block_file(directory: Path, name: str, offsets: U32, states: U8) -> BlockFile:
    """Write one side's block file (atomically: a temporary name, fsync, rename)."""
    buffer = io.BytesIO()
    np.savez(buffer, offset=offsets, state=states)
    data = buffer.getvalue()
    _write_atomically(directory / name, data)
    return BlockFile(file=name, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write the manifest last: a directory without one is not a recording."""
    _write_atomically(directory / MANIFEST, manifest.to_json().encode())


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    with temporary.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)


# ---- reading ---------------------------------------------------------------------------------


def read_manifest(directory: Path) -> Manifest:
    """The recording's manifest, checked; ``RecordingError`` names the file and the problem."""
    path = directory / MANIFEST
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise RecordingError(f"{path}: {size} bytes, more than a manifest may have")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RecordingError(f"{path} does not exist: not a recording directory") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise RecordingError(f"{path}: cannot read it as JSON: {exc}") from None
    try:
        return _manifest_from(data)
    except _Invalid as exc:
        raise RecordingError(f"{path}: {exc}") from None


class _Invalid(Exception):
    pass


def _field(data: object, name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(data, dict) or name not in data:
        raise _Invalid(f"missing {name!r}")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, kind):  # JSON true is no number
        raise _Invalid(f"{name!r} has the wrong type ({type(value).__name__})")
    return value


def _manifest_from(data: object) -> Manifest:
    if _field(data, "format", str) != FORMAT:
        raise _Invalid(f"'format' is not {FORMAT!r}")
    version = _field(data, "version", int)
    if version != VERSION:
        raise _Invalid(f"format version {version}; this release reads version {VERSION}")
    pulses = _field(data, "pulses_per_block", int)
    if not 1 <= pulses <= MAX_PULSES_PER_BLOCK:
        raise _Invalid(f"'pulses_per_block' {pulses} is not in [1, {MAX_PULSES_PER_BLOCK}]")
    params = _parameters_from(_field(data, "link_parameters", dict))
    raw_blocks = _field(data, "blocks", list)
    if _field(data, "block_count", int) != len(raw_blocks) or not raw_blocks:
        raise _Invalid("'block_count' does not match the blocks listed, or there are none")
    seed = data.get("simulator_seed") if isinstance(data, dict) else None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _Invalid("'simulator_seed' has the wrong type")
    blocks = []
    for number, raw in enumerate(raw_blocks):
        try:
            blocks.append(_block_from(raw, number, pulses))
        except _Invalid as exc:
            raise _Invalid(f"blocks[{number}]: {exc}") from None
    return Manifest(
        source=_field(data, "source", str),
        pulses_per_block=pulses,
        link_parameters=params,
        blocks=tuple(blocks),
        simulator_seed=seed,
    )


def _parameters_from(raw: dict[str, object]) -> LinkParameters:
    names = [f.name for f in fields(LinkParameters)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise _Invalid(f"link_parameters: unknown entries {unknown}")
    try:
        values = {name: float(_field(raw, name, (int, float))) for name in names}
    except _Invalid as exc:
        raise _Invalid(f"link_parameters: {exc}") from None
    if not all(math.isfinite(v) and v >= 0.0 for v in values.values()):
        raise _Invalid("link_parameters: every entry must be a finite number >= 0")
    return LinkParameters(**values)


def _block_from(raw: object, number: int, pulses: int) -> RecordedBlock:
    detections = _field(raw, "detections", int)
    if not 0 <= detections <= pulses:
        raise _Invalid(f"'detections' {detections} is not in [0, {pulses}]")
    first = _field(raw, "first_pulse_index", int)
    if first < 0:
        raise _Invalid("'first_pulse_index' is negative")
    sides = {}
    for side in ("alice", "bob"):
        entry = _field(raw, side, dict)
        name = _field(entry, "file", str)
        if name != block_file(side, number):
            raise _Invalid(f"{side}: file {name!r} is not {block_file(side, number)!r}")
        digest = _field(entry, "sha256", str)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise _Invalid(f"{side}: 'sha256' is not 64 lowercase hex digits")
        size = _field(entry, "size_bytes", int)
        if not 0 < size <= 64 + 32 * (detections + 64):  # two arrays with .npy headers
            raise _Invalid(f"{side}: 'size_bytes' {size} does not fit {detections} detections")
        sides[side] = BlockFile(file=name, size_bytes=size, sha256=digest)
    return RecordedBlock(
        first_pulse_index=first, detections=detections, alice=sides["alice"], bob=sides["bob"]
    )


def read_block_file(directory: Path, manifest: Manifest, number: int, side: Side) -> tuple[U32, U8]:
    """(offsets, states) of one side's block ``number``, checked against the manifest.

    Raises ``BadDeviceData`` naming the file: missing, truncated or grown, checksum mismatch,
    not an ``.npz`` of the expected arrays, offsets not increasing or outside the block, states
    out of range."""
    block = manifest.blocks[number]
    entry = block.side(side)
    path = directory / entry.file

    def bad(what: str) -> BadDeviceData:
        return BadDeviceData(f"replay recording {directory}: {entry.file}: {what}")

    try:
        with path.open("rb") as source:
            data = source.read(entry.size_bytes + 1)
    except OSError as exc:
        raise bad(f"cannot read it ({exc.strerror or exc})") from None
    if len(data) != entry.size_bytes:
        raise bad(
            f"{'truncated' if len(data) < entry.size_bytes else 'longer than recorded'}: "
            f"the manifest says {entry.size_bytes} bytes"
            + (f", the file has {len(data)}" if len(data) <= entry.size_bytes else "")
        )
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise bad("SHA-256 does not match the manifest (corrupt, or from another recording)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            names = sorted(archive.files)
            if names != sorted(ARRAYS):
                raise bad(f"arrays {names}, expected {list(ARRAYS)}")
            offsets = archive["offset"]
            states = archive["state"]
    except BadDeviceData:
        raise
    except (OSError, ValueError, EOFError, KeyError, MemoryError, zipfile.BadZipFile) as exc:
        raise bad(f"not a readable .npz ({type(exc).__name__}: {exc})") from None
    _check_arrays(offsets, states, block.detections, manifest.pulses_per_block, side, bad)
    return offsets, states


def _check_arrays(
    offsets: NDArray[Any],
    states: NDArray[Any],
    detections: int,
    pulses: int,
    side: Side,
    bad: Any,
) -> None:
    for name, array, dtype in (("offset", offsets, np.uint32), ("state", states, np.uint8)):
        if array.dtype != dtype or array.shape != (detections,):
            raise bad(
                f"array {name!r} is {array.dtype}{list(array.shape)}, "
                f"expected {np.dtype(dtype)}[{detections}]"
            )
    if detections:
        if int(offsets[-1]) >= pulses:
            raise bad(f"offset {int(offsets[-1])} is outside the block of {pulses} pulses")
        if detections > 1 and not bool(np.all(offsets[1:] > offsets[:-1])):
            raise bad("offsets are not strictly increasing")
        limit = STATE_LIMIT[side]
        top = int(states.max())
        if top >= limit or (side == "alice" and bool(np.any((states >> 2) >= 3))):
            raise bad(f"state {top} out of range for {side}")


def detection_records(
    offsets: U32, states: U8, first_pulse_index: int, pulses: int
) -> DetectionRecords:
    """Bob's records of a block starting at ``first_pulse_index``."""
    return DetectionRecords(
        first_pulse_index=first_pulse_index,
        pulse_count=pulses,
        pulse_index=offsets.astype(np.int64) + first_pulse_index,
        basis=((states >> 1) & 1).astype(np.uint8),
        bit=(states & 1).astype(np.uint8),
    )


def emission_records(
    offsets: U32, states: U8, first_pulse_index: int, pulses: int
) -> DetectedEmissionRecords:
    """Alice's records of a block starting at ``first_pulse_index``: those of the recorded
    (detected) pulses only, as the recording holds them."""
    return DetectedEmissionRecords(
        first_pulse_index=first_pulse_index,
        pulse_count=pulses,
        offset=offsets.astype(np.int64),
        bit=(states & 1).astype(np.uint8),
        basis=((states >> 1) & 1).astype(np.uint8),
        intensity=(states >> 2).astype(np.uint8),
    )
