"""Throughput of the authenticated classical channel over loopback TCP, per authentication mode.

Alice and Bob run in one process (one trio run) and talk through ``qkdnode.node.session`` over a
real loopback TCP socket. Alice opens a block, sends N Data frames of ``frame_bytes`` payload,
and the clock stops when Bob has received and verified all of them (per-frame HMAC-SHA256 in
every mode; the block transcript on both sides: SHA-256 in the bootstrap modes, the one-time
Poly1305 Wegman–Carter tag in key-derived mode). The code measured is this checkout's.

    python scripts/bench_channel.py --json OUT.json [--seconds 1.0] [--repeat 3]

Rows: {"mode", "frame_bytes", "frames", "seconds", "frames_per_s", "mbit_s", "runs_frames_per_s",
"load_1min"}; each row is the median of ``--repeat`` timed runs (all of them in
``runs_frames_per_s``); mbit_s counts payload bytes; ``load_1min`` is the machine's 1-minute
load average when the row started. Targets for key-derived mode: >= 10,000 frames/s at 1 KiB,
>= 1 Gbit/s at 64 KiB.

``--primitives`` adds one row per frame size with the cost of each per-frame step alone, in
microseconds per frame on one side (median of 5 runs of a loop): the frame MAC
(HMAC-SHA256 as ``FrameMac.tag`` computes it), the transcript's Poly1305 update, the SHA-256
update of the bootstrap transcript, and the msgpack encoding of the Data payload.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qkdnode.channel.auth import (
    BlockTranscript,
    CertificateCredentials,
    Credentials,
    FrameMac,
    PskCredentials,
    Role,
)
from qkdnode.channel.connection import ChannelConfig, PeerConnection, Rotated
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import Data, FieldSpec, KindRegistry, encode_payload
from qkdnode.channel.pki import NODE_PURPOSE_OID
from qkdnode.node.session import PeerSession, SessionConfig, open_session, serve_bob

FRAME_SIZES = (64, 1024, 16384, 65536)
MODES = ("psk", "certificate-ed25519", "certificate-mldsa65", "key_derived")


def _certificates(algorithm: str) -> tuple[CertificateCredentials, CertificateCredentials]:
    """A throw-away CA and two node certificates, generated in memory."""
    new = (
        ed25519.Ed25519PrivateKey.generate
        if algorithm == "ed25519"
        else mldsa.MLDSA65PrivateKey.generate
    )
    now = dt.datetime.now(dt.UTC)

    def usage(ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=not ca,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        )

    # node certificates carry the qkdnode node purpose (docs/authentication.md)
    node_purpose = x509.ExtendedKeyUsage(
        [x509.ObjectIdentifier(NODE_PURPOSE_OID), ExtendedKeyUsageOID.SERVER_AUTH]
    )
    ca_key = new()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(True), critical=True)
        .sign(ca_key, None)
    )
    creds = []
    for me, peer in (("alice", "bob"), ("bob", "alice")):
        key = new()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, me)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(2 if me == "alice" else 3)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(me)]), critical=False)
            .add_extension(usage(False), critical=True)
            .add_extension(node_purpose, critical=False)
            .sign(ca_key, None)
        )
        creds.append(
            CertificateCredentials(
                certificate_chain=(cert,), private_key=key, trust_anchor=ca, peer_name=peer
            )
        )
    return creds[0], creds[1]


def _registry() -> KindRegistry:
    registry = KindRegistry()
    registry.register("blob", {"data": FieldSpec(kind="bytes", max_len=1 << 20)})
    return registry


def _ledger() -> AuthKeyLedger:
    ledger = AuthKeyLedger(target_bits=1 << 20, reserve_bits=1 << 12)
    ledger.deposit(np.random.default_rng(1).bytes(1 << 17), mark_consumed_bits=0)
    return ledger


async def _run(mode: str, frame_bytes: int, frames: int) -> float:
    if mode.startswith("certificate"):
        alice_c, bob_c = _certificates(mode.split("-")[1])
        creds: tuple[Credentials, Credentials] = (alice_c, bob_c)
    else:
        creds = (PskCredentials(psk=bytes(range(32))),) * 2
    ledgers = (_ledger(), _ledger()) if mode == "key_derived" else (None, None)
    channel = ChannelConfig(max_frame_bytes=max(frame_bytes + 4096, 1 << 17))
    config = SessionConfig(port=0, send_queue_frames=512)

    def make(role: Role) -> Callable[[], PeerConnection]:
        index = 0 if role is Role.ALICE else 1
        return lambda: PeerConnection(
            role,
            credentials=creds[index],
            registry=_registry(),
            ledger=ledgers[index],
            config=channel,
        )

    received = trio.Event()

    async def bob(session: PeerSession) -> None:
        count = 0
        async for event in session.events():
            if isinstance(event, Data):
                count += 1
                if count == frames:
                    received.set()

    payload = {"data": bytes(frame_bytes)}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_bob, config, make(Role.BOB), bob)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_session(stream, make(Role.ALICE)(), config) as alice:
            if mode == "key_derived":
                await alice.send(lambda c: c.announce_rotation())
                assert isinstance(await alice.next_event(), Rotated)
            start = time.perf_counter()
            await alice.send(lambda c: c.open_block(0))
            for _ in range(frames):
                await alice.send(lambda c: c.send_data(0, "blob", payload))
            await received.wait()
            elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


def _primitives(frame_bytes: int) -> dict[str, float]:
    """Microseconds per frame of each per-frame step alone (see the module docstring)."""
    header = bytes(17)
    message = Data(block_id=0, kind="blob", body={"data": bytes(frame_bytes)})
    payload = encode_payload(message, _registry())
    mac = FrameMac(bytes(32), bytes(16), Role.ALICE)
    poly = BlockTranscript(r=bytes(range(16)), s=bytes(16), hmac_key=None)
    sha = BlockTranscript(hmac_key=bytes(32))
    registry = _registry()
    steps: dict[str, Callable[[], object]] = {
        "hmac_sha256_us": lambda: mac.tag(header, payload),
        "poly1305_us": lambda: poly.absorb(header, payload),
        "sha256_transcript_us": lambda: sha.absorb(header, payload),
        "msgpack_encode_us": lambda: encode_payload(message, registry),
    }
    loops = max(50, (1 << 24) // max(frame_bytes, 64))
    out = {}
    for name, step in steps.items():
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(loops):
                step()
            runs.append((time.perf_counter() - start) / loops * 1e6)
        out[name] = round(statistics.median(runs), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--seconds", type=float, default=1.0, help="target run time per row")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--sizes", default=",".join(str(s) for s in FRAME_SIZES))
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--primitives", action="store_true", help="add per-step cost rows")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'mode':22} {'frame_bytes':>11} {'frames':>7} {'frames/s':>10} {'Mbit/s':>8}")
    for mode in args.modes.split(","):
        for frame_bytes in (int(s) for s in args.sizes.split(",")):
            load_1min = os.getloadavg()[0]
            probe = 200
            seconds = trio.run(_run, mode, frame_bytes, probe)
            frames = max(probe, int(args.seconds * probe / seconds))
            runs = [trio.run(_run, mode, frame_bytes, frames) for _ in range(args.repeat)]
            seconds = statistics.median(runs)
            row = {
                "mode": mode,
                "frame_bytes": frame_bytes,
                "frames": frames,
                "seconds": round(seconds, 4),
                "frames_per_s": round(frames / seconds, 1),
                "mbit_s": round(frames * frame_bytes * 8 / seconds / 1e6, 2),
                "runs_frames_per_s": [round(frames / s, 1) for s in runs],
                "load_1min": round(load_1min, 2),
            }
            rows.append(row)
            print(
                f"{mode:22} {frame_bytes:>11} {frames:>7} {row['frames_per_s']:>10} "
                f"{row['mbit_s']:>8}"
            )
    if args.primitives:
        for frame_bytes in (int(s) for s in args.sizes.split(",")):
            row = {"mode": "primitives", "frame_bytes": frame_bytes, **_primitives(frame_bytes)}
            rows.append(row)
            print(f"{'primitives':22} {frame_bytes:>11} {row}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
