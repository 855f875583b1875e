"""``qkdnode status``: exit 0 healthy, 1 unhealthy, 3 when nothing answers, 2 for usage errors."""

from __future__ import annotations

import io
import json
import re
import socket
from pathlib import Path

import trio

from qkdnode.ops import status
from qkdnode.ops.metrics import NodeMetrics, serve_metrics
from qkdnode.store.keystore import StoreCounts


def healthy_metrics() -> NodeMetrics:
    metrics = NodeMetrics(
        node="bob", peer="alice", role="bob", pool_target_bits=32768, pool_reserve_bits=4096
    )
    metrics.set_peer_connected(True)
    metrics.set_mode("key_derived")
    metrics.block_committed(
        qber=0.011,
        sifted_bits=225_000,
        leak_bits=11_000,
        reconciliation_efficiency=1.05,
        secret_bits=57_344,
        pool_level_bits=32768,
        mode="key_derived",
    )
    metrics.set_store_counts(StoreCounts(staged=0, available=224, reserved=0, delivered=8))
    return metrics


async def run_status(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = await trio.to_thread.run_sync(lambda: status.main(argv, out=out))
    return code, out.getvalue()


async def test_status_of_a_healthy_then_unhealthy_node() -> None:
    metrics = healthy_metrics()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        code, text = await run_status(["--url", url])
        assert code == status.EXIT_HEALTHY, text
        assert "healthy" in text and "peer connected:   yes" in text
        assert "keys available:   224" in text and "1.10 %" in text
        assert "1 committed, 0 aborted" in text

        metrics.set_peer_connected(False)
        metrics.block_aborted("qber_above_threshold")
        code, text = await run_status(["--url", url + "/status"])
        assert code == status.EXIT_UNHEALTHY
        assert "UNHEALTHY" in text and "problem: peer not connected" in text
        assert "(qber_above_threshold 1)" in text

        # the client's own freshness limit applies, whatever the node's default
        metrics.set_peer_connected(True)
        code, text = await run_status(["--url", url, "--max-commit-age-s", "-1", "--json"])
        assert code == status.EXIT_UNHEALTHY
        assert json.loads(text)["problems"][0].startswith("no block committed for")
        nursery.cancel_scope.cancel()


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


async def test_status_of_a_stopped_node_is_3() -> None:
    code, text = await run_status(["--url", f"http://127.0.0.1:{_unused_port()}"])
    assert code == status.EXIT_NOT_ANSWERING
    assert "not answering" in text


async def test_something_else_answering_is_not_a_node() -> None:
    async def not_a_node(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        body = b'{"hello": "world"}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, not_a_node, 0)
        port = listeners[0].socket.getsockname()[1]
        code, text = await run_status(["--url", f"http://127.0.0.1:{port}"])
        assert code == status.EXIT_NOT_ANSWERING and "no valid 'node'" in text
        nursery.cancel_scope.cancel()


async def test_status_from_a_node_config(tmp_path: Path) -> None:
    from qkdnode.demo.run import prepare_workdir

    layout = prepare_workdir(tmp_path, distance_km=10.0, block_pulses=1 << 20)
    config = layout.config("bob")
    config.write_text(re.sub(r"\[metrics\]\nlisten = \S+\n", "", config.read_text()))
    code, _ = await run_status(["--config", str(config)])
    assert code == status.EXIT_USAGE  # no [metrics] listen: nothing to ask

    metrics = healthy_metrics()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        with config.open("a") as handle:
            handle.write(f'\n[metrics]\nlisten = "0.0.0.0:{port}"\n')
        code, text = await run_status(["--config", str(config)])
        assert code == status.EXIT_HEALTHY, text
        nursery.cancel_scope.cancel()


def test_health_rules() -> None:
    base = {
        "peer_connected": True,
        "pool_level_bits": 0,
        "pool_reserve_bits": 4096,
        "blocks_committed": 0,
        "last_commit_age_s": None,
        "uptime_s": 30.0,
    }
    # a fresh node: empty pool and no block yet is expected
    assert status.health_problems(base, max_commit_age_s=600) == []
    assert status.health_problems(base | {"uptime_s": 700.0}, max_commit_age_s=600) == [
        "no block committed in 700 s since start (limit 600 s)"
    ]
    committed = base | {"blocks_committed": 3, "last_commit_age_s": 10.0}
    assert status.health_problems(committed, max_commit_age_s=600) == [
        "authentication pool below reserve (0 < 4096 bits)"
    ]
    assert status.health_problems(
        committed | {"pool_level_bits": 4096, "link_state": "failed"}, max_commit_age_s=600
    ) == ["quantum link failed"]


def test_status_url_of_wildcard_and_ipv6_listeners() -> None:
    assert status.status_url("0.0.0.0", 9100) == "http://127.0.0.1:9100/status"
    assert status.status_url("::1", 9100) == "http://[::1]:9100/status"
    assert status.status_url("::", 9100) == "http://[::1]:9100/status"
