"""The compiled wire coding gives the numpy coding's bytes, arrays and errors, bit for bit.

``tests.helpers_bitpack_reference`` holds the numpy implementations the kernels replaced. Every
case codes the same seeded input both ways: equal bytes and arrays for valid input, and for
malformed input a ProtocolError naming the same field (with the same message where the
reference decodes in one run; its chunked runs may report another of several defects first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import bitpack, bitpack_kernels
from tests import helpers_bitpack_reference as reference

MAX_INT64 = 2**63 - 1
# Bytes that make varints of every shape: terminators, zero groups, continuations.
VARINT_BYTES = st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0x81, 0xFF])


def _outcome(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """("ok", result as a list) or ("error", (field, message)) of ``function(*args, **kwargs)``."""
    try:
        result = function(*args, **kwargs)
    except ProtocolError as exc:
        return "error", (exc.field, str(exc))
    return "ok", np.asarray(result).tolist()


# ---- gaps ------------------------------------------------------------------------------------


@st.composite
def offset_sets(draw: st.DrawFn) -> list[int]:
    """Strictly increasing offsets: small gaps, gaps at every varint length, up to 2**63 - 1."""
    gaps = draw(
        st.lists(
            st.one_of(
                st.integers(0, 3),
                st.integers(0, 2**14),
                st.sampled_from([127, 128, 2**14 - 1, 2**14, 2**56 - 1, 2**56]),
                st.integers(0, MAX_INT64),
            ),
            max_size=80,
        )
    )
    offsets, previous = [], -1
    for gap in gaps:
        if previous + 1 + gap > MAX_INT64:
            break
        previous += 1 + gap
        offsets.append(previous)
    return offsets


@given(values=offset_sets(), chunk=st.sampled_from([9, 16, reference.CHUNK]))
def test_gap_coding_equals_the_reference(values: list[int], chunk: int) -> None:
    offsets = np.array(values, dtype=np.int64)
    data = bitpack.encode_gaps(offsets)
    assert data == reference.encode_gaps(offsets, chunk)
    last = values[-1] if values else -1
    for limit in (last + 1, last, 2**63, 0):
        got = _outcome(bitpack.decode_gaps, data, len(values), limit, field="f")
        assert got == _outcome(reference.decode_gaps, data, len(values), limit, field="f")
        # in runs the reference names the limit left after the run before: only the field
        chunked = _outcome(reference.decode_gaps, data, len(values), limit, field="f", chunk=chunk)
        assert got == chunked or (got[0] == chunked[0] == "error" and got[1][0] == chunked[1][0])
    assert bitpack.decode_gaps(data, len(values), last + 1, field="f").tolist() == values


@given(values=st.lists(st.integers(0, 2**20), min_size=2, max_size=40))
def test_unsorted_or_repeated_offsets_are_refused_as_by_the_reference(values: list[int]) -> None:
    offsets = np.array(values, dtype=np.int64)
    increasing = bool(np.all(offsets[1:] > offsets[:-1]))
    for encode in (bitpack.encode_gaps, reference.encode_gaps):
        if increasing:
            encode(offsets)
        else:
            with pytest.raises(ValueError, match="strictly increasing"):
                encode(offsets)


def test_negative_offsets_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        bitpack.encode_gaps(np.array([-1, 4], dtype=np.int64))


@given(
    raw=st.lists(VARINT_BYTES, max_size=30),
    count=st.integers(-1, 12),
    limit=st.sampled_from([0, 1, 2, 128, 300, 2**14, 2**62, 2**63]),
)
def test_malformed_gaps_fail_as_in_the_reference(raw: list[int], count: int, limit: int) -> None:
    data = bytes(raw)
    got = _outcome(bitpack.decode_gaps, data, count, limit, field="f")
    assert got == _outcome(reference.decode_gaps, data, count, limit, field="f")
    # decoded in runs of 9 varint bytes, the reference fails too, perhaps at another defect
    chunked = _outcome(reference.decode_gaps, data, count, limit, field="f", chunk=9)
    assert got[0] == chunked[0]
    assert got[0] == "ok" or got[1][0] == chunked[1][0] == "f"


@pytest.mark.parametrize(
    ("data", "count", "limit", "message"),
    [
        (b"", 1, 10, "exactly"),  # nothing
        (b"\x80", 1, 10, "exactly"),  # truncated
        (b"\x01\x80", 1, 10, "exactly"),  # an unfinished varint after the last
        (b"\x01\x02", 1, 10, "exactly"),  # too many
        (b"\x01", 2, 10, "exactly"),  # too few
        (b"\x01", -1, 10, "exactly"),
        (b"\x01", 0, 10, "no data"),
        (b"\x80\x00", 1, 10, "non-canonical"),
        (b"\x81\x00", 1, 10, "non-canonical"),
        (b"\xff" * 9 + b"\x01", 1, 2**63, "longer than 9"),
        (b"\x80" * 9 + b"\x00", 1, 2**63, "longer than 9"),
        (b"\x09", 1, 9, "below 9"),
        (b"\x00\x08", 2, 9, "below 9"),  # the second offset is 9
        (b"\x00", 1, 0, "below 0"),
    ],
)
def test_malformed_gaps_are_rejected(data: bytes, count: int, limit: int, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        bitpack.decode_gaps(data, count, limit, field="f")
    assert info.value.field == "f"


def test_gaps_must_be_bytes() -> None:
    with pytest.raises(ProtocolError, match="expected bytes"):
        bitpack.decode_gaps(bytearray(b"\x00"), 1, 10, field="f")  # type: ignore[arg-type]


def test_gaps_at_the_int64_limits() -> None:
    top = np.array([MAX_INT64], dtype=np.int64)
    data = bitpack.encode_gaps(top)
    assert data == b"\xff" * 8 + b"\x7f"
    assert bitpack.decode_gaps(data, 1, 2**63, field="f").tolist() == [MAX_INT64]
    with pytest.raises(ProtocolError, match="below"):
        bitpack.decode_gaps(data, 1, MAX_INT64, field="f")
    both = np.array([0, MAX_INT64], dtype=np.int64)  # the largest gap after an offset
    assert bitpack.decode_gaps(bitpack.encode_gaps(both), 2, 2**63, field="f").tolist() == [
        0,
        MAX_INT64,
    ]
    # gaps each below the limit whose running sum passes 2**64
    huge = reference.encode_varints(np.array([2**62] * 5, dtype=np.uint64))
    with pytest.raises(ProtocolError, match="below"):
        bitpack.decode_gaps(huge, 5, MAX_INT64, field="f")


def test_a_limit_above_int64_still_allows_no_offset_past_it() -> None:
    # (the numpy decoder wrapped such offsets round to negative ones)
    data = reference.encode_varints(np.array([2**62, 2**62], dtype=np.uint64))
    with pytest.raises(ProtocolError, match=f"below {2**64}"):
        bitpack.decode_gaps(data, 2, 2**64, field="f")
    assert bitpack.decode_gaps(b"\x00\x05", 2, 2**70, field="f").tolist() == [0, 6]


@pytest.mark.parametrize("count", [0, 1, 2**20 - 1, 2**20 + 3])
def test_large_gap_coding_equals_the_reference(count: int) -> None:
    rng = np.random.default_rng(count)
    offsets = np.cumsum(rng.geometric(0.3, count)).astype(np.int64)
    offsets[count // 2 :] += 2**40  # one gap of 6 varint bytes
    data = bitpack.encode_gaps(offsets)
    assert data == reference.encode_gaps(offsets)
    limit = int(offsets[-1]) + 1 if count else 0
    assert np.array_equal(bitpack.decode_gaps(data, count, limit, field="f"), offsets)
    assert np.array_equal(reference.decode_gaps(data, count, limit, field="f"), offsets)


def test_the_kernels_run_as_plain_python() -> None:
    # what NUMBA_DISABLE_JIT=1 runs
    offsets = np.array([0, 3, 200, 2**40, MAX_INT64], dtype=np.int64)
    raw, increasing = bitpack_kernels.encode_gap_varints.py_func(offsets)  # type: ignore[attr-defined]
    assert increasing and raw.tobytes() == reference.encode_gaps(offsets)
    out = np.empty(5, dtype=np.int64)
    assert bitpack_kernels.decode_gap_varints.py_func(raw, MAX_INT64, out) == 0  # type: ignore[attr-defined]
    assert np.array_equal(out, offsets)
    labels = np.array([2, 0, 1, 2, 1], dtype=np.uint8)
    packed = np.empty(2, dtype=np.uint8)
    bitpack_kernels.pack_label_bits.py_func(labels, 2, packed)  # type: ignore[attr-defined]
    assert packed.tobytes() == reference.pack_labels(labels, 2)
    back = np.empty(5, dtype=np.uint8)
    assert bitpack_kernels.unpack_label_bits.py_func(packed, 2, back) == 2  # type: ignore[attr-defined]
    assert np.array_equal(back, labels)


# ---- labels ----------------------------------------------------------------------------------


@given(
    width=st.integers(1, 8),
    values=st.lists(st.integers(0, 255), max_size=70),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_label_coding_equals_the_reference(width: int, values: list[int], data_seed: int) -> None:
    # high bits beyond the width are dropped by both
    labels = np.array(values, dtype=np.uint8)
    data = bitpack.pack_labels(labels, width)
    assert data == reference.pack_labels(labels, width)
    count = len(values)
    for limit in (1 << width, 3, 1, 0):
        got = _outcome(bitpack.unpack_labels, data, count, width, limit, field="f")
        assert got == _outcome(reference.unpack_labels, data, count, width, limit, field="f")
    # random bytes of the right length, and ones a byte too long or short
    rng = np.random.default_rng(data_seed)
    for length in {len(data), len(data) + 1, max(len(data) - 1, 0)}:
        noise = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        for limit in (3, 1 << width):
            got = _outcome(bitpack.unpack_labels, noise, count, width, limit, field="f")
            assert got == _outcome(reference.unpack_labels, noise, count, width, limit, field="f")


@pytest.mark.parametrize(
    ("data", "count", "message"),
    [
        (b"\x03", 1, "below 3"),  # label 3 does not exist
        (b"\x30", 3, "below 3"),  # the third label is 3
        (b"\x10", 2, "padding"),
        (b"\x00\x00", 2, "expected 1 bytes"),
        (b"", 1, "expected 1 bytes"),
        (b"", -1, "bit count"),
    ],
)
def test_malformed_labels_are_rejected(data: bytes, count: int, message: str) -> None:
    for unpack in (bitpack.unpack_labels, reference.unpack_labels):
        with pytest.raises(ProtocolError, match=message) as info:
            unpack(data, count, 2, 3, field="f")
        assert info.value.field == "f"


@pytest.mark.parametrize("count", [950_000, 2**20 + 1])
def test_large_label_coding_equals_the_reference(count: int) -> None:
    labels = np.random.default_rng(count).integers(0, 3, count, dtype=np.uint8)
    data = bitpack.pack_labels(labels, 2)
    assert data == reference.pack_labels(labels, 2)
    assert np.array_equal(bitpack.unpack_labels(data, count, 2, 3, field="f"), labels)


def test_label_width_outside_a_byte_is_refused() -> None:
    for width in (0, 9):
        with pytest.raises(ValueError, match="width"):
            bitpack.pack_labels(np.zeros(3, dtype=np.uint8), width)
        with pytest.raises(ValueError, match="width"):
            bitpack.unpack_labels(b"", 0, width, 3, field="f")
