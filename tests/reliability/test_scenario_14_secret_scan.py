"""Scenario 14: secret scan. The shared pair runs at DEBUG level through scenarios 1-13
(tampering, replays, forged frames, ETSI 014 negatives, a hammering consumer). Every 8-byte
window of every secret, raw or inside a hex or base64 run, is searched in both nodes' logs and
stderr (where exception texts end up), in ``/metrics`` of both nodes, and in the reprs of the
objects holding secrets. Secrets: every key in both stores, every key handed out through the API
in this run, the authentication-key pool (the ledger state in each store) and the nodes'
private keys (the PSK when a PSK is configured; this pair bootstraps with certificates).
0 hits. The scan is shown to find a planted secret first.
"""

from __future__ import annotations

import base64
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization

from qkdnode.channel.ledger import AuthKeyLedger, ledger_state_from_bytes
from tests.reliability.harness import api, scan, windows
from tests.reliability.helpers_proxied import Proxied

pytestmark = pytest.mark.slow  # starts daemon processes


def test_no_secret_in_logs_exceptions_metrics_or_reprs(proxied: Proxied) -> None:
    pair = proxied.pair
    layout = pair.layout
    proxied.sane(blocks=1)
    # a key handed out now (its bytes leave the store; they must not leave anywhere else)
    delivered: list[bytes] = []
    status, issued = api(layout, "alice", "sae-a2", "sae-b/enc_keys", {"number": 2})
    if status == 200:
        delivered += [base64.b64decode(k["key"]) for k in issued["keys"]]
    secrets: list[bytes] = list(delivered)
    ledgers = []
    for node in ("alice", "bob"):
        view = pair.store(node)
        secrets += [m for _, _, m in view.keys.values() if m is not None]
        assert view.ledger is not None
        state = ledger_state_from_bytes(view.ledger)
        ledgers.append(state)
        secrets.append(state.pool)
        key = serialization.load_pem_private_key(
            (layout.pki_dir / f"{node}.key").read_bytes(), password=None
        )
        secrets.append(
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    assert sum(len(s) for s in secrets) > 10_000, "too little secret material to mean anything"
    needles = windows(secrets)
    # the scanner finds a planted secret, raw, hex and base64
    planted = secrets[0][:16]
    for form in (planted, planted.hex().encode(), base64.b64encode(planted)):
        assert scan(b"log line " + form + b" end", needles) > 0
    texts: dict[str, bytes] = {}
    for node in ("alice", "bob"):
        texts[f"{node}.log"] = layout.log(node).read_bytes()
        texts[f"{node}.stderr"] = (layout.workdir / f"{node}.stderr").read_bytes()
        with urllib.request.urlopen(layout.metrics_url(node), timeout=10) as response:
            texts[f"{node} /metrics"] = response.read()
    for index, state in enumerate(ledgers):
        ledger = AuthKeyLedger(
            target_bits=state.target_bits, reserve_bits=state.reserve_bits, state=state
        )
        texts[f"repr ledger {index}"] = (repr(state) + repr(ledger) + str(state)).encode()
    debug_lines = sum(text.count(b'"level": "debug"') for text in texts.values())
    hits = {name: scan(data, needles) for name, data in texts.items()}
    assert sum(hits.values()) == 0, hits
    total = sum(len(data) for data in texts.values())
    print(
        f"scenario 14: {len(secrets)} secrets ({len(needles)} windows), {total} bytes scanned "
        f"({debug_lines} debug lines), 0 hits"
    )
