"""Operations of a node with several peers: metrics with a ``peer`` label, ``qkdnode status``
per link, and ``qkdnode auth rebootstrap --peer``."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from qkdnode.cli import main
from qkdnode.node import rebootstrap
from qkdnode.ops import status
from qkdnode.ops.metrics import LinkMetricsSet, NodeMetrics, serve_metrics
from qkdnode.store import KeyStore
from qkdnode.store.audit import AuditTrail, read_trail
from qkdnode.store.keystore import StoreCounts
from tests.test_config_peers import write_relay_config


def link_metrics(peer: str, role: str, *, connected: bool, secret_bits: int) -> NodeMetrics:
    metrics = NodeMetrics(
        node="r", peer=peer, role=role, pool_target_bits=32768, pool_reserve_bits=4096
    )
    metrics.set_peer_connected(connected)
    metrics.block_committed(
        qber=0.01,
        sifted_bits=200_000,
        leak_bits=10_000,
        reconciliation_efficiency=1.05,
        secret_bits=secret_bits,
        pool_level_bits=32768,
        mode="key_derived",
    )
    metrics.set_store_counts(StoreCounts(staged=0, available=10, reserved=0, delivered=0))
    return metrics


def two_links() -> LinkMetricsSet:
    return LinkMetricsSet(
        node="r",
        links=[
            link_metrics("a", "bob", connected=True, secret_bits=1024),
            link_metrics("c", "alice", connected=False, secret_bits=2048),
        ],
    )


def test_every_sample_of_a_link_carries_its_peer() -> None:
    families = {
        family.name: family
        for family in text_string_to_metric_families(two_links().exposition().decode())
    }
    samples = [sample for family in families.values() for sample in family.samples]
    assert samples and all(sample.labels.get("peer") in ("a", "c") for sample in samples)
    secret = {s.labels["peer"]: s.value for s in families["qkdnode_secret_bits"].samples}
    assert secret == {"a": 1024.0, "c": 2048.0}
    connected = {s.labels["peer"]: s.value for s in families["qkdnode_peer_connected"].samples}
    assert connected == {"a": 1.0, "c": 0.0}
    # the identity keeps its own labels: one sample per link, each with its role
    info = {(s.labels["peer"], s.labels["role"]) for s in families["qkdnode_info"].samples}
    assert info == {("a", "bob"), ("c", "alice")}
    # each family once, with both links' samples in it
    store = [s for s in families["qkdnode_store_keys"].samples if s.labels["state"] == "available"]
    assert sorted(s.labels["peer"] for s in store) == ["a", "c"]


def test_two_links_for_one_peer_are_refused() -> None:
    one = link_metrics("a", "bob", connected=True, secret_bits=8)
    with pytest.raises(ValueError, match="one NodeMetrics per peer"):
        LinkMetricsSet(node="r", links=[one, one])


async def test_status_shows_each_link_and_names_the_link_of_each_problem() -> None:
    links = two_links()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, links, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        out = io.StringIO()
        code = await trio.to_thread.run_sync(lambda: status.main(["--url", url], out=out))
        text = out.getvalue()
        assert code == status.EXIT_UNHEALTHY, text
        assert "node r (bob), peer a: healthy" in text
        assert "node r (alice), peer c: UNHEALTHY" in text
        assert "problem: peer not connected" in text
        out = io.StringIO()
        code = await trio.to_thread.run_sync(lambda: status.main(["--url", url, "--json"], out=out))
        summary = json.loads(out.getvalue())
        assert code == status.EXIT_UNHEALTHY
        assert summary["problems"] == ["c: peer not connected"]
        assert [link["healthy"] for link in summary["links"]] == [True, False]

        links.links[1].set_peer_connected(True)
        out = io.StringIO()
        code = await trio.to_thread.run_sync(lambda: status.main(["--url", url], out=out))
        assert code == status.EXIT_HEALTHY, out.getvalue()
        nursery.cancel_scope.cancel()


def test_a_links_summary_without_peers_is_not_a_node() -> None:
    with pytest.raises(status.StatusUnavailable):
        status.validate_summary({"node": "r", "links": []})
    one = link_metrics("a", "bob", connected=True, secret_bits=8).summary()
    del one["peer"]
    with pytest.raises(status.StatusUnavailable):
        status.validate_summary({"node": "r", "links": [one]})


def test_rebootstrap_with_several_peers_needs_the_link_and_writes_its_permit_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relay_config = write_relay_config(tmp_path)
    base = relay_config.parent
    link_c, link_a = base / "elsewhere" / "c", base / "stores" / "a"
    for directory in (link_a, link_c):  # each link's store and trail, as the daemon left them
        store = KeyStore.open(directory, node_name="r")
        AuditTrail.start(store, node_name="r")
        store.close()
    argv = ["auth", "rebootstrap", "--config", str(relay_config)]
    assert main(argv) == 2
    assert "--peer NAME" in capsys.readouterr().err
    assert main([*argv, "--peer", "b"]) == 2
    assert "a peer named 'b' (configured: a, c)" in capsys.readouterr().err

    assert main([*argv, "--peer", "c"]) == 0
    assert "towards c" in capsys.readouterr().out
    assert rebootstrap.in_force(link_c, now_s=time.time())
    assert not (link_a / rebootstrap.PERMIT_FILE).exists()

    def kinds(directory: Path) -> list[str]:
        return [record.entry().kind for record in read_trail(directory).records]

    assert "rebootstrap_permit_granted" in kinds(link_c)
    assert "rebootstrap_permit_granted" not in kinds(link_a)
