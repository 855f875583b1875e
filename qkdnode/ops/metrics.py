"""Prometheus metrics of one node, and a small HTTP listener serving them and a health summary.

``NodeMetrics`` owns its own ``prometheus_client.CollectorRegistry`` (never the process-global
one, so two nodes in one process or one test never share counters). The daemon calls its
methods as things happen (``block_committed``, ``block_aborted``, ``set_mode``,
``set_peer_connected``, ``delivery_request``, ...); values that are cheaper to read than to push
(store counts, link status, the ledger) are read by *refreshers* run just before each scrape.

A node with several peers has one ``NodeMetrics`` per link, served together by
``LinkMetricsSet``: every sample of a link carries a ``peer`` label (its peer's name).

``serve_metrics`` is a trio task (``nursery.start``) answering, over plain HTTP/1.1 (h11):

- ``GET /metrics``: the Prometheus text exposition format (version 0.0.4);
- ``GET /status``: a JSON health summary (see :meth:`NodeMetrics.summary`; with several peers
  ``{"node", "links": [one summary per link], "problems", "healthy"}``) read by
  ``qkdnode status``; HTTP 200 when healthy, 503 when not.

The listener is meant for loopback (the default ``127.0.0.1``). Nothing secret is exported:
every value is a count, a size, a ratio or a closed-set label (authentication modes, abort
reasons, configured SAE IDs); anything else becomes ``"other"`` or ``"unknown"``.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import json
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import h11
import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from qkdnode.channel.messages import SessionMode
from qkdnode.config.auth import DEFAULT_SECURITY_BUDGET_EPSILON
from qkdnode.link.interface import LinkState, LinkStatus
from qkdnode.ops.status import DEFAULT_MAX_COMMIT_AGE_S, health_problems
from qkdnode.postprocess.events import AbortReason

_log = structlog.get_logger("qkdnode.metrics")

# The classic text format: understood by every Prometheus server version.
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
AUTH_MODES: Final = ("none", *(mode.value for mode in SessionMode))
ABORT_REASONS: Final = tuple(reason.value for reason in AbortReason)
STORE_STATES: Final = ("staged", "available", "reserved", "delivered")
DEFAULT_RATE_WINDOW_S: Final = 300.0
# the event-loop lag reported is the largest seen over this long
LOOP_LAG_WINDOW_S: Final = 60.0
LOOP_STEP_BUCKETS_S: Final = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
MAX_ALARM_LABELS: Final = 32
# alarm names are lower-case words joined by underscores; anything else (say, a hex string)
# is exported as "other"
_ALARM_NAME: Final = re.compile(r"[a-z_]{1,40}")


def _finite_or_nan(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def _closed_label(value: str | enum.Enum, allowed: Collection[str], name: str) -> str:
    text = value.value if isinstance(value, enum.Enum) else value
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str or an enum member, got {type(value).__name__}")
    if text not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}")  # never echo the value
    return text


class NodeMetrics:
    """The metrics of one node, in a registry of its own (``self.registry``).

    ``clock`` is a monotonic clock (seconds) for ages and the key rate; ``wall_clock`` gives
    the Unix timestamps exported for alerting (``time() - qkdnode_last_commit_timestamp_seconds``).
    The secret key rate is the secret bits committed during the last ``rate_window_s`` seconds
    divided by that window (or by the uptime while it is shorter), computed at scrape time, so
    it falls to zero when keys stop flowing.
    """

    def __init__(
        self,
        *,
        node: str,
        peer: str,
        role: str,
        pool_target_bits: int,
        pool_reserve_bits: int,
        saes: Iterable[str] = (),
        rate_window_s: float = DEFAULT_RATE_WINDOW_S,
        max_commit_age_s: float = DEFAULT_MAX_COMMIT_AGE_S,
        security_budget_epsilon: float = DEFAULT_SECURITY_BUDGET_EPSILON,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if rate_window_s <= 0:
            raise ValueError("rate_window_s must be positive")
        self.node, self.peer, self.role = node, peer, role
        self.max_commit_age_s = max_commit_age_s
        self._saes = frozenset(saes)
        self._clock = clock
        self._wall_clock = wall_clock
        self._rate_window_s = rate_window_s
        self._started_s = clock()
        self._refreshers: list[Callable[[NodeMetrics], None]] = []
        self._init_summary_state(pool_target_bits, pool_reserve_bits)
        if not 0.0 < security_budget_epsilon < 1.0:
            raise ValueError("security_budget_epsilon must be in (0, 1)")
        self._security_budget_epsilon = security_budget_epsilon
        self.registry = CollectorRegistry(auto_describe=True)
        self._register_node_metrics()
        self._register_block_metrics()
        self._register_auth_metrics()
        self._register_store_delivery_and_link_metrics()
        self.set_mode("none")

    def _init_summary_state(self, pool_target_bits: int, pool_reserve_bits: int) -> None:
        """What /status reports, kept here: the registry is write-only for our purposes."""
        self._blocks_committed = 0
        self._blocks_aborted = 0
        self._abort_reasons: collections.Counter[str] = collections.Counter()
        self._secret_bits = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._last_commit_s: float | None = None
        self._last_qber: float | None = None
        self._mode = "none"
        self._peer_connected = False
        self._pool_level_bits = 0
        self._pool_reserve_bits = _count(pool_reserve_bits, "pool_reserve_bits")
        self._pool_target_bits = _count(pool_target_bits, "pool_target_bits")
        self._pool_consumed_bits: int | None = None
        self._pool_exhausted = False
        self._loop_lags: collections.deque[tuple[float, float]] = collections.deque()
        self._key_epsilon: float | None = None
        self._store: dict[str, int] | None = None
        self._link_state: str | None = None
        self._link_alarms_seen: tuple[str, ...] = ()
        self._alarm_labels: set[str] = set()
        self._link_alarm_labels: list[str] = []

    def _register_node_metrics(self) -> None:
        r = self.registry
        self.info = Gauge(
            "qkdnode_info", "Node identity (always 1).", ["node", "peer", "role"], registry=r
        )
        self.info.labels(node=self.node, peer=self.peer, role=self.role).set(1)
        self.start_time = Gauge(
            "qkdnode_start_time_seconds", "Unix time the node started.", registry=r
        )
        self.start_time.set(self._wall_clock())

    def _register_block_metrics(self) -> None:
        r = self.registry
        self.blocks = Counter(
            "qkdnode_blocks_total", "Blocks finished, by outcome.", ["outcome"], registry=r
        )
        self.blocks_aborted = Counter(
            "qkdnode_blocks_aborted_total", "Blocks aborted, by reason.", ["reason"], registry=r
        )
        for outcome in ("committed", "aborted"):
            self.blocks.labels(outcome=outcome)
        for reason in ABORT_REASONS:
            self.blocks_aborted.labels(reason=reason)
        self.qber = Gauge(
            "qkdnode_qber_ratio", "Quantum bit error rate of the last committed block.", registry=r
        )
        self.qber.set(math.nan)
        self.sifted_bits = Counter(
            "qkdnode_sifted_bits_total", "Sifted key bits of committed blocks.", registry=r
        )
        self.secret_bits = Counter(
            "qkdnode_secret_bits_total",
            "Secret bits handed to the store as consumer keys.",
            registry=r,
        )
        self.key_rate = Gauge(
            "qkdnode_secret_key_rate_bits_per_second",
            f"Secret bits per second over the last {self._rate_window_s:g} s.",
            registry=r,
        )
        self.key_rate.set_function(self.secret_key_rate_bits_per_second)
        self.efficiency = Gauge(
            "qkdnode_reconciliation_efficiency_ratio",
            "Reconciliation efficiency f of the last committed block (1 = Slepian-Wolf limit).",
            registry=r,
        )
        self.efficiency.set(math.nan)
        self.leaked_bits = Counter(
            "qkdnode_leaked_bits_total",
            "Bits disclosed by reconciliation and verification in committed blocks.",
            registry=r,
        )
        self.loop_lag = Gauge(
            "qkdnode_event_loop_lag_seconds",
            f"Largest delay of the event loop's probe timer over the last {LOOP_LAG_WINDOW_S:g} s "
            "(how long the loop was blocked).",
            registry=r,
        )
        self.loop_lag.set_function(self.event_loop_lag_max_s)
        self.loop_steps = Histogram(
            "qkdnode_event_loop_step_seconds",
            "Task steps of 1 ms or more (the event loop runs nothing else meanwhile), by task; "
            'task="unauthenticated_connection" counts every connection not yet authenticated.',
            ["task"],
            buckets=LOOP_STEP_BUCKETS_S,
            registry=r,
        )
        self.last_commit = Gauge(
            "qkdnode_last_commit_timestamp_seconds",
            "Unix time of the last committed block (0: none since start).",
            registry=r,
        )

    def _register_auth_metrics(self) -> None:
        r = self.registry
        self.pool_level = Gauge(
            "qkdnode_auth_pool_level_bits", "Authentication-key pool level.", registry=r
        )
        self.pool_reserve = Gauge(
            "qkdnode_auth_pool_reserve_bits", "Authentication-key pool reserve.", registry=r
        )
        self.pool_target = Gauge(
            "qkdnode_auth_pool_target_bits", "Authentication-key pool target level.", registry=r
        )
        self.pool_reserve.set(self._pool_reserve_bits)
        self.pool_target.set(self._pool_target_bits)
        self.pool_spent = Counter(
            "qkdnode_auth_pool_spent_bits_total",
            "Authentication-key bits spent (the ledger's consumed offset).",
            registry=r,
        )
        self.pool_exhausted = Gauge(
            "qkdnode_auth_pool_exhausted",
            "1 while the pool cannot pay for a block: none opens until an operator re-bootstraps.",
            registry=r,
        )
        self.key_epsilon = Gauge(
            "qkdnode_key_security_epsilon",
            "Epsilon of the last committed block's keys (its security statement).",
            registry=r,
        )
        self.key_epsilon.set(math.nan)
        self.security_budget = Gauge(
            "qkdnode_key_security_budget_epsilon",
            "The configured budget for that epsilon; past it the node alerts.",
            registry=r,
        )
        self.security_budget.set(self._security_budget_epsilon)
        self.auth_mode = Gauge(
            "qkdnode_auth_mode",
            "Authentication mode of the classical channel (1 for the current mode).",
            ["mode"],
            registry=r,
        )

    def _register_store_delivery_and_link_metrics(self) -> None:
        r = self.registry
        self.store_keys = Gauge(
            "qkdnode_store_keys", "Consumer keys in the store, by state.", ["state"], registry=r
        )
        for state in STORE_STATES:
            self.store_keys.labels(state=state)
        self.delivery_requests = Counter(
            "qkdnode_delivery_requests_total",
            "ETSI 014 requests, by calling SAE and HTTP status.",
            ["sae", "status"],
            registry=r,
        )
        self.link_up = Gauge(
            "qkdnode_link_up", "1 while the quantum link is open, else 0.", registry=r
        )
        self.link_alarms = Counter(
            "qkdnode_link_alarms_total",
            "Quantum-link alarms raised, by name.",
            ["alarm"],
            registry=r,
        )
        self.peer_connected = Gauge(
            "qkdnode_peer_connected",
            "1 while an authenticated session with the peer node is up.",
            registry=r,
        )

    def __repr__(self) -> str:
        return f"NodeMetrics(node={self.node!r}, peer={self.peer!r}, role={self.role!r})"

    # ---- events the daemon reports ---------------------------------------------------------
    def block_committed(
        self,
        *,
        qber: float,
        sifted_bits: int,
        leak_bits: int,
        reconciliation_efficiency: float,
        secret_bits: int,
        pool_level_bits: int,
        mode: str | enum.Enum,
    ) -> None:
        """Account one committed block (public statistics only; NaN efficiency is allowed)."""
        qber = _finite_or_nan(qber, "qber")
        efficiency = _finite_or_nan(reconciliation_efficiency, "reconciliation_efficiency")
        sifted_bits = _count(sifted_bits, "sifted_bits")
        leak_bits = _count(leak_bits, "leak_bits")
        secret_bits = _count(secret_bits, "secret_bits")
        pool_level_bits = _count(pool_level_bits, "pool_level_bits")
        self.set_mode(mode)
        now = self._clock()
        self._blocks_committed += 1
        self._secret_bits += secret_bits
        self._recent.append((now, secret_bits))
        self._last_commit_s = now
        self._last_qber = qber
        self.blocks.labels(outcome="committed").inc()
        self.qber.set(qber)
        self.sifted_bits.inc(sifted_bits)
        self.secret_bits.inc(secret_bits)
        self.leaked_bits.inc(leak_bits)
        self.efficiency.set(efficiency)
        self.last_commit.set(self._wall_clock())
        self._set_pool_level(pool_level_bits)
        self.set_pool_exhausted(False)

    def key_security(self, epsilon_total: float) -> None:
        """The epsilon of a committed block's keys (``KeySecurityStatement.epsilon_total``)."""
        epsilon = _finite_or_nan(epsilon_total, "epsilon_total")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon_total must be in [0, 1]")
        self._key_epsilon = epsilon
        self.key_epsilon.set(epsilon)

    def event_loop_lag(self, lag_s: float) -> None:
        """One probe: the event loop ran a timer ``lag_s`` seconds late."""
        now = self._clock()
        self._loop_lags.append((now, max(0.0, _finite_or_nan(lag_s, "lag_s"))))
        self._drop_old_lags(now)

    def event_loop_step(self, task: str, seconds: float) -> None:
        """One task step that held the event loop for ``seconds`` (``loopsteps.StepTimer``)."""
        self.loop_steps.labels(task=task).observe(max(0.0, _finite_or_nan(seconds, "seconds")))

    def _drop_old_lags(self, now: float) -> None:
        while self._loop_lags and self._loop_lags[0][0] < now - LOOP_LAG_WINDOW_S:
            self._loop_lags.popleft()

    def event_loop_lag_max_s(self) -> float:
        """The largest probe delay over the last ``LOOP_LAG_WINDOW_S`` (0 without probes)."""
        self._drop_old_lags(self._clock())
        return max((lag for _, lag in self._loop_lags), default=0.0)

    def set_pool_exhausted(self, exhausted: bool) -> None:
        self._pool_exhausted = bool(exhausted)
        self.pool_exhausted.set(1 if exhausted else 0)

    def block_aborted(self, reason: str | AbortReason) -> None:
        """Account one aborted block (``reason``: an ``AbortReason`` or its value)."""
        label = _closed_label(reason, ABORT_REASONS, "reason")
        self._blocks_aborted += 1
        self._abort_reasons[label] += 1
        self.blocks.labels(outcome="aborted").inc()
        self.blocks_aborted.labels(reason=label).inc()

    def set_mode(self, mode: str | enum.Enum) -> None:
        """The session's authentication mode (``SessionMode`` or its value, or ``"none"``)."""
        label = _closed_label(mode, AUTH_MODES, "mode")
        self._mode = label
        for name in AUTH_MODES:
            self.auth_mode.labels(mode=name).set(1 if name == label else 0)

    def set_peer_connected(self, connected: bool) -> None:
        self._peer_connected = bool(connected)
        self.peer_connected.set(1 if connected else 0)

    def set_auth_pool(self, *, level_bits: int, consumed_bits: int) -> None:
        """The ledger's level and consumed offset (``AuthKeyLedger.level_bits/consumed_bits``).

        The spent counter follows the consumed offset; a smaller offset than before means a
        new ledger, whose whole offset is then counted.
        """
        self._set_pool_level(_count(level_bits, "level_bits"))
        consumed_bits = _count(consumed_bits, "consumed_bits")
        previous = self._pool_consumed_bits
        step = (
            consumed_bits
            if previous is None or consumed_bits < previous
            else consumed_bits - previous
        )
        self.pool_spent.inc(step)
        self._pool_consumed_bits = consumed_bits

    def _set_pool_level(self, level_bits: int) -> None:
        self._pool_level_bits = level_bits
        self.pool_level.set(level_bits)

    def set_store_counts(self, counts: Any) -> None:
        """Key counts by state, from ``KeyStore.counts()`` (any object with the four fields)."""
        values = {state: _count(getattr(counts, state), state) for state in STORE_STATES}
        self._store = values
        for state, value in values.items():
            self.store_keys.labels(state=state).set(value)

    def delivery_request(self, sae: str, status: int) -> None:
        """One ETSI 014 request by ``sae`` answered with HTTP ``status``.

        SAE IDs outside the configured ``saes`` are counted as ``"unknown"``, so a client
        cannot grow the label set or put text of its choice into the metrics.
        """
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code (100-599)")
        label = sae if isinstance(sae, str) and sae in self._saes else "unknown"
        self.delivery_requests.labels(sae=label, status=str(status)).inc()

    def set_link_status(self, status: LinkStatus) -> None:
        """The link's health; alarms not seen in the previous status are counted once each."""
        self._link_state = status.state.value
        self.link_up.set(1 if status.state is LinkState.OPEN else 0)
        alarms = tuple(status.alarms)
        seen = self._link_alarms_seen
        # the link lists alarms since its open(): a list that does not extend the previous one
        # belongs to a new open(), and all of it is new
        fresh = alarms[len(seen) :] if alarms[: len(seen)] == seen else alarms
        for alarm in fresh:
            self.link_alarms.labels(alarm=self._alarm_label(alarm)).inc()
        self._link_alarms_seen = alarms
        self._link_alarm_labels = [self._alarm_label(alarm) for alarm in alarms]

    def _alarm_label(self, alarm: object) -> str:
        if not isinstance(alarm, str) or not _ALARM_NAME.fullmatch(alarm):
            return "other"
        if alarm not in self._alarm_labels and len(self._alarm_labels) >= MAX_ALARM_LABELS:
            return "other"
        self._alarm_labels.add(alarm)
        return alarm

    # ---- reading ---------------------------------------------------------------------------
    def add_refresher(self, refresh: Callable[[NodeMetrics], None]) -> None:
        """Call ``refresh(self)`` before each scrape, e.g. to read the store's counts."""
        self._refreshers.append(refresh)

    def refresh(self) -> None:
        """Run the refreshers; one that fails is logged and skipped (a scrape still answers)."""
        for refresh in self._refreshers:
            try:
                refresh(self)
            except Exception as exc:
                _log.warning("metrics.refresh_failed", error_type=type(exc).__name__)

    def secret_key_rate_bits_per_second(self) -> float:
        now = self._clock()
        while self._recent and self._recent[0][0] < now - self._rate_window_s:
            self._recent.popleft()
        span_s = min(self._rate_window_s, now - self._started_s)
        if span_s <= 0:
            return 0.0
        return sum(bits for _, bits in self._recent) / span_s

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this node's registry (after refreshing)."""
        self.refresh()
        return generate_latest(self.registry)

    def summary(self) -> dict[str, Any]:
        """The health summary served at ``/status`` (after refreshing); JSON-serialisable."""
        self.refresh()
        now = self._clock()
        summary: dict[str, Any] = {
            "node": self.node,
            "peer": self.peer,
            "role": self.role,
            "uptime_s": round(now - self._started_s, 3),
            "peer_connected": self._peer_connected,
            "auth_mode": self._mode,
            "pool_level_bits": self._pool_level_bits,
            "pool_reserve_bits": self._pool_reserve_bits,
            "pool_target_bits": self._pool_target_bits,
            "pool_exhausted": self._pool_exhausted,
            "key_epsilon": self._key_epsilon,
            "security_budget_epsilon": self._security_budget_epsilon,
            "blocks_committed": self._blocks_committed,
            "blocks_aborted": self._blocks_aborted,
            "abort_reasons": dict(self._abort_reasons),
            "last_commit_age_s": (
                None if self._last_commit_s is None else round(now - self._last_commit_s, 3)
            ),
            "last_qber": self._last_qber,
            "secret_bits": self._secret_bits,
            "secret_key_rate_bits_per_second": self.secret_key_rate_bits_per_second(),
            "keys": self._store,
            "link_state": self._link_state,
            "link_alarms": list(self._link_alarm_labels),
            "max_commit_age_s": self.max_commit_age_s,
            "event_loop_lag_max_s": round(self.event_loop_lag_max_s(), 6),
        }
        problems = health_problems(summary, max_commit_age_s=self.max_commit_age_s)
        summary["problems"] = problems
        summary["healthy"] = not problems
        return summary


# ---- several links -----------------------------------------------------------------------------


class MetricsSource(Protocol):
    """What the listener serves: one node's metrics or a ``LinkMetricsSet``."""

    def exposition(self) -> bytes: ...

    def summary(self) -> dict[str, Any]: ...


class _PeerLabelled(Collector):
    """Every link's families merged by name, each sample labelled with its link's ``peer``
    (``qkdnode_info`` has the label already)."""

    def __init__(self, links: Sequence[NodeMetrics]) -> None:
        self._links = links

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for link in self._links:
            for family in link.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                for sample in family.samples:
                    labels = dict(sample.labels)
                    labels.setdefault("peer", link.peer)
                    merged.samples.append(sample._replace(labels=labels))
        return list(families.values())


class LinkMetricsSet:
    """The metrics of a node with several peers, one ``NodeMetrics`` per link, served as one:
    ``/metrics`` with a ``peer`` label on every sample, ``/status`` listing the links (healthy
    when every link is; each problem names its peer)."""

    def __init__(self, *, node: str, links: Sequence[NodeMetrics]) -> None:
        if len({link.peer for link in links}) != len(links):
            raise ValueError("one NodeMetrics per peer")
        self.node = node
        self.links = tuple(links)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_PeerLabelled(self.links))

    def __repr__(self) -> str:
        return f"LinkMetricsSet(node={self.node!r}, peers={[m.peer for m in self.links]!r})"

    def exposition(self) -> bytes:
        for link in self.links:
            link.refresh()
        return generate_latest(self._registry)

    def summary(self) -> dict[str, Any]:
        links = [link.summary() for link in self.links]
        problems = [f"{s['peer']}: {problem}" for s in links for problem in s["problems"]]
        return {"node": self.node, "links": links, "problems": problems, "healthy": not problems}


# ---- the HTTP listener ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsServerLimits:
    max_connections: int = 16
    request_timeout_s: float = 10.0
    max_header_bytes: int = 8192


_RECEIVE_BYTES: Final = 8192


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_metrics(
    metrics: MetricsSource,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    limits: MetricsServerLimits = MetricsServerLimits(),
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and ``/status`` on host:port until cancelled.

    ``port`` 0 picks a free port; ``task_status.started`` reports the bound (host, port).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    if not is_loopback(host):
        _log.warning("metrics.not_loopback", host=host, detail="metrics reachable off this host")
    active = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= limits.max_connections:
            await trio.aclose_forcefully(stream)
            return
        active += 1
        try:
            await _serve_connection(stream, metrics, limits)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass  # the client went away or does not speak HTTP: just close
        except Exception as exc:
            _log.warning("metrics.connection_failed", error_type=type(exc).__name__)
        finally:
            active -= 1
            await trio.aclose_forcefully(stream)

    task_status.started((bound[0], bound[1]))
    await trio.serve_listeners(handler, listeners)


def respond(metrics: MetricsSource, method: str, target: str) -> tuple[int, str, bytes]:
    """(HTTP status, content type, body) for one request: the routing, free of I/O."""
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return 405, "text/plain; charset=utf-8", b"method not allowed\n"
    if path == "/metrics":
        return 200, METRICS_CONTENT_TYPE, metrics.exposition()
    if path == "/status":
        summary = metrics.summary()
        body = json.dumps(summary, allow_nan=False, default=_json_default).encode() + b"\n"
        return (200 if summary["healthy"] else 503), "application/json", body
    if path == "/":
        return 200, "text/plain; charset=utf-8", b"qkdnode: /metrics /status\n"
    return 404, "text/plain; charset=utf-8", b"not found\n"


def _json_default(value: object) -> object:
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


async def _serve_connection(
    stream: trio.SocketStream, metrics: MetricsSource, limits: MetricsServerLimits
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    while True:
        request: h11.Request | None = None
        with trio.move_on_after(limits.request_timeout_s):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(_RECEIVE_BYTES)))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
                # request bodies (h11.Data) are read and ignored: no endpoint takes one
        if request is None or conn.their_state not in (h11.DONE, h11.MUST_CLOSE):
            return
        method = request.method.decode("ascii", "replace")
        status, content_type, body = respond(
            metrics, method, request.target.decode("ascii", "replace")
        )
        headers = [("content-type", content_type), ("content-length", str(len(body)))]
        data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if method != "HEAD":
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        with trio.move_on_after(limits.request_timeout_s) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught or conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()
