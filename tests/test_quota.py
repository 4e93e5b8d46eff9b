"""Per-tenant token buckets, on a clock the test controls."""

from __future__ import annotations

import pytest

from muse._errors import TooManyRequests
from muse._quota import QuotaPolicy, Quotas


def test_burst_then_refill_at_rate() -> None:
    quotas = Quotas({"bank-01": QuotaPolicy(rate=100, burst=10)})
    quotas.take("bank-01", 10, now=0.0)
    with pytest.raises(
        TooManyRequests, match="over its quota of 100 events/s"
    ) as caught:
        quotas.take("bank-01", 1, now=0.0)
    assert caught.value.retry_after == pytest.approx(0.01)
    quotas.take("bank-01", 5, now=0.05)  # 50 ms refilled 5 tokens
    with pytest.raises(TooManyRequests):
        quotas.take("bank-01", 1, now=0.05)
    assert quotas.refused == 2


def test_one_tenant_burst_leaves_others_alone() -> None:
    quotas = Quotas({"*": QuotaPolicy(rate=10, burst=5)})
    with pytest.raises(TooManyRequests):
        quotas.take("bank-01", 6, now=0.0)
    quotas.take("bank-02", 5, now=0.0)
    quotas.take("bank-01", 5, now=0.0)  # a refused request charged nothing


def test_unlisted_tenants_are_unlimited_without_a_default() -> None:
    quotas = Quotas({"bank-01": QuotaPolicy(rate=1, burst=1)})
    quotas.take("bank-02", 10**6, now=0.0)


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="rate > 0"):
        QuotaPolicy(rate=0, burst=5)
