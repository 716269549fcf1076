"""Routing table and hot-path counters, pure-Python twin of ``_routing.pyx``.

The table maps each user to its online devices, with indexes by device type
and by capability, so a selector resolves without scanning other users. Every
entry carries an activity stamp from a table-wide counter; ``pick_one``
prefers the highest stamp (the most recently active device).

Handles are opaque to the table (the server stores its session objects).
All methods run on the event loop thread; none of them blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

SELECT_ALL = 0
SELECT_TYPE = 1
SELECT_CAPABILITY = 2

RESULT_ROUTED = 0
RESULT_NO_ROUTE = 1
RESULT_OFFLINE = 2
RESULT_REJECTED = 3
RESULT_NAMES = ("routed", "no_route", "offline", "rejected")

# Upper bounds, in microseconds, of the routing latency histogram buckets.
LATENCY_BUCKETS_US = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000)
# Latencies are clamped to [0, one minute] so every sum stays a small exact integer.
MAX_LATENCY_NS = 60_000_000_000
# Largest count accepted by one count_frames call.
MAX_FRAMES_PER_CALL = 2**32 - 1


class _Entry:
    __slots__ = ("capabilities", "device", "device_type", "handle", "stamp")

    def __init__(self, handle: object, device: str, device_type: str, capabilities: tuple[str, ...], stamp: int):
        self.handle = handle
        self.device = device
        self.device_type = device_type
        self.capabilities = capabilities
        self.stamp = stamp


class RoutingTable:
    """Online devices per user, indexed by device, type and capability."""

    def __init__(self) -> None:
        self._users: dict[str, dict[str, _Entry]] = {}
        self._by_type: dict[tuple[str, str], dict[str, _Entry]] = {}
        self._by_capability: dict[tuple[str, str], dict[str, _Entry]] = {}
        self._type_counts: dict[str, int] = {}
        self._clock = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, user: str, device: str, device_type: str, capabilities: Iterable[str], handle: object) -> object:
        """Register ``handle`` as the online connection of (user, device).

        Returns the handle it replaced (the same device connected again), or None.
        """
        if type(user) is not str or type(device) is not str or type(device_type) is not str:
            raise TypeError("user, device and device_type must be str")
        caps = tuple(dict.fromkeys(capabilities))
        for cap in caps:
            if type(cap) is not str:
                raise TypeError("capabilities must be str")
        previous = self._unlink(user, device)
        self._clock += 1
        entry = _Entry(handle, device, device_type, caps, self._clock)
        self._users.setdefault(user, {})[device] = entry
        self._by_type.setdefault((user, device_type), {})[device] = entry
        for cap in caps:
            self._by_capability.setdefault((user, cap), {})[device] = entry
        self._type_counts[device_type] = self._type_counts.get(device_type, 0) + 1
        self._size += 1
        return previous

    def remove(self, user: str, device: str, handle: object) -> bool:
        """Remove (user, device) if ``handle`` is still its connection. True if removed."""
        devices = self._users.get(user)
        if devices is None:
            return False
        entry = devices.get(device)
        if entry is None or entry.handle is not handle:
            return False
        self._unlink(user, device)
        return True

    def _unlink(self, user: str, device: str) -> object:
        devices = self._users.get(user)
        if devices is None:
            return None
        entry = devices.pop(device, None)
        if entry is None:
            return None
        if not devices:
            del self._users[user]
        _discard(self._by_type, (user, entry.device_type), device)
        for cap in entry.capabilities:
            _discard(self._by_capability, (user, cap), device)
        remaining = self._type_counts[entry.device_type] - 1
        if remaining:
            self._type_counts[entry.device_type] = remaining
        else:
            del self._type_counts[entry.device_type]
        self._size -= 1
        return entry.handle

    def touch(self, user: str, device: str) -> None:
        """Mark (user, device) as the most recently active of its user's devices."""
        devices = self._users.get(user)
        if devices is not None:
            entry = devices.get(device)
            if entry is not None:
                self._clock += 1
                entry.stamp = self._clock

    def get(self, user: str, device: str) -> object:
        """The online handle of (user, device), or None."""
        devices = self._users.get(user)
        if devices is None:
            return None
        entry = devices.get(device)
        return None if entry is None else entry.handle

    def most_recent(self, user: str, devices: list[str]) -> object:
        """Handle of the most recently active online device among ``devices``, or None."""
        online = self._users.get(user)
        if online is None:
            return None
        best: _Entry | None = None
        for device in devices:
            entry = online.get(device)
            if entry is not None and (best is None or entry.stamp > best.stamp):
                best = entry
        return None if best is None else best.handle

    def devices(self, user: str) -> list[str]:
        """Ids of the user's online devices, in no particular order."""
        devices = self._users.get(user)
        return [] if devices is None else list(devices)

    def select(self, user: str, kind: int, value: object, pick_one: bool, exclude: object) -> list[object]:
        """Handles of the user's online devices matching a selector.

        ``kind`` is SELECT_ALL (``value`` ignored), SELECT_TYPE or
        SELECT_CAPABILITY (``value`` the str to match). ``exclude`` is a device
        id left out (the sender), or None. With ``pick_one`` at most one
        handle is returned: the most recently active match.
        """
        if kind == SELECT_ALL:
            candidates = self._users.get(user)
        elif kind == SELECT_TYPE:
            candidates = self._by_type.get((user, value))  # type: ignore[arg-type]
        elif kind == SELECT_CAPABILITY:
            candidates = self._by_capability.get((user, value))  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown selector kind {kind}")
        if not candidates:
            return []
        if pick_one:
            best: _Entry | None = None
            for device, entry in candidates.items():
                if device != exclude and (best is None or entry.stamp > best.stamp):
                    best = entry
            return [] if best is None else [best.handle]
        return [entry.handle for device, entry in candidates.items() if device != exclude]

    def count_by_type(self) -> dict[str, int]:
        """Online devices per device type, across users."""
        return dict(self._type_counts)


def _discard(index: dict[tuple[str, str], dict[str, _Entry]], key: tuple[str, str], device: str) -> None:
    bucket = index.get(key)
    if bucket is not None:
        bucket.pop(device, None)
        if not bucket:
            del index[key]


class RouteStats:
    """Plain counters the hot path bumps; metrics read them at scrape time."""

    def __init__(self) -> None:
        self._results = [0] * len(RESULT_NAMES)
        self._buckets = [0] * (len(LATENCY_BUCKETS_US) + 1)
        self._latency_sum_ns = 0
        self._frames_in = 0
        self._frames_out = 0

    def record_route(self, result: int, latency_ns: int) -> None:
        """Count one routed ``send`` with its result and server-side latency (clamped to 0..MAX_LATENCY_NS)."""
        if type(result) is not int or not 0 <= result < len(RESULT_NAMES):
            raise ValueError(f"unknown result {result!r}")
        if type(latency_ns) is not int:
            raise TypeError("latency_ns must be an int")
        latency_ns = min(max(latency_ns, 0), MAX_LATENCY_NS)
        self._results[result] += 1
        self._latency_sum_ns += latency_ns
        latency_us = latency_ns / 1000.0
        index = 0
        for bound in LATENCY_BUCKETS_US:
            if latency_us <= bound:
                break
            index += 1
        self._buckets[index] += 1

    def count_frames(self, frames_in: int, frames_out: int) -> None:
        """Add to the messages-in and messages-out counters."""
        for count in (frames_in, frames_out):
            if type(count) is not int or not 0 <= count <= MAX_FRAMES_PER_CALL:
                raise ValueError("frame counts must be ints in 0..2**32-1")
        self._frames_in += frames_in
        self._frames_out += frames_out

    def snapshot(self) -> dict[str, object]:
        """A consistent copy: results by name, latency buckets (non-cumulative), sums, frames."""
        return {
            "results": dict(zip(RESULT_NAMES, self._results, strict=True)),
            "latency_buckets": list(self._buckets),
            "latency_sum_ns": self._latency_sum_ns,
            "frames_in": self._frames_in,
            "frames_out": self._frames_out,
        }
