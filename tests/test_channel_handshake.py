"""The channel's handshake: certificate, PSK and key-derived sessions, their refusals, and the
handshake-key slots; two PeerConnections driven against each other in memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qkdnode.channel import wegman_carter
from qkdnode.channel.auth import BLOCK_DRAW_BITS, CertificateCredentials, PskCredentials, Role
from qkdnode.channel.connection import (
    NEED_DATA,
    ConnectionState,
    HandshakeComplete,
    PeerConnection,
)
from qkdnode.channel.ledger import HANDSHAKE_KEYS_PER_SLOT, AuthKeyLedger
from qkdnode.channel.messages import (
    BLOCK_TAG_FAMILIES,
    CASCADE_PERMUTATIONS,
    PROTOCOL_VERSION,
    SessionMode,
)
from qkdnode.channel.revocation import parse_revocation_lists
from qkdnode.errors import (
    AuthenticationFailed,
    CertificatePurposeRejected,
    CertificateRejected,
    CertificateRevoked,
    ProtocolError,
    RevocationUnknown,
)
from qkdnode.postprocess.cascade import permutation
from tests import helpers_pki
from tests.helpers_channel import (
    NAMED_ERRORS,
    REGISTRY,
    Pair,
    assert_rejected,
    flip,
    make_creds,
    make_pair,
    offsets,
    rotated_pair,
)
from tests.helpers_pki import (
    NOW_S,
    credentials_pair,
    make_ca,
    make_crl,
    make_node_certificate,
)


def test_later_session_starts_key_derived_and_resyncs_offsets() -> None:
    pair = rotated_pair()
    pair.run_block(0)
    ledgers = (pair.alice.ledger, pair.bob.ledger)
    assert ledgers[0] is not None and ledgers[1] is not None
    # a session that died after Alice's BlockOpen left Bob one block behind
    ledgers[0].draw(BLOCK_DRAW_BITS, "lost block")
    ledgers[0].record_tags(2, 1e-30)
    creds = (pair.alice._credentials, pair.bob._credentials)
    second = make_pair("psk", ledgers=ledgers, creds=creds, seed=5)
    second.handshake()
    for role in Role:
        (event,) = second.events[role]
        assert isinstance(event, HandshakeComplete) and event.mode is SessionMode.KEY_DERIVED
    assert ledgers[0].state == ledgers[1].state
    second.run_block(1)
    assert ledgers[0].state == ledgers[1].state


def test_a_forged_reply_naming_a_key_far_ahead_burns_nothing_at_alice() -> None:
    """An on-path forger answers Alice's Hello naming the last key of a slot she holds: his
    proof fails and her handshake-key stream stays where it was, so the genuine Bob's next
    key is still hers to verify (it used to burn every key below the named one: an outage)."""
    pair = rotated_pair()
    pair.run_block(0)
    alice_ledger, bob_ledger = pair.alice.ledger, pair.bob.ledger
    assert alice_ledger is not None and bob_ledger is not None
    first_key = alice_ledger.handshake_first
    slot = first_key // HANDSHAKE_KEYS_PER_SLOT
    assert slot < alice_ledger.state.handshake_deposited
    forger_ledger = AuthKeyLedger(
        target_bits=bob_ledger.state.target_bits,
        reserve_bits=0,
        state=replace(
            bob_ledger.state,
            handshake_pool=bytes(len(bob_ledger.state.handshake_pool)),
            handshake_next_key=HANDSHAKE_KEYS_PER_SLOT - 1,
        ),
    )
    creds = (pair.alice._credentials, pair.bob._credentials)
    forged = make_pair("psk", ledgers=(alice_ledger, forger_ledger), creds=creds, seed=11)
    with pytest.raises(AuthenticationFailed):
        forged.handshake()
    assert alice_ledger.handshake_first == first_key
    genuine = make_pair("psk", ledgers=(alice_ledger, bob_ledger), creds=creds, seed=12)
    genuine.handshake()
    assert genuine.alice.mode is SessionMode.KEY_DERIVED
    assert alice_ledger.handshake_first == bob_ledger.handshake_first == first_key + 1


@pytest.mark.parametrize("algorithm", ["ed25519", "mldsa65"])
@pytest.mark.parametrize("flaw", ["wrong_ca", "expired", "wrong_name", "no_signing_usage"])
def test_bad_certificate_is_rejected(algorithm: str, flaw: str) -> None:
    alice_c, _, ca = credentials_pair(algorithm)
    issuer = make_ca(algorithm, "rogue CA") if flaw == "wrong_ca" else ca
    name = "mallory.qkd.test" if flaw == "wrong_name" else "bob.qkd.test"
    cert, key = make_node_certificate(
        issuer,
        name,
        algorithm,
        expired=flaw == "expired",
        signing_usage=flaw != "no_signing_usage",
    )
    bad_bob = CertificateCredentials(
        certificate_chain=(cert,),
        private_key=key,
        trust_anchor=ca.certificate,
        peer_name="alice.qkd.test",
    )
    pair = make_pair(algorithm, creds=(alice_c, bad_bob))
    pair.bob.receive_data(pair.alice.start_handshake())
    assert pair.bob.next_event(now_s=NOW_S) is NEED_DATA
    error = assert_rejected(pair.alice, pair.bob.data_to_send(), CertificateRejected)
    assert "pool" not in str(error)


@pytest.mark.parametrize(
    ("purposes", "detail"),
    [
        (("sae",), "carries the qkdnode SAE purpose"),
        (("node", "sae"), "carries the qkdnode SAE purpose"),
        ((), "lacks the qkdnode node purpose"),
    ],
)
def test_a_certificate_that_is_not_a_nodes_is_refused_on_the_channel(
    purposes: tuple[str, ...], detail: str
) -> None:
    """An SAE certificate (or one without the node purpose) from the nodes' own CA, naming the
    pinned peer, valid in every other way: refused as not a node certificate."""
    alice_c, bob_c, ca = credentials_pair("ed25519")
    cert, key = make_node_certificate(ca, "bob.qkd.test", "ed25519", purposes=purposes)
    bad_bob = replace(bob_c, certificate_chain=(cert,), private_key=key)
    pair = make_pair("ed25519", creds=(alice_c, bad_bob))
    pair.bob.receive_data(pair.alice.start_handshake())
    assert pair.bob.next_event(now_s=NOW_S) is NEED_DATA
    error = assert_rejected(pair.alice, pair.bob.data_to_send(), CertificatePurposeRejected)
    assert detail in str(error) and "CN=bob.qkd.test" in str(error)


def _checking(
    credentials: CertificateCredentials, crl: bytes, ca: helpers_pki.TestCa
) -> CertificateCredentials:
    lists = parse_revocation_lists(
        crl, ca_certificates=(ca.certificate,), now_s=NOW_S, source="crl.pem", key="auth.crl_file"
    )
    return replace(credentials, revocation=lists)


@pytest.mark.parametrize("algorithm", ["ed25519", "mldsa65"])
def test_a_peer_revoked_in_the_crl_is_refused_and_one_not_listed_is_accepted(
    algorithm: str,
) -> None:
    alice_c, bob_c, ca = credentials_pair(algorithm)
    other, _ = make_node_certificate(ca, "carol.qkd.test", algorithm)
    accepting = _checking(alice_c, make_crl(ca, (other,)), ca)
    pair = make_pair(algorithm, creds=(accepting, bob_c))
    pair.handshake()
    assert pair.alice.mode is SessionMode.CERTIFICATE

    refusing = _checking(alice_c, make_crl(ca, (other, bob_c.certificate_chain[0])), ca)
    pair = make_pair(algorithm, creds=(refusing, bob_c))
    pair.bob.receive_data(pair.alice.start_handshake())
    assert pair.bob.next_event(now_s=NOW_S) is NEED_DATA
    error = assert_rejected(pair.alice, pair.bob.data_to_send(), CertificateRevoked)
    assert isinstance(error, CertificateRevoked)
    assert error.serial == f"{bob_c.certificate_chain[0].serial_number:x}"


def test_a_crl_past_its_next_update_refuses_every_peer() -> None:
    alice_c, bob_c, ca = credentials_pair("ed25519")
    checking = _checking(alice_c, make_crl(ca, until_s=NOW_S + 60.0), ca)
    pair = make_pair("ed25519", creds=(checking, bob_c))
    pair.bob.receive_data(pair.alice.start_handshake())
    assert pair.bob.next_event(now_s=NOW_S + 61.0) is NEED_DATA
    error = assert_rejected(
        pair.alice, pair.bob.data_to_send(), RevocationUnknown, now_s=NOW_S + 61.0
    )
    assert "not current" in str(error)


def test_wrong_psk_is_rejected() -> None:
    pair = make_pair(
        "psk", creds=(PskCredentials(psk=bytes(32)), PskCredentials(psk=bytes([1]) * 32))
    )
    pair.bob.receive_data(pair.alice.start_handshake())
    assert pair.bob.next_event(now_s=NOW_S) is NEED_DATA
    assert_rejected(pair.alice, pair.bob.data_to_send(), AuthenticationFailed)


@pytest.mark.parametrize(
    ("mode", "which"),
    [("psk", 0), ("psk", 1), ("psk", 2), ("ed25519", 0), ("ed25519", 2), ("mldsa65", 1)],
)
@pytest.mark.slow  # runs long
def test_flipped_handshake_byte_never_completes(mode: str, which: int) -> None:
    """A flipped byte anywhere in handshake frame ``which`` ends the handshake with an error."""
    creds = make_creds(mode)
    probe = make_pair(mode, creds=creds)
    hello = probe.alice.start_handshake()
    probe.bob.receive_data(hello)
    probe.bob.next_event(now_s=NOW_S)
    reply = probe.bob.data_to_send()
    sizes = [len(hello), len(reply)]
    probe.alice.receive_data(reply)
    probe.alice.next_event(now_s=NOW_S)
    sizes.append(len(probe.alice.data_to_send()))
    for offset in offsets(sizes[which], every=mode != "mldsa65"):
        pair = make_pair(mode, creds=creds, seed=offset)
        frames = [pair.alice.start_handshake()]
        if which == 0:
            frames[0] = flip(frames[0], offset)
        failed = False
        try:
            pair.bob.receive_data(frames[0])
            pair.bob.next_event(now_s=NOW_S)
            reply = pair.bob.data_to_send()
            if which == 1:
                reply = flip(reply, offset)
            pair.alice.receive_data(reply)
            pair.alice.next_event(now_s=NOW_S)
            finish = pair.alice.data_to_send()
            if which == 2:
                finish = flip(finish, offset)
            pair.bob.receive_data(finish)
            while pair.bob.next_event(now_s=NOW_S) is not NEED_DATA:
                pass
        except NAMED_ERRORS:
            failed = True
        # A longer length prefix makes the receiver wait for bytes that never come: the
        # wrapper's timeout ends that session. Either way, Bob never completes.
        assert failed or pair.bob.state is not ConnectionState.ESTABLISHED, offset
        assert (
            pair.bob.state is not ConnectionState.ESTABLISHED
            or pair.alice.state is ConnectionState.ESTABLISHED
        )


def test_ledger_mismatch_refuses_key_derived_session() -> None:
    pair = rotated_pair()
    pair.run_block(0)
    ledgers = (pair.alice.ledger, pair.bob.ledger)
    assert ledgers[0] is not None and ledgers[1] is not None
    ledgers[1].deposit(bytes(64), mark_consumed_bits=ledgers[1].consumed_bits)  # rolled/forked
    second = make_pair("psk", ledgers=ledgers, creds=(PskCredentials(psk=bytes(range(32))),) * 2)
    error = assert_rejected(second.bob, second.alice.start_handshake(), ProtocolError)
    assert isinstance(error, ProtocolError) and error.field == "ledger_deposit_digest"
    # an operator's re-bootstrap on both nodes: a PSK session, the ledgers untouched by it
    third = PeerConnection(
        Role.ALICE,
        credentials=PskCredentials(psk=bytes(range(32))),
        registry=REGISTRY,
        ledger=ledgers[0],
        force_bootstrap=True,
    )
    bob = PeerConnection(
        Role.BOB,
        credentials=PskCredentials(psk=bytes(range(32))),
        registry=REGISTRY,
        ledger=ledgers[1],
        force_bootstrap=True,
    )
    rebooted = Pair(third, bob)
    rebooted.handshake()
    assert third.mode is SessionMode.PSK and bob.mode is SessionMode.PSK


def test_an_active_ledger_refuses_bootstrap_both_ways_without_an_operator() -> None:
    """Once rotated, Alice sends only key-derived Hellos and Bob refuses a bootstrap one."""
    pair = rotated_pair()
    pair.run_block(0)
    ledgers = (pair.alice.ledger, pair.bob.ledger)
    assert ledgers[0] is not None and ledgers[1] is not None
    assert ledgers[0].active and ledgers[1].active
    psk = PskCredentials(psk=bytes(range(32)))
    alice = PeerConnection(Role.ALICE, credentials=psk, registry=REGISTRY, ledger=ledgers[0])
    hello = alice.start_handshake()
    assert alice._handshake is not None and alice._handshake.mode is SessionMode.KEY_DERIVED
    # a bootstrap Hello (a stranger with the PSK, or a node that lost its ledger)
    stranger = PeerConnection(Role.ALICE, credentials=psk, registry=REGISTRY, ledger=None)
    bob = PeerConnection(Role.BOB, credentials=psk, registry=REGISTRY, ledger=ledgers[1])
    before = ledgers[1].state
    error = assert_rejected(bob, stranger.start_handshake(), ProtocolError)
    assert isinstance(error, ProtocolError) and error.field == "mode"
    assert ledgers[1].state == before
    # the key-derived Hello is answered under a fresh handshake slot, used up at once
    bob = PeerConnection(Role.BOB, credentials=psk, registry=REGISTRY, ledger=ledgers[1])
    first = ledgers[1].handshake_first
    bob.receive_data(hello)
    assert bob.next_event(now_s=NOW_S) is NEED_DATA and bob.data_to_send()
    assert ledgers[1].handshake_first > first


def test_every_key_derived_hello_uses_up_its_own_handshake_slot_and_no_pool_bit() -> None:
    """A stranger's Hellos (forged offsets included) never get a proof under a pool bit: each
    one costs a fresh handshake slot, and the pool is untouched."""
    pair = rotated_pair()
    pair.run_block(0)
    alice_ledger, bob_ledger = pair.alice.ledger, pair.bob.ledger
    assert alice_ledger is not None and bob_ledger is not None
    pool_before = (bob_ledger.consumed_bits, bob_ledger.state.pool)
    psk = PskCredentials(psk=bytes(range(32)))
    used = []
    for ahead_bits in (0, 1024, 2048):
        fake = AuthKeyLedger(
            target_bits=alice_ledger.state.target_bits,
            reserve_bits=0,
            state=replace(
                alice_ledger.state,
                consumed_bits=alice_ledger.consumed_bits + ahead_bits,
                deposited_bits=alice_ledger.state.deposited_bits + ahead_bits,
                reserve_bits=0,
            ),
        )
        stranger = PeerConnection(Role.ALICE, credentials=psk, registry=REGISTRY, ledger=fake)
        bob = PeerConnection(Role.BOB, credentials=psk, registry=REGISTRY, ledger=bob_ledger)
        used.append(bob_ledger.handshake_first)
        bob.receive_data(stranger.start_handshake())
        assert bob.next_event(now_s=NOW_S) is NEED_DATA
    assert used == sorted(set(used)) and bob_ledger.handshake_first == used[-1] + 1
    assert (bob_ledger.consumed_bits, bob_ledger.state.pool) == pool_before
    # Alice takes the slot Bob names: the slots used by strangers are skipped, never reused
    second = make_pair("psk", ledgers=(alice_ledger, bob_ledger), creds=(psk, psk), seed=9)
    second.handshake()
    assert second.alice.mode is SessionMode.KEY_DERIVED
    assert alice_ledger.handshake_first == bob_ledger.handshake_first == used[-1] + 2


@pytest.mark.parametrize("mode", ["psk", "key_derived"])
def test_a_peer_of_another_protocol_version_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A Hello of protocol version 3 (GF(2^128) block tags, Cascade permutations v2) is refused
    before anything else, naming both versions and what each computes; a key-derived one uses
    up no handshake key."""
    if mode == "psk":
        pair = make_pair("psk")
    else:
        rotated = rotated_pair()
        rotated.run_block(0)
        ledgers = (rotated.alice.ledger, rotated.bob.ledger)
        pair = make_pair("psk", ledgers=ledgers)
    with monkeypatch.context() as patched:
        patched.setattr("qkdnode.channel.handshake.PROTOCOL_VERSION", 5)
        hello = pair.alice.start_handshake()
    bob_ledger = pair.bob.ledger
    before = None if bob_ledger is None else bob_ledger.state
    error = assert_rejected(pair.bob, hello, ProtocolError)
    assert isinstance(error, ProtocolError) and error.field == "protocol_version"
    for part in (
        "version 5 (block tag poly1305-v1, Cascade permutations v3, reconciliation report "
        "error count)",
        "version 6 (block tag poly1305-v1, Cascade permutations v3, reconciliation report "
        "errors per intensity class)",
    ):
        assert part in str(error)
    # the version names the tag family and the permutation specification the blocks use
    assert BLOCK_TAG_FAMILIES[PROTOCOL_VERSION] == wegman_carter.FAMILY == "poly1305-v1"
    domain = f"qkdnode/cascade/permutation/{CASCADE_PERMUTATIONS[PROTOCOL_VERSION]}".encode()
    assert domain == permutation.PERMUTATION_DOMAIN
    assert (None if bob_ledger is None else bob_ledger.state) == before
    # the same pair at one version completes
    fresh = make_pair("psk")
    fresh.handshake()
    assert fresh.bob.state is ConnectionState.ESTABLISHED
