"""Fuzz targets shared by the hypothesis tests (scenario 16) and ``scripts/fuzz`` (atheris).

Each target takes bytes and either returns or raises one of the project's own refusals
(``ProtocolError`` and friends for the channel, ``ApiError`` with a 4xx status for the REST
parser). Anything else propagates: that is a finding.
"""

from __future__ import annotations

import contextlib

from qkdnode.channel.auth import Role
from qkdnode.channel.connection import NeedData
from qkdnode.channel.framing import FrameReader
from qkdnode.channel.messages import Hello, decode_payload
from qkdnode.config.delivery import ApiLimits
from qkdnode.delivery.api import ApiError, parse_request
from qkdnode.errors import QkdError
from tests.reliability.memory import NAMED, make_wire

LIMITS = ApiLimits(
    key_size_bits=256, min_key_size_bits=64, max_key_size_bits=1024, max_keys_per_request=128
)


def frame_codec(data: bytes) -> None:
    reader = FrameReader(max_frame_bytes=1 << 16, max_feed_bytes=1 << 16)
    try:
        reader.feed(data)
        while (frame := reader.peek(32)) is not None:
            reader.consume(frame)
    except NAMED:
        pass


def hello_payload(data: bytes) -> None:
    from tests.reliability.memory import REGISTRY

    with contextlib.suppress(*NAMED):
        decode_payload(Hello, data, REGISTRY)


def handshake(data: bytes) -> None:
    """Bob in state IDLE fed arbitrary bytes (a fresh connection per input)."""
    wire, _ = make_wire("psk")
    bob = wire.bob
    try:
        bob.receive_data(data)
        for _ in range(8):
            if isinstance(bob.next_event(now_s=0.0), NeedData):
                break
    except NAMED:
        pass
    assert wire.alice.state.value == "idle" and Role.BOB is bob.role


def rest_request(data: bytes) -> None:
    methods = ("GET", "POST", "PUT", "DELETE")
    method = methods[data[0] % 4] if data else "GET"
    target_end = data.find(b"\n", 1)
    target_bytes = data[1:target_end] if target_end > 0 else data[1:]
    body = data[target_end + 1 :] if target_end > 0 else b""
    target = target_bytes.decode("latin-1")
    try:
        parse_request(method, target, body, LIMITS)
    except ApiError as error:
        if not 400 <= error.status < 500:
            raise
    except QkdError:
        raise


TARGETS = {
    "frame": frame_codec,
    "hello": hello_payload,
    "handshake": handshake,
    "rest": rest_request,
}
