"""A broker's other side for tests: a node that records what reaches it."""

from typing import Any


class RecordingNode:
    """A node holding ``devices`` (user, device): records what reaches it, in order."""

    def __init__(self, *devices: tuple[str, str]):
        self.devices = set(devices)
        self.seen: list[tuple[Any, ...]] = []

    def deliver_to_device(self, user: str, device: str, envelope: dict[str, Any]) -> bool:
        if (user, device) not in self.devices:
            return False
        self.seen.append(("device", user, device, envelope))
        return True

    def deliver_to_user(self, user: str, envelope: dict[str, Any], exclude: str | None) -> int:
        reached = sorted(device for owner, device in self.devices if owner == user and device != exclude)
        for device in reached:
            self.seen.append(("device", user, device, envelope))
        return len(reached)

    def device_revoked(self, device: str, at: int) -> None:
        self.seen.append(("revoked device", device, at))

    def session_revoked(self, session_id: str, at: int) -> None:
        self.seen.append(("revoked session", session_id, at))

    def deliver_event(self, channel: str, payload: Any) -> None:
        self.seen.append(("event", channel, payload))

    def undeliverable(self, user: str, device: str, envelope: dict[str, Any]) -> None:
        self.seen.append(("undeliverable", user, device, envelope))

    def deliver_message(self, user: str, device: str, message: dict[str, Any]) -> bool:
        if (user, device) not in self.devices:
            return False
        self.seen.append(("msg", user, device, message))
        return True

    def device_gone(self, user: str, device: str) -> None:
        self.seen.append(("gone", user, device))

    def resubscribed(self) -> None:
        self.seen.append(("resubscribed",))

    def device_moved(self, user: str, device: str) -> None:
        if (user, device) in self.devices:  # a node acts only on a connection it holds
            self.devices.discard((user, device))
            self.seen.append(("moved", user, device))
