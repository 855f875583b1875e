"""``qkdnode demo``: Alice and Bob as two real ``qkdnode run`` processes on loopback.

The demo makes a work directory with a fresh PKI (two CAs: ``pki/node-ca/`` issues the node
certificates, ``pki/sae-ca/`` the SAE client certificates ``sae-a``/``sae-b``; each CA's empty CRL
``crl.pem``, re-signed at every start), the bootstrap trust anchor (``--bootstrap``: the PKI, a
pre-shared key, or a web of trust of OpenPGP keys, see ``bootstrap.py``) and two configs,
starts both nodes with the simulated link, follows their JSON logs to show progress, stops after
``--blocks`` block attempts (or when Alice refuses Bob's credentials before any block), and
proves that both stores hold the same keys. Nothing secret is printed: keys are compared, never
shown.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO, TypedDict

from qkdnode.config.auth import DEFAULT_ROTATION_POOL_BITS
from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.demo.bootstrap import Bootstrap, auth_lines, make_bootstrap
from qkdnode.demo.display import DemoDisplay
from qkdnode.demo.progress import LogFollower, Progress
from qkdnode.ops import issuance
from qkdnode.postprocess.finitekey import (
    DecoySettings,
    OneDecoySettings,
    SecurityParameters,
    channel_transmittance,
    optimise_decoy_settings,
)
from qkdnode.postprocess.keylength.one_decoy import optimise_one_decoy_settings

DEFAULT_BLOCK_PULSES = 40_000_000
# the reconciliation efficiency the demo's settings are optimised for (Cascade's, measured)
DEMO_RECONCILIATION_EFFICIENCY: Final = 1.06


def prepare_workdir(
    workdir: Path,
    *,
    distance_km: float,
    block_pulses: int,
    eve: float = 0.0,
    pool_target_bits: int = 32768,
    bootstrap: Bootstrap = "pki",
    vouches: int | None = None,
    decoys: int = 2,
) -> DemoLayout:
    """Fresh ports, PKI, the bootstrap trust anchor and the two node configs in ``workdir``
    (also used by the tests). ``vouches``: web of trust only, how many introducers vouch for
    each node (default: all of them). ``decoys``: 2 (signal, decoy, vacuum) or 1 (signal and
    one decoy, ``security_model = "one_decoy"``)."""
    layout = DemoLayout(
        workdir=workdir,
        peer_port=free_port(),
        fibre_port=free_port(),
        kme_ports={"alice": free_port(), "bob": free_port()},
        metrics_ports={"alice": free_port(), "bob": free_port()},
    )
    make_pki(layout)
    make_bootstrap(workdir, bootstrap, vouches=vouches)
    if decoys not in (1, 2):
        raise ValueError(f"decoys: 1 or 2, got {decoys!r}")
    decoy = (
        one_decoy_settings_for(distance_km, block_pulses)
        if decoys == 1
        else decoy_settings_for(distance_km, block_pulses)
    )
    for node in ("alice", "bob"):
        layout.config(node).write_text(
            node_config_text(
                layout,
                node,
                distance_km=distance_km,
                block_pulses=block_pulses,
                eve=eve,
                decoy=decoy,
                pool_target_bits=pool_target_bits,
                bootstrap=bootstrap,
            )
        )
    return layout


# Every port free_port has returned in this process: a layout takes several ports one after
# another, each free when picked but not yet bound, so the kernel may offer one of them again.
_PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port free now and never returned before by this process.

    The port is not held: another process may still take it before the caller binds it."""
    held: list[socket.socket] = []
    try:
        while True:
            # sockets of refused picks stay bound until the end, so no pick repeats
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            if port not in _PORTS_HANDED_OUT:
                _PORTS_HANDED_OUT.add(port)
                return port
    finally:
        for sock in held:
            sock.close()


SAE_OF = {"alice": "sae-a", "bob": "sae-b"}


@dataclass(frozen=True, slots=True)
class DemoLayout:
    workdir: Path
    peer_port: int
    fibre_port: int
    kme_ports: dict[str, int]
    metrics_ports: dict[str, int]

    def kme_url(self, node: str) -> str:
        return f"https://localhost:{self.kme_ports[node]}/api/v1/keys/"

    def metrics_url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[node]}/metrics"

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def node_ca_dir(self) -> Path:
        """The CA of the node certificates (the peer channel; the KMEs' TLS server certificates)."""
        return self.pki_dir / "node-ca"

    @property
    def sae_ca_dir(self) -> Path:
        """The CA of the SAE client certificates."""
        return self.pki_dir / "sae-ca"

    def config(self, node: str) -> Path:
        return self.workdir / f"{node}.toml"

    def log(self, node: str) -> Path:
        return self.workdir / f"{node}.log"

    def store(self, node: str) -> Path:
        return self.workdir / f"{node}-store"


DEMO_CRL_DAYS: Final = 30.0


def make_pki(layout: DemoLayout) -> None:
    """Two CAs, the node and SAE certificates (made once per work directory), and each CA's
    empty CRL (re-signed every time, so that a reused work directory never has a stale one)."""
    directory = layout.pki_dir
    node_ca, sae_ca = layout.node_ca_dir, layout.sae_ca_dir
    if not (node_ca / issuance.CA_CERT).exists():
        issuance.init_ca(node_ca, common_name="qkdnode demo node CA")
        issuance.init_ca(sae_ca, common_name="qkdnode demo SAE CA")
        for node in ("alice", "bob"):
            issuance.issue_certificate(node_ca, node, directory / node, purpose="node")
        for sae in ("sae-a", "sae-b"):
            issuance.issue_certificate(sae_ca, sae, directory / sae, purpose="sae")
    for ca in (node_ca, sae_ca):
        issuance.issue_crl(ca, validity_days=DEMO_CRL_DAYS)


class _DemoChannel(TypedDict):
    """What both decoy optimisers take of the demo's simulated link."""

    transmittance: float
    dark_count_probability: float
    misalignment_error: float
    reconciliation_efficiency: float
    security: SecurityParameters


def _demo_channel(distance_km: float) -> _DemoChannel:
    """The demo's simulated link (default fibre and detector) at ``distance_km``."""
    link = SimulatedLinkConfig(fiber_km=distance_km)
    return _DemoChannel(
        transmittance=channel_transmittance(
            fiber_km=distance_km,
            attenuation_db_per_km=link.attenuation_db_per_km,
            detector_efficiency=link.detector_efficiency,
            insertion_loss_db=link.insertion_loss_db,
        ),
        dark_count_probability=link.dark_count_probability_per_gate,
        misalignment_error=link.misalignment_error,
        reconciliation_efficiency=DEMO_RECONCILIATION_EFFICIENCY,
        security=SecurityParameters(eps_sec=1e-10, eps_cor=1e-12),
    )


def decoy_settings_for(distance_km: float, block_pulses: int) -> DecoySettings:
    """Intensities and probabilities that maximise the expected finite-key rate for the demo's
    simulated link at this distance and block size."""
    mu_vacuum = SimulatedLinkConfig().mu_vacuum
    channel = _demo_channel(distance_km)
    return optimise_decoy_settings(**channel, pulses=block_pulses, mu_vacuum=mu_vacuum).settings


def one_decoy_settings_for(distance_km: float, block_pulses: int) -> OneDecoySettings:
    """As ``decoy_settings_for``, for a source of two intensities (one-decoy BB84)."""
    channel = _demo_channel(distance_km)
    return optimise_one_decoy_settings(**channel, pulses=block_pulses).settings


def _intensity_lines(decoy: DecoySettings | OneDecoySettings) -> str:
    """The ``[link]`` lines of the source's intensities (a one-decoy source sends no third
    class: p_vacuum = 0, mu_vacuum left at the link's default)."""
    if isinstance(decoy, OneDecoySettings):
        return f"""mu_signal = {decoy.mu_signal:.6f}
mu_decoy = {decoy.mu_decoy:.6f}
p_signal = {decoy.p_signal:.6f}
p_decoy = {1.0 - round(decoy.p_signal, 6):.6f}
p_vacuum = 0.0
p_key_basis = {decoy.p_key_basis:.6f}"""
    return f"""mu_signal = {decoy.mu_signal:.6f}
mu_decoy = {decoy.mu_decoy:.6f}
mu_vacuum = {decoy.mu_vacuum:.6f}
p_signal = {decoy.p_signal:.6f}
p_decoy = {decoy.p_decoy:.6f}
p_vacuum = {1.0 - round(decoy.p_signal, 6) - round(decoy.p_decoy, 6):.6f}
p_key_basis = {decoy.p_key_basis:.6f}"""


def node_config_text(
    layout: DemoLayout,
    node: str,
    *,
    distance_km: float,
    block_pulses: int,
    eve: float,
    decoy: DecoySettings | OneDecoySettings,
    pool_target_bits: int = 32768,
    bootstrap: Bootstrap = "pki",
) -> str:
    peer = "bob" if node == "alice" else "alice"
    address = f"127.0.0.1:{layout.peer_port}"
    peer_line = f'connect = "{address}"' if node == "alice" else f'listen = "{address}"'
    eve_table = (
        f"\n[link.eve]\nintercept_resend_fraction = {eve}\n" if eve > 0 and node == "bob" else ""
    )
    return f"""# qkdnode demo: {node} (generated by `qkdnode demo`)
[node]
name = "{node}"
role = "{node}"

[peer]
name = "{peer}"
{peer_line}

[link]
backend = "simulated"
fiber_km = {distance_km}
fibre_host = "127.0.0.1"
fibre_port = {layout.fibre_port}
# decoy settings optimised for this distance and block size
{_intensity_lines(decoy)}
{eve_table}
[postprocess]
block_pulses = {block_pulses}
cascade_variant = "subblock-reuse"
security_model = "{"one_decoy" if isinstance(decoy, OneDecoySettings) else "decoy"}"

[auth]
{auth_lines(bootstrap, node)}pool_target_bits = {pool_target_bits}
pool_reserve_bits = {pool_target_bits // 8}
rotation_pool_bits = {min(DEFAULT_ROTATION_POOL_BITS, pool_target_bits - pool_target_bits // 8)}

[store]
directory = "{node}-store"

[delivery]
listen = "127.0.0.1:{layout.kme_ports[node]}"
certificate = "pki/{node}.pem"
private_key = "pki/{node}.key"
sae_ca = "pki/sae-ca/ca.pem"
sae_crl = "pki/sae-ca/crl.pem"
kme_id = "{node}"
peer_kme_id = "{peer}"
local_saes = ["{SAE_OF[node]}"]
peer_saes = ["{SAE_OF[peer]}"]
# keys at even block positions are handed out by Alice as master, odd ones by Bob
master_parity = {0 if node == "alice" else 1}

[metrics]
listen = "127.0.0.1:{layout.metrics_ports[node]}"

[logging]
level = "info"
format = "json"
file = "{node}.log"
"""


def read_keys(store_dir: Path) -> dict[str, bytes]:
    """Key ID -> bytes of every committed key still held (read-only, for the comparison)."""
    path = store_dir / "keys.db"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT key_id, material FROM keys WHERE state IN ('available', 'reserved')"
            " AND material IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    return {str(key_id): bytes(material) for key_id, material in rows}


def count_blocks(store_dir: Path) -> int:
    """How many blocks the store has a record of, in any state (read-only)."""
    path = store_dir / "keys.db"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (count,) = db.execute("SELECT count(*) FROM blocks").fetchone()
    finally:
        db.close()
    return int(count)


def compare_stores(layout: DemoLayout, *, exact: bool) -> tuple[bool, int]:
    """(keys match, number of keys compared). ``exact``: the ID sets must be equal too."""
    alice = read_keys(layout.store("alice"))
    bob = read_keys(layout.store("bob"))
    common = alice.keys() & bob.keys()
    if exact and alice.keys() != bob.keys():
        return False, len(common)
    same = all(alice[key_id] == bob[key_id] for key_id in common)
    return same and bool(common), len(common)


def api_call(
    layout: DemoLayout, node: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One ETSI 014 call to ``node``'s KME as that node's SAE, over mutual TLS."""
    return etsi_call(layout, port=layout.kme_ports[node], sae=SAE_OF[node], path=path, body=body)


def etsi_call(
    layout: DemoLayout, *, port: int, sae: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One ETSI 014 call to the KME on ``port`` as SAE ``sae`` (its certificate in the
    demo PKI); RuntimeError naming the HTTP status unless it answers 200."""
    pki_dir = layout.pki_dir
    context = ssl.create_default_context(cafile=str(layout.node_ca_dir / issuance.CA_CERT))
    context.load_cert_chain(str(pki_dir / f"{sae}.pem"), str(pki_dir / f"{sae}.key"))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(
            "GET" if body is None else "POST",
            f"/api/v1/keys/{path}",
            body=payload,
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        data = json.loads(response.read() or b"{}")
        if response.status != 200:
            raise RuntimeError(f"{sae} {path}: HTTP {response.status} {data.get('message')}")
        if not isinstance(data, dict):
            raise RuntimeError(f"{sae} {path}: not a JSON object")
        return data
    finally:
        connection.close()


def prove_keys_through_api(layout: DemoLayout, *, number: int = 4) -> tuple[bool, int]:
    """Each node as master gets keys for the other's SAE; the slave gets the same bytes."""
    compared = 0
    for master, slave in (("alice", "bob"), ("bob", "alice")):
        status = api_call(layout, master, f"{SAE_OF[slave]}/status")
        if int(status.get("stored_key_count", 0)) < number:
            continue
        issued = api_call(layout, master, f"{SAE_OF[slave]}/enc_keys", {"number": number})
        keys = issued.get("keys", [])
        ids = [{"key_ID": key["key_ID"]} for key in keys]
        fetched = api_call(layout, slave, f"{SAE_OF[master]}/dec_keys", {"key_IDs": ids})
        by_id = {key["key_ID"]: key["key"] for key in fetched.get("keys", [])}
        if len(keys) != number or any(by_id.get(k["key_ID"]) != k["key"] for k in keys):
            return False, compared
        compared += len(keys)
    return compared > 0, compared


def start_node(layout: DemoLayout, node: str) -> subprocess.Popen[bytes]:
    return start_process(layout.workdir, layout.config(node), node)


def start_process(workdir: Path, config: Path, node: str) -> subprocess.Popen[bytes]:
    """``qkdnode run --config config`` in ``workdir``, its stderr in ``<node>.stderr``."""
    stderr_path = workdir / f"{node}.stderr"
    with stderr_path.open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "qkdnode", "run", "--config", str(config)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


def stop_nodes(
    processes: list[subprocess.Popen[bytes]], timeout_s: float = 20.0
) -> list[int | None]:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(None)
    return codes


def demo_workdir(requested: str | None, *, prefix: str) -> Path:
    """``requested`` (created if needed) or a fresh temporary directory, private to the owner."""
    if requested:
        workdir = Path(requested).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(workdir, 0o700)
    return workdir


def run_demo(args: argparse.Namespace) -> int:
    out: TextIO = sys.stderr if args.json else sys.stdout
    workdir = demo_workdir(args.workdir, prefix="qkdnode-demo-")
    layout = prepare_workdir(
        workdir,
        distance_km=args.distance_km,
        block_pulses=args.block_pulses or DEFAULT_BLOCK_PULSES,
        eve=args.eve,
        bootstrap=args.bootstrap,
        vouches=args.vouches,
        decoys=args.decoys,
    )
    # a SIGTERM to the demo must still stop both nodes (the finally below)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    processes = [start_node(layout, "bob"), start_node(layout, "alice")]
    follower = LogFollower(layout.log("alice"))
    progress = Progress()
    deadline = time.monotonic() + args.timeout_s
    failed: str | None = None
    api_match, api_compared = False, 0
    with DemoDisplay(out, target_blocks=args.blocks) as display:
        display.message(
            f"qkdnode demo in {workdir}: Alice and Bob on loopback, {args.distance_km} km, "
            f"bootstrap {args.bootstrap}"
        )
        for node in ("alice", "bob"):
            display.message(
                f"{node}: keys {layout.kme_url(node)}  metrics {layout.metrics_url(node)}"
            )

        def follow() -> None:
            for event in follower.new_events():
                display.update(progress, progress.feed(event))

        try:
            while progress.attempts < args.blocks:
                follow()
                if progress.refusals and not progress.committed:
                    failed = f"the peer was refused: {progress.refusals[0]}"
                    break
                if any(p.poll() is not None for p in processes):
                    failed = f"a node exited early; see its .stderr and .log files in {workdir}"
                    break
                if time.monotonic() > deadline:
                    failed = f"timed out after {args.timeout_s} s"
                    break
                time.sleep(0.2)
            if failed is None and progress.committed:
                try:
                    api_match, api_compared = prove_keys_through_api(layout)
                except (OSError, RuntimeError, ValueError, KeyError) as exc:
                    failed = f"key delivery check failed: {exc}"
                display.message(
                    f"delivery API: {api_compared} keys fetched as master and as slave, "
                    f"{'identical' if api_match else 'NOT identical'} on both nodes"
                )
            if args.keep_running and failed is None:
                summary = _summary(layout, progress, exact=False, api=(api_match, api_compared))
                _print_summary(args, display, summary)
                display.message("nodes keep running; Ctrl-C to stop")
                try:
                    while all(p.poll() is None for p in processes):
                        follow()
                        time.sleep(0.5)
                except KeyboardInterrupt:
                    pass
        finally:
            codes = stop_nodes(processes)
        summary = _summary(layout, progress, exact=True, api=(api_match, api_compared))
        summary["bootstrap"] = args.bootstrap
        summary["exit_codes"] = {"alice": codes[1], "bob": codes[0]}
        if not args.keep_running or failed is not None:
            _print_summary(args, display, summary)
    if failed:
        print(f"demo failed: {failed}", file=sys.stderr)
        return 1
    return 0


def _summary(
    layout: DemoLayout, progress: Progress, *, exact: bool, api: tuple[bool, int]
) -> dict[str, Any]:
    stores_match, compared = compare_stores(layout, exact=exact)
    qber_mean = sum(progress.qbers) / len(progress.qbers) if progress.qbers else None
    return {
        "workdir": str(layout.workdir),
        "blocks_committed": progress.committed,
        "blocks_aborted": progress.aborted,
        "abort_reasons": dict(progress.abort_reasons),
        "secret_bits": progress.secret_bits,
        "qber_mean": qber_mean,
        "auth_mode": progress.auth_mode,
        "auth_modes_seen": progress.modes_seen,
        "peer_refusals": progress.refusals,
        "blocks_recorded": {node: count_blocks(layout.store(node)) for node in ("alice", "bob")},
        # both stores hold identical keys and the delivery API gave identical keys to both SAEs
        "keys_match": stores_match and api[0],
        "keys_compared": compared,
        "keys_delivered_and_compared": api[1],
        "first_commit_s": progress.first_commit_s,
        "kme": {node: layout.kme_url(node) for node in ("alice", "bob")},
        "metrics": {node: layout.metrics_url(node) for node in ("alice", "bob")},
        "sae": dict(SAE_OF),
    }


def _print_summary(args: argparse.Namespace, display: DemoDisplay, summary: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(summary), flush=True)  # stdout: the one JSON object
        return
    display.final_table(summary)
