"""What lives as long as the daemon, per link: ``Node`` (config, store, ledger, link, metrics,
the authentication planner, reservations) and the store as the coordination machine reads it."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

import structlog
import trio

from qkdnode.audit import AuditKind
from qkdnode.channel.auth import BLOCK_DRAW_BITS, CertificateCredentials, Credentials, Role
from qkdnode.channel.connection import ChannelConfig, PeerConnection
from qkdnode.channel.ledger import AuthKeyLedger, ledger_state_from_bytes, ledger_state_to_bytes
from qkdnode.channel.messages import ControlBody, SessionMode
from qkdnode.channel.revocation import RevocationLists
from qkdnode.config import NodeConfig
from qkdnode.config.postprocess import security_model_mismatch
from qkdnode.coordination.events import StagedShare
from qkdnode.coordination.planner import AttemptDecision, AuthPlanner, HandshakeAdmission
from qkdnode.coordination.security import KeySecurityStatement, key_security_statement
from qkdnode.coordination.wire import make_registry
from qkdnode.delivery.keys import KeyManager
from qkdnode.errors import ConfigError
from qkdnode.link.blocks import BlockSource
from qkdnode.link.interface import QuantumLink
from qkdnode.node import rebootstrap
from qkdnode.node.reporting import BlockReporter, NodeCounters
from qkdnode.node.reservations import Reservations
from qkdnode.node.session import (
    SessionConfig,
    load_certificate_credentials,
    load_psk_file,
    with_revocation_lists,
)
from qkdnode.node.weboftrust_files import load_web_of_trust_credentials
from qkdnode.ops.metrics import NodeMetrics
from qkdnode.ops.systemd import SystemdNotifier
from qkdnode.postprocess.amplification_family import AmplificationFamily
from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.finitekey import (
    DecoySettings,
    FiniteKeyAnalysis,
    OneDecoySettings,
    SecurityParameters,
)
from qkdnode.postprocess.pipeline import PipelineParameters
from qkdnode.store import BlockState, KeyStore
from qkdnode.store.audit import AuditTrail

log = structlog.get_logger("qkdnode.node")


class RelayInbox(Protocol):
    """Where a link's session hands the key relay's control frames (``qkdnode.node.relaying``)."""

    def on_control(self, peer: str, kind: str, body: Mapping[str, object]) -> None: ...


class SessionControl(Protocol):
    """What the daemon needs of the session in progress: stop it gracefully, and send the key
    relay's control frames on it."""

    idle: trio.Event

    def request_stop(self) -> None: ...
    async def send_control(self, kind: str, body: ControlBody) -> None: ...


def _pipeline_parameters(config: NodeConfig, link: QuantumLink) -> PipelineParameters:
    """The block parameters of ``config`` over ``link``'s nominal parameters (a device's or a
    recording's, known once it is open); ConfigError when they do not fit the security model."""
    pp = config.postprocess
    nominal = link.nominal_parameters()
    expected = security_model_mismatch(pp.security_model, nominal.p_vacuum)
    if expected is not None:
        raise ConfigError(f"link.p_vacuum (as the {config.link_backend} link reports it)", expected)
    decoy: DecoySettings | OneDecoySettings | None = None
    if pp.security_model == "decoy":
        decoy = DecoySettings(
            mu_signal=nominal.mu_signal,
            mu_decoy=nominal.mu_decoy,
            mu_vacuum=nominal.mu_vacuum,
            p_signal=nominal.p_signal,
            p_decoy=nominal.p_decoy,
            p_vacuum=nominal.p_vacuum,
            p_key_basis=nominal.p_key_basis,
        )
    elif pp.security_model == "one_decoy":
        decoy = OneDecoySettings(
            mu_signal=nominal.mu_signal,
            mu_decoy=nominal.mu_decoy,
            p_signal=nominal.p_signal,
            p_key_basis=nominal.p_key_basis,
        )
    return PipelineParameters(
        cascade_variant=CascadeVariant.from_name(pp.cascade_variant),
        security=SecurityParameters(eps_sec=pp.eps_sec, eps_cor=pp.eps_cor),
        qber_threshold=pp.qber_threshold,
        sample_bits=pp.sample_bits,
        decoy=decoy,
        finite_key=FiniteKeyAnalysis(pp.finite_key),
        pa_family=AmplificationFamily(pp.pa_family),
        cascade_frame_bits=pp.cascade_frame_bits,
    )


class KeyStoreView:
    """The key store as the coordination machine reads it."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store

    def staged_block_ids(self) -> list[int]:
        return self._store.staged_block_ids()

    def last_block_id(self) -> int | None:
        return self._store.last_block_id()

    def block_committed(self, block_id: int) -> bool:
        return self._store.block_state(block_id) is BlockState.COMMITTED

    def block_known(self, block_id: int) -> bool:
        return self._store.block_state(block_id) is not None

    def any_key_known(self, key_ids: Sequence[uuid.UUID]) -> bool:
        return self._store.any_key_known(key_ids)

    def staged_material(self, block_id: int) -> StagedShare:
        return self._store.staged_material(block_id)


class Node:
    """One link's state shared by its tasks: config, store, ledger, link, counters. ``config``
    is the single-peer view of the link (``NodeConfig.for_peer``): a node with several peers
    runs one ``Node`` per peer."""

    def __init__(self, config: NodeConfig, store: KeyStore, blocks: BlockSource) -> None:
        self.config = config
        self.role = Role.ALICE if config.node.role == "alice" else Role.BOB
        self.store = store
        self.store_view = KeyStoreView(store)
        # the tamper-evident audit trail in the same store (started with the store's first run)
        self.audit = AuditTrail.start(store, node_name=config.node.name)
        self.peer_name = config.peer.name
        self.blocks = blocks
        self.link = blocks.link
        self.params = _pipeline_parameters(config, blocks.link)
        self.registry = make_registry()
        self.notifier = SystemdNotifier()
        self.stop_requested = trio.Event()
        # a failed store write can surface in any task (e.g. a ledger draw while a frame is
        # read): the store reports it here and the daemon stops
        self.store_failed = trio.Event()
        store.on_failure = self.store_failed.set
        stored = store.load_auth_ledger()
        state = ledger_state_from_bytes(stored) if stored is not None else None
        self.ledger = AuthKeyLedger(
            target_bits=config.auth.pool_target_bits,
            reserve_bits=config.auth.pool_reserve_bits,
            state=state,
            observer=lambda _draw: self._persist_ledger(),
        )
        self.planner = AuthPlanner(self.role)
        # each key-derived Hello uses up a handshake key: at most one every 2 s on average,
        # in bursts of 8 (Alice needs one per session)
        self.admission = HandshakeAdmission(rate_per_s=0.5, burst=8.0)
        self.credentials = self._load_credentials()
        self.metrics = NodeMetrics(
            node=config.node.name,
            peer=config.peer.name,
            role=config.node.role,
            pool_target_bits=config.auth.pool_target_bits,
            pool_reserve_bits=config.auth.pool_reserve_bits,
            security_budget_epsilon=config.auth.security_budget_epsilon,
            saes=(*config.delivery.local_saes, *config.delivery.peer_saes)
            if config.delivery is not None
            else (),
        )
        self.metrics.add_refresher(lambda m: m.set_store_counts(self.store.counts()))
        self.metrics.add_refresher(
            lambda m: m.set_auth_pool(
                level_bits=self.ledger.level_bits, consumed_bits=self.ledger.consumed_bits
            )
        )
        self.metrics.add_refresher(lambda m: m.set_link_status(self.link.status()))
        # on both nodes: once key-derived, a pool that cannot pay for a block opens none
        self.metrics.add_refresher(
            lambda m: m.set_pool_exhausted(
                self.ledger.active and not self.ledger.can_pay(BLOCK_DRAW_BITS)
            )
        )
        # each block key's distance from uniform; summed into the statement of later keys
        self.block_epsilon = config.postprocess.eps_sec + config.postprocess.eps_cor
        self.reporter = BlockReporter(
            metrics=self.metrics,
            notifier=self.notifier,
            ledger=self.ledger,
            key_size_bits=config.store.key_size_bits,
            security_budget_epsilon=config.auth.security_budget_epsilon,
            rotation_pool_bits=config.auth.rotation_pool_bits,
        )
        self.exchange: SessionControl | None = None
        # the daemon's key relay, told of the relay frames of this link's sessions
        self.relay: RelayInbox | None = None
        # the session running now: its cancel scope and the event set once it has stopped
        self.current_session: tuple[trio.CancelScope, trio.Event] | None = None
        self._last_connection: PeerConnection | None = None
        self.reservations = Reservations()
        self.manager: KeyManager | None = None
        if config.delivery is not None:
            self.manager = KeyManager(
                store,
                master_parity=config.delivery.master_parity,
                peer_reserve=self.reservations.peer_reserve,
                peer_timeout_s=config.delivery.peer_timeout_s,
                local_saes=config.delivery.local_saes,
                peer_saes=config.delivery.peer_saes,
                prebind_keys=config.delivery.prebind_keys,
                prebind_size_bits=config.delivery.limits.key_size_bits,
                pair_kinds=config.delivery.pair_kinds,
                kme_id=config.delivery.kme_id,
                peer_kme_id=config.delivery.peer_kme_id,
                peer_reserve_hybrid=self.reservations.peer_reserve_hybrid,
            )
            self.reservations.manager = self.manager
            self.manager.audit = self.audit

    @property
    def counters(self) -> NodeCounters:
        return self.reporter.counters

    def security_statement(self, mode: SessionMode) -> KeySecurityStatement:
        """The statement of a block authenticated in ``mode``, staged now."""
        return key_security_statement(
            mode=mode,
            ledger=self.ledger.state,
            block_epsilon=self.block_epsilon,
            chain_root=self.config.auth.mode,
        )

    # ---- set-up ---------------------------------------------------------------------------
    def _load_credentials(self) -> Credentials:
        auth = self.config.auth
        if auth.mode == "psk":
            assert auth.psk_file is not None
            return load_psk_file(auth.psk_file)
        if auth.mode == "web-of-trust":
            return load_web_of_trust_credentials(auth, peer_name=self.config.peer.name)
        assert auth.certificate_file and auth.private_key_file and auth.ca_file
        credentials = load_certificate_credentials(
            certificate_file=str(auth.certificate_file),
            key_file=str(auth.private_key_file),
            ca_file=str(auth.ca_file),
            peer_name=self.config.peer.name,
        )
        return self._with_crl(credentials) if auth.crl_file is not None else credentials

    def _with_crl(self, credentials: CertificateCredentials) -> CertificateCredentials:
        assert self.config.auth.crl_file is not None
        try:
            return with_revocation_lists(
                credentials, str(self.config.auth.crl_file), now_s=time.time()
            )
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.expected, file=str(self.config.file)) from None

    def reload_revocation_lists(self) -> RevocationLists | None:
        """Reread ``auth.crl_file`` (on SIGHUP): handshakes from now on check the peer against
        it, a session already authenticated carries on. ``ConfigError`` if the file does not
        load, and the lists in force stay; None without a ``crl_file``."""
        credentials = self.credentials
        if self.config.auth.crl_file is None or not isinstance(credentials, CertificateCredentials):
            return None
        self.credentials = self._with_crl(credentials)
        return self.credentials.revocation

    def session_config(self) -> SessionConfig:
        peer = self.config.peer
        address = peer.connect if peer.connect is not None else peer.listen
        assert address is not None
        return SessionConfig(
            host=address[0],
            port=address[1],
            connect_timeout_s=peer.connect_timeout_s,
            read_timeout_s=peer.io_timeout_s,
            write_timeout_s=peer.io_timeout_s,
            keepalive_interval_s=min(peer.keepalive_interval_s, peer.io_timeout_s / 2),
            backoff_max_s=peer.reconnect_max_delay_s,
        )

    def make_connection(self) -> PeerConnection:
        """A new connection, authenticated as the ``AuthPlanner`` decides."""
        self.planner.operator_rebootstrap = rebootstrap.in_force(
            self.config.store.directory, now_s=time.time()
        )
        connection, decision = self.planner.new_connection(
            last=self._last_connection,
            credentials=self.credentials,
            registry=self.registry,
            ledger=self.ledger,
            config=ChannelConfig(max_frame_bytes=self.config.peer.max_frame_bytes),
            random_bytes=os.urandom,
            store=self.store_view,
            admit_key_derived=lambda: self.admission.admit(time.monotonic()),
        )
        if decision is AttemptDecision.REBOOTSTRAP:
            log.warning("auth.rebootstrap", reason="operator re-bootstrap permit in force")
            self.audit.record(AuditKind.REBOOTSTRAP_PERMIT_IN_FORCE, peer=self.peer_name)
        elif decision is AttemptDecision.KEY_DERIVED_REFUSED:
            log.warning(
                "auth.key_derived_retry",
                detail="the last key-derived attempt did not complete; trying key-derived again "
                "(never the bootstrap credentials)",
            )
        self._last_connection = connection
        return connection

    def _persist_ledger(self) -> None:
        # Write-ahead: a drawn one-time key is durable as spent before it is used.
        self.store.save_auth_ledger(ledger_state_to_bytes(self.ledger.state))
