"""Per-SAE fair use of the key store: a token bucket per master SAE, pure (``now`` injected).

Each SAE's bucket holds up to ``burst_keys`` tokens and refills at ``keys_per_s``; an enc_keys
request costs ``number * size_bits / key_size_bits`` tokens (a key of twice the stored size costs
two), so a consumer draining the store with large keys pays for it. Buckets are independent: one
SAE over its quota gets 429 while every other SAE keeps its own full rate, so no consumer can
starve the others. (Token bucket: Turner, "New directions in communications", IEEE Commun. Mag.
24(10), 1986.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qkdnode.errors import QkdError


class QuotaExceeded(QkdError):
    """The SAE is over its quota; ``retry_after_s`` is when the request would fit."""

    def __init__(self, sae_id: str, retry_after_s: float) -> None:
        super().__init__(f"SAE {sae_id!r} over its key quota; retry after {retry_after_s:.3f} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True, kw_only=True)
class FairUsePolicy:
    keys_per_s: float
    burst_keys: float
    key_size_bits: int

    def __post_init__(self) -> None:
        if not (self.keys_per_s > 0 and self.burst_keys >= 1 and self.key_size_bits > 0):
            raise ValueError("fair use needs keys_per_s > 0, burst_keys >= 1, key_size_bits > 0")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_s: float


@dataclass(slots=True)
class FairUse:
    """Token buckets keyed by SAE ID (only SAEs the caller authenticated reach it)."""

    policy: FairUsePolicy
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def cost(self, *, number: int, size_bits: int) -> float:
        return number * size_bits / self.policy.key_size_bits

    def _refill(self, sae_id: str, now: float) -> _Bucket:
        bucket = self._buckets.get(sae_id)
        if bucket is None:
            bucket = self._buckets[sae_id] = _Bucket(self.policy.burst_keys, now)
        elapsed = max(0.0, now - bucket.updated_s)  # a clock going backwards refills nothing
        bucket.tokens = min(
            self.policy.burst_keys, bucket.tokens + elapsed * self.policy.keys_per_s
        )
        bucket.updated_s = max(bucket.updated_s, now)
        return bucket

    def acquire(self, sae_id: str, cost: float, *, now: float) -> None:
        """Take ``cost`` tokens from the SAE's bucket or raise QuotaExceeded (taking none)."""
        bucket = self._refill(sae_id, now)
        if cost > bucket.tokens:
            if cost > self.policy.burst_keys:
                retry = math.inf  # larger than the bucket: never fits
            else:
                retry = (cost - bucket.tokens) / self.policy.keys_per_s
            raise QuotaExceeded(sae_id, retry)
        bucket.tokens -= cost

    def refund(self, sae_id: str, cost: float, *, now: float) -> None:
        """Give back tokens of a request that delivered nothing (no key material, peer down)."""
        bucket = self._refill(sae_id, now)
        bucket.tokens = min(self.policy.burst_keys, bucket.tokens + cost)
