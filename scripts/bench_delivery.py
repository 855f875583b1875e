"""Key delivery (ETSI GS QKD 014) over mutual TLS on loopback: enc_keys + dec_keys pairs per second.

As deployed, each node runs in its own process: two child processes serve Alice's and Bob's
delivery APIs (one trio run each, each with its own KeyStore filled by staging and committing the
same seeded blocks). The nodes reach each other over one loopback TCP connection carrying the
reservation wire form (``reservation_to_wire``) in length-prefixed msgpack frames, each with an
HMAC-SHA256 tag (standing in for the authenticated classical channel's framing and tags; concurrent
reservations are answered concurrently, as the daemon's pump does). This process runs the SAE
clients: each client holds one keep-alive TLS connection to its master's node and one to its
slave's node and loops ``enc_keys`` (POST, ``number = keys_per_request``) at the master node, then
``dec_keys`` with the returned IDs at the slave node; even clients are masters at Alice, odd ones at
Bob (both nodes act as master at once). Latency is per pair (enc_keys + dec_keys).

    python scripts/bench_delivery.py --json OUT.json [--seconds 3]

Rows: {"clients", "keys_per_request", "pairs", "requests_per_s", "key_pairs_per_s", "p50_ms",
"p99_ms", "duplicates", "mismatches", "errors", "commits_alice", "commits_bob"};
requests_per_s counts enc_keys + dec_keys pairs; commits_* are the store transactions each node
ran during the row (group commit: fewer than its store operations under concurrency). Target
>= 500 key pairs per second with p99 <= 50 ms on 2 cores, and no key handed out twice
(``duplicates`` counts key IDs or key bytes seen twice, ``mismatches`` slave bytes != master's).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import msgpack
import numpy as np
import trio

from qkdnode.config.delivery import DEFAULT_PREBIND_KEYS, ApiLimits, ServerLimits
from qkdnode.delivery.fairuse import FairUse, FairUsePolicy
from qkdnode.delivery.keys import KeyManager, reservation_from_wire, reservation_to_wire
from qkdnode.delivery.server import DeliveryApp, DeliveryServer, server_ssl_context
from qkdnode.demo.etsiclient import EtsiClient, sae_tls_context
from qkdnode.errors import ProtocolError
from qkdnode.ops import issuance
from qkdnode.store.groupcommit import GroupCommit
from qkdnode.store.keystore import DeliveryKey, KeyStore, ReservationRejected, StagedBlock

CLIENTS = (1, 4, 8, 16)
SAES = ("sae-a", "sae-b")
KEYS_PER_REQUEST = (1, 8, 32)
KEYS_PER_BLOCK = 10_000
# the stand-in link's key: drawn fresh by the parent for each run, handed to both children
LINK_KEY_ENV = "QKDNODE_BENCH_LINK_KEY"


def _link_key() -> bytes:
    return bytes.fromhex(os.environ[LINK_KEY_ENV])


TAG_BYTES = 32
NODES = {"alice": (0, "bob", ("sae-a",), ("sae-b",)), "bob": (1, "alice", ("sae-b",), ("sae-a",))}


# ---- child: one node -----------------------------------------------------------------------------


def _fill(store: KeyStore, blocks: int) -> None:
    rng = np.random.default_rng(2024)  # the same blocks at both nodes
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
        store.stage_block(block)
        store.commit_block(block_id)


class _PeerLink:
    """The node-to-node link of the benchmark: tagged msgpack frames over one TCP stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.manager: KeyManager | None = None
        self._next_id = 0
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, object]]]] = {}
        self._out: list[bytes] = []
        self._wake = trio.Event()
        self._slots = trio.Semaphore(64)
        self._key = _link_key()

    def _send(self, message: dict[str, object]) -> None:
        body = msgpack.packb(message, use_bin_type=True)
        tag = hmac.new(self._key, body, hashlib.sha256).digest()
        self._out.append(len(body).to_bytes(4, "big") + body + tag)
        self._wake.set()

    async def writer(self) -> None:
        while True:
            if not self._out:
                self._wake = trio.Event()
                await self._wake.wait()
            data, self._out = b"".join(self._out), []
            await self.stream.send_all(data)

    async def reader(self, nursery: trio.Nursery) -> None:
        buffer = bytearray()
        while True:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
            while len(buffer) >= 4:
                size = int.from_bytes(buffer[:4], "big")
                if len(buffer) < 4 + size + TAG_BYTES:
                    break
                body = bytes(buffer[4 : 4 + size])
                tag = bytes(buffer[4 + size : 4 + size + TAG_BYTES])
                del buffer[: 4 + size + TAG_BYTES]
                expected = hmac.new(self._key, body, hashlib.sha256).digest()
                if not hmac.compare_digest(tag, expected):
                    raise RuntimeError("peer link: bad tag")
                message = msgpack.unpackb(body, raw=False)
                if message["kind"] == "reserve":
                    await self._slots.acquire()
                    nursery.start_soon(self._answer, message)
                else:
                    waiting = self._waiting.get(message["id"])
                    if waiting is not None:
                        waiting[1].append(message)
                        waiting[0].set()

    async def _answer(self, message: dict[str, object]) -> None:
        try:
            assert self.manager is not None
            ok, detail, burned = True, "", []
            try:
                wire = message["reservation"]
                assert isinstance(wire, dict)
                keys, master, slave = reservation_from_wire(wire)
                await self.manager.record_peer_reservation(keys, master, slave)
            except ReservationRejected as exc:
                ok, detail, burned = False, str(exc), [k.bytes for k in exc.burned_key_ids]
            except ProtocolError as exc:
                ok, detail = False, str(exc)
            self._send(
                {
                    "kind": "result",
                    "id": message["id"],
                    "ok": ok,
                    "detail": detail,
                    "burned": burned,
                }
            )
        finally:
            self._slots.release()

    async def peer_reserve(self, keys: Sequence[DeliveryKey], master: str, slave: str) -> None:
        self._next_id += 1
        request_id = self._next_id
        done, box = trio.Event(), list[dict[str, object]]()
        self._waiting[request_id] = (done, box)
        try:
            self._send(
                {
                    "kind": "reserve",
                    "id": request_id,
                    "reservation": reservation_to_wire(keys, master, slave),
                }
            )
            await done.wait()
        finally:
            del self._waiting[request_id]
        answer = box[0]
        if not answer["ok"]:
            burned = answer["burned"]
            assert isinstance(burned, list)
            raise ReservationRejected(
                str(answer["detail"]), burned_key_ids=[uuid.UUID(bytes=b) for b in burned]
            )


async def _serve(directory: Path, node: str, blocks: int, peer_fd: int, prebind_keys: int) -> None:
    parity, peer, local, remote = NODES[node]
    store = KeyStore.open(directory / f"{node}-store", node_name=node)
    _fill(store, blocks)
    limits = ApiLimits(
        key_size_bits=256, min_key_size_bits=8, max_key_size_bits=8192, max_keys_per_request=128
    )
    link = _PeerLink(
        trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=peer_fd)))
    )
    commits = GroupCommit(store)
    link.manager = KeyManager(
        store,
        master_parity=parity,
        peer_reserve=link.peer_reserve,
        local_saes=local,
        peer_saes=remote,
        group_commit=commits,
        prebind_keys=prebind_keys,
        prebind_size_bits=256,
    )
    app = DeliveryApp(
        manager=link.manager,
        limits=limits,
        kme_id=f"kme-{node}",
        peer_kme_id=f"kme-{peer}",
        local_saes=local,
        peer_saes=remote,
        fair_use=FairUse(FairUsePolicy(keys_per_s=1e6, burst_keys=1e6, key_size_bits=256)),
        max_key_count=10**7,
    )
    server = DeliveryServer(app, ServerLimits(max_connections=1024))
    context = server_ssl_context(
        directory / f"{node}.pem", directory / f"{node}.key", directory / "ca" / issuance.CA_CERT
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.writer)
        nursery.start_soon(link.reader, nursery)
        await nursery.start(link.manager.run)
        _, port = await nursery.start(server.serve_tls, context, "127.0.0.1", 0)
        print(json.dumps({"port": port}), flush=True)
        # one line on stdin per row: answer the number of store transactions so far;
        # serve until the parent closes stdin
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            del line
            answer = {
                "commits": commits.batches,
                "ops": commits.operations,
                "cpu_s": time.process_time(),  # user + system, every thread of this node
            }
            print(json.dumps(answer), flush=True)
        nursery.cancel_scope.cancel()


# ---- parent: SAE clients -------------------------------------------------------------------------


async def _run_row(
    directory: Path, ports: dict[str, int], clients: int, keys_per_request: int, seconds: float
) -> dict[str, object]:
    latencies: list[float] = []
    seen_ids: set[str] = set()
    seen_keys: set[str] = set()
    counters = {"duplicates": 0, "mismatches": 0, "errors": 0}
    contexts = {
        sae: sae_tls_context(directory / "ca", directory, sae) for sae in ("sae-a", "sae-b")
    }
    deadline = trio.current_time() + seconds

    async def one(index: int) -> None:
        master, slave = ("sae-a", "sae-b") if index % 2 == 0 else ("sae-b", "sae-a")
        master_node, slave_node = ("alice", "bob") if master == "sae-a" else ("bob", "alice")
        enc = await EtsiClient.connect(ports[master_node], contexts[master])
        dec = await EtsiClient.connect(ports[slave_node], contexts[slave])
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
        await enc.aclose()
        await dec.aclose()

    started, cpu_started = time.perf_counter(), time.process_time()
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
        "cpu_ms_per_pair_clients": round(
            1000 * (time.process_time() - cpu_started) / max(1, pairs), 3
        ),
        **counters,
    }


def _make_pki(directory: Path) -> None:
    issuance.init_ca(directory / "ca")
    for name, purpose in (("alice", "node"), ("bob", "node"), ("sae-a", "sae"), ("sae-b", "sae")):
        issuance.issue_certificate(directory / "ca", name, directory / name, purpose=purpose)  # type: ignore[arg-type]


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection (the link between the two node processes)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname())
        two, _ = listener.accept()
    return one, two


def _rows(chosen: Sequence[str] | None) -> list[tuple[int, int]]:
    if not chosen:
        return [(c, k) for c in CLIENTS for k in KEYS_PER_REQUEST]
    rows = []
    for text in chosen:
        clients, _, keys = text.partition("x")
        if not (clients.isdigit() and keys.isdigit() and int(clients) > 0 and int(keys) > 0):
            raise SystemExit(f"--rows: {text!r} is not CLIENTSxKEYS, e.g. 16x1")
        rows.append((int(clients), int(keys)))
    return rows


def _ask(child: subprocess.Popen[str]) -> dict[str, float]:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("\n")
    child.stdin.flush()
    answer: dict[str, float] = json.loads(child.stdout.readline())
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each row")
    parser.add_argument("--blocks", type=int, default=12, help="blocks of 10,000 keys to fill")
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="CLIENTSxKEYS",
        help="run only these rows, e.g. 16x1 8x1 (default: every clients x keys_per_request)",
    )
    parser.add_argument(
        "--prebind-keys",
        type=int,
        default=DEFAULT_PREBIND_KEYS,
        help="keys each node reserves ahead per SAE pair (the daemon's [delivery] prebind_keys,"
        " default %(default)s; 0: reserve on request only)",
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--node", choices=sorted(NODES), help=argparse.SUPPRESS)
    parser.add_argument("--peer-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        trio.run(_serve, args.serve, args.node, args.blocks, args.peer_fd, args.prebind_keys)
        return
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        directory = Path(tmp)
        _make_pki(directory)
        ends = dict(zip(NODES, _socket_pair(), strict=True))
        children: dict[str, subprocess.Popen[str]] = {}
        link_key = secrets.token_hex(32)
        for node, end in ends.items():
            children[node] = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve",
                    str(directory),
                    "--node",
                    node,
                    "--blocks",
                    str(args.blocks),
                    "--peer-fd",
                    str(end.fileno()),
                    "--prebind-keys",
                    str(args.prebind_keys),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=(end.fileno(),),
                env={**os.environ, "PYTHONUNBUFFERED": "1", LINK_KEY_ENV: link_key},
            )
            end.close()
        try:
            ports = {}
            for node, child in children.items():
                assert child.stdout is not None
                ports[node] = json.loads(child.stdout.readline())["port"]
            rows = []
            print(
                f"{'clients':>7} {'keys/req':>8} {'pairs/s':>9} {'keys/s':>9} {'p50 ms':>8}"
                f" {'p99 ms':>8} {'dup':>4} {'mismatch':>8} {'errors':>6} {'commits':>13}"
                f" {'cpu ms/pair a/b/c':>18}"
            )
            for clients, keys_per_request in _rows(args.rows):
                before = {node: _ask(child) for node, child in children.items()}
                row = trio.run(_run_row, directory, ports, clients, keys_per_request, args.seconds)
                pairs = int(str(row["pairs"]))
                for node, child in children.items():
                    after = _ask(child)
                    row[f"commits_{node}"] = after["commits"] - before[node]["commits"]
                    row[f"store_ops_{node}"] = after["ops"] - before[node]["ops"]
                    row[f"cpu_ms_per_pair_{node}"] = round(
                        1000 * (after["cpu_s"] - before[node]["cpu_s"]) / max(1, pairs), 3
                    )
                rows.append(row)
                commits = f"{row['commits_alice']}/{row['commits_bob']}"
                cpu = "/".join(
                    f"{row[f'cpu_ms_per_pair_{who}']:.2f}" for who in ("alice", "bob", "clients")
                )
                print(
                    f"{row['clients']:>7} {row['keys_per_request']:>8}"
                    f" {row['requests_per_s']:>9}"
                    f" {row['key_pairs_per_s']:>9} {row['p50_ms']:>8} {row['p99_ms']:>8}"
                    f" {row['duplicates']:>4} {row['mismatches']:>8} {row['errors']:>6}"
                    f" {commits:>13} {cpu:>18}",
                    flush=True,
                )
        finally:
            for child in children.values():
                assert child.stdin is not None
                child.stdin.close()
            for child in children.values():
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
