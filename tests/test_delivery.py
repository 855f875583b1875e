"""ETSI 014 delivery over real sockets: two in-process nodes (Alice, Bob) with mutual TLS, the real
``etsi-qkd-014-client`` and curl as clients, the negative cases of the issue, the Unix socket,
quotas, and concurrent masters on both nodes never handing out a key twice."""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h11
import numpy as np
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from etsi_qkd_014_client import QKD014Client

from qkdnode.audit.trail import AuditValue
from qkdnode.channel.messages import Control
from qkdnode.channel.pki import NODE_PURPOSE_OID
from qkdnode.channel.revocation import parse_revocation_lists
from qkdnode.config.delivery import ApiLimits, KeyKind, ServerLimits
from qkdnode.coordination.wire import (
    CoordinationMessage,
    Reserve,
    control_from_wire,
    control_to_wire,
    make_registry,
)
from qkdnode.delivery.api import MSG_KEYS_NOT_FOUND, MSG_SIZE_MULTIPLE
from qkdnode.delivery.fairuse import FairUse, FairUsePolicy
from qkdnode.delivery.keys import KeyManager, reservation_from_wire, reservation_to_wire
from qkdnode.delivery.server import DeliveryApp, DeliveryServer, server_ssl_context
from qkdnode.node.reservations import Reservations
from qkdnode.ops import issuance
from qkdnode.store.audit import AuditTrail, read_trail
from qkdnode.store.keystore import DeliveryKey, KeyStore, StagedBlock
from tests import helpers_hybrid

LIMITS = ApiLimits(
    key_size_bits=256, min_key_size_bits=8, max_key_size_bits=2048, max_keys_per_request=64
)
SERVER_LIMITS = ServerLimits(
    max_header_bytes=4096,
    max_body_bytes=8192,
    request_timeout_s=1.0,
    handshake_timeout_s=2.0,
    max_connections=64,
)


@dataclass
class Pki:
    node_ca: Path  # issues the KMEs' certificates: the clients trust it
    sae_ca: Path  # issues the SAEs' certificates: the KMEs trust it
    sae_ca_dir: Path
    alice: issuance.IssuedFiles
    bob: issuance.IssuedFiles
    sae: dict[str, issuance.IssuedFiles]


def node_certificate_with_client_auth(ca_dir: Path, name: str, out: Path) -> issuance.IssuedFiles:
    """A node certificate that clientAuth lets through TLS: only the qkdnode purposes tell it
    from an SAE's (an operator's own CA might issue such node certificates)."""
    ca_key = issuance.load_private_key(ca_dir / issuance.CA_KEY)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / issuance.CA_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    x509.ObjectIdentifier(NODE_PURPOSE_OID),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, None)
    )
    files = issuance.IssuedFiles(out.with_suffix(".pem"), out.with_suffix(".key"))
    issuance.write_certificate(files.certificate, certificate)
    issuance.write_private_key(files.private_key, key)
    return files


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    issuance.init_ca(root / "node-ca", common_name="node CA")
    issuance.init_ca(root / "sae-ca", common_name="SAE CA")
    issuance.init_ca(root / "other-ca")
    sae = {
        name: issuance.issue_certificate(root / "sae-ca", name, root / name, purpose="sae")
        for name in ("sae-a", "sae-a2", "sae-b", "sae-b2", "sae-x")
    }
    sae["foreign"] = issuance.issue_certificate(
        root / "other-ca", "sae-a", root / "foreign", purpose="sae"
    )
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    sae["expired"] = issuance.issue_certificate(
        root / "sae-ca",
        "sae-a",
        root / "expired",
        purpose="sae",
        not_valid_before=past,
        validity_days=1,
    )
    # node certificates presented as SAEs: from the nodes' own CA (the one the KMEs do not
    # trust for SAEs), and from the SAE CA (as if one CA issued both kinds)
    sae["node"] = issuance.issue_certificate(
        root / "node-ca", "sae-a", root / "node-sae-a", purpose="node"
    )
    sae["node-shared-ca"] = issuance.issue_certificate(
        root / "sae-ca", "sae-a", root / "shared-node-sae-a", purpose="node"
    )
    sae["node-client-auth"] = node_certificate_with_client_auth(
        root / "sae-ca", "sae-a", root / "client-auth-node-sae-a"
    )
    sae["sae-a-reissued"] = issuance.issue_certificate(
        root / "sae-ca", "sae-a", root / "sae-a-reissued", purpose="sae"
    )
    return Pki(
        node_ca=root / "node-ca" / issuance.CA_CERT,
        sae_ca=root / "sae-ca" / issuance.CA_CERT,
        sae_ca_dir=root / "sae-ca",
        alice=issuance.issue_certificate(
            root / "node-ca", "kme-alice", root / "alice", purpose="node"
        ),
        bob=issuance.issue_certificate(root / "node-ca", "kme-bob", root / "bob", purpose="node"),
        sae=sae,
    )


@dataclass
class Node:
    store: KeyStore
    manager: KeyManager
    app: DeliveryApp
    server: DeliveryServer
    port: int


@dataclass
class Pair:
    alice: Node
    bob: Node
    blocks: list[StagedBlock]
    certs: Pki


def fill(stores: Sequence[KeyStore], *, seed: int, blocks: int, keys: int) -> list[StagedBlock]:
    """Stage then commit identical blocks in every store, as the two-phase commit does."""
    rng = np.random.default_rng(seed)
    staged = []
    for block_id in range(1, blocks + 1):
        block = StagedBlock(
            block_id=block_id,
            first_pulse_index=block_id,
            pulse_count=1,
            consumer_keys=[
                (uuid.UUID(bytes=rng.bytes(16), version=4), rng.bytes(32)) for _ in range(keys)
            ],
            key_size_bits=256,
            auth_pool_material=b"",
        )
        staged.append(block)
        for store in stores:
            store.stage_block(block)
    for block in staged:
        for store in stores:
            store.commit_block(block.block_id)
    return staged


REGISTRY = make_registry()
NODES = ("alice", "bob")


def channel_between(reservations: Mapping[str, Reservations]) -> None:
    """Attach each node's Reservations to the other's through the control-message wire form
    (typed -> (kind, body) -> schema check -> typed), answering in the sender's task."""

    def send_to(peer: str) -> object:
        async def send(message: CoordinationMessage) -> None:
            await trio.sleep(0)  # a real channel round trip lets other requests interleave here
            kind, body = control_to_wire(message)
            REGISTRY.check(kind, body)
            received = control_from_wire(Control(kind=kind, body=body))
            if isinstance(received, Reserve):
                back = NODES[1 - NODES.index(peer)]
                await reservations[peer].answer(received, send_to(back))  # type: ignore[arg-type]
            else:
                reservations[peer].on_result(received)  # type: ignore[arg-type]

        return send

    for name in NODES:
        reservations[name].attach(send_to(NODES[1 - NODES.index(name)]))  # type: ignore[arg-type]


async def start_pair(
    nursery: trio.Nursery,
    tmp_path: Path,
    certs: Pki,
    *,
    keys: int = 64,
    quota: FairUsePolicy | None = None,
    limits: ServerLimits = SERVER_LIMITS,
    audit: bool = False,
    kinds: Mapping[str, Mapping[tuple[str, str], KeyKind]] | None = None,
) -> Pair:
    """Alice and Bob serving ETSI 014 over TLS. ``kinds``: each node's configured pair kinds;
    with them, reservations go through the nodes' Reservations and the control-message wire
    (hybrid ones always do)."""
    reservations = {name: Reservations() for name in NODES}
    channel_between(reservations)
    stores = [
        KeyStore.open(tmp_path / "alice", node_name="alice"),
        KeyStore.open(tmp_path / "bob", node_name="bob"),
    ]
    blocks = fill(stores, seed=42, blocks=2, keys=keys // 2)
    managers: dict[str, KeyManager] = {}
    sae_sets = {
        "alice": ({"sae-a", "sae-a2"}, {"sae-b", "sae-b2"}),
        "bob": ({"sae-b", "sae-b2"}, {"sae-a", "sae-a2"}),
    }

    def wired(peer: str) -> object:
        async def peer_reserve(keys: Sequence[DeliveryKey], master: str, slave: str) -> None:
            await trio.sleep(0)  # a real channel round trip lets other requests interleave here
            parsed, m, s = reservation_from_wire(reservation_to_wire(keys, master, slave))
            await managers[peer].record_peer_reservation(parsed, m, s)

        return peer_reserve

    nodes = []
    for name, store, parity, cert, peer in (
        ("alice", stores[0], 0, certs.alice, "bob"),
        ("bob", stores[1], 1, certs.bob, "alice"),
    ):
        local, remote = sae_sets[name]
        managers[name] = KeyManager(
            store,
            master_parity=parity,
            # with ``kinds``, plain reservations too go through Reservations and the wire
            peer_reserve=wired(peer) if kinds is None else reservations[name].peer_reserve,  # type: ignore[arg-type]
            local_saes=local,
            peer_saes=remote,
            pair_kinds=(kinds or {}).get(name),
            kme_id=f"kme-{name}",
            peer_kme_id=f"kme-{peer}",
            peer_reserve_hybrid=reservations[name].peer_reserve_hybrid,
        )
        if audit:
            managers[name].audit = AuditTrail.start(store, node_name=name)
        reservations[name].manager = managers[name]
        app = DeliveryApp(
            manager=managers[name],
            limits=LIMITS,
            kme_id=f"kme-{name}",
            peer_kme_id=f"kme-{peer}",
            local_saes=tuple(sorted(local)),
            peer_saes=tuple(sorted(remote)),
            fair_use=FairUse(
                quota or FairUsePolicy(keys_per_s=1e6, burst_keys=1e6, key_size_bits=256)
            ),
            max_key_count=1000,
        )
        server = DeliveryServer(app, limits)
        context = server_ssl_context(cert.certificate, cert.private_key, certs.sae_ca)
        _, port = await nursery.start(server.serve_tls, context, "127.0.0.1", 0)
        nodes.append(Node(store, managers[name], app, server, port))
    return Pair(nodes[0], nodes[1], blocks, certs)


@pytest.fixture
async def pair(nursery: trio.Nursery, tmp_path: Path, certs: Pki) -> AsyncIterator[Pair]:
    result = await start_pair(nursery, tmp_path, certs)
    yield result
    nursery.cancel_scope.cancel()


def client(pair: Pair, node: Node, sae: str) -> QKD014Client:
    files = pair.certs.sae[sae]
    return QKD014Client(
        f"127.0.0.1:{node.port}",
        str(files.certificate),
        str(files.private_key),
        str(pair.certs.node_ca),
    )


def client_context(certs: Pki, sae: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.node_ca))
    if sae is not None:
        files = certs.sae[sae]
        context.load_cert_chain(files.certificate, files.private_key)
    return context


async def raw(
    port: int, context: ssl.SSLContext | None, data: bytes, *, unix: Path | None = None
) -> tuple[int, dict[str, object]]:
    """Send raw request bytes; parse one response (status, JSON body) with an h11 client."""
    stream: trio.abc.Stream
    if unix is not None:
        stream = await trio.open_unix_socket(str(unix))
    else:
        assert context is not None
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.send_all(data)
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        return status, json.loads(body)


def http(method: str, target: str, body: bytes = b"", extra: str = "") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    ).encode() + body


async def status_ok(pair: Pair, node: Node, sae: str = "sae-a") -> None:
    """The sanity request that must succeed before and after every negative case."""
    slave = "sae-b" if node is pair.alice else "sae-a"
    code, body = await raw(
        node.port,
        client_context(pair.certs, sae if node is pair.alice else "sae-b"),
        http("GET", f"/api/v1/keys/{slave}/status"),
    )
    assert code == 200 and body["key_size"] == 256


# ---- the real client -------------------------------------------------------------------------


async def test_real_client_status_enc_keys_at_alice_dec_keys_at_bob_same_bytes(pair: Pair) -> None:
    alice_client = client(pair, pair.alice, "sae-a")
    bob_client = client(pair, pair.bob, "sae-b")
    code, status = await trio.to_thread.run_sync(alice_client.get_status, "sae-b")
    assert code == 200
    assert (status.source_kme_id, status.target_kme_id) == ("kme-alice", "kme-bob")
    assert (status.master_sae_id, status.slave_sae_id) == ("sae-a", "sae-b")
    assert status.key_size == 256 and status.stored_key_count == 32
    assert (status.min_key_size, status.max_key_size, status.max_key_per_request) == (8, 2048, 64)

    code, container = await trio.to_thread.run_sync(alice_client.get_key, "sae-b")  # GET form
    assert code == 200 and len(container.keys) == 1
    code, more = await trio.to_thread.run_sync(
        lambda: alice_client.get_key("sae-b", number=3, size=512)  # POST form
    )
    assert code == 200 and len(more.keys) == 3
    keys = container.keys + more.keys
    # the first key is stored key 0 of block 1 (position 0: Alice's partition)
    assert (
        keys[0].key == __import__("base64").b64encode(pair.blocks[0].consumer_keys[0][1]).decode()
    )

    for key in keys:
        code, fetched = await trio.to_thread.run_sync(
            bob_client.get_key_with_key_IDs, "sae-a", [key.key_id]
        )
        assert code == 200
        assert fetched.keys[0].key_id == key.key_id and fetched.keys[0].key == key.key
    code, error = await trio.to_thread.run_sync(
        bob_client.get_key_with_key_IDs, "sae-a", [keys[0].key_id]
    )
    assert code == 400 and error.message == MSG_KEYS_NOT_FOUND  # second dec_keys
    code, status = await trio.to_thread.run_sync(alice_client.get_status, "sae-b")
    assert status.stored_key_count == 32 - 1 - 6


async def test_status_answers_with_an_empty_store(
    nursery: trio.Nursery, tmp_path: Path, certs: Pki
) -> None:
    pair = await start_pair(nursery, tmp_path, certs, keys=0)
    code, status = await trio.to_thread.run_sync(
        client(pair, pair.alice, "sae-a").get_status, "sae-b"
    )
    assert code == 200 and status.stored_key_count == 0
    code, error = await trio.to_thread.run_sync(client(pair, pair.alice, "sae-a").get_key, "sae-b")
    assert code == 503 and "not enough key material" in error.message
    nursery.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_with_client_certificates_against_both_nodes(pair: Pair) -> None:
    def curl(node: Node, sae: str, path: str, *extra: str) -> list[str]:
        files = pair.certs.sae[sae]
        return [
            "curl",
            "--silent",
            "--show-error",
            "--cert",
            str(files.certificate),
            "--key",
            str(files.private_key),
            "--cacert",
            str(pair.certs.node_ca),
            *extra,
            f"https://localhost:{node.port}/api/v1/keys/{path}",
        ]

    result = await trio.run_process(curl(pair.alice, "sae-a", "sae-b/status"), capture_stdout=True)
    assert json.loads(result.stdout)["stored_key_count"] == 32
    result = await trio.run_process(
        curl(
            pair.alice,
            "sae-a",
            "sae-b/enc_keys",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"number": 2, "size": 128}',
        ),
        capture_stdout=True,
    )
    keys = json.loads(result.stdout)["keys"]
    assert len(keys) == 2
    result = await trio.run_process(
        curl(pair.bob, "sae-b", f"sae-a/dec_keys?key_ID={keys[0]['key_ID']}"), capture_stdout=True
    )
    assert json.loads(result.stdout)["keys"] == keys[:1]
    result = await trio.run_process(
        curl(
            pair.bob,
            "sae-b",
            "sae-a/dec_keys",
            "-d",
            json.dumps({"key_IDs": [{"key_ID": keys[1]["key_ID"]}]}),
        ),
        capture_stdout=True,
    )
    assert json.loads(result.stdout)["keys"] == keys[1:]


# ---- negative cases: each refused, and the server keeps serving ---------------------------------


async def refusals(directory: Path, count: int = 1) -> list[dict[str, AuditValue]]:
    """The fields of the ``sae_certificate_refused`` entries of a store's audit trail, once
    there are ``count`` of them: the server records a refusal after the client has seen it."""
    for _ in range(3000):  # a bound, not a timing: the entry comes after one group commit
        entries = [record.entry() for record in read_trail(directory).records]
        found = [dict(e.fields) for e in entries if e.kind == "sae_certificate_refused"]
        if len(found) >= count:
            return found
        await trio.sleep(0.01)
    pytest.fail(f"fewer than {count} refused certificates recorded")


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("none", "no client certificate"),
        ("foreign", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
        # the client sends the node CA with its certificate: the chain ends at an untrusted root
        ("node", "self-signed certificate in certificate chain"),
        ("node-shared-ca", "unsuitable certificate purpose"),
    ],
)
async def test_certificates_refused_at_the_tls_layer_are_recorded_in_the_audit_trail(
    nursery: trio.Nursery, tmp_path: Path, certs: Pki, who: str, reason: str
) -> None:
    """Among them node certificates, whether from the nodes' CA or from the SAE CA: a node
    certificate has no clientAuth, so TLS refuses it before any request."""
    pair = await start_pair(nursery, tmp_path, certs, audit=True)
    context = client_context(certs, None if who == "none" else who)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await raw(pair.alice.port, context, http("GET", "/api/v1/keys/sae-b/status"))
    await status_ok(pair, pair.alice)
    (entry,) = await refusals(tmp_path / "alice")
    assert entry["reason"] == reason and entry["client"] == "127.0.0.1"
    nursery.cancel_scope.cancel()


async def test_a_node_certificate_that_passes_tls_is_refused_as_no_sae_with_401(
    nursery: trio.Nursery, tmp_path: Path, certs: Pki
) -> None:
    """clientAuth, the SAE CA, the CN of a local SAE: only the qkdnode node purpose tells it
    from an SAE's certificate, and that refuses it, named, and recorded."""
    pair = await start_pair(nursery, tmp_path, certs, audit=True)
    code, body = await raw(
        pair.alice.port,
        client_context(certs, "node-client-auth"),
        http("GET", "/api/v1/keys/sae-b/status"),
    )
    assert code == 401
    assert str(body["message"]).startswith("not an SAE certificate: 'CN=sae-a' carries the qkdnode")
    await status_ok(pair, pair.alice)
    (entry,) = await refusals(tmp_path / "alice")
    assert entry["error"] == "CertificatePurposeRejected"
    assert entry["reason"] == body["message"]
    nursery.cancel_scope.cancel()


async def test_a_revoked_sae_is_served_until_the_crl_listing_it_is_loaded_then_refused(
    nursery: trio.Nursery, tmp_path: Path, certs: Pki
) -> None:
    """The server's TLS context is replaced as SIGHUP does (the daemon's SIGHUP itself is in
    test_node_revocation.py): the listed certificate is refused from then on, a certificate
    of the same SAE with another serial is not."""
    pair = await start_pair(nursery, tmp_path, certs, audit=True)
    node = pair.alice

    def context_with_crl(*revoked: Path) -> ssl.SSLContext:
        crl = issuance.issue_crl(certs.sae_ca_dir, revoked, out=tmp_path / "crl.pem")
        lists = parse_revocation_lists(
            crl.read_bytes(),
            ca_certificates=(x509.load_pem_x509_certificate(certs.sae_ca.read_bytes()),),
            now_s=datetime.datetime.now(datetime.UTC).timestamp(),
            source=str(crl),
            key="delivery.sae_crl",
        )
        return server_ssl_context(
            certs.alice.certificate, certs.alice.private_key, certs.sae_ca, sae_crl=lists
        )

    node.server.ssl_context = context_with_crl()
    await status_ok(pair, node)  # sae-a, accepted under a CRL that lists nothing
    node.server.ssl_context = context_with_crl(certs.sae["sae-a"].certificate)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await raw(
            node.port, client_context(certs, "sae-a"), http("GET", "/api/v1/keys/sae-b/status")
        )
    await status_ok(pair, node, "sae-a-reissued")
    (entry,) = await refusals(tmp_path / "alice")
    assert entry["reason"] == "certificate revoked"
    nursery.cancel_scope.cancel()


async def test_unknown_sae_gets_401(pair: Pair) -> None:
    code, body = await raw(
        pair.alice.port,
        client_context(pair.certs, "sae-x"),
        http("GET", "/api/v1/keys/sae-b/status"),
    )
    assert code == 401 and isinstance(body["message"], str)
    # an SAE of the peer node is not an SAE of this node either
    code, _ = await raw(
        pair.alice.port,
        client_context(pair.certs, "sae-b"),
        http("GET", "/api/v1/keys/sae-a/enc_keys"),
    )
    assert code == 401
    await status_ok(pair, pair.alice)


async def test_slave_asking_for_another_saes_key_gets_401_and_the_right_slave_still_can(
    pair: Pair,
) -> None:
    code, container = await trio.to_thread.run_sync(
        lambda: client(pair, pair.alice, "sae-a").get_key("sae-b2", number=1)  # for sae-b2
    )
    assert code == 200
    key_id = container.keys[0].key_id
    code, error = await trio.to_thread.run_sync(
        client(pair, pair.bob, "sae-b").get_key_with_key_IDs, "sae-a", [key_id]
    )
    assert code == 401
    code, error = await trio.to_thread.run_sync(  # right slave, wrong master in the URL
        client(pair, pair.bob, "sae-b2").get_key_with_key_IDs, "sae-a2", [key_id]
    )
    assert code == 400 and error.message == MSG_KEYS_NOT_FOUND
    code, fetched = await trio.to_thread.run_sync(
        client(pair, pair.bob, "sae-b2").get_key_with_key_IDs, "sae-a", [key_id]
    )
    assert code == 200 and fetched.keys[0].key == container.keys[0].key


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"number": 1,', "request body is not valid JSON"),
        (b'{"size": 100}', MSG_SIZE_MULTIPLE),
        (b'{"number": 65}', "number shall be between 1 and max_key_per_request (64)"),
        (
            b'{"extension_mandatory": [{"route": "x"}]}',
            "not all extension_mandatory parameters are supported",
        ),
    ],
)
async def test_bad_enc_keys_requests_get_400_with_the_spec_message(
    pair: Pair, body: bytes, message: str
) -> None:
    context = client_context(pair.certs, "sae-a")
    code, answer = await raw(
        pair.alice.port, context, http("POST", "/api/v1/keys/sae-b/enc_keys", body)
    )
    assert (code, answer["message"]) == (400, message)
    assert pair.alice.manager.stored_key_count() == 32  # nothing reserved
    await status_ok(pair, pair.alice)


async def test_huge_body_and_huge_headers_are_refused(pair: Pair) -> None:
    context = client_context(pair.certs, "sae-a")
    big = b'{"x": "' + b"a" * 9000 + b'"}'
    code, answer = await raw(
        pair.alice.port, context, http("POST", "/api/v1/keys/sae-b/enc_keys", big)
    )
    assert code == 400 and "larger than 8192" in str(answer["message"])
    chunked = (
        b"POST /api/v1/keys/sae-b/enc_keys HTTP/1.1\r\nhost: x\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
        + b"".join(b"1000\r\n" + b" " * 4096 + b"\r\n" for _ in range(3))
    )
    code, answer = await raw(pair.alice.port, context, chunked)
    assert code == 400 and "larger than" in str(answer["message"])
    code, answer = await raw(
        pair.alice.port,
        context,
        http("GET", "/api/v1/keys/sae-b/status", extra="x-pad: " + "p" * 5000 + "\r\n"),
    )
    assert code == 400 and answer["message"] == "malformed HTTP request"
    code, answer = await raw(pair.alice.port, context, b"NOT HTTP AT ALL\r\n\r\n")
    assert code == 400
    await status_ok(pair, pair.alice)


async def test_slowloris_gets_408_while_others_are_served(pair: Pair) -> None:
    context = client_context(pair.certs, "sae-a")
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", pair.alice.port, ssl_context=context)
    async with stream:
        await stream.send_all(b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nhost: x\r\n")
        await status_ok(pair, pair.alice)  # served while the slow client hangs
        with trio.fail_after(5):
            data = b""
            while not data.endswith(b"}"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
    assert data.startswith(b"HTTP/1.1 408")
    assert json.loads(data.split(b"\r\n\r\n", 1)[1]) == {"message": "request timeout"}
    # an idle TLS handshake never started is dropped too, without harm
    tcp = await trio.open_tcp_stream("127.0.0.1", pair.alice.port)
    async with tcp:
        await status_ok(pair, pair.alice)


async def test_connection_limit_refuses_extra_connections_and_recovers(
    nursery: trio.Nursery, tmp_path: Path, certs: Pki
) -> None:
    small = ServerLimits(
        max_body_bytes=4096, request_timeout_s=1.0, handshake_timeout_s=1.0, max_connections=2
    )
    pair = await start_pair(nursery, tmp_path, certs, limits=small)
    idle = [await trio.open_tcp_stream("127.0.0.1", pair.alice.port) for _ in range(2)]
    await trio.sleep(0.05)
    assert pair.alice.server.active_connections == 2
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await raw(
            pair.alice.port,
            client_context(certs, "sae-a"),
            http("GET", "/api/v1/keys/sae-b/status"),
        )
    for stream in idle:
        await stream.aclose()
    await trio.sleep(0.05)
    await status_ok(pair, pair.alice)
    nursery.cancel_scope.cancel()


async def test_quota_stops_a_hog_but_not_other_saes(
    nursery: trio.Nursery, tmp_path: Path, certs: Pki
) -> None:
    quota = FairUsePolicy(keys_per_s=0.001, burst_keys=4, key_size_bits=256)
    pair = await start_pair(nursery, tmp_path, certs, quota=quota)
    hog = client_context(certs, "sae-a")
    enc = http("POST", "/api/v1/keys/sae-b/enc_keys", b'{"number": 2}')
    assert (await raw(pair.alice.port, hog, enc))[0] == 200
    assert (await raw(pair.alice.port, hog, enc))[0] == 200
    code, body = await raw(pair.alice.port, hog, enc)
    assert code == 429 and "quota" in str(body["message"])
    code, body = await raw(pair.alice.port, client_context(certs, "sae-a2"), enc)
    assert code == 200 and len(body["keys"]) == 2  # type: ignore[arg-type]
    nursery.cancel_scope.cancel()


# ---- Unix socket --------------------------------------------------------------------------------


async def test_unix_socket_serves_the_same_api_with_file_permissions(
    pair: Pair, nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "delivery.sock"
    await nursery.start(pair.alice.server.serve_unix, path, "sae-a")
    assert path.stat().st_mode & 0o777 == 0o600
    code, body = await raw(0, None, http("GET", "/api/v1/keys/sae-b/status"), unix=path)
    assert code == 200 and body["master_SAE_ID"] == "sae-a"
    code, body = await raw(
        0, None, http("GET", "/api/v1/keys/sae-b/enc_keys?number=2&size=64"), unix=path
    )
    assert code == 200
    keys = body["keys"]
    assert isinstance(keys, list) and len(keys) == 2
    ids = json.dumps({"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}).encode()
    code, fetched = await raw(
        pair.bob.port,
        client_context(pair.certs, "sae-b"),
        http("POST", "/api/v1/keys/sae-a/dec_keys", ids),
    )
    assert code == 200 and fetched["keys"] == keys


# ---- both nodes master at once ------------------------------------------------------------------


async def test_concurrent_masters_on_both_nodes_never_hand_out_a_key_twice(
    nursery: trio.Nursery, tmp_path: Path, certs: Pki
) -> None:
    pair = await start_pair(nursery, tmp_path, certs, keys=400)
    rng = np.random.default_rng(7)
    results: list[tuple[str, dict[str, object]]] = []

    async def master(node: Node, sae: str, slave: str, number: int, size: int) -> None:
        body = json.dumps({"number": number, "size": size}).encode()
        response = await node.app.respond("POST", f"/api/v1/keys/{slave}/enc_keys", body, sae)
        results.append((sae, json.loads(response.body) | {"status": response.status}))

    async with trio.open_nursery() as inner:
        for i in range(80):
            size = int(rng.choice([64, 256, 384]))
            if i % 2:
                inner.start_soon(
                    master, pair.alice, "sae-a", "sae-b", int(rng.integers(1, 4)), size
                )
            else:
                inner.start_soon(master, pair.bob, "sae-b", "sae-a", int(rng.integers(1, 4)), size)
    delivered = [(sae, k) for sae, r in results if r["status"] == 200 for k in r["keys"]]  # type: ignore[attr-defined]
    assert len(delivered) > 100
    ids = [k["key_ID"] for _, k in delivered]
    materials = [k["key"] for _, k in delivered]
    assert len(set(ids)) == len(ids)
    assert len(set(materials)) == len(materials)  # no stored bytes handed out twice
    # every slave gets exactly the master's bytes, once
    for sae, key in delivered:
        node, slave, master_sae = (
            (pair.bob, "sae-b", "sae-a") if sae == "sae-a" else (pair.alice, "sae-a", "sae-b")
        )
        body = json.dumps({"key_IDs": [{"key_ID": key["key_ID"]}]}).encode()
        response = await node.app.respond(
            "POST", f"/api/v1/keys/{master_sae}/dec_keys", body, slave
        )
        assert response.status == 200 and json.loads(response.body)["keys"] == [key]
    nursery.cancel_scope.cancel()


# ---- hybrid pairs --------------------------------------------------------------------------

HYBRID_AB = {("sae-a", "sae-b"): KeyKind.HYBRID}  # (sae-a2, sae-b2) stays plain QKD


def stored_qkd_keys(pair: Pair) -> set[bytes]:
    return {material for block in pair.blocks for _, material in block.consumer_keys}


def secrets_held(store: KeyStore) -> int:
    rows = store._query("SELECT COUNT(*) FROM deliveries WHERE mlkem_secret IS NOT NULL")
    return int(rows[0][0])


async def test_real_client_gets_identical_hybrid_keys_at_both_nodes_and_plain_keys_unchanged(
    nursery: trio.Nursery, tmp_path: Path, certs: Pki
) -> None:
    pair = await start_pair(nursery, tmp_path, certs, kinds={"alice": HYBRID_AB, "bob": HYBRID_AB})
    qkd_keys = stored_qkd_keys(pair)
    # Status says which kind each pair gets (its extension field); the real client accepts it
    for master, slave, kind in (("sae-a", "sae-b", "hybrid"), ("sae-a2", "sae-b2", "qkd")):
        code, body = await raw(
            pair.alice.port,
            client_context(pair.certs, master),
            http("GET", f"/api/v1/keys/{slave}/status"),
        )
        assert code == 200 and body["status_extension"] == {"key_kind": kind}
    code, status = await trio.to_thread.run_sync(
        client(pair, pair.alice, "sae-a").get_status, "sae-b"
    )
    assert code == 200 and status.stored_key_count == 32

    alice_a, bob_b = client(pair, pair.alice, "sae-a"), client(pair, pair.bob, "sae-b")
    code, single = await trio.to_thread.run_sync(alice_a.get_key, "sae-b")
    assert code == 200
    code, more = await trio.to_thread.run_sync(lambda: alice_a.get_key("sae-b", number=3, size=512))
    assert code == 200
    keys = single.keys + more.keys
    assert [len(base64.b64decode(k.key)) for k in keys] == [32, 64, 64, 64]  # requested sizes
    assert base64.b64decode(keys[0].key) not in qkd_keys  # not the QKD key itself
    assert secrets_held(pair.alice.store) == 0  # handed out at Alice: her secrets erased
    assert secrets_held(pair.bob.store) == 4  # kept at Bob until his SAE fetches them

    # Bob's first key is the documented combiner of its QKD bytes and its ML-KEM secret
    first = uuid.UUID(keys[0].key_id)
    (secret,) = pair.bob.store._query(
        "SELECT mlkem_secret FROM deliveries WHERE delivery_id = ?", (str(first),)
    )[0]
    expected = helpers_hybrid.hybrid_key(
        pair.blocks[0].consumer_keys[0][1],  # stored key 0 of block 1: Alice's partition
        secret,
        key_id=first,
        master_sae="sae-a",
        slave_sae="sae-b",
        master_kme_id="kme-alice",
        slave_kme_id="kme-bob",
    )
    assert base64.b64decode(keys[0].key) == expected
    for key in keys:
        code, fetched = await trio.to_thread.run_sync(
            bob_b.get_key_with_key_IDs, "sae-a", [key.key_id]
        )
        assert code == 200
        assert fetched.keys[0].key_id == key.key_id and fetched.keys[0].key == key.key
    assert secrets_held(pair.bob.store) == 0

    # the plain pair still gets the stored QKD bytes themselves, the same at both nodes
    code, plain = await trio.to_thread.run_sync(
        client(pair, pair.alice, "sae-a2").get_key, "sae-b2"
    )
    assert code == 200 and base64.b64decode(plain.keys[0].key) in qkd_keys
    code, fetched = await trio.to_thread.run_sync(
        client(pair, pair.bob, "sae-b2").get_key_with_key_IDs, "sae-a2", [plain.keys[0].key_id]
    )
    assert code == 200 and fetched.keys[0].key == plain.keys[0].key
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "kinds", [{"alice": HYBRID_AB, "bob": {}}, {"alice": {}, "bob": HYBRID_AB}], ids=["a", "b"]
)
async def test_a_pair_hybrid_on_one_node_only_is_refused_and_nothing_is_recorded(
    nursery: trio.Nursery,
    tmp_path: Path,
    certs: Pki,
    kinds: Mapping[str, Mapping[tuple[str, str], KeyKind]],
) -> None:
    pair = await start_pair(nursery, tmp_path, certs, kinds=kinds)
    available = pair.alice.store.available_count(parity=0)
    code, error = await trio.to_thread.run_sync(client(pair, pair.alice, "sae-a").get_key, "sae-b")
    assert code == 503 and "could not reserve" in error.message
    assert pair.bob.store._query("SELECT COUNT(*) FROM deliveries")[0][0] == 0
    assert pair.alice.store._query("SELECT COUNT(*) FROM deliveries")[0][0] == 0
    assert pair.alice.store.available_count(parity=0) == available  # released, not lost
    nursery.cancel_scope.cancel()
