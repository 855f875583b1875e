"""The node daemon: the node's state (``Node``) and its task tree (``run_daemon``).

The distillation of blocks, the limbo sync at session start and the two-phase commit of each
block are decided by the pure coordination machine (``qkdnode.coordination.machine``); the
session's trio shell that applies its effects is ``qkdnode.node.exchange``. This module holds
what lives as long as the daemon: config, store, ledger, link, metrics, the authentication
planner, signals and systemd.
"""

from __future__ import annotations

import datetime as dt
import functools
import signal
import ssl
from collections.abc import Callable, Sequence
from typing import Final

import structlog
import trio

from qkdnode.audit import AuditKind
from qkdnode.channel.auth import Role
from qkdnode.channel.revocation import RevocationLists
from qkdnode.config import NodeConfig
from qkdnode.delivery.server import (
    DeliveryApp,
    DeliveryServer,
    delivery_ssl_context,
    serve_delivery,
)
from qkdnode.errors import ConfigError, KeyStoreError, LinkError
from qkdnode.link.blocks import open_block_source
from qkdnode.node.auditing import SessionFailureRecorder, config_in_force
from qkdnode.node.exchange import DaemonMustStop, Exchange, SessionEnded
from qkdnode.node.loopsteps import StepTimer
from qkdnode.node.session import (
    PeerSession,
    SessionConfig,
    run_alice,
    serve_bob,
)
from qkdnode.node.state import Node
from qkdnode.ops.metrics import serve_metrics
from qkdnode.ops.systemd import watchdog_interval_s
from qkdnode.store import KeyStore

__all__ = [
    "DaemonMustStop",
    "Node",
    "SessionEnded",
    "run_daemon",
]

log = structlog.get_logger("qkdnode.node")

GRACE_PERIOD_S: Final = 10.0
LINK_RETRY_S: Final = 1.0
LOOP_PROBE_INTERVAL_S: Final = 0.01


# ---- sessions ----------------------------------------------------------------------------------


async def run_session(node: Node, session: PeerSession) -> None:
    """One authenticated session: the exchange drives it; reservations use it meanwhile.

    One session at a time: a newer one first ends the session before it (whose peer crashed,
    or whose frames are still in flight) and waits until that one has stopped, so a stale
    session never stages or commits a block after the new one has resolved limbo."""
    previous = node.current_session
    if previous is not None:
        previous_scope, previous_done = previous
        log.info("session.superseded", detail="a newer session authenticated")
        previous_scope.cancel()
        await previous_done.wait()
    done = trio.Event()
    with trio.CancelScope() as scope:
        node.current_session = (scope, done)
        try:
            await _run_exchange(node, session)
        finally:
            if node.current_session == (scope, done):
                node.current_session = None
            done.set()


async def _run_exchange(node: Node, session: PeerSession) -> None:
    exchange = Exchange(node, session)
    mode = session.connection.mode
    node.reporter.mode_changed(mode.value if mode is not None else "none", "session established")
    node.audit.record(
        AuditKind.SESSION_ESTABLISHED,
        peer=node.peer_name,
        mode=mode.value if mode is not None else None,
        bootstrap_anchor=node.config.auth.mode,
        session_id=session.handshake.session_id.hex() if session.handshake else None,
    )
    await node.blocks.reset()
    node.exchange = exchange
    node.reservations.attach(exchange.send_message)
    node.metrics.set_peer_connected(True)
    try:
        await exchange.run()
    finally:
        node.metrics.set_peer_connected(False)
        if node.exchange is exchange:  # a newer session may already have taken over
            node.exchange = None
            node.reservations.detach("the session with the peer node ended")


async def _guarded(node: Node, session: PeerSession) -> None:
    """Run one session; store failures and a halted pool end the daemon, not the session."""
    try:
        await run_session(node, session)
    except* KeyStoreError as group:  # raised inside the session's nurseries: a group
        error = group.exceptions[0]
        log.critical("session.store_failed", error=f"{type(error).__name__}: {error}")
        raise DaemonMustStop(f"key store failure: {error}") from group
    except* LinkError:
        await trio.sleep(LINK_RETRY_S)  # the link was closed; the next session reopens it
        raise


async def _run_alice(node: Node, session_config: SessionConfig) -> None:
    """Alice dials and distils until the daemon stops (SIGTERM), then closes the session."""
    await run_alice(
        session_config,
        node.make_connection,
        lambda s: _guarded(node, s),
        on_failure=SessionFailureRecorder(node.audit, peer=node.peer_name),
    )


async def _run_bob(
    node: Node,
    session_config: SessionConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handle(session: PeerSession) -> None:
        await _guarded(node, session)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve_bob,
                on_failure=SessionFailureRecorder(node.audit, peer=node.peer_name),
            ),
            session_config,
            node.make_connection,
            handle,
        )
        task_status.started()


# ---- signals, store failures, watchdog ---------------------------------------------------------


async def _watch_signals(
    node: Node,
    cancel: trio.CancelScope,
    on_reopen: Callable[[], None],
    early_stops: Sequence[int],
    reloads: Sequence[Callable[[], None]] = (),
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        # checked once the receiver exists, so no stop request falls between the two
        if early_stops:
            await _stop_gracefully(node, cancel, early_stops[0])
            return
        async for signum in signals:
            if signum == signal.SIGHUP:
                on_reopen()
                log.info("daemon.log_reopened")
                for reload in reloads:
                    reload()
                continue
            await _stop_gracefully(node, cancel, signum)
            return


def _reload_revocation_lists(
    node: Node, setting: str, load: Callable[[], RevocationLists | None]
) -> None:
    """Reread one CRL file (SIGHUP): logged and recorded in the audit trail either way; when
    it does not load, the lists in force stay."""
    try:
        lists = load()
    except (ConfigError, OSError, ssl.SSLError) as exc:
        log.error(
            "pki.crl_reload_failed", setting=setting, error=f"{type(exc).__name__}: {exc}"[:300]
        )
        node.audit.record(
            AuditKind.REVOCATION_LISTS_LOADED, setting=setting, outcome="refused", error=str(exc)
        )
        return
    if lists is None:
        return
    next_update = dt.datetime.fromtimestamp(lists.next_update_s, tz=dt.UTC).isoformat()
    log.info(
        "pki.crl_reloaded",
        setting=setting,
        file=lists.source,
        crls=len(lists.crls),
        revoked=lists.revoked_count,
        next_update=next_update,
    )
    node.audit.record(
        AuditKind.REVOCATION_LISTS_LOADED,
        setting=setting,
        outcome="loaded",
        file=lists.source,
        crls=len(lists.crls),
        revoked=lists.revoked_count,
        next_update=next_update,
    )


def _revocation_reloads(node: Node, server: DeliveryServer | None) -> list[Callable[[], None]]:
    """What SIGHUP rereads besides the log: ``auth.crl_file`` (new handshakes check against
    it) and ``delivery.sae_crl`` (a new TLS context for new connections)."""
    reloads: list[Callable[[], None]] = []
    if node.config.auth.crl_file is not None:
        reloads.append(
            lambda: _reload_revocation_lists(node, "auth.crl_file", node.reload_revocation_lists)
        )
    delivery = node.config.delivery
    if server is not None and delivery is not None and delivery.sae_crl is not None:

        def load_sae_crl() -> RevocationLists | None:
            context, lists = delivery_ssl_context(delivery)
            server.ssl_context = context
            return lists

        reloads.append(lambda: _reload_revocation_lists(node, "delivery.sae_crl", load_sae_crl))
    return reloads


async def _stop_gracefully(node: Node, cancel: trio.CancelScope, signum: int) -> None:
    log.info("daemon.stopping", signal=signal.Signals(signum).name)
    node.stop_requested.set()
    node.notifier.stopping()
    exchange = node.exchange
    if exchange is not None:
        # let the blocks in flight finish (a commit is the consistent point), within bounds
        exchange.request_stop()
        with trio.move_on_after(GRACE_PERIOD_S):
            await exchange.idle.wait()
    cancel.cancel()


async def _stop_on_store_failure(node: Node) -> None:
    await node.store_failed.wait()
    log.critical("store.failed", detail="a key store write or read failed; stopping")
    raise DaemonMustStop("key store failure: the daemon stops and does not carry on")


async def _watchdog(node: Node) -> None:
    interval_s = watchdog_interval_s()
    if interval_s is None:
        return
    while True:
        # liveness: the trio loop runs and the store answers
        node.store.counts()
        node.notifier.watchdog()
        await trio.sleep(interval_s)


async def _probe_event_loop(node: Node) -> None:
    """How late a short timer fires: the time the event loop was blocked, exported."""
    while True:
        started = trio.current_time()
        await trio.sleep(LOOP_PROBE_INTERVAL_S)
        node.metrics.event_loop_lag(trio.current_time() - started - LOOP_PROBE_INTERVAL_S)


def _leaf_errors(error: BaseException) -> list[str]:
    if isinstance(error, BaseExceptionGroup):
        return [text for inner in error.exceptions for text in _leaf_errors(inner)]
    return [f"{type(error).__name__}: {error}"[:300]]


# ---- the daemon ------------------------------------------------------------------------------


async def run_daemon(
    config: NodeConfig,
    *,
    on_reopen: Callable[[], None] = lambda: None,
    early_stops: Sequence[int] = (),
) -> int:
    """Run one node until SIGTERM/SIGINT (exit 0) or a fatal error (raises).

    ``early_stops``: stop signals noted before the event loop ran (``qkdnode.cli``); if any,
    the node stops gracefully as soon as it has started.

    The task tree::

        run_daemon
        └── open_block_source            the link; its own nursery runs a serial device's
            │                            reader or Eve's fibre proxy
            └── nursery
                ├── _watch_signals       SIGTERM/SIGINT: stop (blocks in flight finish within
                │                        GRACE_PERIOD_S), SIGHUP: reopen the log, reread
                │                        the CRL files (auth.crl_file, delivery.sae_crl)
                ├── _watchdog            systemd WATCHDOG=1 while the loop and store answer
                ├── _stop_on_store_failure
                ├── _run_alice           dial, one session at a time, back off and redial
                │   or _run_bob          listen, one task per accepted connection
                │   └── PeerSession.run  writer, keepalive, reader (qkdnode.node.session)
                │   └── Exchange.run     event pump, link worker, post-processing threads,
                │                        reservations answered, the session's retirement
                ├── KeyManager.run       delivery pools topped up ahead of requests
                ├── serve_delivery       ETSI GS QKD 014 over mutual TLS
                └── serve_metrics        Prometheus
    """
    store = KeyStore.open(config.store.directory, node_name=config.node.name)
    node: Node | None = None
    try:
        async with open_block_source(config) as blocks:
            node = Node(config, store, blocks)
            node.audit.record(AuditKind.DAEMON_STARTED, **config_in_force(config))
            await _serve(node, config, on_reopen, early_stops)
    except BaseException as exc:
        # say why before the clean-up below: a signal may end the process during it
        log.critical("daemon.failed", errors=_leaf_errors(exc))
        raise
    finally:
        store.close()
        log.info("daemon.stopped", blocks_committed=node.counters.blocks_committed if node else 0)
    return 0


async def _serve(
    node: Node, config: NodeConfig, on_reopen: Callable[[], None], early_stops: Sequence[int]
) -> None:
    session_config = node.session_config()
    log.info(
        "daemon.starting",
        role=config.node.role,
        auth=config.auth.mode,
        link=config.link_backend,
        pool_level_bits=node.ledger.level_bits,
        keys_available=node.store.counts().available,
    )
    server = None
    if config.delivery is not None and node.manager is not None:
        app = DeliveryApp.from_config(config.delivery, node.manager)
        app.observer = node.metrics.delivery_request
        server = DeliveryServer(app, config.delivery.server)
        try:  # before any task runs: a CRL that does not load stops the start, named
            server.ssl_context, _ = delivery_ssl_context(config.delivery)
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.expected, file=str(config.file)) from None
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as serving:
            nursery.start_soon(
                _watch_signals,
                node,
                serving,
                on_reopen,
                early_stops,
                _revocation_reloads(node, server),
            )
            nursery.start_soon(_watchdog, node)
            nursery.start_soon(_probe_event_loop, node)
            trio.lowlevel.add_instrument(StepTimer(node.metrics.event_loop_step))
            nursery.start_soon(_stop_on_store_failure, node)
            if node.role is Role.ALICE:
                nursery.start_soon(_run_alice, node, session_config)
            else:
                await nursery.start(_run_bob, node, session_config)
            if config.delivery is not None and node.manager is not None and server is not None:
                await nursery.start(node.manager.run)
                address, unix_path = await nursery.start(
                    functools.partial(serve_delivery, server=server), config.delivery, server.app
                )
                log.info(
                    "delivery.listening",
                    url=f"https://{address[0]}:{address[1]}/api/v1/keys/",
                    unix_socket=str(unix_path) if unix_path else None,
                )
            if config.metrics_listen is not None:
                host, port = await nursery.start(
                    serve_metrics, node.metrics, *config.metrics_listen
                )
                log.info("metrics.listening", url=f"http://{host}:{port}/metrics")
            node.notifier.ready(f"{config.node.name}: serving ({config.node.role})")
            log.info("daemon.ready")
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
