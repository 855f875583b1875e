"""Key delivery (ETSI GS QKD 014) over mutual TLS on loopback: enc_keys + dec_keys pairs per second.

A child process runs both nodes (Alice and Bob, one trio run, each with its own KeyStore filled by
staging and committing identical blocks, ``peer_reserve`` wired directly between the two key
managers through the reservation wire form). This process runs the SAE clients: each client holds
one keep-alive TLS connection to its master's node and one to its slave's node and loops
``enc_keys`` (POST, ``number = keys_per_request``) at the master node, then ``dec_keys`` with the
returned IDs at the slave node; even clients are masters at Alice, odd ones at Bob (both nodes
act as master at once). Latency is per pair (enc_keys + dec_keys).

    python scripts/bench_delivery.py --json OUT.json [--seconds 3]

Rows: {"clients", "keys_per_request", "pairs", "requests_per_s", "key_pairs_per_s", "p50_ms",
"p99_ms", "duplicates", "mismatches"}; requests_per_s counts enc_keys + dec_keys pairs. Target
(issue 6): >= 500 key pairs per second with p99 <= 50 ms on 2 cores, and no key handed out twice
(``duplicates`` counts key IDs or key bytes seen twice, ``mismatches`` slave bytes != master's).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import h11
import numpy as np
import trio

from qkdnode import pki
from qkdnode.delivery.api import ApiLimits
from qkdnode.delivery.fairuse import FairUse, FairUsePolicy
from qkdnode.delivery.keys import KeyManager, reservation_from_wire, reservation_to_wire
from qkdnode.delivery.server import DeliveryApp, DeliveryServer, ServerLimits, server_ssl_context
from qkdnode.store.keystore import DeliveryKey, KeyStore, StagedBlock

CLIENTS = (1, 4, 16)
KEYS_PER_REQUEST = (1, 8, 32)
KEYS_PER_BLOCK = 10_000


# ---- child: both nodes ---------------------------------------------------------------------------


def _fill(stores: Sequence[KeyStore], blocks: int) -> None:
    rng = np.random.default_rng(2024)
    for block_id in range(1, blocks + 1):
        ids = rng.bytes(16 * KEYS_PER_BLOCK)
        material = rng.bytes(32 * KEYS_PER_BLOCK)
        block = StagedBlock(
            block_id=block_id,
            first_pulse_index=block_id,
            pulse_count=1,
            consumer_keys=[
                (
                    uuid.UUID(bytes=ids[16 * i : 16 * i + 16], version=4),
                    material[32 * i : 32 * i + 32],
                )
                for i in range(KEYS_PER_BLOCK)
            ],
            key_size_bits=256,
            auth_pool_material=b"",
        )
        for store in stores:
            store.stage_block(block)
        for store in stores:
            store.commit_block(block_id)


async def _serve(directory: Path, blocks: int) -> None:
    stores = {
        "alice": KeyStore.open(directory / "alice-store", node_name="alice"),
        "bob": KeyStore.open(directory / "bob-store", node_name="bob"),
    }
    _fill(list(stores.values()), blocks)
    limits = ApiLimits(
        key_size_bits=256, min_key_size_bits=8, max_key_size_bits=8192, max_keys_per_request=128
    )
    managers: dict[str, KeyManager] = {}
    ports: dict[str, int] = {}

    def wired(peer: str):  # type: ignore[no-untyped-def]
        async def peer_reserve(keys: Sequence[DeliveryKey], master: str, slave: str) -> None:
            await trio.sleep(0)  # stands in for the channel round trip
            parsed, m, s = reservation_from_wire(reservation_to_wire(keys, master, slave))
            managers[peer].record_peer_reservation(parsed, m, s)

        return peer_reserve

    async with trio.open_nursery() as nursery:
        for name, parity, peer in (("alice", 0, "bob"), ("bob", 1, "alice")):
            local = ("sae-a",) if name == "alice" else ("sae-b",)
            remote = ("sae-b",) if name == "alice" else ("sae-a",)
            managers[name] = KeyManager(
                stores[name], master_parity=parity, peer_reserve=wired(peer)
            )
            app = DeliveryApp(
                manager=managers[name],
                limits=limits,
                kme_id=f"kme-{name}",
                peer_kme_id=f"kme-{peer}",
                local_saes=local,
                peer_saes=remote,
                fair_use=FairUse(FairUsePolicy(keys_per_s=1e6, burst_keys=1e6, key_size_bits=256)),
                max_key_count=10**7,
            )
            server = DeliveryServer(app, ServerLimits(max_connections=1024))
            context = server_ssl_context(
                directory / f"{name}.pem", directory / f"{name}.key", directory / "ca" / pki.CA_CERT
            )
            _, ports[name] = await nursery.start(server.serve_tls, context, "127.0.0.1", 0)
        print(json.dumps(ports), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # serve until the parent closes stdin
        nursery.cancel_scope.cancel()


# ---- parent: SAE clients -------------------------------------------------------------------------


class _Client:
    """One keep-alive HTTPS connection driven by h11."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        data = self.conn.send(
            h11.Request(
                method="POST",
                target=target,
                headers=[("host", "localhost"), ("content-length", str(len(body)))],
            )
        )
        await self.stream.send_all(
            (data or b"")
            + (self.conn.send(h11.Data(data=body)) or b"")
            + (self.conn.send(h11.EndOfMessage()) or b"")
        )
        status, chunks = 0, []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            else:
                raise RuntimeError(f"unexpected {event!r}")


def _context(directory: Path, sae: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(directory / "ca" / pki.CA_CERT))
    context.load_cert_chain(directory / f"{sae}.pem", directory / f"{sae}.key")
    return context


async def _run_row(
    directory: Path, ports: dict[str, int], clients: int, keys_per_request: int, seconds: float
) -> dict[str, object]:
    latencies: list[float] = []
    seen_ids: set[str] = set()
    seen_keys: set[str] = set()
    counters = {"duplicates": 0, "mismatches": 0, "errors": 0}
    contexts = {sae: _context(directory, sae) for sae in ("sae-a", "sae-b")}
    deadline = trio.current_time() + seconds

    async def one(index: int) -> None:
        master, slave = ("sae-a", "sae-b") if index % 2 == 0 else ("sae-b", "sae-a")
        master_node, slave_node = ("alice", "bob") if master == "sae-a" else ("bob", "alice")
        enc = _Client(
            await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", ports[master_node], ssl_context=contexts[master]
            )
        )
        dec = _Client(
            await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", ports[slave_node], ssl_context=contexts[slave]
            )
        )
        request = json.dumps({"number": keys_per_request}).encode()
        while trio.current_time() < deadline:
            start = time.perf_counter()
            status, body = await enc.post(f"/api/v1/keys/{slave}/enc_keys", request)
            if status != 200:
                counters["errors"] += 1
                continue
            keys = json.loads(body)["keys"]
            ids = json.dumps({"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}).encode()
            status, body = await dec.post(f"/api/v1/keys/{master}/dec_keys", ids)
            latencies.append(time.perf_counter() - start)
            if status != 200 or json.loads(body)["keys"] != keys:
                counters["mismatches"] += 1
            for key in keys:
                if key["key_ID"] in seen_ids or key["key"] in seen_keys:
                    counters["duplicates"] += 1
                seen_ids.add(key["key_ID"])
                seen_keys.add(key["key"])
        await enc.stream.aclose()
        await dec.stream.aclose()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(one, index)
    elapsed = time.perf_counter() - started
    pairs = len(latencies)
    lat_ms = np.array(latencies) * 1000.0 if latencies else np.array([float("nan")])
    return {
        "clients": clients,
        "keys_per_request": keys_per_request,
        "pairs": pairs,
        "requests_per_s": round(pairs / elapsed, 1),
        "key_pairs_per_s": round(pairs * keys_per_request / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        **counters,
    }


def _make_pki(directory: Path) -> None:
    pki.init_ca(directory / "ca")
    for name, purpose in (("alice", "node"), ("bob", "node"), ("sae-a", "sae"), ("sae-b", "sae")):
        pki.issue_certificate(directory / "ca", name, directory / name, purpose=purpose)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each row")
    parser.add_argument("--blocks", type=int, default=12, help="blocks of 10,000 keys to fill")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.serve is not None:
        trio.run(_serve, args.serve, args.blocks)
        return
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        directory = Path(tmp)
        _make_pki(directory)
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(directory), "--blocks", str(args.blocks)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert child.stdout is not None
            ports = json.loads(child.stdout.readline())
            rows = []
            print(
                f"{'clients':>7} {'keys/req':>8} {'pairs/s':>9} {'keys/s':>9} {'p50 ms':>8}"
                f" {'p99 ms':>8} {'dup':>4} {'mismatch':>8} {'errors':>6}"
            )
            for clients in CLIENTS:
                for keys_per_request in KEYS_PER_REQUEST:
                    row = trio.run(
                        _run_row, directory, ports, clients, keys_per_request, args.seconds
                    )
                    rows.append(row)
                    print(
                        f"{row['clients']:>7} {row['keys_per_request']:>8}"
                        f" {row['requests_per_s']:>9}"
                        f" {row['key_pairs_per_s']:>9} {row['p50_ms']:>8} {row['p99_ms']:>8}"
                        f" {row['duplicates']:>4} {row['mismatches']:>8} {row['errors']:>6}",
                        flush=True,
                    )
        finally:
            assert child.stdin is not None
            child.stdin.close()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
