"""Token buckets keyed by client address (pairing redemption attempts, hellos)."""

from __future__ import annotations

MAX_LIMITER_ADDRESSES = 100_000


class TokenBucket:
    """``capacity`` attempts, refilled evenly; keyed buckets live in ``AddressLimiter``."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, capacity: float, now: float):
        self.tokens = capacity
        self.stamp = now


class AddressLimiter:
    """Per client address token buckets: ``capacity`` deep, refilled at ``rate`` per second."""

    def __init__(self, capacity: float, rate: float):
        self.capacity = float(capacity)
        self.rate = float(rate)
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, address: str, now: float) -> float:
        """0 if an attempt is allowed (and counted), else the seconds until the next one is."""
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= MAX_LIMITER_ADDRESSES:
                self._forget_idle(now)
            bucket = self._buckets[address] = TokenBucket(self.capacity, now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled (idle a minute): they would allow a full burst anyway.

        Runs only when the table is full, and then removes everything idle, so its cost is paid
        once per many new addresses, not per address."""
        self._buckets = {address: bucket for address, bucket in self._buckets.items() if now - bucket.stamp < 60.0}
        if len(self._buckets) >= MAX_LIMITER_ADDRESSES:  # all active: the oldest half goes
            ordered = sorted(self._buckets.items(), key=lambda item: item[1].stamp)
            self._buckets = dict(ordered[len(ordered) // 2:])
