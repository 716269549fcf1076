"""The server's clock: milliseconds since the Unix epoch, as every ``ts``, ``server_time`` and expiry uses."""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
