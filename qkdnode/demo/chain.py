"""``qkdnode demo --topology chain``: a chain of nodes on loopback, keys relayed from end to end.

Nodes ``A``, ``R1`` … ``Rk``, ``C`` (three nodes: ``A``, ``R``, ``C``) run as real ``qkdnode
run`` processes, each link with its own simulated fibre and pre-shared key; the left node of
each link is its Alice. The two end nodes serve one SAE each over ETSI GS QKD 014 (``sae-a`` at
A, ``sae-b`` at C, the demo PKI's certificates) and reach the other end's SAE by trusted-node
relay (``[relay]``, docs/relay.md): every middle node learns the relayed keys. The demo waits
for every link to commit key-derived blocks, then has each end's SAE ask its KME for keys shared
with the other end's SAE and fetches them at the other end, and proves them equal.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from qkdnode.config.auth import DEFAULT_ROTATION_POOL_BITS
from qkdnode.demo.progress import LogFollower
from qkdnode.demo.run import (
    DemoLayout,
    decoy_settings_for,
    demo_workdir,
    etsi_call,
    free_port,
    make_pki,
    start_process,
    stop_nodes,
)
from qkdnode.ops import issuance
from qkdnode.postprocess.finitekey import DecoySettings

CHAIN_BLOCK_PULSES: Final = 40_000_000
CHAIN_POOL_TARGET_BITS: Final = 32768
# the end nodes' KMEs use the demo PKI's "alice" and "bob" certificates
END_KME: Final = {"first": "alice", "last": "bob"}
RELAY_PAD_TARGET_BITS: Final = 65536
MIDDLE_KME: Final = "kme-r"
MIDDLE_SAE: Final = "sae-r"
ETSI_RETRY_S: Final = 0.5


def chain_names(nodes: int) -> tuple[str, ...]:
    """A, R, C for three nodes; A, R1 … Rk, C for more."""
    if nodes < 3:
        raise ValueError("a chain has at least three nodes")
    if nodes == 3:
        return ("A", "R", "C")
    return ("A", *(f"R{i}" for i in range(1, nodes - 1)), "C")


@dataclass(frozen=True, slots=True)
class ChainLayout:
    """Ports and paths of a chain in ``workdir``; link ``i`` joins ``names[i]`` (its Alice)
    and ``names[i + 1]``."""

    workdir: Path
    names: tuple[str, ...]
    peer_ports: tuple[int, ...]
    fibre_ports: tuple[int, ...]
    metrics_ports: dict[str, int]
    kmes: DemoLayout  # the end nodes' KMEs as the demo's "alice" (A) and "bob" (C)
    pad_target_bits: int = RELAY_PAD_TARGET_BITS
    # the first middle node's KME (SAE sae-r, keys of its link with A), when it has one
    middle_kme_port: int | None = None

    def config(self, node: str) -> Path:
        return self.workdir / f"{node}.toml"

    def log(self, node: str) -> Path:
        return self.workdir / f"{node}.log"

    def store(self, node: str) -> Path:
        return self.workdir / f"{node.lower()}-store"

    @property
    def links(self) -> list[tuple[str, str]]:
        return list(zip(self.names, self.names[1:], strict=False))


def prepare_chain(
    workdir: Path,
    *,
    nodes: int = 3,
    distance_km: float = 25.0,
    block_pulses: int = CHAIN_BLOCK_PULSES,
    pool_target_bits: int = CHAIN_POOL_TARGET_BITS,
    pad_target_bits: int = RELAY_PAD_TARGET_BITS,
    middle_sae: bool = False,
) -> ChainLayout:
    """Fresh ports, the demo PKI, one pre-shared key per link and every node's config.
    ``middle_sae``: the first middle node also serves SAE ``sae-r`` with the keys of its link
    with A (direct keys beside relayed ones, for the benchmark)."""
    names = chain_names(nodes)
    links = len(names) - 1
    kmes = DemoLayout(
        workdir=workdir,
        peer_port=0,
        fibre_port=0,
        kme_ports={"alice": free_port(), "bob": free_port()},
        metrics_ports={},
    )
    layout = ChainLayout(
        workdir=workdir,
        names=names,
        peer_ports=tuple(free_port() for _ in range(links)),
        fibre_ports=tuple(free_port() for _ in range(links)),
        metrics_ports={name: free_port() for name in names},
        kmes=kmes,
        pad_target_bits=pad_target_bits,
        middle_kme_port=free_port() if middle_sae else None,
    )
    make_pki(kmes)
    if middle_sae and not (kmes.pki_dir / f"{MIDDLE_SAE}.pem").exists():
        issuance.issue_certificate(
            kmes.node_ca_dir, MIDDLE_KME, kmes.pki_dir / MIDDLE_KME, purpose="node"
        )
        issuance.issue_certificate(
            kmes.sae_ca_dir, MIDDLE_SAE, kmes.pki_dir / MIDDLE_SAE, purpose="sae"
        )
    psk_dir = workdir / "psk"
    psk_dir.mkdir(mode=0o700, exist_ok=True)
    for left, right in layout.links:
        path = psk_dir / f"{left}-{right}.psk"
        if not path.exists():  # generated here, never committed
            path.write_text(os.urandom(32).hex())
            path.chmod(0o600)
    decoy = decoy_settings_for(distance_km, block_pulses)
    for index, name in enumerate(names):
        layout.config(name).write_text(
            chain_config_text(
                layout,
                index,
                distance_km=distance_km,
                block_pulses=block_pulses,
                decoy=decoy,
                pool_target_bits=pool_target_bits,
            )
        )
    return layout


def _link_lines(layout: ChainLayout, link: int, distance_km: float, decoy: DecoySettings) -> str:
    p_vacuum = 1.0 - round(decoy.p_signal, 6) - round(decoy.p_decoy, 6)
    return f"""backend = "simulated"
fiber_km = {distance_km}
fibre_host = "127.0.0.1"
fibre_port = {layout.fibre_ports[link]}
mu_signal = {decoy.mu_signal:.6f}
mu_decoy = {decoy.mu_decoy:.6f}
mu_vacuum = {decoy.mu_vacuum:.6f}
p_signal = {decoy.p_signal:.6f}
p_decoy = {decoy.p_decoy:.6f}
p_vacuum = {p_vacuum:.6f}
p_key_basis = {decoy.p_key_basis:.6f}
"""


def _auth_lines(layout: ChainLayout, link: int, pool_target_bits: int) -> str:
    left, right = layout.links[link]
    reserve = pool_target_bits // 8
    rotation = min(DEFAULT_ROTATION_POOL_BITS, pool_target_bits - reserve)
    return f"""mode = "psk"
psk_file = "psk/{left}-{right}.psk"
pool_target_bits = {pool_target_bits}
pool_reserve_bits = {reserve}
rotation_pool_bits = {rotation}
"""


def _channel_lines(layout: ChainLayout, link: int, *, alice: bool) -> str:
    address = f"127.0.0.1:{layout.peer_ports[link]}"
    where = f'connect = "{address}"' if alice else f'listen = "{address}"'
    return f"""{where}
io_timeout_s = 5.0
keepalive_interval_s = 1.0
""" + ("reconnect_max_delay_s = 1.0\n" if alice else "")


def chain_config_text(
    layout: ChainLayout,
    index: int,
    *,
    distance_km: float,
    block_pulses: int,
    decoy: DecoySettings,
    pool_target_bits: int,
) -> str:
    """The config of node ``index`` of the chain."""
    names = layout.names
    name = names[index]
    last = len(names) - 1
    sections = [f"# qkdnode chain demo: {name} (generated by `qkdnode demo --topology chain`)"]
    if index in (0, last):  # an end: one peer, the single-peer form
        link = 0 if index == 0 else last - 1
        alice = index == 0
        peer = names[1] if alice else names[last - 1]
        sections.append(
            f'[node]\nname = "{name}"\nrole = "{"alice" if alice else "bob"}"\n\n'
            f'[peer]\nname = "{peer}"\n{_channel_lines(layout, link, alice=alice)}\n'
            f"[link]\n{_link_lines(layout, link, distance_km, decoy)}\n"
            f"[auth]\n{_auth_lines(layout, link, pool_target_bits)}"
        )
    else:  # a middle node: Bob to its left neighbour, Alice to its right one
        sections.append(f'[node]\nname = "{name}"\n')
        for link, peer, alice in (
            (index - 1, names[index - 1], False),
            (index, names[index + 1], True),
        ):
            sections.append(
                f'[[peers]]\nname = "{peer}"\nrole = "{"alice" if alice else "bob"}"\n'
                f"{_channel_lines(layout, link, alice=alice)}\n"
                f"[peers.link]\n{_link_lines(layout, link, distance_km, decoy)}\n"
                f"[peers.auth]\n{_auth_lines(layout, link, pool_target_bits)}"
            )
    sections.append(
        f'[postprocess]\nblock_pulses = {block_pulses}\ncascade_variant = "subblock-reuse"\n'
    )
    sections.append(f'[store]\ndirectory = "{layout.store(name).name}"\n')
    direct = layout.middle_kme_port is not None and index in (0, 1)
    if direct and index == 1:
        sections.append(
            f'[delivery]\npeer = "{names[0]}"\n'
            f'listen = "127.0.0.1:{layout.middle_kme_port}"\n'
            f'certificate = "pki/{MIDDLE_KME}.pem"\nprivate_key = "pki/{MIDDLE_KME}.key"\n'
            f'sae_ca = "pki/sae-ca/ca.pem"\nkme_id = "{name}"\npeer_kme_id = "{names[0]}"\n'
            f'local_saes = ["{MIDDLE_SAE}"]\npeer_saes = ["{SAE_OF_KME[END_KME["first"]]}"]\n'
            "master_parity = 1\n"
        )
    relay = f"[relay]\npad_target_bits = {layout.pad_target_bits}\n"
    if index in (0, last):
        kme = END_KME["first" if index == 0 else "last"]
        other_kme = END_KME["last" if index == 0 else "first"]
        other = names[last] if index == 0 else names[0]
        via = names[1:last] if index == 0 else tuple(reversed(names[1:last]))
        sae, other_sae = SAE_OF_KME[kme], SAE_OF_KME[other_kme]
        sections.append(
            f'[delivery]\nlisten = "127.0.0.1:{layout.kmes.kme_ports[kme]}"\n'
            f'certificate = "pki/{kme}.pem"\nprivate_key = "pki/{kme}.key"\n'
            f'sae_ca = "pki/sae-ca/ca.pem"\nsae_crl = "pki/sae-ca/crl.pem"\n'
            f'kme_id = "{name}"\npeer_kme_id = "{names[1] if index == 0 else names[last - 1]}"\n'
            f'local_saes = ["{sae}"]\n'
            f"peer_saes = [{json.dumps(MIDDLE_SAE) if direct else ''}]\n"
            f"master_parity = {0 if index == 0 else 1}\n"
        )
        relay += (
            f'\n[[relay.remote]]\nnode = "{other}"\n'
            f"via = [{', '.join(json.dumps(v) for v in via)}]\n"
            f'saes = ["{other_sae}"]\n'
        )
    sections.append(relay)
    sections.append(
        f'[metrics]\nlisten = "127.0.0.1:{layout.metrics_ports[name]}"\n\n'
        f'[logging]\nlevel = "info"\nformat = "json"\nfile = "{name}.log"\n'
    )
    return "\n".join(sections)


SAE_OF_KME: Final = {"alice": "sae-a", "bob": "sae-b"}


@dataclass(frozen=True, slots=True)
class Sae:
    """An SAE as a client: the port of its KME and its ID (its certificate in the demo PKI)."""

    kme_port: int
    sae_id: str


def take_relayed_keys(
    kmes: DemoLayout, *, master: Sae, slave: Sae, number: int, timeout_s: float = 60.0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``master`` asks its KME for ``number`` keys shared with ``slave`` (asked again while the
    KME answers 503: the relay's pads may still be filling), then ``slave`` fetches them at its
    KME by key ID. Returns (keys the master got, keys the slave got)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            issued = etsi_call(
                kmes,
                port=master.kme_port,
                sae=master.sae_id,
                path=f"{slave.sae_id}/enc_keys",
                body={"number": number},
            )
            break
        except RuntimeError as exc:
            if "HTTP 503" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(ETSI_RETRY_S)
    keys = list(issued.get("keys", []))
    fetched = etsi_call(
        kmes,
        port=slave.kme_port,
        sae=slave.sae_id,
        path=f"{master.sae_id}/dec_keys",
        body={"key_IDs": [{"key_ID": key["key_ID"]} for key in keys]},
    )
    return keys, list(fetched.get("keys", []))


def keys_agree(keys: list[dict[str, Any]], fetched: list[dict[str, Any]], number: int) -> bool:
    by_id = {key["key_ID"]: key["key"] for key in fetched}
    return len(keys) == number and all(by_id.get(k["key_ID"]) == k["key"] for k in keys)


def prove_relayed_keys(layout: ChainLayout, *, number: int = 4) -> tuple[bool, int]:
    """Each end's SAE as master gets ``number`` relayed keys for the other end's SAE, which
    fetches them by key ID: all equal? Returns (equal, keys compared)."""
    ends = [
        Sae(layout.kmes.kme_ports[kme], SAE_OF_KME[kme])
        for kme in (END_KME["first"], END_KME["last"])
    ]
    compared = 0
    for master, slave in (ends, ends[::-1]):
        keys, fetched = take_relayed_keys(layout.kmes, master=master, slave=slave, number=number)
        if not keys_agree(keys, fetched, number):
            return False, compared
        compared += len(keys)
    return True, compared


@dataclass(slots=True)
class _LinkProgress:
    """One link's commits as its two ends log them."""

    committed: dict[str, int] = field(default_factory=dict)  # per end node
    key_derived: set[str] = field(default_factory=set)  # ends that committed key-derived
    secret_bits: int = 0  # as the link's Alice logged them


def _link_name(left: str, right: str) -> str:
    return f"{left}-{right}"


class ChainProgress:
    def __init__(self, layout: ChainLayout) -> None:
        self.links = {_link_name(a, b): _LinkProgress() for a, b in layout.links}
        self._name_of = {}
        for a, b in layout.links:
            self._name_of[(a, b)] = self._name_of[(b, a)] = _link_name(a, b)
        names = layout.names
        # the ends log without a peer field (one link each)
        self._only_peer = {names[0]: names[1], names[-1]: names[-2]}

    def feed(self, node: str, event: dict[str, Any]) -> None:
        if event.get("event") != "block.committed":
            return
        peer = str(event.get("peer") or self._only_peer.get(node, ""))
        name = self._name_of.get((node, peer))
        if name is None:
            return
        link = self.links[name]
        link.committed[node] = link.committed.get(node, 0) + 1
        if event.get("mode") == "key_derived":
            link.key_derived.add(node)
        if name.startswith(f"{node}-"):
            link.secret_bits += int(event.get("secret_bits", 0) or 0)

    def ready(self, blocks: int) -> bool:
        """Every link committed ``blocks`` blocks at both ends, key-derived ones among them."""
        return all(
            len(link.key_derived) == 2 and min(link.committed.values()) >= blocks
            for link in self.links.values()
        )

    def summary(self) -> list[dict[str, Any]]:
        return [
            {
                "link": name,
                "blocks_committed": dict(link.committed),
                "key_derived": sorted(link.key_derived),
                "secret_bits": link.secret_bits,
            }
            for name, link in self.links.items()
        ]


def run_chain_demo(args: argparse.Namespace) -> int:
    """The chain demo (module docstring); ``--json`` prints one summary object."""
    out: TextIO = sys.stderr if args.json else sys.stdout
    workdir = demo_workdir(args.workdir, prefix="qkdnode-chain-")
    layout = prepare_chain(
        workdir,
        nodes=args.nodes,
        distance_km=args.distance_km,
        block_pulses=args.block_pulses or CHAIN_BLOCK_PULSES,
    )
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    names = layout.names
    followers = {name: LogFollower(layout.log(name)) for name in names}
    progress = ChainProgress(layout)
    processes = {
        name: start_process(workdir, layout.config(name), name) for name in reversed(names)
    }
    print(
        f"qkdnode chain demo in {workdir}: {' - '.join(names)}, {args.distance_km} km per link",
        file=out,
    )
    for end, kme in (("first", "alice"), ("last", "bob")):
        node = names[0] if end == "first" else names[-1]
        print(f"{node}: keys {layout.kmes.kme_url(kme)} (SAE {SAE_OF_KME[kme]})", file=out)
    started = time.monotonic()
    deadline = started + args.timeout_s
    failed: str | None = None
    match, compared, relay_s = False, 0, None
    try:
        while True:
            for name, follower in followers.items():
                for event in follower.new_events():
                    progress.feed(name, event)
            if progress.ready(args.blocks):
                break
            if any(p.poll() is not None for p in processes.values()):
                failed = f"a node exited early; see its .stderr and .log files in {workdir}"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {args.timeout_s} s"
                break
            time.sleep(0.2)
        if failed is None:
            print("every link commits key-derived blocks; relaying keys end to end", file=out)
            relay_started = time.monotonic()
            try:
                match, compared = prove_relayed_keys(layout, number=args.relay_keys)
                relay_s = time.monotonic() - relay_started
            except (OSError, RuntimeError, ValueError, KeyError) as exc:
                failed = f"relayed key check failed: {exc}"
            if failed is None and not match:
                failed = "relayed keys differ between the two ends"
            print(
                f"relay: {compared} keys taken as master and as slave at both ends, "
                f"{'identical' if match else 'NOT identical'}",
                file=out,
            )
    finally:
        codes = stop_nodes(list(processes.values()))
    summary = {
        "workdir": str(workdir),
        "topology": "chain",
        "nodes": list(names),
        "links": progress.summary(),
        "keys_match": match,
        "relayed_keys_compared": compared,
        "relay_s": relay_s,
        "kme": {names[0]: layout.kmes.kme_url("alice"), names[-1]: layout.kmes.kme_url("bob")},
        "exit_codes": dict(zip(processes, codes, strict=True)),
    }
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        for link in progress.summary():
            print(f"link {link['link']}: committed {link['blocks_committed']}", file=out)
    if failed:
        print(f"demo failed: {failed}", file=sys.stderr)
        return 1
    return 0
