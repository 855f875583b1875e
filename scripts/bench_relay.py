"""Relayed keys against direct keys: ETSI GS QKD 014 key pairs per second through a chain A–R–C.

Three ``qkdnode run`` processes on loopback (``qkdnode.demo.chain``, 25 km per link); R also
serves SAE ``sae-r`` with the keys of its link with A, so one run measures both:

- 1 hop (direct): ``sae-a`` at A is master for ``sae-r`` at R: the link's own keys;
- 2 hops (relayed): ``sae-a`` at A is master for ``sae-b`` at C: each key relayed through R.

The stores are filled first (every link commits ``--blocks`` blocks, and the relay's pads are
filled to ``--pad-target-bits`` on both hops), so that key production is not what is measured;
the links keep distilling meanwhile. Each client holds keep-alive TLS connections to the master's
and the slave's KME and loops ``enc_keys`` (one key of 256 bits) at the master, then
``dec_keys`` at the slave; latency is per pair.

    python scripts/bench_relay.py --json OUT [--seconds 20] [--clients 1 4]

Rows: {"hops", "clients", "pairs", "key_pairs_per_s", "p50_ms", "p99_ms", "errors",
"mismatches", "duplicates", "link_key_bits_per_relayed_bit", "confirmation_bits_per_key_bit",
"auth_bits_per_relayed_key", "blocks_committed_during"}. ``link_key_bits_per_relayed_bit``
(relayed rows): pad bits each hop allocated during the row (from the relay stores) over the bits
the row's relays carried (key and confirmation key, ``payload_bits``), one figure per hop;
``confirmation_bits_per_key_bit``: the 256-bit confirmation key that rides with each key, per key
bit. ``auth_bits_per_relayed_key``: authentication-key bits the links spent during the row
(``qkdnode_auth_pool_spent_bits_total``) per relayed key; relay messages are control frames
under the session's control keys, so this is the links' block traffic, reported beside the
count of blocks committed during the row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import trio

from qkdnode.demo.chain import (
    MIDDLE_SAE,
    ChainLayout,
    ChainProgress,
    prepare_chain,
)
from qkdnode.demo.etsiclient import EtsiClient, sae_tls_context
from qkdnode.demo.progress import LogFollower
from qkdnode.demo.run import start_process, stop_nodes
from qkdnode.relay.events import Direction, Position
from qkdnode.relay.messages import payload_bits
from qkdnode.store.relaystore import RelayStore

KEY_BITS = 256
# (hops, slave SAE, where the slave's KME is)
ROUTES = ((1, MIDDLE_SAE), (2, "sae-b"))


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _auth_spent_bits(layout: ChainLayout) -> float:
    total = 0.0
    for name, port in layout.metrics_ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        total += _metric_sum(text, "qkdnode_auth_pool_spent_bits_total")
        del name
    return total


def _relay_counts(layout: ChainLayout) -> dict[str, Any]:
    """Pad bits spent per outgoing stream on the route A → R → C, relays started at A."""
    counts: dict[str, Any] = {}
    for node, peer in (("A", "R"), ("R", "C")):
        store = RelayStore.open(layout.store(node) / "relay", node_name=node)
        try:
            figures = store.counts()
        finally:
            store.close()
        counts[f"{node}->{peer}"] = figures.pad_bits_spent.get((peer, Direction.OUT), 0)
        counts[f"{node}->{peer} held"] = figures.pad_bits_held.get((peer, Direction.OUT), 0)
        if node == "A":
            counts["origin_relays"] = sum(
                n for (position, _), n in figures.relays.items() if position is Position.ORIGIN
            )
    return counts


async def _row(
    layout: ChainLayout, hops: int, slave: str, clients: int, seconds: float
) -> dict[str, Any]:
    kmes = layout.kmes
    master_port = kmes.kme_ports["alice"]
    slave_port = layout.middle_kme_port if hops == 1 else kmes.kme_ports["bob"]
    assert slave_port is not None
    contexts = {
        sae: sae_tls_context(kmes.node_ca_dir, kmes.pki_dir, sae) for sae in ("sae-a", slave)
    }
    latencies: list[float] = []
    counters = {"errors": 0, "mismatches": 0, "duplicates": 0}
    seen: set[str] = set()
    error_reasons: dict[str, int] = {}
    deadline = trio.current_time() + seconds

    async def one() -> None:
        enc = await EtsiClient.connect(master_port, contexts["sae-a"])
        dec = await EtsiClient.connect(slave_port, contexts[slave])
        request = json.dumps({"number": 1, "size": KEY_BITS}).encode()
        while trio.current_time() < deadline:
            start = time.perf_counter()
            status, body = await enc.post(f"/api/v1/keys/{slave}/enc_keys", request)
            if status != 200:
                counters["errors"] += 1
                reason = f"{status} {json.loads(body or b'{}').get('message', '')}"
                error_reasons[reason] = error_reasons.get(reason, 0) + 1
                await trio.sleep(0.05)
                continue
            keys = json.loads(body)["keys"]
            ids = json.dumps({"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}).encode()
            status, body = await dec.post("/api/v1/keys/sae-a/dec_keys", ids)
            latencies.append(time.perf_counter() - start)
            if status != 200 or json.loads(body)["keys"] != keys:
                counters["mismatches"] += 1
            for key in keys:
                if key["key_ID"] in seen:
                    counters["duplicates"] += 1
                seen.add(key["key_ID"])
        await enc.aclose()
        await dec.aclose()

    before = _relay_counts(layout)
    auth_before = _auth_spent_bits(layout)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one)
    elapsed = time.perf_counter() - started
    auth_spent = _auth_spent_bits(layout) - auth_before
    after = _relay_counts(layout)
    pairs = len(latencies)
    lat_ms = np.array(latencies) * 1000.0 if latencies else np.array([float("nan")])
    row: dict[str, Any] = {
        "hops": hops,
        "clients": clients,
        "pairs": pairs,
        "key_pairs_per_s": round(pairs / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        **counters,
        "error_reasons": error_reasons,
        "link_key_bits_per_relayed_bit": None,
        "confirmation_bits_per_key_bit": None,
        "auth_bits_per_relayed_key": None,
    }
    if hops == 2:
        relays = after["origin_relays"] - before["origin_relays"]
        carried = relays * payload_bits(KEY_BITS)
        row["relays_started"] = relays
        row["link_key_bits_per_relayed_bit"] = {
            hop: round((after[hop] - before[hop]) / carried, 6) if carried else None
            for hop in ("A->R", "R->C")
        }
        row["confirmation_bits_per_key_bit"] = round(
            (payload_bits(KEY_BITS) - KEY_BITS) / KEY_BITS, 6
        )
        row["auth_bits_per_relayed_key"] = round(auth_spent / pairs, 1) if pairs else None
    row["auth_bits_spent_by_links"] = auth_spent
    return row


def _wait_until_filled(
    layout: ChainLayout,
    progress: ChainProgress,
    followers: dict[str, LogFollower],
    blocks: int,
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for name, follower in followers.items():
            for event in follower.new_events():
                progress.feed(name, event)
        if progress.ready(blocks):
            counts = _relay_counts(layout)
            if all(
                counts[f"{hop} held"] >= 0.9 * layout.pad_target_bits for hop in ("A->R", "R->C")
            ):
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"stores not filled after {timeout_s} s: {progress.summary()}")
        time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each row")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--blocks", type=int, default=6, help="blocks every link commits first")
    parser.add_argument("--pad-target-bits", type=int, default=1 << 21)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--workdir", type=Path, help="keep the chain here (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qkdnode-bench-relay-"))
    workdir.mkdir(parents=True, exist_ok=True)
    layout = prepare_chain(workdir, middle_sae=True, pad_target_bits=args.pad_target_bits)
    followers = {name: LogFollower(layout.log(name)) for name in layout.names}
    progress = ChainProgress(layout)
    processes = [start_process(workdir, layout.config(n), n) for n in reversed(layout.names)]
    rows: list[dict[str, Any]] = []
    try:
        _wait_until_filled(layout, progress, followers, args.blocks, args.timeout_s)
        for clients in args.clients:
            for hops, slave in ROUTES:
                row = trio.run(_row, layout, hops, slave, clients, args.seconds)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        codes = stop_nodes(processes)
    direct = {r["clients"]: r["key_pairs_per_s"] for r in rows if r["hops"] == 1}
    for row in rows:
        if row["hops"] == 2 and direct.get(row["clients"]):
            row["fraction_of_direct"] = round(row["key_pairs_per_s"] / direct[row["clients"]], 3)
    summary = {"rows": rows, "exit_codes": codes, "workdir": str(workdir)}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["rows"], indent=1))


if __name__ == "__main__":
    main()
