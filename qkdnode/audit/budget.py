"""How many entries of one kind a source may add per second (pure: time comes in as ``now_s``).

Failures an outsider can cause at will (bad handshakes, refused SAE requests) would otherwise
grow the trail, and cost a durable commit each, as fast as the outsider sends them. Each source
gets a token bucket; an event past its budget is not recorded but counted, and the source's next
recorded entry says how many were left out before it (``suppressed_before``), so the trail keeps
the count of every event and each entry it does hold.
"""

from __future__ import annotations

from typing import Final

MAX_SOURCES: Final = 1024  # sources tracked one by one; any further share one bucket
_OTHER: Final = "\x00other"


class RecordingBudget:
    """A token bucket per source: ``burst`` entries at once, ``rate_per_s`` on average."""

    def __init__(self, *, rate_per_s: float, burst: float) -> None:
        if not (rate_per_s > 0 and burst >= 1):
            raise ValueError("a recording budget needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens: dict[str, float] = {}
        self._last_s: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def admit(self, source: str, now_s: float) -> int | None:
        """None: leave this event out (it is counted); else record it, noting the returned
        number of events of this source left out since its last recorded entry."""
        if source not in self._tokens and len(self._tokens) >= MAX_SOURCES:
            source = _OTHER
        elapsed_s = max(0.0, now_s - self._last_s.get(source, now_s))
        tokens = min(self.burst, self._tokens.get(source, self.burst) + elapsed_s * self.rate_per_s)
        self._last_s[source] = now_s
        if tokens < 1.0:
            self._tokens[source] = tokens
            self._suppressed[source] = self._suppressed.get(source, 0) + 1
            return None
        self._tokens[source] = tokens - 1.0
        return self._suppressed.pop(source, 0)
