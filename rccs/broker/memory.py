"""The in-process broker: today's single-node behaviour behind the broker seam."""

from __future__ import annotations

from typing import Any

from .base import Broker


class MemoryBroker(Broker):
    """Every call reaches the attached nodes synchronously, in attach order."""

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to disconnect from."""

    async def flush(self) -> None:
        """Everything was delivered when it was published."""

    def device_online(self, user: str, device: str) -> None:
        """One process: the routing table is the directory."""

    def device_offline(self, user: str, device: str) -> None:
        """One process: the routing table is the directory."""

    def held_elsewhere(self) -> list[tuple[str, str]]:
        return []

    def holder(self, user: str, device: str) -> str | None:
        return None  # one process: no other node

    def to_device(self, user: str, device: str, envelope: dict[str, Any]) -> bool:
        return any(node.deliver_to_device(user, device, envelope) for node in self._nodes)

    def message_to_device(self, user: str, device: str, message: dict[str, Any]) -> bool:
        return False  # one process: a device held here is reached through the routing table

    def to_user(self, user: str, envelope: dict[str, Any], exclude: str | None = None) -> int:
        return sum(node.deliver_to_user(user, envelope, exclude) for node in self._nodes)

    def revoke_device(self, device: str, at: int) -> None:
        for node in list(self._nodes):
            node.device_revoked(device, at)

    def revoke_session(self, session_id: str, at: int) -> None:
        for node in list(self._nodes):
            node.session_revoked(session_id, at)

    def publish(self, channel: str, payload: Any) -> None:
        for node in list(self._nodes):
            node.deliver_event(channel, payload)
