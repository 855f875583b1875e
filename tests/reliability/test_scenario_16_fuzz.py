"""Scenario 16: fuzzing the frame codec, the handshake parser and REST request parsing.

Hypothesis (derandomised in the default run; ``QKDNODE_HYPOTHESIS_PROFILE=long`` for more);
``scripts/fuzz`` runs the same targets under atheris. 0 crashes other than the project's own
refusals.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reliability.fuzz_targets import frame_codec, handshake, hello_payload, rest_request
from tests.reliability.proxy import CODES


def framed(code: int) -> st.SearchStrategy[bytes]:
    """Well-framed frames of a given type with arbitrary header fields and payload."""
    return st.builds(
        lambda seq, block, payload: (
            struct.pack(">IBQQ", 17 + len(payload), code, seq, block) + payload
        ),
        st.integers(0, 3),
        st.sampled_from([0, 2**64 - 1, 5]),
        st.binary(max_size=300),
    )


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_frame_codec_on_random_bytes(data: bytes) -> None:
    frame_codec(data)


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_hello_payload_parser(data: bytes) -> None:
    hello_payload(data)


@settings(max_examples=150)
@given(st.one_of(st.binary(max_size=400), *(framed(code) for code in CODES.values())))
def test_handshake_parser_on_random_and_well_framed_input(data: bytes) -> None:
    handshake(data)


@settings(max_examples=300)
@given(
    st.binary(max_size=1),
    st.sampled_from(["/api/v1/keys/sae-b/", "/api/v1/keys/", "/x/"]),
    st.text(max_size=30),
    st.one_of(
        st.binary(max_size=200),
        st.builds(lambda n: b'{"number": %d, "size": 256}' % n, st.integers(-5, 10**6)),
        st.just(b'{"key_IDs": [{"key_ID": "not-a-uuid"}]}'),
    ),
)
def test_rest_request_parser(method: bytes, prefix: str, rest: str, body: bytes) -> None:
    target = (prefix + rest).replace("\n", "")
    rest_request(method + target.encode("utf-8") + b"\n" + body)
