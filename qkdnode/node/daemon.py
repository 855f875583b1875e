"""The node daemon: the node's state (``Node``) and its task tree (``run_daemon``).

The distillation of blocks, the limbo sync at session start and the two-phase commit of each
block are decided by the pure coordination machine (``qkdnode.coordination.machine``); the
session's trio shell that applies its effects is ``qkdnode.node.exchange``. This module holds
what lives as long as the daemon: config, store, ledger, link, metrics, the authentication
planner, signals and systemd.
"""

from __future__ import annotations

import contextlib
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
from qkdnode.config.relay import RelaySection
from qkdnode.delivery.server import (
    DeliveryApp,
    DeliveryServer,
    delivery_ssl_context,
    serve_delivery,
)
from qkdnode.errors import ConfigError, KeyStoreError, LinkError, SecurityError
from qkdnode.link.blocks import open_block_source
from qkdnode.node.auditing import SessionFailureRecorder, config_in_force, leaf_exceptions
from qkdnode.node.exchange import DaemonMustStop, Exchange, SessionEnded
from qkdnode.node.loopsteps import StepTimer
from qkdnode.node.relaying import RelayService
from qkdnode.node.session import (
    PeerSession,
    SessionConfig,
    run_alice,
    serve_bob,
)
from qkdnode.node.state import Node
from qkdnode.ops.metrics import LinkMetricsSet, MetricsSource, serve_metrics
from qkdnode.ops.systemd import watchdog_interval_s
from qkdnode.store import KeyStore
from qkdnode.store.relaystore import RelayStore
from qkdnode.store.transaction import Database

__all__ = [
    "DaemonMustStop",
    "Node",
    "SessionEnded",
    "run_daemon",
]

log = structlog.get_logger("qkdnode.node")

GRACE_PERIOD_S: Final = 10.0
LINK_RETRY_S: Final = 1.0
# with several peers, a link whose tasks failed restarts after this pause, doubled on each
# failure in a row up to the maximum
LINK_RESTART_S: Final = 1.0
LINK_RESTART_MAX_S: Final = 60.0
LOOP_PROBE_INTERVAL_S: Final = 0.01
RELAY_DIRECTORY: Final = "relay"  # under store.directory: the relay store (relay.db)


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


async def _run_link(
    node: Node,
    session_config: SessionConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One link's session loop: Alice dials, Bob listens (started once Bob listens)."""
    async with trio.open_nursery() as nursery:
        if node.role is Role.ALICE:
            nursery.start_soon(_run_alice, node, session_config)
        else:
            await nursery.start(_run_bob, node, session_config)
        task_status.started()


def _fatal(error: BaseException) -> bool:
    """Errors after which no link carries on: a store failure, a security failure that escaped
    the session loops."""
    return any(
        isinstance(leaf, DaemonMustStop | KeyStoreError | SecurityError)
        for leaf in leaf_exceptions(error)
    )


async def _supervise_link(
    node: Node,
    session_config: SessionConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A link of a node with several peers: its errors end its own tasks only, which restart
    after a pause (``LINK_RESTART_S``, doubling); the other links carry on. Errors at start
    (Bob's port taken) and fatal ones (``_fatal``) end the daemon. Every log line of the link
    carries ``peer``."""
    structlog.contextvars.bind_contextvars(peer=node.peer_name)
    delay_s = LINK_RESTART_S
    starting = True
    while True:
        began_s = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(_run_link, node, session_config)
                if starting:
                    starting = False
                    task_status.started()
            return  # the session loop ended by itself: the daemon is stopping
        except Exception as error:
            # trio's nurseries raise groups; any error of this link is handled here
            if starting or _fatal(error):
                raise
            log.error("link.failed", errors=_leaf_errors(error), restart_in_s=delay_s)
            node.metrics.set_peer_connected(False)
        if trio.current_time() - began_s >= LINK_RESTART_MAX_S:
            delay_s = LINK_RESTART_S  # it ran well for a while: restart fast again
        await trio.sleep(delay_s)
        delay_s = min(2 * delay_s, LINK_RESTART_MAX_S)


# ---- signals, store failures, watchdog ---------------------------------------------------------


async def _watch_signals(
    nodes: Sequence[Node],
    cancel: trio.CancelScope,
    on_reopen: Callable[[], None],
    early_stops: Sequence[int],
    reloads: Sequence[Callable[[], None]] = (),
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        # checked once the receiver exists, so no stop request falls between the two
        if early_stops:
            await _stop_gracefully(nodes, cancel, early_stops[0])
            return
        async for signum in signals:
            if signum == signal.SIGHUP:
                on_reopen()
                log.info("daemon.log_reopened")
                for reload in reloads:
                    reload()
                continue
            await _stop_gracefully(nodes, cancel, signum)
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


def _revocation_reloads(
    nodes: Sequence[Node], server: DeliveryServer | None
) -> list[Callable[[], None]]:
    """What SIGHUP rereads besides the log: each link's ``auth.crl_file`` (new handshakes
    check against it) and ``delivery.sae_crl`` (a new TLS context for new connections)."""
    reloads: list[Callable[[], None]] = []
    for node in nodes:
        if node.config.auth.crl_file is not None:
            reloads.append(
                functools.partial(
                    _reload_revocation_lists, node, "auth.crl_file", node.reload_revocation_lists
                )
            )
    node = next((n for n in nodes if n.config.delivery is not None), nodes[0])
    delivery = node.config.delivery
    if server is not None and delivery is not None and delivery.sae_crl is not None:

        def load_sae_crl() -> RevocationLists | None:
            context, lists = delivery_ssl_context(delivery)
            server.ssl_context = context
            return lists

        reloads.append(lambda: _reload_revocation_lists(node, "delivery.sae_crl", load_sae_crl))
    return reloads


async def _stop_gracefully(nodes: Sequence[Node], cancel: trio.CancelScope, signum: int) -> None:
    log.info("daemon.stopping", signal=signal.Signals(signum).name)
    for node in nodes:
        node.stop_requested.set()
    nodes[0].notifier.stopping()
    # let every link's blocks in flight finish (a commit is the consistent point), within
    # one grace period for all
    with trio.move_on_after(GRACE_PERIOD_S):
        async with trio.open_nursery() as waiting:
            for node in nodes:
                exchange = node.exchange
                if exchange is not None:
                    exchange.request_stop()
                    waiting.start_soon(exchange.idle.wait)
    cancel.cancel()


async def _stop_on_store_failure(node: Node) -> None:
    await node.store_failed.wait()
    log.critical("store.failed", detail="a key store write or read failed; stopping")
    raise DaemonMustStop("key store failure: the daemon stops and does not carry on")


async def _watchdog(nodes: Sequence[Node]) -> None:
    interval_s = watchdog_interval_s()
    if interval_s is None:
        return
    while True:
        # liveness: the trio loop runs and every store answers
        for node in nodes:
            node.store.counts()
        nodes[0].notifier.watchdog()
        await trio.sleep(interval_s)


async def _probe_event_loop(nodes: Sequence[Node]) -> None:
    """How late a short timer fires: the time the event loop was blocked, exported (in every
    link's metrics: one loop serves them all)."""
    while True:
        started = trio.current_time()
        await trio.sleep(LOOP_PROBE_INTERVAL_S)
        lag_s = trio.current_time() - started - LOOP_PROBE_INTERVAL_S
        for node in nodes:
            node.metrics.event_loop_lag(lag_s)


def _record_step(nodes: Sequence[Node], task: str, seconds: float) -> None:
    for node in nodes:
        node.metrics.event_loop_step(task, seconds)


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

    One ``Node`` per link (``config.peers``), each with its own store, link, ledger, session
    loop and metrics (docs/architecture.md, "Several peers"). The task tree::

        run_daemon
        └── open_block_source            per link: the link; its own nursery runs a serial
            │                            device's reader or Eve's fibre proxy
            └── nursery
                ├── _watch_signals       SIGTERM/SIGINT: stop (blocks in flight finish within
                │                        GRACE_PERIOD_S), SIGHUP: reopen the log, reread
                │                        the CRL files (auth.crl_file, delivery.sae_crl)
                ├── _watchdog            systemd WATCHDOG=1 while the loop and stores answer
                ├── _stop_on_store_failure   per link
                ├── _run_link            per link (under _supervise_link with several peers):
                │   ├── _run_alice       dial, one session at a time, back off and redial
                │   │   or _run_bob      listen, one task per accepted connection
                │   ├── PeerSession.run  writer, keepalive, reader (qkdnode.node.session)
                │   └── Exchange.run     event pump, link worker, post-processing threads,
                │                        reservations answered, the session's retirement
                ├── RelayService.run     with [relay]: relays through this node, pad fill,
                │                        retransmission (qkdnode.node.relaying)
                ├── KeyManager.run       delivery pools topped up ahead of requests
                ├── serve_delivery       ETSI GS QKD 014 over mutual TLS (one link's keys,
                │                        and relayed keys for SAEs at other nodes)
                └── serve_metrics        Prometheus, every link's metrics
    """
    nodes: list[Node] = []
    stores: list[Database] = []
    try:
        async with contextlib.AsyncExitStack() as links:
            for link in config.peers:
                view = config.for_peer(link)
                store = KeyStore.open(view.store.directory, node_name=config.node.name)
                stores.append(store)
                blocks = await links.enter_async_context(open_block_source(view))
                node = Node(view, store, blocks)
                node.audit.record(AuditKind.DAEMON_STARTED, **config_in_force(view))
                nodes.append(node)
            relay = None
            if config.relay is not None:
                relay_store = RelayStore.open(
                    config.store.directory / RELAY_DIRECTORY, node_name=config.node.name
                )
                stores.append(relay_store)
                relay = _relay_service(config, config.relay, relay_store, nodes)
            await _serve(nodes, config, on_reopen, early_stops, relay)
    except BaseException as exc:
        # say why before the clean-up below: a signal may end the process during it
        log.critical("daemon.failed", errors=_leaf_errors(exc))
        raise
    finally:
        for database in stores:
            database.close()
        log.info("daemon.stopped", blocks_committed=sum(n.counters.blocks_committed for n in nodes))
    return 0


def _relay_service(
    config: NodeConfig, section: RelaySection, store: RelayStore, nodes: Sequence[Node]
) -> RelayService:
    """The key relay over every link; each link's sessions hand it their relay frames."""
    delivering = next((n for n in nodes if n.config.delivery is not None), None)
    service = RelayService(
        section,
        node_name=config.node.name,
        store=store,
        links={node.peer_name: node for node in nodes},
        local_saes=config.delivery.local_saes if config.delivery is not None else (),
        delivery_node=delivering,
    )
    for node in nodes:
        node.relay = service
    return service


def _delivery_server(node: Node, config: NodeConfig) -> DeliveryServer | None:
    """The ETSI 014 server over ``node``'s key manager (the link delivery is bound to)."""
    if node.config.delivery is None or node.manager is None:
        return None
    app = DeliveryApp.from_config(node.config.delivery, node.manager)
    app.observer = node.metrics.delivery_request
    server = DeliveryServer(app, node.config.delivery.server)
    try:  # before any task runs: a CRL that does not load stops the start, named
        server.ssl_context, _ = delivery_ssl_context(node.config.delivery)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.expected, file=str(config.file)) from None
    return server


async def _serve(
    nodes: Sequence[Node],
    config: NodeConfig,
    on_reopen: Callable[[], None],
    early_stops: Sequence[int],
    relay: RelayService | None,
) -> None:
    several = len(nodes) > 1
    for node in nodes:
        log.info(
            "daemon.starting",
            role=node.config.node.role,
            peer=node.peer_name,
            auth=node.config.auth.mode,
            link=node.config.link_backend,
            pool_level_bits=node.ledger.level_bits,
            keys_available=node.store.counts().available,
        )
    delivering = next((n for n in nodes if n.config.delivery is not None), None)
    server = None if delivering is None else _delivery_server(delivering, config)
    if server is not None:
        server.app.relay = relay
    metrics: MetricsSource = (
        LinkMetricsSet(node=config.node.name, links=[n.metrics for n in nodes])
        if several
        else nodes[0].metrics
    )
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as serving:
            nursery.start_soon(
                _watch_signals,
                nodes,
                serving,
                on_reopen,
                early_stops,
                _revocation_reloads(nodes, server),
            )
            nursery.start_soon(_watchdog, nodes)
            nursery.start_soon(_probe_event_loop, nodes)
            trio.lowlevel.add_instrument(StepTimer(functools.partial(_record_step, nodes)))
            for node in nodes:
                nursery.start_soon(_stop_on_store_failure, node)
                # a link's failure never cancels another's: with several peers each link runs
                # under its own supervisor
                run = _supervise_link if several else _run_link
                await nursery.start(run, node, node.session_config())
            if relay is not None:
                await nursery.start(relay.run)
                log.info("relay.ready", remotes=sorted(relay.section.remotes))
            if delivering is not None and delivering.manager is not None and server is not None:
                delivery = delivering.config.delivery
                assert delivery is not None
                await nursery.start(delivering.manager.run)
                address, unix_path = await nursery.start(
                    functools.partial(serve_delivery, server=server), delivery, server.app
                )
                log.info(
                    "delivery.listening",
                    peer=delivering.peer_name,
                    url=f"https://{address[0]}:{address[1]}/api/v1/keys/",
                    unix_socket=str(unix_path) if unix_path else None,
                )
            if config.metrics_listen is not None:
                host, port = await nursery.start(serve_metrics, metrics, *config.metrics_listen)
                log.info("metrics.listening", url=f"http://{host}:{port}/metrics")
            roles = ", ".join(f"{n.config.node.role} to {n.peer_name}" for n in nodes)
            nodes[0].notifier.ready(
                f"{config.node.name}: serving ({roles if several else config.node.role})"
            )
            log.info("daemon.ready", peers=[n.peer_name for n in nodes])
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
