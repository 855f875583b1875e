"""A node with two peers, end to end: three ``qkdnode run`` processes in a chain A–R–C on loopback.

R is Bob on its link with A (it listens for A) and Alice on its link with C (it dials C); each
link has its own simulated fibre and pre-shared key. R's ETSI 014 server delivers the keys of its
link with A (``[delivery] peer = "A"``), as A's does. Both links commit key-derived blocks; then
C stops, and the link A–R keeps committing and delivering while R's other link is down; C comes
back and its link commits again. Each link's keys agree between its two stores.

All three relay keys (``[relay]``): A's SAE ``sae-a`` and C's SAE ``sae-c`` get keys shared with
each other through R, over the ETSI 014 API at both ends, also after R is killed (SIGKILL) while
relays are in flight and restarted: no relay is left unfinished and both ends agree on every one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qkdnode.config.auth import DEFAULT_ROTATION_POOL_BITS
from qkdnode.demo.chain import Sae, keys_agree, take_relayed_keys
from qkdnode.demo.progress import LogFollower
from qkdnode.demo.run import (
    DemoLayout,
    decoy_settings_for,
    etsi_call,
    free_port,
    make_pki,
    prove_keys_through_api,
    read_keys,
    stop_nodes,
)
from qkdnode.ops import issuance
from qkdnode.postprocess.finitekey import DecoySettings
from qkdnode.relay.events import RelayState
from qkdnode.store.relaystore import RelayStore
from tests.reliability.harness import REPO, wait_until_catches_sigterm

pytestmark = pytest.mark.slow  # starts daemon processes

BLOCK_PULSES = 40_000_000
POOL_TARGET_BITS = 32768
NODES = ("A", "R", "C")


def _link_table(header: str, fibre_port: int, decoy: DecoySettings) -> str:
    p_vacuum = 1.0 - round(decoy.p_signal, 6) - round(decoy.p_decoy, 6)
    return f"""{header}
backend = "simulated"
fiber_km = 25.0
fibre_host = "127.0.0.1"
fibre_port = {fibre_port}
mu_signal = {decoy.mu_signal:.6f}
mu_decoy = {decoy.mu_decoy:.6f}
mu_vacuum = {decoy.mu_vacuum:.6f}
p_signal = {decoy.p_signal:.6f}
p_decoy = {decoy.p_decoy:.6f}
p_vacuum = {p_vacuum:.6f}
p_key_basis = {decoy.p_key_basis:.6f}
"""


def _auth_table(header: str, psk: str) -> str:
    reserve = POOL_TARGET_BITS // 8
    rotation = min(DEFAULT_ROTATION_POOL_BITS, POOL_TARGET_BITS - reserve)
    return f"""{header}
mode = "psk"
psk_file = "psk/{psk}.psk"
pool_target_bits = {POOL_TARGET_BITS}
pool_reserve_bits = {reserve}
rotation_pool_bits = {rotation}
"""


def _relay(remote: str = "", sae: str = "") -> str:
    """``[relay]``; at an end, the other end ``remote`` (its SAE ``sae``) through R."""
    text = "\n[relay]\npad_target_bits = 65536\n"
    if remote:
        text += f'\n[[relay.remote]]\nnode = "{remote}"\nvia = ["R"]\nsaes = ["{sae}"]\n'
    return text


def _delivery_c(kme_port: int) -> str:
    """C's KME: its SAE sae-c has no SAE at R to talk to, only relayed keys (the "bob" KME
    certificate serves here too)."""
    return f"""
[delivery]
listen = "127.0.0.1:{kme_port}"
certificate = "pki/bob.pem"
private_key = "pki/bob.key"
sae_ca = "pki/sae-ca/ca.pem"
kme_id = "C"
peer_kme_id = "R"
local_saes = ["sae-c"]
peer_saes = []
master_parity = 1
"""


def _delivery(kme: str, peer_kme: str, kme_port: int, *, a_side: bool) -> str:
    """The KMEs of the link A–R: A's KME as the demo's "alice" (SAE sae-a), R's as "bob"."""
    certificate = "alice" if a_side else "bob"
    local, remote = ("sae-a", "sae-b") if a_side else ("sae-b", "sae-a")
    return f"""
[delivery]
{"" if a_side else 'peer = "A"'}
listen = "127.0.0.1:{kme_port}"
certificate = "pki/{certificate}.pem"
private_key = "pki/{certificate}.key"
sae_ca = "pki/sae-ca/ca.pem"
kme_id = "{kme}"
peer_kme_id = "{peer_kme}"
local_saes = ["{local}"]
peer_saes = ["{remote}"]
master_parity = {0 if a_side else 1}
"""


def _common(node: str, metrics_port: int) -> str:
    return f"""
[postprocess]
block_pulses = {BLOCK_PULSES}
cascade_variant = "subblock-reuse"

[store]
directory = "{node.lower()}-store"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[logging]
level = "info"
format = "json"
file = "{node}.log"
"""


@dataclass
class Chain:
    """The three nodes' configs, processes and logs in ``workdir``."""

    workdir: Path
    metrics_ports: dict[str, int]
    # the ETSI 014 servers of the link A–R, as the demo's "alice" (A) and "bob" (R)
    kmes: DemoLayout
    kme_c_port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    followers: dict[str, LogFollower] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def create(cls, workdir: Path) -> Chain:
        decoy = decoy_settings_for(25.0, BLOCK_PULSES)
        psk_dir = workdir / "psk"
        psk_dir.mkdir(mode=0o700)
        for link in ("ar", "rc"):  # one pre-shared key per link
            path = psk_dir / f"{link}.psk"
            path.write_text(os.urandom(32).hex())
            path.chmod(0o600)
        peer_ar, peer_rc, fibre_ar, fibre_rc = (free_port() for _ in range(4))
        metrics = {node: free_port() for node in NODES}
        kmes = DemoLayout(
            workdir=workdir,
            peer_port=peer_ar,
            fibre_port=fibre_ar,
            kme_ports={"alice": free_port(), "bob": free_port()},
            metrics_ports={},
        )
        make_pki(kmes)
        issuance.issue_certificate(kmes.sae_ca_dir, "sae-c", kmes.pki_dir / "sae-c", purpose="sae")
        kme_a, kme_r, kme_c = kmes.kme_ports["alice"], kmes.kme_ports["bob"], free_port()
        configs = {
            "A": f"""[node]
name = "A"
role = "alice"

[peer]
name = "R"
connect = "127.0.0.1:{peer_ar}"
io_timeout_s = 5.0
keepalive_interval_s = 1.0
reconnect_max_delay_s = 1.0

{_link_table("[link]", fibre_ar, decoy)}
{_auth_table("[auth]", "ar")}{_delivery("A", "R", kme_a, a_side=True)}\
{_relay("C", "sae-c")}{_common("A", metrics["A"])}""",
            "R": f"""[node]
name = "R"

[[peers]]
name = "A"
role = "bob"
listen = "127.0.0.1:{peer_ar}"
io_timeout_s = 5.0
keepalive_interval_s = 1.0

{_link_table("[peers.link]", fibre_ar, decoy)}
{_auth_table("[peers.auth]", "ar")}
[[peers]]
name = "C"
role = "alice"
connect = "127.0.0.1:{peer_rc}"
io_timeout_s = 5.0
keepalive_interval_s = 1.0
reconnect_max_delay_s = 1.0

{_link_table("[peers.link]", fibre_rc, decoy)}
{_auth_table("[peers.auth]", "rc")}{_delivery("R", "A", kme_r, a_side=False)}\
{_relay()}{_common("R", metrics["R"])}""",
            "C": f"""[node]
name = "C"
role = "bob"

[peer]
name = "R"
listen = "127.0.0.1:{peer_rc}"
io_timeout_s = 5.0
keepalive_interval_s = 1.0

{_link_table("[link]", fibre_rc, decoy)}
{_auth_table("[auth]", "rc")}{_delivery_c(kme_c)}{_relay("A", "sae-a")}\
{_common("C", metrics["C"])}""",
        }
        for node, text in configs.items():
            (workdir / f"{node}.toml").write_text(text)
        chain = cls(workdir, metrics, kmes, kme_c)
        for node in NODES:
            chain.followers[node] = LogFollower(workdir / f"{node}.log")
            chain.events[node] = []
        return chain

    def config(self, node: str) -> Path:
        return self.workdir / f"{node}.toml"

    @property
    def sae_a(self) -> Sae:
        return Sae(self.kmes.kme_ports["alice"], "sae-a")

    @property
    def sae_c(self) -> Sae:
        return Sae(self.kme_c_port, "sae-c")

    def store(self, node: str, peer: str | None = None) -> Path:
        directory = self.workdir / f"{node.lower()}-store"
        return directory if peer is None else directory / peer

    def start(self, node: str) -> None:
        with (self.workdir / f"{node}.stderr").open("ab") as stderr:
            self.processes[node] = subprocess.Popen(
                [sys.executable, "-m", "qkdnode", "run", "--config", str(self.config(node))],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                env=_env(),
            )
        wait_until_catches_sigterm(self.processes[node])

    def stop(self, *nodes: str) -> list[int | None]:
        return stop_nodes([self.processes[n] for n in nodes if n in self.processes])

    def commits(self, node: str, *, peer: str | None = None, since: int = 0) -> list[str]:
        """The auth modes of ``node``'s committed blocks (on its link with ``peer``), from
        the ``since``-th log event on."""
        return [
            str(event.get("mode"))
            for event in self.events[node][since:]
            if event.get("event") == "block.committed"
            and (peer is None or event.get("peer") == peer)
        ]

    def wait(
        self,
        done: Callable[[], bool],
        what: str,
        *,
        running: tuple[str, ...] = NODES,
        timeout_s: float = 180.0,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.drain()
            if done():
                return
            for node in running:
                process = self.processes[node]
                if process.poll() is not None:
                    stderr = (self.workdir / f"{node}.stderr").read_text()[-2000:]
                    pytest.fail(f"{node} exited with {process.returncode}: {stderr}")
            if time.monotonic() > deadline:
                counts = {n: len(self.commits(n)) for n in NODES}
                pytest.fail(f"timed out waiting for {what}; commits {counts}")
            time.sleep(0.1)

    def drain(self) -> None:
        """Read what the logs hold by now."""
        for node, follower in self.followers.items():
            self.events[node].extend(follower.new_events())

    def status(self, node: str, *options: str) -> tuple[int, str]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "qkdnode",
                "status",
                "--config",
                str(self.config(node)),
                *options,
            ],
            capture_output=True,
            env=_env(),
            text=True,
            timeout=60,
        )
        return result.returncode, result.stdout

    def scrape(self, node: str) -> str:
        url = f"http://127.0.0.1:{self.metrics_ports[node]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())


def _env() -> dict[str, str]:
    """The daemons run this checkout's qkdnode, whatever the interpreter has installed."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def _agree(left: Path, right: Path) -> int:
    """Keys both stores hold, checked equal; how many."""
    mine, theirs = read_keys(left), read_keys(right)
    common = mine.keys() & theirs.keys()
    assert all(mine[key_id] == theirs[key_id] for key_id in common)
    return len(common)


def _kill_the_middle_node_while_relays_are_in_flight(chain: Chain) -> None:
    """SIGKILL of R while A's SAE asks for relayed keys; R restarts. Keys the master got are
    then fetched at C by their IDs (once); relaying works again."""
    handed_out: list[dict[str, Any]] = []
    outcomes: list[str] = []
    stop = threading.Event()

    def request_relays() -> None:
        while not stop.is_set():
            try:
                issued = etsi_call(
                    chain.kmes,
                    port=chain.sae_a.kme_port,
                    sae="sae-a",
                    path="sae-c/enc_keys",
                    body={"number": 8},
                )
            except RuntimeError as exc:
                outcomes.append(str(exc)[:80])
                time.sleep(0.2)
                continue
            handed_out.extend(issued["keys"])
            outcomes.append("ok")

    requests = threading.Thread(target=request_relays)
    requests.start()
    try:
        time.sleep(0.3)
        os.killpg(chain.processes["R"].pid, signal.SIGKILL)
        chain.processes["R"].wait()
        killed_at = len(outcomes)
        time.sleep(1.0)
        mark = len(chain.events["R"])
        chain.start("R")
        chain.wait(
            lambda: (
                all(
                    "key_derived" in chain.commits("R", peer=peer, since=mark)
                    for peer in ("A", "C")
                )
                and "ok" in outcomes[killed_at:]
            ),
            "key-derived commits on both of R's links and a relay after its restart",
        )
    finally:
        stop.set()
        requests.join(timeout=60)
    assert handed_out
    # every key A handed out before, during and after the crash is C's to fetch, the same bytes
    for start in range(0, len(handed_out), 64):
        batch = handed_out[start : start + 64]
        fetched = etsi_call(
            chain.kmes,
            port=chain.sae_c.kme_port,
            sae="sae-c",
            path="sae-a/dec_keys",
            body={"key_IDs": [{"key_ID": key["key_ID"]} for key in batch]},
        )["keys"]
        assert keys_agree(batch, fetched, len(batch))
    time.sleep(3.0)  # retransmission finishes what the crash left in flight


def _relay_stores_agree(chain: Chain) -> None:
    """After quiet: no relay unfinished at any node; every relay finished the same way at
    both ends (one that never reached C is aborted at A)."""
    stores = {node: RelayStore.open(chain.store(node) / "relay", node_name=node) for node in NODES}
    try:
        records = {node: store.records() for node, store in stores.items()}
        for node, store in stores.items():
            assert store.unfinished_relays() == [], node
        assert records["A"] and records["C"]
        for origin, terminal in (("A", "C"), ("C", "A")):
            for key_id, record in records[origin].items():
                if record.route[0] != origin:
                    continue
                other = records[terminal].get(key_id)
                if record.state is RelayState.COMMITTED:
                    assert other is not None and other.state is RelayState.COMMITTED
                else:
                    assert other is None or other.state is RelayState.ABORTED
    finally:
        for store in stores.values():
            store.close()


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    workdir = tmp_path / "chain"
    workdir.mkdir(mode=0o700)
    chain = Chain.create(workdir)
    yield chain
    chain.stop(*NODES)


def test_a_relay_node_runs_two_links_and_one_peer_stopping_leaves_the_other_committing(
    chain: Chain,
) -> None:
    for node in ("C", "R", "A"):
        chain.start(node)
    # both links rotate to key-derived authentication and commit blocks under it, at each end
    chain.wait(
        lambda: all(
            "key_derived" in chain.commits(node, peer=peer)
            for node, peer in (("A", None), ("C", None), ("R", "A"), ("R", "C"))
        ),
        "key-derived commits on both links",
    )
    # one metrics endpoint and one status for both links, told apart by the peer
    text = chain.scrape("R")
    for peer in ("A", "C"):
        assert f'qkdnode_peer_connected{{peer="{peer}"}} 1.0' in text, text[:2000]
        assert f'qkdnode_blocks_total{{outcome="committed",peer="{peer}"}}' in text
    # R delivers its link with A's keys: a master at either end, the same key at the other
    assert prove_keys_through_api(chain.kmes) == (True, 8)
    code, shown = chain.status("R")
    assert "node R (bob), peer A: healthy" in shown, shown
    assert "node R (alice), peer C: healthy" in shown, shown
    # A's SAE and C's SAE share keys relayed through R, either one master, marked as relayed
    for master, slave in ((chain.sae_a, chain.sae_c), (chain.sae_c, chain.sae_a)):
        keys, fetched = take_relayed_keys(chain.kmes, master=master, slave=slave, number=4)
        assert keys_agree(keys, fetched, 4), (keys, fetched)
    status = etsi_call(chain.kmes, port=chain.sae_a.kme_port, sae="sae-a", path="sae-c/status")
    assert status["target_KME_ID"] == "C"
    assert status["status_extension"] == {
        "key_kind": "qkd",
        "relayed": True,
        "route": ["A", "R", "C"],
    }

    # C stops: R's link with C goes down, its link with A keeps committing key-derived blocks
    assert chain.stop("C") == [0]
    time.sleep(1.0)  # R logs the commit of the block C finished while stopping
    chain.drain()
    mark = len(chain.events["R"])
    a_mark = len(chain.events["A"])
    chain.wait(
        lambda: (
            chain.commits("R", peer="A", since=mark).count("key_derived") >= 3
            and chain.commits("A", since=a_mark).count("key_derived") >= 3
        ),
        "three commits on A–R with C stopped",
        running=("A", "R"),
    )
    assert chain.commits("R", peer="C", since=mark) == []
    assert chain.processes["R"].poll() is None
    code, shown = chain.status("R", "--json")
    summary = json.loads(shown)
    links = {link["peer"]: link for link in summary["links"]}
    assert code == 1 and "C: peer not connected" in summary["problems"], summary["problems"]
    assert links["A"]["peer_connected"] and not links["C"]["peer_connected"]
    assert not any(problem.startswith("A:") for problem in summary["problems"])
    assert prove_keys_through_api(chain.kmes) == (True, 8)

    # C comes back: its link with R commits again
    mark = len(chain.events["R"])
    chain.start("C")
    chain.wait(
        lambda: "key_derived" in chain.commits("R", peer="C", since=mark),
        "a commit on R–C after C restarts",
    )
    _kill_the_middle_node_while_relays_are_in_flight(chain)
    assert chain.stop(*NODES) == [0, 0, 0]
    _relay_stores_agree(chain)
    # each link's two stores agree, and the stores of R's links are apart
    assert _agree(chain.store("A"), chain.store("R", "A")) > 0
    assert _agree(chain.store("C"), chain.store("R", "C")) > 0
    assert not read_keys(chain.store("R", "A")).keys() & read_keys(chain.store("R", "C")).keys()
