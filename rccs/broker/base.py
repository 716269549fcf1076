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
import time
from typing import Any

from ..contracts import BrokerNode

FIRST_ACK_SETTLED = "first_ack.settled"  # event: [user, sender device, msg id, winning device]


class BrokerUnavailable(Exception):
    """The engine could not be reached for a call that needs its answer (a first_ack claim)."""


class Broker(abc.ABC):
    """Carries what crosses connections to the nodes that hold them. Event loop thread only."""

    spans_nodes = False  # True for an engine that connects several processes: what only they need is skipped

    def __init__(self) -> None:
        self._nodes: list[BrokerNode] = []  # the attached nodes of this process, in attach order
        # One process: (user, sender, msg id) -> (winning device, monotonic expiry) of first_ack claims.
        self._first_ack_claims: dict[tuple[str, str, str | int], tuple[str, float]] = {}

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

    async def claim_first_ack(self, user: str, sender: str, msg_id: str | int, device: str | None,
                              keep_ms: int) -> str | None:
        """The arbiter of a ``first_ack`` message whose copies are on several nodes: atomically, the first
        device to claim (user, sender, msg_id) wins and stays the winner for ``keep_ms``. Returns the winner:
        ``device`` if this claim won, another device if one won before, None if ``device`` is None (only a
        look) and nobody has won yet. A claim that wins makes every other node hear ``FIRST_ACK_SETTLED``
        (``BrokerNode.deliver_event``) with [user, sender, msg_id, device]; the caller settles its own node.
        Raises BrokerUnavailable while the engine cannot be reached: nothing was claimed then, or the claim
        that was taken is found by the next call (a claim by the same device is answered with it).

        This one-process version keeps the claims in memory (there is no other node to tell)."""
        key = (user, sender, msg_id)
        now = time.monotonic()
        held = self._first_ack_claims.get(key)
        if held is not None and held[1] > now:
            return held[0]
        if device is None:
            return None
        for stale in [k for k, (_, expiry) in self._first_ack_claims.items() if expiry <= now]:
            del self._first_ack_claims[stale]
        self._first_ack_claims[key] = (device, now + keep_ms / 1000)
        return device

    def to_node(self, node: str, channel: str, payload: Any) -> bool:
        """A feature's event for one other node only (its ``BrokerNode.deliver_event``), in publishing order
        with everything else this node sends; False if ``node`` is not a live node other than this one."""
        return False  # one process: no other node
