"""Block messages survive msgpack unchanged; malformed wire messages raise ProtocolError only."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.pipeline import (
    MESSAGE_TYPES,
    BlockKey,
    BlockMessage,
    Transcript,
    run_block,
)
from qkdnode.postprocess.wire import decode_block_message, encode_block_message
from tests.helpers_blocks import SINGLE_PHOTON, make_block


def _through_msgpack(message: BlockMessage) -> BlockMessage:
    kind, body = encode_block_message(message)
    packed = msgpack.packb([kind, body], use_bin_type=True)
    kind2, body2 = msgpack.unpackb(packed, raw=False)
    return decode_block_message(kind2, body2)


def test_every_message_of_a_block_round_trips_and_keys_still_match() -> None:
    emissions, detections = make_block(np.random.default_rng(1), pulse_count=2_000_000)
    transcript = Transcript()
    alice, bob = run_block(
        emissions,
        detections,
        SINGLE_PHOTON,
        np.random.default_rng(2),
        transcript=transcript,
        tamper=_through_msgpack,
    )
    assert isinstance(alice, BlockKey) and isinstance(bob, BlockKey)
    assert np.array_equal(alice.key, bob.key)
    seen = {type(m) for _, m in transcript.messages}
    assert len(seen) >= 12  # every stage's messages went over the wire form


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("no_such_kind", {}, "kind"),
        (7, {}, "kind"),
        ("key_length", [], "key_length"),
        ("key_length", {}, "key_length.final_key_bits"),
        ("key_length", {"final_key_bits": 128, "extra": 1}, "key_length.extra"),
        ("key_length", {"final_key_bits": "128"}, "key_length.final_key_bits"),
        ("key_length", {"final_key_bits": True}, "key_length.final_key_bits"),
        ("key_length", {"final_key_bits": 0}, "key_length.final_key_bits"),
        ("verification_result", {"ok": 1}, "verification_result.ok"),
        ("reconciliation_seed", {"seed": b"short"}, "reconciliation_seed.seed"),
        ("parity_answer", {"round_index": 0, "count": 9, "parities": b"\x01"}, "parity_answer"),
        ("block_abort", {"reason": "bored", "detail": ""}, "block_abort.reason"),
    ],
)
def test_schema_violations_name_the_field(kind: object, body: object, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_block_message(kind, body)
    assert info.value.field is not None and info.value.field.startswith(field)


wire_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.binary(max_size=64),
    st.text(max_size=16),
)


@settings(max_examples=400)
@given(
    kind=st.sampled_from(sorted(MESSAGE_TYPES)),
    body=st.dictionaries(
        st.sampled_from(["round_index", "count", "seed", "bits", "ok", "x"]), wire_values
    ),
)
def test_random_bodies_raise_only_protocol_error(kind: str, body: dict[str, object]) -> None:
    try:
        message = decode_block_message(kind, body)
    except ProtocolError:
        return
    assert encode_block_message(message) == (kind, body)
