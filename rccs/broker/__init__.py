"""The broker seam (``base.Broker``) and its engines: ``memory`` (one process), ``redis`` (several nodes)."""

from .base import FIRST_ACK_SETTLED, Broker, BrokerUnavailable
from .memory import MemoryBroker

__all__ = ["FIRST_ACK_SETTLED", "Broker", "BrokerUnavailable", "MemoryBroker", "open_broker"]


def open_broker(url: str = "memory", node_id: str | None = None) -> Broker:
    """The broker for ``url``: ``memory``, or ``redis://HOST:PORT/DB`` (needs the ``redis`` extra)."""
    if url == "memory":
        return MemoryBroker()
    if url.startswith(("redis://", "rediss://")):
        from .redis import RedisBroker  # redis-py is needed only by the nodes of a cluster

        return RedisBroker(url, node_id)
    raise ValueError(f"unknown broker {url!r}: 'memory' or a redis:// URL")
