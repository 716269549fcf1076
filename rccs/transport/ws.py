"""The WebSocket listener: the fast path's ServerConnection (compiled or its twin).

See ``rccs/_fastpath/listener.py`` for how frames become messages, the
direct routing path and write coalescing.
"""

from .._fastpath import listener_impl

ServerConnection = listener_impl.ServerConnection
WriteCoalescer = listener_impl.WriteCoalescer

__all__ = ["ServerConnection", "WriteCoalescer"]
