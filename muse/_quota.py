"""Per-tenant event quotas: one token bucket per tenant.  No I/O.

A bucket refills at ``rate`` events per second up to ``burst`` events.  A
request takes as many tokens as it has events, all or nothing, so a tenant's
burst is refused with 429 for that tenant alone and other tenants never wait
behind it.  The clock is passed in, which keeps the arithmetic testable and
lets the engine use trio's (virtual in tests) clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from muse._errors import TooManyRequests

__all__ = ["QuotaPolicy", "Quotas"]


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """Events per second and the burst allowed above it."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.burst >= 1:
            raise ValueError(
                f"a quota needs rate > 0 and burst >= 1, got {self.rate}, {self.burst}"
            )


class Quotas:
    """Token buckets by tenant.

    Args:
        policies: tenant -> policy; ``*`` applies to tenants not listed.
            Tenants with no policy are not limited.
    """

    def __init__(self, policies: Mapping[str, QuotaPolicy]) -> None:
        self._policies = dict(policies)
        self._buckets: dict[str, list[float]] = {}
        self.refused = 0

    def __bool__(self) -> bool:
        return bool(self._policies)

    def take(self, tenant: str, events: int, now: float) -> None:
        """Charge ``events`` to the tenant's bucket.

        Raises:
            TooManyRequests: the bucket holds fewer tokens than ``events``;
                nothing is charged, and ``retry_after`` says when it will.
        """
        policy = self._policies.get(tenant) or self._policies.get("*")
        if policy is None:
            return
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = [policy.burst, now]
        tokens = min(policy.burst, bucket[0] + (now - bucket[1]) * policy.rate)
        bucket[1] = now
        if tokens < events:
            bucket[0] = tokens
            self.refused += 1
            wait = (events - tokens) / policy.rate
            raise TooManyRequests(
                f"tenant {tenant!r} is over its quota of {policy.rate:g} events/s "
                f"(burst {policy.burst:g})",
                retry_after=max(wait, 0.001),
            )
        bucket[0] = tokens - events
