"""The broker seam: everything that crosses connections passes through it.

A node attaches itself (a ``BrokerNode``); what one connection causes for another -- a receipt for a
sender, a control envelope for one device (a handoff step, a pairing answer), a notice for every device
of a user (presence, ``pair.request``, ``pair.joined``), a revocation, a feature's event (a state change)
-- is handed to the broker, which brings it to whichever attached node holds the connections concerned.

``memory.py`` is one process: every call reaches the attached nodes at once, in the caller's turn of the
event loop, so the order of what one connection sees is the order in which the server decided it (the
single-node behaviour the protocol documents). An engine for several nodes (Redis) keeps the same
promises per publisher, at a latency; ``tests/broker/test_contract.py`` states them once for every engine.
"""

from __future__ import annotations

import abc
from typing import Any

from ..contracts import BrokerNode


class Broker(abc.ABC):
    """Carries what crosses connections to the nodes that hold them. Event loop thread only."""

    spans_nodes = False  # True for an engine that connects several processes: what only they need is skipped

    def __init__(self) -> None:
        self._nodes: list[BrokerNode] = []  # the attached nodes of this process, in attach order

    @property
    def available(self) -> bool:
        """False while the engine cannot be reached (a node then refuses what it could not keep)."""
        return True

    def attach(self, node: BrokerNode) -> None:
        """From now on, ``node`` gets what is published for the connections it holds (once, however often
        it is attached)."""
        if node not in self._nodes:
            self._nodes.append(node)

    def detach(self, node: BrokerNode) -> None:
        """``node`` gets nothing more (it is stopping)."""
        if node in self._nodes:
            self._nodes.remove(node)

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect to the engine (nothing for memory)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect from the engine (nothing for memory)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Return once everything published so far has reached the attached nodes (memory: at once)."""

    @abc.abstractmethod
    def device_online(self, user: str, device: str) -> None:
        """An attached node now holds ``device``'s connection (a node that held it before closes its own)."""

    @abc.abstractmethod
    def device_offline(self, user: str, device: str) -> None:
        """The attached nodes hold no connection of ``device`` any more."""

    @abc.abstractmethod
    def held_elsewhere(self) -> list[tuple[str, str]]:
        """(user, device) of every device a live node other than this one holds."""

    @abc.abstractmethod
    def holder(self, user: str, device: str) -> str | None:
        """The live node other than this one that holds ``device``'s connection, or None (also when this one
        does, or nobody does)."""

    @abc.abstractmethod
    def to_device(self, user: str, device: str, envelope: dict[str, Any]) -> bool:
        """Write ``envelope`` to ``device``'s open connection, wherever it is. True if a connection took it;
        False if the device has none (the caller keeps what must not be lost, e.g. a receipt)."""

    @abc.abstractmethod
    def message_to_device(self, user: str, device: str, message: dict[str, Any]) -> bool:
        """A live message (fields of ``msg`` but ``seq``: id, from, type, body as msgpack bytes, ts) for
        ``device`` held by another node, which writes it with its own ``seq``. True if sent there."""

    @abc.abstractmethod
    def to_user(self, user: str, envelope: dict[str, Any], exclude: str | None = None) -> int:
        """Write ``envelope`` to every open connection of ``user`` except ``exclude``'s; how many took it."""

    @abc.abstractmethod
    def revoke_device(self, device: str, at: int) -> None:
        """Every node closes the device's connection (4410) and drops its resumable sessions."""

    @abc.abstractmethod
    def revoke_session(self, session_id: str, at: int) -> None:
        """Every node closes that session's connection (4410) or forgets it as resumable."""

    @abc.abstractmethod
    def publish(self, channel: str, payload: Any) -> None:
        """A feature's event for every node (``BrokerNode.deliver_event``), in publishing order."""
