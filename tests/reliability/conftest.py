"""Shared fixtures: one daemon pair behind the MITM proxy for the whole reliability run.

Scenarios 1-4, 7, 12, 14 and 15 share it (start-up and the first blocks cost seconds), in file
order; each scenario leaves it distilling again (a clean block after its tamper series).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qkdnode.node.daemon import Node
from tests.reliability.harness import Pair, add_sae_certificates, edit_config
from tests.reliability.proxy import MitmProxy, ProxyThread, Rule, Tampering

QUOTA_KEYS_PER_S = 2.0
QUOTA_BURST_KEYS = 6.0


class Proxied:
    """The shared pair and its proxy, with helpers to run one tampering at a time."""

    def __init__(self, pair: Pair, thread: ProxyThread) -> None:
        self.pair = pair
        self.thread = thread
        self.proxy: MitmProxy = thread.proxy

    def tamper_once(self, rule: Rule, *, timeout_s: float = 30.0) -> tuple[Tampering, float]:
        """Arm ``rule`` (times=1); wait until it fired and its connection ended.

        Returns the tampering and the seconds from the tampering to the end of the connection.
        """
        rule.times = 1
        before = len(self.proxy.tamperings())
        self.proxy.add(rule)
        deadline = time.monotonic() + timeout_s
        while len(self.proxy.tamperings()) == before:
            self.pair.poll()
            self._alive()
            if time.monotonic() > deadline:
                self.proxy.clear()
                raise AssertionError(f"rule never fired: {rule}")
            time.sleep(0.02)
        self.proxy.clear()
        tampering = self.proxy.tamperings()[before]
        number = tampering.frame.connection
        while True:
            ends = [e for e in self.proxy.ends() if e.connection == number]
            if ends:
                return tampering, ends[0].at_s - tampering.at_s
            self._alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"connection {number} survived {tampering}")
            time.sleep(0.02)

    def sane(self, *, blocks: int = 1, timeout_s: float = 60.0) -> None:
        """A clean session: ``blocks`` more blocks committed on both nodes."""
        self.pair.poll()
        target_a = self.pair.committed("alice") + blocks
        target_b = self.pair.committed("bob") + blocks
        self.pair.wait(
            lambda p: p.committed("alice") >= target_a and p.committed("bob") >= target_b,
            timeout_s=timeout_s,
            what="a clean block",
        )

    def _alive(self) -> None:
        for node, process in self.pair.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{node} exited: {self.pair.stderr(node)[-1500:]}")


@pytest.fixture(scope="session")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    workdir: Path = tmp_path_factory.mktemp("reliability") / "pair"
    pair = Pair.create(workdir, log_level="debug")
    # scenario 13: a second SAE at Alice and a small quota per SAE; scenario 12: an SAE the
    # CA knows but no node authorises
    add_sae_certificates(pair.layout, "sae-a2", "sae-x")
    edit_config(
        pair.layout,
        "alice",
        'local_saes = ["sae-a"]',
        f'local_saes = ["sae-a", "sae-a2"]\nquota_keys_per_s = {QUOTA_KEYS_PER_S}\n'
        f"quota_burst_keys = {QUOTA_BURST_KEYS}",
    )
    edit_config(pair.layout, "bob", 'peer_saes = ["sae-a"]', 'peer_saes = ["sae-a", "sae-a2"]')
    thread = ProxyThread(pair.layout.peer_port)
    port = thread.start()
    pair.route_alice_to(port)
    pair.start_both()
    shared = Proxied(pair, thread)
    try:
        yield shared
    finally:
        pair.stop()
        thread.stop()


@pytest.fixture(scope="session")
def node_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Node]]:
    """Real daemon ``Node`` objects (config, store, link not opened) for in-memory scenarios
    that check what the daemon does between sessions (``Node.make_connection``, ``Exchange``).
    Callers replace ``credentials`` and ``ledger`` with in-memory ones."""
    import numpy as np

    from qkdnode.config import load_config
    from qkdnode.link.blocks import SimulatedBlocks
    from qkdnode.link.simulated import simulated_link_from_config
    from qkdnode.node.demo import prepare_workdir
    from qkdnode.store import KeyStore

    workdir = tmp_path_factory.mktemp("nodes")
    layout = prepare_workdir(workdir, distance_km=25.0, block_pulses=20_000_000)
    stores: list[KeyStore] = []

    def make(role: str = "alice") -> Node:
        config = load_config(layout.config(role))
        store = KeyStore.open(workdir / f"store-{len(stores)}", node_name=role)
        stores.append(store)
        link = simulated_link_from_config(config.node.role, config.link, np.random.default_rng(3))
        return Node(config, store, SimulatedBlocks(link, config.postprocess.block_pulses))

    yield make
    for store in stores:
        store.close()
