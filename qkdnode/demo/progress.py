"""What the demo follows: the nodes' JSON logs, and the public progress counts read from them."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the errors that refuse the peer's bootstrap credentials (names as logged)
_REFUSALS = frozenset({"CertificateRejected", "WebOfTrustRefused"})


@dataclass(slots=True)
class Progress:
    """What the demo has seen in Alice's log."""

    committed: int = 0
    aborted: int = 0
    abort_reasons: Counter[str] = field(default_factory=Counter)
    secret_bits: int = 0
    sifted_bits: int = 0
    qbers: list[float] = field(default_factory=list)
    auth_mode: str = "none"
    modes_seen: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # why Alice refused Bob's credentials (certificate or web-of-trust refusals), in order
    refusals: list[str] = field(default_factory=list)
    started_s: float = field(default_factory=time.monotonic)
    first_commit_s: float | None = None

    @property
    def attempts(self) -> int:
        return self.committed + self.aborted

    def feed(self, event: dict[str, Any]) -> str | None:
        """Update from one log event; return a progress line worth printing, if any."""
        name = event.get("event")
        if name == "auth.mode":
            mode = str(event.get("mode"))
            if mode != self.auth_mode:
                self.auth_mode = mode
                self.modes_seen.append(mode)
                return f"authentication mode: {mode}"
        elif name == "block.committed":
            self.committed += 1
            if self.first_commit_s is None:
                self.first_commit_s = time.monotonic() - self.started_s
            self.secret_bits += int(event.get("secret_bits", 0))
            self.sifted_bits += int(event.get("sifted_bits", 0))
            qber = float(event.get("qber", 0.0))
            self.qbers.append(qber)
            elapsed = max(time.monotonic() - self.started_s, 1e-9)
            return (
                f"block {event.get('block')}: committed, QBER {100 * qber:.2f} %, "
                f"sifted {event.get('sifted_bits')} bits, secret {event.get('secret_bits')} bits "
                f"(f = {event.get('reconciliation_efficiency')}), "
                f"rate {self.sifted_bits / elapsed:,.0f} sifted / "
                f"{self.secret_bits / elapsed:,.0f} secret bit/s, auth {event.get('mode')}"
            )
        elif name == "block.aborted":
            self.aborted += 1
            reason = str(event.get("reason"))
            self.abort_reasons[reason] += 1
            return f"block {event.get('block')}: aborted ({reason}: {event.get('detail')})"
        elif name == "channel.session_failed" and event.get("error") in _REFUSALS:
            detail = str(event.get("detail"))
            self.refusals.append(detail)
            return f"peer refused: {detail}"
        elif event.get("level") in ("error", "critical"):
            self.errors.append(str(name))
            return f"error: {name} {event.get('error', '')}"
        return None


class LogFollower:
    """Reads new complete JSON lines from a growing log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = ""

    def new_events(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("r", encoding="utf-8") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            self._offset = handle.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                events.append(value)
        return events
