"""Scenario 12: ETSI GS QKD 014 negatives against the running daemon pair (over real TLS).

Each refused with the right status and a JSON error (or a refused TLS handshake where no HTTP
exchange can exist), each key ID delivered exactly once per side, and the server keeps serving
the others. Mapped: no client certificate and a certificate of a foreign CA (TLS refused), SAE
not authorised (401), key ID of another SAE (401 / 400), second ``dec_keys`` of the same ID
(400), malformed JSON (400), huge body (400, "larger than"), slowloris (408 while others are
served). An expired client certificate is covered in process by
``tests/test_delivery.py::test_tls_refuses_missing_foreign_and_expired_client_certificates``.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from qkdnode.ops import issuance
from tests.reliability.harness import api, tls_context
from tests.reliability.helpers_proxied import Proxied

pytestmark = pytest.mark.slow  # starts daemon processes


def _wait_for_keys(proxied: Proxied, node: str, sae: str, slave: str, number: int) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            status, body = api(proxied.pair.layout, node, sae, f"{slave}/status")
        except OSError:  # the daemon is not listening yet (a loaded machine starts slowly)
            proxied.pair.poll()
            time.sleep(0.5)
            continue
        if status == 200 and int(body.get("stored_key_count", 0)) >= number:
            return
        proxied.pair.poll()
        time.sleep(0.5)
    raise AssertionError(f"{node} never had {number} keys for {slave}")


def _served(proxied: Proxied) -> None:
    status, body = api(proxied.pair.layout, "alice", "sae-a", "sae-b/status")
    assert status == 200 and body["source_KME_ID"] == "alice", (status, body)


def test_etsi_014_negatives_at_daemon_level(proxied: Proxied, tmp_path: Path) -> None:
    layout = proxied.pair.layout
    _wait_for_keys(proxied, "alice", "sae-a", "sae-b", 2)
    # no client certificate; a client certificate from a foreign CA: the TLS handshake fails
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        api(layout, "alice", None, "sae-b/status")
    foreign = tmp_path / "foreign"
    issuance.init_ca(foreign, common_name="foreign CA")
    issuance.issue_certificate(foreign, "sae-a", foreign / "sae-a", purpose="sae")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        api(layout, "alice", "sae-a", "sae-b/status", ca_dir=foreign)
    _served(proxied)
    # an SAE the CA knows but no node authorises
    status, body = api(layout, "alice", "sae-x", "sae-b/status")
    assert status == 401 and isinstance(body["message"], str)
    # malformed JSON and a huge body
    status, body = api(layout, "alice", "sae-a", "sae-b/enc_keys", b'{"number": 1,')
    assert status == 400 and body["message"] == "request body is not valid JSON"
    status, body = api(
        layout, "alice", "sae-a", "sae-b/enc_keys", b'{"x": "' + b"a" * 70_000 + b'"}'
    )
    assert status in (400, 413) and "larger than" in body["message"], (status, body)
    _served(proxied)
    # one key, fetched by its slave once; a second fetch, and fetches by others, are refused
    status, issued = api(layout, "alice", "sae-a", "sae-b/enc_keys", {"number": 1})
    assert status == 200, issued
    key_id = issued["keys"][0]["key_ID"]
    ids = {"key_IDs": [{"key_ID": key_id}]}
    status, body = api(layout, "bob", "sae-x", "sae-a/dec_keys", ids)
    assert status == 401 and isinstance(body["message"], str)
    status, body = api(layout, "alice", "sae-a", "sae-a/dec_keys", ids)  # master as slave
    assert status in (400, 401) and isinstance(body["message"], str), (status, body)
    status, fetched = api(layout, "bob", "sae-b", "sae-a/dec_keys", ids)
    assert status == 200 and fetched["keys"][0]["key"] == issued["keys"][0]["key"]
    status, body = api(layout, "bob", "sae-b", "sae-a/dec_keys", ids)
    assert status == 400 and isinstance(body["message"], str), (status, body)
    # each key ID delivered exactly once per side (the stores record one delivery each)
    for node in ("alice", "bob"):
        deliveries = proxied.pair.store(node).deliveries
        assert list(deliveries).count(key_id) == 1, (node, deliveries.get(key_id))
    # slowloris: a request that never completes gets 408 while others are served
    context = tls_context(layout, "sae-a")
    raw = socket.create_connection(("127.0.0.1", layout.kme_ports["alice"]), timeout=30)
    with context.wrap_socket(raw, server_hostname="localhost") as slow:
        slow.sendall(b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nhost: x\r\n")
        _served(proxied)
        data = b""
        while True:
            chunk = slow.recv(4096)
            if not chunk:
                break
            data += chunk
            if data.rstrip().endswith(b"}"):
                break
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    _served(proxied)
