"""The live connections of this node and the routing table that indexes them.

The hub is the only object sessions share. It owns the fast-path routing
table and counters, the device ownership map (which user each device id
belongs to), and plain counters that metrics read at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from . import __version__
from ._fastpath import IMPLEMENTATION, RouteStats, RoutingTable
from .auth import TokenAuthority
from .config import Settings

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("rccs.hub")


class Hub:
    """Connections of one node. Runs on the event loop thread only."""

    def __init__(self, settings: Settings, tokens: TokenAuthority):
        self.settings = settings
        self.tokens = tokens
        self.routing = RoutingTable()
        self.stats = RouteStats()
        self.sessions: set[Session] = set()
        # Device id -> user id for every device seen since start; a device id
        # belongs to one user for good, so selectors can refuse foreign ids.
        self.device_owners: dict[str, str] = {}
        self.errors_sent: Counter[str] = Counter()
        self.closes_sent: Counter[int] = Counter()
        self.receipts_undeliverable = 0
        self.started_at = time.time()
        self.accepting = True
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def connection_count(self) -> int:
        return len(self.sessions)

    def is_full(self) -> bool:
        return len(self.sessions) >= self.settings.max_connections

    def attach(self, session: Session) -> None:
        self.sessions.add(session)
        self._idle.clear()

    def detach(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no connection is open (used by shutdown and tests)."""
        await self._idle.wait()

    def owner_of(self, device: str) -> str | None:
        return self.device_owners.get(device)

    def register(self, session: Session) -> Session | None:
        """Make ``session`` the online connection of its device; returns the one it replaces."""
        assert session.user is not None and session.device is not None and session.info is not None
        self.device_owners[session.device] = session.user
        previous: Session | None = self.routing.add(  # type: ignore[assignment]
            session.user, session.device, session.info.type, session.info.capabilities, session
        )
        return previous

    def unregister(self, session: Session) -> None:
        if session.user is not None and session.device is not None:
            self.routing.remove(session.user, session.device, session)

    def online(self, user: str, device: str) -> Session | None:
        return self.routing.get(user, device)  # type: ignore[return-value]

    def send_receipt(self, user: str, device: str, receipt: dict[str, Any]) -> None:
        """Give a receipt to the sender device if it is online (v1 keeps no offline receipts)."""
        target = self.online(user, device)
        if target is None:
            self.receipts_undeliverable += 1
            return
        target.send_control(receipt)

    def close_all(self, code: int, reason: str) -> None:
        for session in list(self.sessions):
            session.close(code, reason)

    def server_info(self) -> dict[str, Any]:
        return {"version": __version__, "implementation": IMPLEMENTATION}
