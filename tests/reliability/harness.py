"""Crash and fault helpers: a daemon pair (optionally behind the MITM proxy), kill -9 and
restart, store checks ("both stores agree"), log scanning, and a fault-injecting launcher.

Fault injection without touching the daemon: ``python -m tests.reliability.harness run-faulty
--fail-commit-after N --config FILE`` runs ``qkdnode run`` with SQLite connections whose
``COMMIT`` fails with ``disk I/O error`` (what SQLite reports for a failed fsync,
SQLITE_IOERR_FSYNC) after N successful commits. The transaction is left uncommitted, as after a
real fsync failure; the daemon itself has no fault-injection switch.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdnode.demo.progress import LogFollower, Progress
from qkdnode.demo.run import DemoLayout, prepare_workdir, stop_nodes

REPO = Path(__file__).resolve().parents[2]
NAMED_ERRORS = frozenset(
    {
        "ProtocolError",
        "AuthenticationFailed",
        "CertificateRejected",
        "AuthKeyExhausted",
        "TooSlowError",
        "SessionEnded",
    }
)
# what the other node of a refused frame may see: its peer hung up mid-send
PEER_HUNG_UP = frozenset({"BrokenResourceError", "ClosedResourceError"})


def wait_until_catches_sigterm(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """Block until ``process`` handles SIGTERM (Linux /proc) or exits; no-op without /proc."""
    status = Path(f"/proc/{process.pid}/status")
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            lines = status.read_text().splitlines()
        except OSError:
            return
        caught = next((int(line.split()[1], 16) for line in lines if line.startswith("SigCgt:")), 0)
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.002)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class Pair:
    """Alice and Bob as ``qkdnode run`` processes; Alice dials ``alice_port`` (a proxy or Bob)."""

    layout: DemoLayout
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    followers: dict[str, LogFollower] = field(default_factory=dict)
    progress: dict[str, Progress] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    launcher: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        workdir: Path,
        *,
        block_pulses: int = 20_000_000,
        distance_km: float = 25.0,
        alice_port: int | None = None,
        log_level: str = "info",
        io_timeout_s: float = 5.0,
        keepalive_interval_s: float = 1.0,
        pool_target_bits: int = 32768,
        extra_auth: str = "",
        eve: float = 0.0,
    ) -> Pair:
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        layout = prepare_workdir(
            workdir,
            distance_km=distance_km,
            block_pulses=block_pulses,
            eve=eve,
            pool_target_bits=pool_target_bits,
        )
        for node in ("alice", "bob"):
            path = layout.config(node)
            text = path.read_text()
            text = text.replace(
                "[link]\n",
                f"io_timeout_s = {io_timeout_s}\nkeepalive_interval_s = {keepalive_interval_s}\n"
                "reconnect_max_delay_s = 1.0\n\n[link]\n",
                1,
            )
            text = text.replace('level = "info"', f'level = "{log_level}"')
            if extra_auth:
                text = text.replace("[store]\n", f"{extra_auth}\n\n[store]\n", 1)
            path.write_text(text)
        pair = cls(layout)
        if alice_port is not None:
            pair.route_alice_to(alice_port)
        for node in ("alice", "bob"):
            pair.followers[node] = LogFollower(layout.log(node))
            pair.progress[node] = Progress()
            pair.events[node] = []
        return pair

    def route_alice_to(self, port: int) -> None:
        path = self.layout.config("alice")
        text = re.sub(
            r'connect = "127\.0\.0\.1:\d+"', f'connect = "127.0.0.1:{port}"', path.read_text()
        )
        path.write_text(text)

    # ---- processes ------------------------------------------------------------------------
    def start(self, node: str, *, launcher: list[str] | None = None) -> None:
        command = launcher or self.launcher.get(node) or [sys.executable, "-m", "qkdnode", "run"]
        with (self.layout.workdir / f"{node}.stderr").open("ab") as stderr:
            self.processes[node] = subprocess.Popen(
                [*command, "--config", str(self.layout.config(node))],
                cwd=self.layout.workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                env=_env(),
            )
        # started = ready for a stop request: a SIGTERM in the interpreter's first ~30 ms, before
        # qkdnode.cli installs its handler, kills by the default disposition
        wait_until_catches_sigterm(self.processes[node])

    def start_both(self) -> None:
        self.start("bob")
        self.start("alice")

    def kill9(self, node: str) -> None:
        process = self.processes[node]
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> dict[str, int | None]:
        names = list(self.processes)
        codes = stop_nodes([self.processes[n] for n in names], timeout_s=timeout_s)
        return dict(zip(names, codes, strict=True))

    def stderr(self, node: str) -> str:
        return (self.layout.workdir / f"{node}.stderr").read_text(errors="replace")

    # ---- logs -----------------------------------------------------------------------------
    def poll(self) -> None:
        for node, follower in self.followers.items():
            for event in follower.new_events():
                self.events[node].append(event)
                self.progress[node].feed(event)

    def wait(
        self,
        done: Callable[[Pair], bool],
        *,
        timeout_s: float = 60.0,
        what: str = "condition",
        allow_exit: bool = False,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            if done(self):
                return
            if not allow_exit:
                for node, process in self.processes.items():
                    if process.poll() is not None:
                        raise AssertionError(
                            f"{node} exited with {process.returncode}: {self.stderr(node)[-1500:]}"
                        )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.progress['alice']}")
            time.sleep(0.05)

    def committed(self, node: str = "alice") -> int:
        return self.progress[node].committed

    def named(self, node: str, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events[node] if e.get("event") == event]

    def session_failures(self) -> list[tuple[str, str]]:
        """(node, error type) of every failed session either node logged."""
        out = []
        for node in ("alice", "bob"):
            for event in self.events[node]:
                if event.get("event") == "channel.session_failed":
                    out.append((node, str(event.get("error"))))
        return out

    # ---- stores ---------------------------------------------------------------------------
    def store(self, node: str) -> StoreView:
        return StoreView.read(self.layout.store(node) / "keys.db")

    def master_keys(self, node: str = "alice") -> int:
        """Stored keys ``node`` can hand out as master now (available, its position parity).

        A committed block is not enough: after a restart a block may go wholly to refilling the
        authentication pool and commit with no consumer key."""
        path = self.layout.store(node) / "keys.db"
        if not path.exists():
            return 0
        parity = 0 if node == "alice" else 1
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            query = "SELECT count(*) FROM keys WHERE state = 'available' AND position % 2 = ?"
            return int(db.execute(query, (parity,)).fetchone()[0])
        finally:
            db.close()


@dataclass(frozen=True)
class StoreView:
    """Read-only snapshot of one key store."""

    blocks: dict[int, str]
    keys: dict[str, tuple[int, str, bytes | None]]  # key_id -> (block, state, material)
    deliveries: dict[str, tuple[str, str]]  # delivery_id -> (role, state)
    ledger: bytes | None

    @classmethod
    def read(cls, path: Path) -> StoreView:
        if not path.exists():
            return cls({}, {}, {}, None)
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            blocks = dict(db.execute("SELECT block_id, state FROM blocks").fetchall())
            keys = {
                str(k): (int(b), str(s), None if m is None else bytes(m))
                for k, b, s, m in db.execute("SELECT key_id, block_id, state, material FROM keys")
            }
            deliveries = {
                str(d): (str(r), str(s))
                for d, r, s in db.execute("SELECT delivery_id, role, state FROM deliveries")
            }
            row = db.execute("SELECT state FROM auth_ledger WHERE singleton = 1").fetchone()
        finally:
            db.close()
        return cls(blocks, keys, deliveries, None if row is None else bytes(row[0]))

    def committed_blocks(self) -> set[int]:
        return {b for b, s in self.blocks.items() if s == "committed"}

    def deliverable(self) -> dict[str, bytes]:
        return {
            k: m
            for k, (_, s, m) in self.keys.items()
            if s in ("available", "reserved") and m is not None
        }


def stores_agree(alice: StoreView, bob: StoreView) -> list[str]:
    """Violations of "both stores agree" (empty list: they agree).

    For every key ID on both nodes the bytes are equal (where both still hold them); no ID is
    deliverable on one node while missing or delivered on the other; committed blocks match.
    """
    problems = []
    for key_id in alice.keys.keys() & bob.keys.keys():
        a_block, _a_state, a_mat = alice.keys[key_id]
        b_block, _b_state, b_mat = bob.keys[key_id]
        if a_block != b_block:
            problems.append(f"{key_id}: block {a_block} vs {b_block}")
        if a_mat is not None and b_mat is not None and a_mat != b_mat:
            problems.append(f"{key_id}: key bytes differ")
    for mine, theirs, name in ((alice, bob, "alice"), (bob, alice, "bob")):
        for key_id in mine.deliverable().keys() - set(theirs.keys):
            block = mine.keys[key_id][0]
            problems.append(f"{key_id} (block {block}) deliverable on {name} only")
    if alice.committed_blocks() != bob.committed_blocks():
        diff = alice.committed_blocks() ^ bob.committed_blocks()
        problems.append(f"committed blocks differ: {sorted(diff)[:10]}")
    return problems


# ---- secret scanning --------------------------------------------------------------------------


def windows(secrets: Iterable[bytes], width: int = 8) -> set[bytes]:
    """Every ``width``-byte substring of every secret."""
    out: set[bytes] = set()
    for secret in secrets:
        for i in range(len(secret) - width + 1):
            out.add(secret[i : i + width])
    return out


_HEX_RUN = re.compile(rb"[0-9a-fA-F]{16,}")
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{12,}={0,2}")


def scan(data: bytes, needles: set[bytes], width: int = 8) -> int:
    """Occurrences of any needle in ``data`` raw, or inside hex or base64 runs of ``data``."""
    hits = 0
    candidates = [data]
    for match in _HEX_RUN.finditer(data):
        run = match.group()
        for shift in (0, 1):
            piece = run[shift : shift + (len(run) - shift) // 2 * 2]
            candidates.append(bytes.fromhex(piece.decode()))
    for match in _B64_RUN.finditer(data):
        run = match.group().rstrip(b"=")
        for shift in range(4):
            piece = run[shift:]
            piece = piece[: len(piece) // 4 * 4]
            for decoder in (base64.b64decode, base64.urlsafe_b64decode):
                with contextlib.suppress(ValueError):
                    candidates.append(decoder(piece))
    for blob in candidates:
        for i in range(len(blob) - width + 1):
            if blob[i : i + width] in needles:
                hits += 1
    return hits


# ---- fault-injecting launcher -----------------------------------------------------------------


def _install_commit_fault(fail_after: int) -> None:
    """Every SQLite connection the store opens fails its COMMIT after ``fail_after`` commits."""
    state = {"commits": 0}
    original = sqlite3.connect

    class FaultyConnection(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql.strip().upper() == "COMMIT":
                if state["commits"] >= fail_after:
                    raise sqlite3.OperationalError("disk I/O error (injected fsync failure)")
                state["commits"] += 1
            return super().execute(sql, *args)

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", FaultyConnection)
        connection: sqlite3.Connection = original(*args, **kwargs)
        return connection

    # the store calls sqlite3.connect through the module: replace it for this process only
    setattr(sqlite3, "connect", connect)  # noqa: B010


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "run-faulty" and argv[1] == "--fail-commit-after":
        _install_commit_fault(int(argv[2]))
        from qkdnode.cli import main as qkdnode_main

        return qkdnode_main(["run", *argv[3:]])
    print("usage: python -m tests.reliability.harness run-faulty --fail-commit-after N --config F")
    return 2


def faulty_launcher(fail_after: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.reliability.harness",
        "run-faulty",
        "--fail-commit-after",
        str(fail_after),
    ]


def dump(value: object) -> str:
    return json.dumps(value, default=str)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ---- ETSI 014 client (scenarios 9, 12, 13, 14) ----------------------------------------------


def tls_context(layout: DemoLayout, sae: str | None, *, ca_dir: Path | None = None) -> Any:
    """A client TLS context trusting the pair's CA, presenting ``sae``'s certificate (if any)
    from ``ca_dir`` (default: the pair's PKI)."""
    import ssl

    context = ssl.create_default_context(cafile=str(layout.node_ca_dir / "ca.pem"))
    if sae is not None:
        directory = ca_dir or layout.pki_dir
        context.load_cert_chain(str(directory / f"{sae}.pem"), str(directory / f"{sae}.key"))
    return context


def api(
    layout: DemoLayout,
    node: str,
    sae: str | None,
    path: str,
    body: dict[str, Any] | bytes | None = None,
    *,
    ca_dir: Path | None = None,
    timeout_s: float = 15.0,
) -> tuple[int, Any]:
    """One ETSI 014 call to ``node``'s KME as ``sae``: (HTTP status, decoded JSON or None)."""
    import http.client

    connection = http.client.HTTPSConnection(
        "localhost",
        layout.kme_ports[node],
        context=tls_context(layout, sae, ca_dir=ca_dir),
        timeout=timeout_s,
    )
    try:
        payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(
            "GET" if body is None else "POST",
            f"/api/v1/keys/{path}",
            body=payload,
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        raw = response.read()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = None
        return response.status, decoded
    finally:
        connection.close()


def add_sae_certificates(layout: DemoLayout, *names: str) -> None:
    """Issue SAE client certificates from the pair's SAE CA (e.g. an extra or unauthorised SAE)."""
    from qkdnode.ops import issuance

    for name in names:
        if not (layout.pki_dir / f"{name}.pem").exists():
            issuance.issue_certificate(
                layout.sae_ca_dir, name, layout.pki_dir / name, purpose="sae"
            )


def edit_config(layout: DemoLayout, node: str, old: str, new: str) -> None:
    path = layout.config(node)
    text = path.read_text()
    if old not in text:
        raise AssertionError(f"{old!r} not in {path}")
    path.write_text(text.replace(old, new, 1))


@dataclass
class DeliveryAudit:
    """Keys handed out through the API across kills: every key ID must be new, and the slave
    must get the master's bytes; a delivered ID must never be deliverable again in a store."""

    issued: dict[str, str] = field(default_factory=dict)  # key_ID -> base64 key
    duplicates: int = 0
    mismatches: int = 0
    refused: int = 0
    refusals: list[str] = field(default_factory=list)  # why each refused call was refused

    def deliver(self, pair: Pair, number: int = 2, *, wait_s: float = 8.0) -> int:
        """enc_keys at Alice (sae-a -> sae-b), dec_keys at Bob; returns keys delivered.

        A node restarted a moment ago may not listen yet: retry for up to ``wait_s``."""
        layout = pair.layout
        deadline = time.monotonic() + wait_s
        while True:
            try:
                status, issued = api(layout, "alice", "sae-a", "sae-b/enc_keys", {"number": number})
                break
            except OSError as error:
                if time.monotonic() > deadline:
                    self.refused += 1
                    self.refusals.append(f"enc_keys: {error!r}")
                    return 0
                time.sleep(0.2)
        if status != 200:
            self.refused += 1
            self.refusals.append(f"enc_keys: HTTP {status} {issued}")
            return 0
        keys = issued["keys"]
        for key in keys:
            if key["key_ID"] in self.issued:
                self.duplicates += 1
            self.issued[key["key_ID"]] = key["key"]
        ids = {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
        while True:
            try:
                status, fetched = api(layout, "bob", "sae-b", "sae-a/dec_keys", ids)
                break
            except OSError:
                if time.monotonic() > deadline + wait_s:
                    return len(keys)  # issued by the master; the slave was down throughout
                time.sleep(0.2)
        if status == 200:
            got = {k["key_ID"]: k["key"] for k in fetched["keys"]}
            self.mismatches += sum(1 for k in keys if got.get(k["key_ID"]) != k["key"])
        return len(keys)

    def reused(self, *views: StoreView) -> int:
        """Delivered key IDs that a store offers again (available or reserved with bytes)."""
        return sum(1 for view in views for key_id in view.deliverable() if key_id in self.issued)
