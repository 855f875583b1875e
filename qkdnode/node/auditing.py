"""What the daemon writes to its audit trail (``qkdnode.store.audit``) beyond single events:
the configuration in force at start and the security failures that end sessions."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import structlog

from qkdnode.audit import AuditKind
from qkdnode.audit.budget import RecordingBudget
from qkdnode.audit.trail import AuditValue
from qkdnode.config import NodeConfig
from qkdnode.errors import CertificateRejected, KeyStoreError, SecurityError
from qkdnode.store.audit import AuditTrail

log = structlog.get_logger("qkdnode.audit")


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def config_in_force(config: NodeConfig) -> dict[str, AuditValue]:
    """The settings that matter to an auditor: identities, trust anchors (file paths, never
    their content), addresses, security parameters, and the SHA-256 of the config file."""
    try:
        config_sha256: str | None = hashlib.sha256(config.file.read_bytes()).hexdigest()
    except OSError:
        config_sha256 = None
    auth = config.auth
    fields: dict[str, AuditValue] = {
        "config_file": str(config.file),
        "config_sha256": config_sha256,
        "node": config.node.name,
        "role": config.node.role,
        "peer": config.peer.name,
        "peer_address": ":".join(map(str, config.peer.connect or config.peer.listen or ())),
        "auth_mode": auth.mode,
        "ca_file": _path(auth.ca_file),
        "crl_file": _path(auth.crl_file),
        "certificate_file": _path(auth.certificate_file),
        "psk_file": _path(auth.psk_file),
        "pool_target_bits": auth.pool_target_bits,
        "pool_reserve_bits": auth.pool_reserve_bits,
        "security_budget_epsilon": auth.security_budget_epsilon,
        "eps_sec": config.postprocess.eps_sec,
        "eps_cor": config.postprocess.eps_cor,
        "link_backend": config.link_backend,
        "store_directory": str(config.store.directory),
    }
    delivery = config.delivery
    if delivery is not None:
        fields |= {
            "kme_id": delivery.kme_id,
            "peer_kme_id": delivery.peer_kme_id,
            "delivery_address": f"{delivery.listen_host}:{delivery.listen_port}",
            "sae_ca": str(delivery.sae_ca),
            "sae_crl": _path(delivery.sae_crl),
            "local_saes": delivery.local_saes,
            "peer_saes": delivery.peer_saes,
        }
    return fields


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``'s (nested) groups, or ``error`` itself."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_exceptions(inner)]
    return [error]


# security failures recorded one by one: 20 at once, then one every 2 s (the rest are counted)
FAILURES_PER_S: Final = 0.5
FAILURE_BURST: Final = 20.0


class SessionFailureRecorder:
    """Records the security failures that end sessions (``on_failure`` of the session loops):
    a refused certificate, a tag or signature that did not verify, an exhausted key pool. The
    reason is the exception's text, which never holds secret material. Other endings (timeouts,
    a lost connection) are not security events and are not recorded. Past its budget
    (``qkdnode.audit.budget``) a failure is counted into the next entry instead."""

    def __init__(
        self,
        trail: AuditTrail,
        *,
        peer: str,
        clock: Callable[[], float] = time.monotonic,
        budget: RecordingBudget | None = None,
    ) -> None:
        self.trail = trail
        self.peer = peer
        self.clock = clock
        self.budget = budget or RecordingBudget(rate_per_s=FAILURES_PER_S, burst=FAILURE_BURST)

    def __call__(self, error: BaseException) -> None:
        for leaf in leaf_exceptions(error):
            if not isinstance(leaf, SecurityError):
                continue
            kind = (
                AuditKind.CERTIFICATE_REJECTED
                if isinstance(leaf, CertificateRejected)
                else AuditKind.AUTHENTICATION_FAILED
            )
            suppressed = self.budget.admit(kind.value, self.clock())
            if suppressed is None:
                continue
            fields: dict[str, AuditValue] = {
                "peer": self.peer,
                "error": type(leaf).__name__,
                "reason": str(leaf),
            }
            if suppressed:
                fields["suppressed_before"] = suppressed
            try:
                self.trail.record(kind, **fields)
            except KeyStoreError:
                log.critical("audit.write_failed", event=kind.value)
                raise
