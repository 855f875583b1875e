"""Shared fixtures: one daemon pair behind the MITM proxy for the whole reliability run.

Scenarios 1-4, 7, 12, 14 and 15 share it (start-up and the first blocks cost seconds), in file
order; each scenario leaves it distilling again (a clean block after its tamper series).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qkdnode.node.daemon import Node
from tests.reliability.harness import Pair, add_sae_certificates, edit_config
from tests.reliability.helpers_proxied import QUOTA_BURST_KEYS, QUOTA_KEYS_PER_S, Proxied
from tests.reliability.proxy import ProxyThread


@pytest.fixture(scope="session")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    workdir: Path = tmp_path_factory.mktemp("reliability") / "pair"
    # pings often enough that every frame type passes the proxy: a busy pair idles only while
    # the link makes the next block
    pair = Pair.create(workdir, log_level="debug", keepalive_interval_s=0.25)
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
    from qkdnode.demo.run import prepare_workdir
    from qkdnode.link.blocks import SimulatedBlocks
    from qkdnode.link.simulated import simulated_link_from_config
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
