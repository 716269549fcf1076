"""Closing after a 1009 so that the client reads the close frame instead of a TCP reset.

A client that sends more than ``max_message_bytes`` is refused while it is still writing: picows sends
the 1009 close as soon as it reads the frame header and closes the socket about 10 ms later (the listener
does the same for fragments that add up to too much). Closing a socket with unread data makes the kernel
answer with a reset, and a client that is still writing then sees the reset, not the close frame.

So the close that follows a 1009 is made gentle: the server half-closes (FIN after the close frame), reads
and throws away what is still coming, and really closes on the client's EOF, after ``DRAIN_SECONDS`` or
after ``DRAIN_MAX_BYTES`` discarded bytes, whichever comes first. picows then sees the disconnect as usual.

The hook is the transport's ``close``: picows and the listener both end a connection through
``underlying_transport.close()``. aiofastnet's transports (what picows serves on) take per-instance
attributes, so each connection's transport gets a stand-in ``close``; nothing on the read or write path
changes, and a connection that never sends 1009 closes exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

DRAIN_SECONDS = 2.0
DRAIN_MAX_BYTES = 64 * 1024 * 1024
MESSAGE_TOO_BIG = 1009

# Discarded input is read into this one buffer: connections that drain share it (reads are synchronous).
_SCRATCH = memoryview(bytearray(256 * 1024))


def close_gently_after_1009(ws_transport: Any) -> None:
    """Make the close of this connection drain first when the server's close frame said 1009.

    Called once per connection when the WebSocket handshake completes. A transport that does not take
    per-instance attributes (uvloop's, ``socket_transport = "uvloop"``) is left alone: it closes as before.
    """
    underlying = ws_transport.underlying_transport
    with contextlib.suppress(AttributeError):
        underlying.close = _GentleClose(underlying)


def close_code_sent(ws_transport: Any) -> int | None:
    """The code of the close frame this connection's server side sent (picows or rccs), None if none yet."""
    handshake = ws_transport.close_handshake
    if handshake is None or handshake.sent is None:
        return None
    return int(handshake.sent.code)


def close_code_not_echoed(ws_transport: Any) -> int | None:
    """The code of a close frame the server side sent first (not its answer to the client's close), or None."""
    handshake = ws_transport.close_handshake
    if handshake is None or handshake.sent is None or handshake.recv_then_sent:
        return None
    return int(handshake.sent.code)


def _restore_close(transport: Any) -> None:
    transport.__dict__.pop("close", None)  # the transport's own close from now on


class _GentleClose(asyncio.BufferedProtocol):
    """Stands in for ``transport.close``; while draining it is also the transport's (discarding) protocol.

    It refers to its transport weakly until draining starts, so an idle connection's transport and this
    stand-in (held in the transport's attributes) do not keep each other alive.
    """

    __slots__ = ("_discarded", "_timer", "_transport", "_transport_ref", "_ws_protocol")

    def __init__(self, transport: Any):
        self._transport_ref = weakref.ref(transport)
        self._transport: Any = None  # set while draining
        self._ws_protocol: Any = None
        self._discarded = 0
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        transport = self._transport_ref()
        if transport is None or self._transport is not None:
            return  # gone, or already draining: draining ends on its own terms
        ws_protocol = transport.get_protocol()
        if transport.is_closing() or not _sent_1009_unanswered(ws_protocol.transport):
            _restore_close(transport)
            transport.close()
            return
        self._transport = transport
        self._ws_protocol = ws_protocol
        if transport.can_write_eof():  # not over TLS: there the close frame is all the client gets
            transport.write_eof()
        transport.set_protocol(self)
        self._timer = asyncio.get_running_loop().call_later(DRAIN_SECONDS, self._cut_off)

    def _cut_off(self) -> None:
        """The client kept sending, or neither sent EOF nor closed, for too long: drop the connection."""
        _restore_close(self._transport)
        self._transport.abort()

    # ---- the discarding protocol, from the 1009 until the connection ends ------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH

    def buffer_updated(self, nbytes: int) -> None:
        self._discarded += nbytes
        if self._discarded > DRAIN_MAX_BYTES:
            self._cut_off()

    def eof_received(self) -> bool:
        _restore_close(self._transport)
        return False  # the client has sent everything: the transport closes itself (gracefully)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        _restore_close(self._transport)
        self._transport = None
        ws_protocol, self._ws_protocol = self._ws_protocol, None
        ws_protocol.connection_lost(exc)  # picows sees the disconnect as usual


def _sent_1009_unanswered(ws_transport: Any) -> bool:
    """The server's close frame said 1009 and the client has not answered it with its own close."""
    return close_code_sent(ws_transport) == MESSAGE_TOO_BIG and ws_transport.close_handshake.recv is None
